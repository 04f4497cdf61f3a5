"""Downloads against real HTTP servers on loopback: every failure named, nothing partial kept; the SSRF guard
(public addresses only, every redirect checked, the app's credentials never sent on; no traffic leaves the machine);
servers that send a byte at a time held to their deadlines, the dataset's and the callback's."""

import gzip
import hashlib
import ipaddress
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from runpod.serverless.utils import rp_ssrf

from conftest import S3_KEYS, SAMPLE, free_port
from job import JobError
from settings import WorkerSettings
from storage import LinkExpired, download_dataset, post_callback, upload_files


@pytest.fixture
def private_ok(monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")


def fetch(url, tmp_path, **kw):
    kw.setdefault("max_bytes", 10**8)
    return download_dataset(url, tmp_path / "out" / "dataset.download", retries=2, backoff_s=0.01, **kw)


def test_download_writes_every_byte_and_its_hash(storage, tmp_path, private_ok):
    got = fetch(storage.url(SAMPLE.name, storage.good), tmp_path)
    data = SAMPLE.read_bytes()
    assert got.path.read_bytes() == data and got.bytes == len(data)
    assert got.sha256 == hashlib.sha256(data).hexdigest() and got.attempts == 1


def test_expired_signed_url_says_resubmit(storage, tmp_path, private_ok):
    with pytest.raises(LinkExpired, match=r"dataset URL has expired \(the app signs dataset links for 1 hour .*\): "
                                          r"resubmit the job"):
        fetch(storage.url(SAMPLE.name, storage.old), tmp_path)
    assert storage.hits[SAMPLE.name] == 1  # not retried


def test_a_bad_signature_is_refused_not_taken_for_an_expired_link(storage, tmp_path, private_ok):
    with pytest.raises(JobError, match=r"dataset URL was refused \(HTTP 400\): the signature is invalid") as exc:
        fetch(storage.url(SAMPLE.name, "sig-forged"), tmp_path)
    assert not isinstance(exc.value, LinkExpired) and "sig-forged" not in str(exc.value)


def test_missing_file_is_a_404_message_without_the_token(storage, tmp_path, private_ok):
    with pytest.raises(JobError, match="not found") as exc:
        fetch(storage.url("nope.jsonl", storage.good), tmp_path)
    assert storage.good not in str(exc.value)


def test_503_twice_then_200_succeeds_on_the_third_attempt(storage, tmp_path, private_ok):
    storage.fail_first[SAMPLE.name] = 2
    got = fetch(storage.url(SAMPLE.name, storage.good), tmp_path)
    assert got.attempts == 3 and got.path.read_bytes() == SAMPLE.read_bytes()


def test_a_body_cut_short_is_never_kept(storage, tmp_path, private_ok):
    storage.cut[SAMPLE.name] = 1000
    with pytest.raises(JobError, match="failed after 3 attempts"):
        fetch(storage.url(SAMPLE.name, storage.good), tmp_path)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_empty_body_is_an_error(storage, tmp_path, private_ok):
    (storage.root / "empty.jsonl").write_bytes(b"")
    with pytest.raises(JobError, match=r"empty \(0 bytes\)"):
        fetch(storage.url("empty.jsonl", storage.good), tmp_path)


def test_the_size_cap_is_enforced(storage, tmp_path, private_ok):
    with pytest.raises(JobError, match="larger than the worker's limit of 1000 bytes"):
        fetch(storage.url(SAMPLE.name, storage.good), tmp_path, max_bytes=1000)


def test_unreachable_host_is_retried_then_named(tmp_path, private_ok):
    with pytest.raises(JobError, match="could not connect"):
        fetch(f"http://127.0.0.1:{free_port()}/x.jsonl?token=abc", tmp_path)


def test_loopback_is_refused_without_the_private_switch_and_never_contacted(storage, tmp_path, monkeypatch):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    with pytest.raises(JobError, match="only from public addresses") as exc:
        fetch(storage.url(SAMPLE.name, storage.good), tmp_path)
    assert storage.hits[SAMPLE.name] == 0
    assert storage.good not in str(exc.value)


def test_file_urls_need_the_setting_except_for_the_bundled_sample(tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_bytes(SAMPLE.read_bytes())
    (tmp_path / "link.jsonl").symlink_to(outside)
    escape = f"file://{SAMPLE.parent}/../../{outside.relative_to('/')}"  # data/../.. leads out of the bundled folder
    for url in (outside.as_uri(), (tmp_path / "link.jsonl").as_uri(), escape, "file:/etc/hostname"):
        with pytest.raises(JobError, match="only the worker's bundled sample is readable.*ALLOW_FILE_URLS"):
            fetch(url, tmp_path / "d")
    assert fetch(outside.as_uri(), tmp_path / "d", allow_file_urls=True).bytes == SAMPLE.stat().st_size
    assert fetch(SAMPLE.as_uri(), tmp_path / "d").bytes == SAMPLE.stat().st_size  # the smoke test's sample


def test_429_is_retried(storage, tmp_path, private_ok):
    storage.fail_status, storage.fail_first[SAMPLE.name] = 429, 1
    assert fetch(storage.url(SAMPLE.name, storage.good), tmp_path).attempts == 2


def test_a_server_slower_than_the_timeout_is_named(storage, tmp_path, private_ok):
    storage.delay[SAMPLE.name] = 1.5
    with pytest.raises(JobError, match=r"no answer within 0.5 s") as exc:
        fetch(storage.url(SAMPLE.name, storage.good), tmp_path, timeout=0.5)
    assert storage.hits[SAMPLE.name] == 3 and storage.good not in str(exc.value)
    assert not (tmp_path / "out" / "dataset.download").exists()


def test_a_server_that_gzips_the_body_anyway_still_delivers_the_file(tmp_path, private_ok):
    data = SAMPLE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # ignores Accept-Encoding: identity, as some CDNs do
            body = gzip.compress(data)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    got = fetch(f"http://127.0.0.1:{server.server_address[1]}/d.jsonl", tmp_path)
    assert got.path.read_bytes() == data
    server.shutdown()


def test_an_upload_to_a_missing_bucket_says_what_to_check(tmp_path, s3):
    settings = WorkerSettings.from_env({"S3_ENDPOINT_URL": s3[0], "S3_BUCKET": "no-such-bucket", **S3_KEYS})
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(JobError,
                       match="could not upload adapter_config.json to bucket 'no-such-bucket'.*check the S3_"):
        upload_files([tmp_path / "adapter_config.json"], "job-x", settings)


class Dripping:
    """A server on loopback that answers every request with `head` and then `body`, one byte every `every_s` seconds:
    never silent long enough for a read timeout, never done."""

    def __init__(self, head: bytes, body: bytes, every_s: float):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.head, self.body, self.every_s = self.sock.getsockname()[1], head, body, every_s
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.head)
                for byte in self.body:
                    if self.done.wait(self.every_s):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def close(self):
        self.done.set()
        self.sock.close()


def test_a_download_sent_a_byte_at_a_time_ends_at_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    server = Dripping(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n", b"x" * 400, 0.1)  # 40 s to the end
    try:
        start = time.monotonic()
        with pytest.raises(JobError, match=r"did not finish in time \(\d+ bytes received\) within "
                                           r"DOWNLOAD_DEADLINE_S=1 s: check the storage's speed"):
            download_dataset(f"http://127.0.0.1:{server.port}/d.jsonl?token=t", tmp_path / "d", max_bytes=10**6,
                             timeout=2, retries=3, backoff_s=0.01, deadline_s=1)
        assert time.monotonic() - start < 15  # the deadline plus one read's wait at most, not the body's 40 s
        assert list(tmp_path.iterdir()) == []  # no partial file kept
    finally:
        server.close()


def test_a_callback_receiver_answering_a_byte_at_a_time_cannot_hold_the_job(monkeypatch, caplog):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    # its status line, slowly
    server = Dripping(b"", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + b" " * 400, 0.1)
    try:
        start = time.monotonic()
        assert post_callback(f"http://127.0.0.1:{server.port}/cb", {"id": "j", "status": "COMPLETED"},
                             timeout=2, deadline_s=1) is False
        assert time.monotonic() - start < 15 and "no answer within 1 s" in caplog.text
    finally:
        server.close()


NON_PUBLIC = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1",
              "fe80::1", "fc00::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1"]


REFUSED = (r"dataset URL refused: .* The worker downloads only from public addresses; "
           r"for a local run set RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true")


@pytest.fixture
def guard_on(monkeypatch):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)


