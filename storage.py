"""Files in and out: a download that never hands a partial or empty file to the loader, an upload
of the adapter to S3-compatible storage, and the optional callback.

The runpod SDK's `rp_ssrf.safe_get` does the address checks (public addresses only unless
RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true, every redirect hop re-checked, the connection pinned to
the checked address). This module adds what a training job needs on top: streaming to a temporary
file with a size cap, retries with backoff on transient failures only, a check of the received
length, errors that name the cause and the fix, and no signed token in any message.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import requests
import urllib3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
from runpod.serverless.utils import rp_ssrf

from compat import pinned_session
from files import atomic_file, new_file
from job import JobError, redact_text, redact_url
from settings import APP_STORAGE_HELP, WorkerSettings

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
BUNDLED_DATA = (Path(__file__).parent / "data").resolve()  # the sample a smoke test reads as file:data/...
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Download:
    path: Path
    bytes: int
    sha256: str
    attempts: int


class _Retryable(Exception):
    """A transient failure: worth another attempt."""


class LinkExpired(JobError):
    """The dataset's signed URL has expired (the storage said so, not another refusal)."""


EXPIRED = ("dataset URL has expired (the app signs dataset links for 1 hour in its pipeline flow, 24 hours in the "
           "legacy one, and a job that waits longer in RunPod's queue finds its link expired): resubmit the job")


def _expired_or_denied(status: int, body: str) -> JobError | None:
    """Supabase answers an expired signed URL with 400 and {"error":"InvalidJWT","message":"\"exp\" claim timestamp
    check failed"}, and a bad signature with the same error and "invalid signature"."""
    text = body.lower()
    if '"exp" claim' in text or "\\\"exp\\\" claim" in text or "jwt expired" in text or "token expired" in text \
            or "expiredtoken" in text or "request has expired" in text:
        return LinkExpired(EXPIRED)
    if status in (401, 403) or "invalidjwt" in text:
        return JobError(f"dataset URL was refused (HTTP {status}): the signature is invalid or lacks access; create "
                        "a new signed URL and resubmit")
    return None


def _status_error(status: int, body: str, shown: str) -> JobError:
    reason = _expired_or_denied(status, body)
    if reason:
        return reason
    if status == 404:
        return JobError(f"dataset not found (HTTP 404) at {shown}: check the file still exists in storage, then "
                        "resubmit")
    try:
        detail = json.loads(body).get("message") if body.strip().startswith("{") else None
    except (ValueError, AttributeError):
        detail = None
    suffix = f" ({detail})" if isinstance(detail, str) else ""
    return JobError(f"dataset download failed with HTTP {status}{suffix} at {shown}: check the URL and resubmit")


def _body(response, deadline: float, max_bytes: int, shown: str):
    """The response's body as it arrives (`read1`: whatever bytes are there, so a server that sends one byte at a
    time cannot keep a read going past the deadline), held to `max_bytes` and to the total deadline."""
    total = 0
    while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
        total += len(chunk)
        if total > max_bytes:
            raise JobError(f"dataset is larger than the worker's limit of {max_bytes} bytes: split it or raise "
                           "MAX_DATASET_BYTES")
        if time.monotonic() > deadline:
            raise _Deadline(f"the download from {shown} did not finish in time ({total} bytes received)")
        yield chunk


class _Deadline(JobError):
    pass


