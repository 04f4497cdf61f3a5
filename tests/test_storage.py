"""Downloads against a real HTTP server on loopback: every failure named, nothing partial kept."""

import hashlib

import pytest

from conftest import SAMPLE, free_port
from job import JobError
from storage import LinkExpired, download_dataset


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
    with pytest.raises(LinkExpired, match=r"dataset URL has expired \(the app signs dataset links for 1 hour .*\): resubmit the job"):
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
    import gzip as gz
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = SAMPLE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # ignores Accept-Encoding: identity, as some CDNs do
            body = gz.compress(data)
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
    from job import WorkerSettings
    from storage import upload_files
    from conftest import S3_KEYS

    settings = WorkerSettings.from_env({"S3_ENDPOINT_URL": s3[0], "S3_BUCKET": "no-such-bucket", **S3_KEYS})
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(JobError, match="could not upload adapter_config.json to bucket 'no-such-bucket'.*check the S3_"):
        upload_files([tmp_path / "adapter_config.json"], "job-x", settings)
