"""The adapter as the one archive the app deploys: `<job_id>.tar.gz` holding `adapter/` with every file the adapter
needs to load and serve, and its upload to the app's Supabase Storage (`lora-models/adapters/<job_id>.tar.gz`).

The app's deployer downloads the archive from the bucket, un-tars it in memory stripping one leading folder
(`adapter/x.json` -> `x.json`, hidden files skipped) and pushes the files to a Hugging Face repo for its vLLM endpoint.

Uploads go through Supabase Storage's own API with the service key: a standard upload (supabase-py's `storage3`) up
to Supabase's 6 MB recommendation, a resumable one (TUS 1.0.0, in 6 MiB chunks as Supabase requires) above it, which
`storage3` does not offer: that protocol is spoken here over httpx, storage3's own HTTP client. Either replaces an
earlier upload of the same job (`x-upsert`). The object is then checked: its size, and its MD5 where the API's ETag is
one (a single-part object; a multipart ETag is a hash of the parts' hashes as the storage backend cut them).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from storage3 import SyncStorageClient
from storage3.exceptions import StorageApiError

from files import atomic_file
from job import JobError, redact_text
from settings import WorkerSettings

log = logging.getLogger(__name__)

TUS_CHUNK = 6 * 1024 * 1024  # Supabase's resumable uploads take chunks of exactly 6 MiB (the last one excepted)
STANDARD_UPLOAD_MAX = 6 * 1000 * 1000  # Supabase recommends resumable uploads above 6 MB
RETRIES = 5  # per request, with exponential backoff from 1 s, after timeouts, lost connections, 5xx and 429
FOLDER = "adapter"


@dataclass(frozen=True)
class Archive:
    path: Path
    bytes: int
    sha256: str
    md5: str

    def describe(self) -> dict:
        return {"name": self.path.name, "bytes": self.bytes, "sha256": self.sha256}


def build_archive(adapter_dir: Path, dest: Path) -> Archive:
    """`dest` (`<job_id>.tar.gz`): the adapter's files under one folder `adapter/`, written atomically."""
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    with atomic_file(dest) as out:
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for path in files:
                info = tar.gettarinfo(str(path), arcname=f"{FOLDER}/{path.name}")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(dest, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
            md5.update(chunk)
    archive = Archive(dest, dest.stat().st_size, sha256.hexdigest(), md5.hexdigest())
    log.info("archive %s: %d files, %d bytes, sha256 %s", dest.name, len(files), archive.bytes, archive.sha256)
    return archive


def storage_path(settings: WorkerSettings, job_id: str) -> tuple[str, str]:
    """(bucket, object path) of a job's archive; `f"{bucket}/{path}"` is what the row's `adapter_file_path` holds."""
    return settings.supabase_bucket, f"{settings.supabase_adapter_prefix.strip('/')}/{job_id}.tar.gz".lstrip("/")


def _client(settings: WorkerSettings):
    key = settings.supabase_service_role_key
    return httpx.Client(headers={"apikey": key, "Authorization": f"Bearer {key}"}, follow_redirects=False,
                        timeout=httpx.Timeout(120.0, connect=10.0))


def upload_archive(archive: Archive, settings: WorkerSettings, job_id: str) -> str:
    """Upload the archive to the app's Storage, replacing an earlier one of this job, and check it arrived whole.
    Returns `<bucket>/<path>`, the row's `adapter_file_path`."""
    bucket, path = storage_path(settings, job_id)
    base = f"{settings.supabase_url.rstrip('/')}/storage/v1/"
    with _client(settings) as http:
        if archive.bytes <= STANDARD_UPLOAD_MAX:
            bucket_api = SyncStorageClient(base, dict(http.headers), http_client=http).from_(bucket)
            _retried(lambda: bucket_api.upload(path, archive.path,
                                               {"upsert": "true", "content-type": "application/gzip"}),
                     archive, settings, "upload")
        else:
            _tus_upload(http, base, bucket, path, archive, settings)
        _check_uploaded(SyncStorageClient(base, dict(http.headers), http_client=http).from_(bucket), path, archive,
                        settings)
    log.info("uploaded %s (%d bytes) to Supabase Storage %s/%s", archive.path.name, archive.bytes, bucket, path)
    return f"{bucket}/{path}"


def signed_url(settings: WorkerSettings, job_id: str, expires_s: int) -> str:
    """A link to the job's archive that anyone can GET for `expires_s` seconds."""
    bucket, path = storage_path(settings, job_id)
    with _client(settings) as http:
        bucket_api = SyncStorageClient(f"{settings.supabase_url.rstrip('/')}/storage/v1/", dict(http.headers),
                                       http_client=http).from_(bucket)
        return _retried(lambda: bucket_api.create_signed_url(path, expires_s), None, settings, "signing")["signedURL"]


def _too_large(archive: Archive) -> JobError:
    return JobError(f"the adapter archive ({archive.bytes / 1e6:.1f} MB) is above the Supabase project's upload size "
                    "limit: raise it (Supabase dashboard: Storage, Settings, upload file size limit; the free plan "
                    "allows 50 MB) or make the adapter smaller (a lower lora_rank, or fewer lora_target_modules), and "
                    "resubmit. The adapter is kept on the volume")


def _failed(what: str, detail: str, settings: WorkerSettings) -> JobError:
    detail = detail.replace(settings.supabase_service_role_key, "<SUPABASE_SERVICE_ROLE_KEY>")
    return JobError(f"the adapter archive's {what} to Supabase Storage (bucket {settings.supabase_bucket!r}) failed: "
                    f"{redact_text(detail, 300)}. Check SUPABASE_BUCKET exists and SUPABASE_SERVICE_ROLE_KEY, and "
                    "resubmit: the job completes from its final checkpoint without training again")


def _retried(call, archive: Archive | None, settings: WorkerSettings, what: str):
    """`call()` with retries on transient failures; a refusal becomes a JobError that says what to change."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except StorageApiError as exc:
            status = str(exc.status)
            if status == "413" and archive is not None:
                raise _too_large(archive) from None
            if not (status == "429" or status.startswith("5")) or attempt == RETRIES:
                raise _failed(what, f"HTTP {status} {exc.code}: {exc.message}", settings) from None
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            if attempt == RETRIES:
                raise _failed(what, f"{type(exc).__name__}: {exc}", settings) from None
        time.sleep(2 ** attempt)
    raise AssertionError("unreachable")


def _tus_upload(http, base: str, bucket: str, path: str, archive: Archive, settings: WorkerSettings) -> None:
    """A resumable upload (TUS 1.0.0 as Supabase speaks it): create, then PATCH 6 MiB chunks; after a lost connection
    or a 5xx the server's offset (HEAD) says where to go on, so no byte is sent twice in vain."""
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    tus = {"Tus-Resumable": "1.0.0"}
    metadata = ",".join(f"{k} {b64(v)}" for k, v in {"bucketName": bucket, "objectName": path,
                                                     "contentType": "application/gzip", "cacheControl": "3600"}.items())

    def send(method, url, **kwargs):
        for attempt in range(RETRIES + 1):
            try:
                response = http.request(method, url, **kwargs)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 413:
                    raise _too_large(archive)
                if response.status_code != 429 and response.status_code < 500:
                    return response
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
            if attempt == RETRIES:
                raise _failed("resumable upload", failure, settings)
            time.sleep(2 ** attempt)
            if method == "PATCH":
                return None  # the caller asks the server where the upload stands

    created = send("POST", f"{base}upload/resumable", headers={
        **tus, "Upload-Length": str(archive.bytes), "Upload-Metadata": metadata, "x-upsert": "true"})
    if created.status_code != 201 or not created.headers.get("Location"):
        raise _failed("resumable upload", f"HTTP {created.status_code}: {created.text[:300]}", settings)
    location = httpx.URL(base).join(created.headers["Location"])  # a relative Location is allowed
    if ((location.scheme, location.host, location.port)
            != (httpx.URL(base).scheme, httpx.URL(base).host, httpx.URL(base).port)):
        raise _failed("resumable upload", f"the server sent the upload elsewhere ({location.host}): the service key "
                      "goes to SUPABASE_URL's host only", settings)
    offset, stalls = 0, 0
    with open(archive.path, "rb") as f:
        while offset < archive.bytes:
            f.seek(offset)
            chunk = f.read(TUS_CHUNK)
            answer = send("PATCH", location, content=chunk, headers={
                **tus, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
            moved = _offset(answer) if answer is not None and answer.status_code == 204 else None
            if moved is not None and moved > offset:
                offset, stalls = moved, 0
                continue
            if answer is not None and answer.status_code not in (204, 409):  # 409: another offset than ours; ask
                raise _failed("resumable upload", f"HTTP {answer.status_code}: {answer.text[:300]}", settings)
            stalls += 1
            if stalls > RETRIES:
                raise _failed("resumable upload", f"no progress at byte {offset} of {archive.bytes}", settings)
            head = send("HEAD", location, headers=tus)
            if head.status_code != 200 or _offset(head) is None:
                raise _failed("resumable upload", f"HTTP {head.status_code} asking where the upload stands", settings)
            offset = _offset(head)
            log.warning("resumable upload of %s: going on from byte %d of %d", archive.path.name, offset, archive.bytes)


def _offset(response) -> int | None:
    value = response.headers.get("Upload-Offset", "")
    return int(value) if value.isdigit() else None


def _check_uploaded(bucket_api, path: str, archive: Archive, settings: WorkerSettings) -> None:
    info = _retried(lambda: bucket_api.info(path), None, settings, "check")
    meta = info.get("metadata") or {}
    size = info.get("size", meta.get("size"))
    etag = str(info.get("etag") or meta.get("eTag") or "").strip('"')
    if size != archive.bytes:
        raise _failed("check", f"the stored object has {size} bytes, the archive {archive.bytes}", settings)
    if etag and "-" not in etag and etag != archive.md5:
        raise _failed("check", f"the stored object's MD5 {etag} is not the archive's {archive.md5}", settings)