def _fetch_once(url: str, part: Path, *, max_bytes: int, timeout: float, deadline: float,
                credentials: dict | None = None) -> tuple[int, str]:
    shown = redact_url(url)
    try:
        # identity: the byte count must be the one Content-Length announces (a gzip file stays gzip). With credentials
        # no redirect is followed: they are for this host alone.
        response = rp_ssrf.safe_get(url, stream=True, timeout=timeout, max_bytes=max_bytes,
                                    headers={"Accept-Encoding": "identity", **(credentials or {})},
                                    **({"max_redirects": 0} if credentials else {}))
    except rp_ssrf.SSRFError as exc:
        message = str(exc).replace(url, shown)
        if "size cap" in message:
            raise JobError(f"dataset is larger than the worker's limit of {max_bytes} bytes: split it or raise "
                           "MAX_DATASET_BYTES") from None
        raise JobError(
            f"dataset URL refused: {message}. The worker downloads only from public addresses; "
            "for a local run set RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true"
        ) from None
    except requests.Timeout:
        raise _Retryable(f"no answer within {timeout:g} s from {shown}") from None
    except requests.ConnectionError:
        raise _Retryable(f"could not connect to {shown}") from None

    with response:
        if response.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {response.status_code} from {shown}")
        if response.status_code != 200:
            body = response.raw.read(4096, decode_content=True).decode("utf-8", "replace")
            raise _status_error(response.status_code, body, shown)
        declared = response.headers.get("Content-Length")
        digest, received = hashlib.sha256(), 0
        try:
            with os.fdopen(new_file(part), "wb") as out:
                for chunk in _body(response, deadline, max_bytes, shown):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
        except (urllib3.exceptions.HTTPError, requests.RequestException, http.client.HTTPException):
            raise _Retryable(f"connection to {shown} dropped after {received} bytes") from None
    encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
    if declared is not None and declared.isdigit() and not encoded and int(declared) != received:
        raise _Retryable(f"received {received} of the {declared} bytes announced by {shown}")
    if received == 0:
        raise JobError(f"dataset at {shown} is empty (0 bytes): check the export in the app and resubmit")
    return received, digest.hexdigest()


def _copy_local_file(url: str, dest: Path, max_bytes: int) -> Download:
    source = Path(unquote(urlsplit(url).path))
    if not source.is_file():
        raise JobError(f"dataset file {source} does not exist")
    size = source.stat().st_size
    if size == 0:
        raise JobError(f"dataset file {source} is empty (0 bytes)")
    if size > max_bytes:
        raise JobError(f"dataset is larger than the worker's limit of {max_bytes} bytes: split it or raise "
                       "MAX_DATASET_BYTES")
    digest = hashlib.sha256()
    with open(source, "rb") as src, atomic_file(dest) as out:
        for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):  # streamed: never the whole file in memory
            out.write(chunk)
            digest.update(chunk)
    return Download(dest, size, digest.hexdigest(), 1)