@pytest.fixture
def dialled(monkeypatch) -> list[str]:
    """Every address this process's sockets try to connect to during the test; any but loopback is refused here,
    so nothing leaves the machine."""
    tried, connect = [], socket.socket.connect

    def recording(sock, address):
        tried.append(address[0])
        if not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            raise ConnectionRefusedError(f"the test lets no connection leave this machine ({address[0]})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording)
    return tried


def url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def resolving(monkeypatch, name: str, address: str) -> None:
    """A stubbed DNS answer: `name` resolves to `address`, every other host as usual."""
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real(address if host == name else host, *a, **k))


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_are_refused(address, tmp_path, guard_on, dialled):
    """A dataset URL naming a loopback, private, link-local (the cloud metadata service), shared, unspecified or
    IPv4-mapped address: refused naming the setting, no connection tried, nothing written, the token not shown."""
    assert not rp_ssrf.is_safe_address(address)
    with pytest.raises(JobError, match=REFUSED) as refused:
        download_dataset(f"http://{url_host(address)}:8080/d.jsonl?token=planted-token", tmp_path / "out" / "d",
                         max_bytes=10**7, retries=2, backoff_s=0.01)
    assert dialled == [] and "planted-token" not in str(refused.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_public_addresses_are_allowed(tmp_path, guard_on, dialled):
    """The guard lets a public address through to the connection (which the test refuses: nothing leaves here)."""
    assert rp_ssrf.is_safe_address("8.8.8.8") and rp_ssrf.is_safe_address("2606:4700:4700::1111")
    for address in ("8.8.8.8", "2606:4700:4700::1111"):
        with pytest.raises(JobError, match=r"failed after 1 attempt: could not connect to") as failed:
            download_dataset(f"http://{url_host(address)}/d.jsonl?token=t", tmp_path / "d", max_bytes=10**7, retries=0)
        assert "refused" not in str(failed.value)
    assert dialled == ["8.8.8.8", "2606:4700:4700::1111"]


class Counting(ThreadingHTTPServer):
    """A loopback server that counts its requests and answers every GET with `answer(handler)`."""

    def __init__(self, host, answer):
        self.hits = 0
        self.headers_seen = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits += 1
                server.headers_seen.append(dict(self.headers))
                answer(self)

        super().__init__((host, 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def serve_sample(handler):
    body = SAMPLE.read_bytes()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def redirecting_to(location: str):
    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return redirect


def public_on(monkeypatch, *loopbacks: str) -> None:
    """These loopback addresses play public servers: the guard's decision is the SDK's, asked through its module."""
    real = rp_ssrf.is_safe_address
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip in loopbacks or real(ip))


def test_a_hostname_resolving_to_a_private_address_is_refused_before_any_connection(tmp_path, guard_on, monkeypatch):
    target = Counting("127.0.0.1", serve_sample)
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k)
                        if host == "datasets.example.com" else real(host, *a, **k))  # a stubbed DNS answer
    with pytest.raises(JobError, match="only from public addresses"):
        download_dataset(f"http://datasets.example.com:{target.server_address[1]}/d.jsonl?token=t", tmp_path / "d",
                         max_bytes=10**7, retries=0)
    assert target.hits == 0
    target.shutdown()


@pytest.mark.parametrize("address", ["169.254.169.254", "10.1.2.3", "fd00::1", "::ffff:127.0.0.1"])
def test_a_hostname_with_any_non_public_address_among_its_answers_is_refused_unconnected(address, tmp_path, guard_on,
                                                                                         monkeypatch, dialled):
    """DNS rebinding: a name answering a public and a non-public address is refused whole, before any connection."""
    real = socket.getaddrinfo
    answers = lambda host, *a, **k: [*real("8.8.8.8", *a, **k), *real(address, *a, **k)]  # noqa: E731
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: answers(host, *a, **k)
                        if host == "datasets.example.com" else real(host, *a, **k))
    with pytest.raises(JobError, match=REFUSED + "|" + f"non-public address {address}"):
        download_dataset("http://datasets.example.com/d.jsonl?token=t", tmp_path / "d", max_bytes=10**7, retries=2,
                         backoff_s=0.01)
    assert dialled == []


def test_a_redirect_from_a_public_server_to_a_private_one_is_refused(tmp_path, guard_on, monkeypatch):
    private = Counting("127.0.0.1", serve_sample)

    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", f"http://127.0.0.1:{private.server_address[1]}/latest/meta-data/")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    public = Counting("127.0.0.2", redirect)
    real = rp_ssrf.is_safe_address
    # 127.0.0.2 plays "public"
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.2" or real(ip))
    with pytest.raises(JobError, match="non-public address 127.0.0.1"):
        download_dataset(f"http://127.0.0.2:{public.server_address[1]}/d.jsonl", tmp_path / "d", max_bytes=10**7,
                         retries=0)
    assert (public.hits, private.hits) == (1, 0)
    assert not (tmp_path / "d").exists()
    public.shutdown()
    private.shutdown()