def download_dataset(url: str, dest: Path, *, max_bytes: int, timeout: float = 60.0, retries: int = 4,
                     backoff_s: float = 1.0, allow_file_urls: bool = False, deadline_s: float = 1800.0,
                     credentials: dict | None = None) -> Download:
    """Download `url` to `dest`, atomically: `dest` exists only if every byte arrived.

    Retries (with exponential backoff) connection errors, timeouts, dropped or short bodies,
    429 and 5xx; any other status fails at once with a message that says what to do (LinkExpired for an
    expired signed URL). `timeout` bounds each wait for bytes; `deadline_s` the whole download, retries
    included. `credentials`: headers sent to this URL's host alone (no redirect is followed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        bundled = Path(unquote(urlsplit(url).path)).resolve().is_relative_to(BUNDLED_DATA)
        if not (allow_file_urls or bundled):
            raise JobError("file:// dataset URLs are disabled (only the worker's bundled sample is readable): pass an "
                           "http(s) URL, or set ALLOW_FILE_URLS=true for a local run")
        return _copy_local_file(url, dest, max_bytes)
    if scheme not in ("http", "https"):
        raise JobError(f"dataset_url must be http(s), got {scheme or 'no'} scheme")

    part = dest.with_name(dest.name + ".part")
    last, deadline = "", time.monotonic() + deadline_s
    for attempt in range(1, retries + 2):
        try:
            size, sha = _fetch_once(url, part, max_bytes=max_bytes, timeout=timeout, deadline=deadline,
                                    credentials=credentials)
        except _Deadline as exc:
            part.unlink(missing_ok=True)
            raise JobError(f"{exc} within DOWNLOAD_DEADLINE_S={deadline_s:g} s: check the storage's speed, or raise "
                           "the setting for a large dataset, and resubmit") from None
        except _Retryable as exc:
            last = str(exc)
            part.unlink(missing_ok=True)
            if attempt <= retries:
                delay = backoff_s * 2 ** (attempt - 1)
                if time.monotonic() + delay > deadline:
                    break
                log.warning("download attempt %d failed: %s; retrying in %.1f s", attempt, last, delay)
                time.sleep(delay)
            continue
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)
        log.info("downloaded %s: %d bytes, sha256 %s", redact_url(url), size, sha)
        return Download(dest, size, sha, attempt)
    raise JobError(f"dataset download failed after {attempt} attempt{'s' if attempt > 1 else ''}: {last}. Check "
                   "that the storage is reachable and resubmit")


SIGNED_PATH = "/storage/v1/object/sign/"


def supabase_object(url: str, supabase_url: str | None) -> str | None:
    """For a Supabase signed URL on the deployment's own project
    (`<SUPABASE_URL>/storage/v1/object/sign/<bucket>/<path>`), the same object's authenticated URL
    (`.../object/authenticated/<bucket>/<path>`, read with the service key); None for any other URL.

    >>> # the token's payload: {"url": "training-files/u/d.jsonl"}
    >>> token = "e30." + "eyJ1cmwiOiJ0cmFpbmluZy1maWxlcy91L2QuanNvbmwifQ" + ".sig"
    >>> supabase_object(f"https://p.supabase.co/storage/v1/object/sign/training-files/u/d.jsonl?token={token}", "https://p.supabase.co")
    'https://p.supabase.co/storage/v1/object/authenticated/training-files/u/d.jsonl'
    >>> supabase_object(f"https://p.supabase.co/storage/v1/object/sign/training-files/u/other.jsonl?token={token}", "https://p.supabase.co")
    >>> supabase_object(f"https://evil.example/storage/v1/object/sign/training-files/u/d.jsonl?token={token}", "https://p.supabase.co")
    """
    if not supabase_url:
        return None
    link, own = urlsplit(url), urlsplit(supabase_url)
    same_host = (link.scheme, link.hostname, link.port) == (own.scheme, own.hostname, own.port)
    base = own.path.rstrip("/")
    if not same_host or not link.path.startswith(base + SIGNED_PATH) or ".." in link.path.split("/"):
        return None
    rest = link.path[len(base + SIGNED_PATH):]
    if "/" not in rest.strip("/") or _signed_object(link.query) != unquote(rest):
        return None  # only the object the app signed: Storage checks a token's expiry before the path it names
    return f"{supabase_url.rstrip('/')}/storage/v1/object/authenticated/{rest}"


def _signed_object(query: str) -> str | None:
    """The `<bucket>/<path>` a Supabase signed URL's token was issued for (its JWT's `url` claim; not verified here:
    Storage verified the signature when it answered that the token had expired)."""
    try:
        payload = parse_qs(query)["token"][0].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims["url"] if isinstance(claims.get("url"), str) else None
    except (KeyError, IndexError, ValueError, TypeError):
        return None


def upload_files(files: list[Path], job_id: str, settings: WorkerSettings) -> dict[str, str]:
    """Upload `files` to `<bucket>/<prefix>/<job_id>/<name>`; return name → presigned GET URL.

    Any S3-compatible store that signs GET links works (Supabase Storage's S3 endpoint, AWS S3,
    Cloudflare R2; not RunPod's network-volume S3 API). Nothing is deleted here: the local files stay.
    """
    client = _s3_client(settings)
    urls = {}
    for path in files:
        key = _s3_key(settings, job_id, path.name)
        try:
            client.upload_file(str(path), settings.s3_bucket, key)
            urls.update(presigned_urls([path.name], job_id, settings, client))
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
            raise JobError(
                f"could not upload {path.name} to bucket {settings.s3_bucket!r} at "
                f"{redact_url(settings.s3_endpoint_url)}: {type(exc).__name__}: {exc}. The adapter is kept on the "
                "volume; check the S3_* settings and resubmit"
            ) from None
        log.info("uploaded %s (%d bytes) to s3://%s/%s", path.name, path.stat().st_size, settings.s3_bucket, key)
    return urls


def check_storage(settings: WorkerSettings, job_id: str) -> None:
    """Before any work: a test file uploads to the job's prefix, and a presigned link to it downloads the
    same bytes with a plain GET and no credentials, as the app will fetch the adapter. Wrong keys, a
    missing bucket, or a store that cannot sign links fail the job here, in a second, not after training."""
    client = _s3_client(settings)
    key, body = _s3_key(settings, job_id, ".storage-check"), f"storage check of job {job_id}\n".encode()
    where = f"bucket {settings.s3_bucket!r} at {redact_url(settings.s3_endpoint_url)}"
    try:
        client.put_object(Bucket=settings.s3_bucket, Key=key, Body=body)
    except (BotoCoreError, ClientError) as exc:
        raise JobError(f"the adapter's storage refused a test upload to {where} ({_s3_reason(exc)}): check "
                       "S3_BUCKET, S3_REGION, S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY. Nothing was downloaded or "
                       "trained") from None
    try:
        url = client.generate_presigned_url("get_object", ExpiresIn=300,
                                            Params={"Bucket": settings.s3_bucket, "Key": key})
        response = requests.get(url, timeout=30, allow_redirects=False)
        answer = f"HTTP {response.status_code}" if response.content != body else None
    except requests.RequestException as exc:
        answer = f"{type(exc).__name__}"
    finally:
        try:
            client.delete_object(Bucket=settings.s3_bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not delete the storage check file %s (%s)", key, _s3_reason(exc))
    if answer:
        raise JobError(f"a presigned download link from {where} does not return the file it signs ({answer}): the "
                       "app could not download the adapter. Use storage that supports presigned GET URLs "
                       f"({APP_STORAGE_HELP}), and check that S3_REGION is the bucket's region. Nothing was downloaded "
                       "or trained")


def _s3_reason(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {redact_text(str(error.get('Message', '')))}".rstrip(": ")
    if isinstance(exc, NoCredentialsError):
        return "no credentials: set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY"
    if isinstance(exc, EndpointConnectionError):
        return "could not connect"
    return f"{type(exc).__name__}: {redact_text(str(exc))}"


def _s3_client(settings: WorkerSettings):
    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id, aws_secret_access_key=settings.s3_secret_access_key,
        # Checksums only where S3 requires them: botocore's default (since 1.36) sends aws-chunked bodies with
        # CRC32 trailers, which S3-compatible stores other than AWS often refuse; AWS and R2 are unaffected.
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      request_checksum_calculation="when_required", response_checksum_validation="when_required",
                      retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120),
    )


def _s3_key(settings: WorkerSettings, job_id: str, name: str) -> str:
    return f"{settings.s3_prefix.strip('/')}/{job_id}/{name}".lstrip("/")


def presigned_urls(names: list[str], job_id: str, settings: WorkerSettings, client=None) -> dict[str, str]:
    """Fresh presigned GET URLs for files already uploaded under `<prefix>/<job_id>/` (signing is local)."""
    client = client or _s3_client(settings)
    return {name: client.generate_presigned_url("get_object", ExpiresIn=settings.presigned_url_expiry_s,
                                                Params={"Bucket": settings.s3_bucket,
                                                        "Key": _s3_key(settings, job_id, name)})
            for name in names}


def post_callback(url: str, payload: dict, timeout: float = 10.0, deadline_s: float = 30.0) -> bool:
    """One best-effort POST of the final status; a failure is logged, never raised. `timeout` bounds each wait for
    the receiver, `deadline_s` the whole exchange: a receiver slower than that (one that sends its answer a byte at a
    time, say) is left to its thread and the job's result is returned without waiting for it."""
    shown, answer = redact_url(url), {}

    def post() -> None:
        try:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("callback_url must be an http(s) URL")
            ips = rp_ssrf.resolve_and_validate(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
            # Dial the address that was checked (as the SDK's safe_get does): no DNS rebinding in between.
            with pinned_session(ips[0]) as session:
                # stream: only the status is read, never a body the receiver could make endless
                with session.post(url, json=payload, timeout=timeout, allow_redirects=False, stream=True) as response:
                    answer["status"] = response.status_code
        except Exception as exc:  # noqa: BLE001 - the callback must never fail a job
            answer["error"] = exc

    thread = threading.Thread(target=post, name="callback", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        log.warning("callback to %s failed: no answer within %g s; the job's result is returned without it",
                    shown, deadline_s)
        return False
    if "error" in answer:
        exc = answer["error"]
        reason = "could not connect" if isinstance(exc, requests.ConnectionError) else redact_text(str(exc))
        log.warning("callback to %s failed: %s: %s", shown, type(exc).__name__, reason)
        return False
    log.info("callback %s answered HTTP %d", shown, answer["status"])
    return 200 <= answer["status"] < 400