@pytest.mark.parametrize("location", ["http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                                      "http://[::1]:8080/", "http://10.0.0.5/d.jsonl", "http://metadata.internal/",
                                      "file:///etc/passwd"])
def test_a_redirect_to_the_metadata_service_a_private_host_or_a_file_is_refused_unfollowed(location, tmp_path, guard_on,
                                                                                          monkeypatch, dialled):
    resolving(monkeypatch, "metadata.internal", "169.254.169.254")
    public_on(monkeypatch, "127.0.0.2")
    public = Counting("127.0.0.2", redirecting_to(location))
    try:
        with pytest.raises(JobError, match=r"dataset URL refused: .*(non-public address|blocked URL scheme 'file')"):
            download_dataset(f"http://127.0.0.2:{public.server_address[1]}/d.jsonl?token=t", tmp_path / "out" / "d",
                             max_bytes=10**7, retries=2, backoff_s=0.01)
        assert public.hits == 1 and set(dialled) == {"127.0.0.2"}  # the redirect's target was never dialled
        assert list((tmp_path / "out").iterdir()) == []
    finally:
        public.shutdown()


def test_the_app_storages_credentials_never_follow_a_redirect(tmp_path, guard_on, monkeypatch):
    """The service-role key goes to the app's own Storage host alone: a redirect, even to a public host, is not
    followed with it (the same redirect without credentials is)."""
    public_on(monkeypatch, "127.0.0.2", "127.0.0.3")
    elsewhere = Counting("127.0.0.3", serve_sample)
    own = Counting("127.0.0.2", redirecting_to(f"http://127.0.0.3:{elsewhere.server_address[1]}/d.jsonl"))
    url = f"http://127.0.0.2:{own.server_address[1]}/storage/v1/object/d.jsonl?token=planted-token"
    try:
        with pytest.raises(JobError, match=r"dataset URL refused: exceeded maximum redirects \(0\)") as refused:
            download_dataset(url, tmp_path / "d", max_bytes=10**7, retries=0,
                             credentials={"Authorization": "Bearer planted-key", "apikey": "planted-key"})
        assert (own.hits, elsewhere.hits) == (1, 0) and own.headers_seen[0]["apikey"] == "planted-key"
        assert "planted-key" not in str(refused.value) and "planted-token" not in str(refused.value)
        assert download_dataset(url, tmp_path / "d", max_bytes=10**7, retries=0).bytes == SAMPLE.stat().st_size
        assert elsewhere.hits == 1 and "apikey" not in elsewhere.headers_seen[0]
    finally:
        own.shutdown()
        elsewhere.shutdown()


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "10.1.2.3"])
def test_a_callback_to_a_non_public_address_is_never_sent(address, guard_on, dialled, caplog):
    """The callback is best effort: refused, it is logged (without its signature) and the job's result stands."""
    with caplog.at_level(logging.WARNING):
        assert post_callback(f"http://{address}:8080/cb?sig=planted-sig", {"id": "j", "status": "COMPLETED"},
                             timeout=2, deadline_s=5) is False
    assert dialled == [] and f"non-public address {address}" in caplog.text and "planted-sig" not in caplog.text
