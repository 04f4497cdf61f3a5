"""The Storage part of the Supabase stand-in (tests/supabase_server.py): the handler's /storage/v1 routes
(`_StorageRoutes`, mixed into its `_Handler`), the objects' metadata (`ObjectMeta`), Storage's errors
(`StorageError`), and the TUS resumable upload (`_Tus`, `TusUpload`, `TUS_CHUNK`, `multipart_etag`). The objects
themselves live on the `SupabaseServer`.

Storage, under /storage/v1/ (`SyncStorageClient(f"{url}/storage/v1/", headers)`; `_sync/file_api.py` sends and
raises `StorageApiError(message, error, statusCode)` from the error body, so `exc.status` is the body's
`statusCode` string and `exc.code` its `error`):
- Auth: `Authorization: Bearer <service key>` on every endpoint but the signed-URL download; missing or wrong:
  HTTP 400 `{"statusCode": "403", "error": "Unauthorized", "message": "invalid signature"}` (or "headers must
  have required property 'authorization'"), as Supabase Storage answers a bad JWT. No apikey is needed (Supabase's
  gateway does not check it on Storage routes).
- Buckets must exist (`buckets`); another: HTTP 400 `{"statusCode": "404", "error": "Bucket not found", ...}`.
  `GET /bucket` and `GET /bucket/<id>` (`list_buckets`, `get_bucket`) list them.
- `POST /object/<bucket>/<path>` (`upload`: multipart/form-data with a `file` part and `cacheControl`; header
  `x-upsert: true|false`) → 200 `{"Key": "<bucket>/<path>", "Id": <uuid>}`; existing object without upsert: 400
  `{"statusCode": "409", "error": "Duplicate", "message": "The resource already exists"}`; a file above
  `file_size_limit`: 400 `{"statusCode": "413", "error": "Payload too large", "message": "The object exceeded the
  maximum allowed size"}`. `PUT` the same path (`update`) replaces an existing object (missing: 400 "404").
- `GET /object/info/<bucket>/<path>` (`info`, and `exists`, which returns False on statusCode "404" with error
  "not_found") → `{"id", "name", "version", "bucket_id", "size", "content_type", "cache_control", "etag",
  "last_modified", "created_at", "updated_at", "metadata": {"eTag", "size", "mimetype", "cacheControl",
  "lastModified", "contentLength", "httpStatusCode"}}`. The etag is `"<md5>"` for a standard upload and, as on
  S3-backed Supabase, `"<md5 of the parts' md5 digests>-<parts>"` for an object completed through TUS (parts of
  6 MiB). Missing: 400 `{"statusCode": "404", "error": "not_found", "message": "Object not found"}`.
- `GET` (and `HEAD`) `/object/<bucket>/<path>` (`download`) and `/object/authenticated/<bucket>/<path>` → the
  bytes, with Content-Length, Content-Type, ETag, Cache-Control, Last-Modified.
- `POST /object/sign/<bucket>/<path>` with `{"expiresIn": n}` (`create_signed_url`, which sends n as a string) →
  `{"signedURL": "/object/sign/<bucket>/<path>?token=<JWT>"}`; the client prefixes its base URL.
  `GET /object/sign/<bucket>/<path>?token=` (no auth) → the bytes; an expired token: 400 `{"statusCode": "400",
  "error": "InvalidJWT", "message": "\\"exp\\" claim timestamp check failed"}`, an unknown one or one for another
  path: 400 InvalidJWT "invalid signature".
- `DELETE /object/<bucket>` with `{"prefixes": [paths]}` (`remove`) → 200, the removed objects' info;
  `DELETE /object/<bucket>/<path>` → 200 `{"message": "Successfully deleted"}`.
- Resumable uploads, TUS 1.0.0 as Supabase documents them, at `/upload/resumable`: `OPTIONS` (no auth) lists
  `Tus-Version`, `Tus-Extension: creation,creation-with-upload,termination`, `Tus-Max-Size`. `POST` with
  `Tus-Resumable: 1.0.0`, `Upload-Length`, `Upload-Metadata` (`bucketName`, `objectName`, `contentType`,
  `cacheControl`; comma-separated `key base64(value)`) and optional `x-upsert: true` → 201, `Location:
  <url>/storage/v1/upload/resumable/<id>`; a body with `Content-Type: application/offset+octet-stream` is a first
  chunk (creation-with-upload). Upload-Length above `file_size_limit`: 413; the object exists and no upsert: 409
  (bodies in the Storage shape above, statusCode "413"/"409"); unknown bucket: 404; no Tus-Resumable: 412.
  `PATCH <location>` with `Upload-Offset` and `Content-Type: application/offset+octet-stream` → 204 with the new
  `Upload-Offset`; an offset other than the upload's: 409; another content type: 415; a chunk that is not the last
  and not exactly 6 MiB (TUS_CHUNK): 400, nothing kept (Supabase requires 6 MiB chunks); past Upload-Length: 400.
  The last byte stores the object (replacing it under upsert; 409 if it appeared meanwhile without). `HEAD
  <location>` → 200 `Upload-Offset`, `Upload-Length`, `Cache-Control: no-store`, `Tus-Resumable`; `DELETE
  <location>` → 204. An unknown upload id: 404.
- Not mimicked: public buckets and `/object/public`, image transforms, `list`/`list_v2`, move/copy, signed upload
  URLs, bucket creation, per-bucket limits and MIME rules, TUS upload expiry, the S3 protocol.
"""

import base64
import email.parser
import email.policy
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import parse_qsl, quote

from supabase_common import _b64url, _DropConnection, _now_iso

TUS_CHUNK = 6 * 1024 * 1024  # Supabase's required TUS chunk size (and its S3 multipart part size)
OBJECT_NOT_FOUND = ("404", "not_found", "Object not found")
BUCKET_NOT_FOUND = ("404", "Bucket not found", "Bucket not found")
TOO_LARGE = ("413", "Payload too large", "The object exceeded the maximum allowed size")
DUPLICATE = ("409", "Duplicate", "The resource already exists")
EXP_FAILED = '"exp" claim timestamp check failed'


def multipart_etag(data: bytes, part_size: int = TUS_CHUNK) -> str:
    """S3's etag of an object uploaded in parts of `part_size`: md5 of the parts' md5 digests, '-', the count."""
    parts = [data[i:i + part_size] for i in range(0, len(data), part_size)] or [b""]
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    return f'"{digest}-{len(parts)}"'


class StorageError(Exception):
    def __init__(self, http_status: int, status_code: str, error: str, message: str):
        super().__init__(message)
        self.http_status, self.body = http_status, {"statusCode": status_code, "error": error, "message": message}


def _storage_error(triple: tuple[str, str, str], http_status: int = 400) -> StorageError:
    return StorageError(http_status, *triple)


@dataclass
class ObjectMeta:
    content_type: str
    cache_control: str
    etag: str  # with its double quotes, as S3 and Supabase give it
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    version: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: str = field(default_factory=_now_iso)
    updated_at: str = field(default_factory=_now_iso)


@dataclass
class TusUpload:
    id: str
    bucket: str
    path: str
    length: int
    content_type: str
    cache_control: str
    upsert: bool
    metadata: str
    data: bytearray = field(default_factory=bytearray)
    done: bool = False  # the object is stored

    @property
    def offset(self) -> int:
        return len(self.data)


class _StorageRoutes:
    """The HTTP handler's /storage/v1 routes: auth, buckets, objects, signed URLs (resumable uploads go to
    `_Tus`); mixed into tests/supabase_server.py's `_Handler`."""

    def _storage_auth(self):
        key = self.server.supa.service_key
        auth = self.headers.get("Authorization")
        if auth is None:
            raise StorageError(400, "403", "Unauthorized", "headers must have required property 'authorization'")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != key:
            raise StorageError(400, "403", "Unauthorized", "invalid signature")

    def _bucket(self, bucket: str):
        with self.server.supa._lock:
            known = bucket in self.server.supa.buckets
        if not known:
            raise _storage_error(BUCKET_NOT_FOUND)

    def _storage(self, url):
        supa = self.server.supa
        rest = self._path[len("/storage/v1/"):]
        parts = rest.split("/")
        method = self.command
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        if parts[0] == "upload" and parts[1:2] == ["resumable"]:
            return _Tus(self, supa).route(parts[2:])
        if parts[0] == "object" and len(parts) >= 3 and parts[1] == "sign" and method == "GET":
            return self._signed_download(parts[2], "/".join(parts[3:]), query)
        self._storage_auth()
        if parts[0] == "bucket" and method == "GET":
            return self._buckets(parts[1] if len(parts) > 1 and parts[1] else None)
        if parts[0] != "object" or len(parts) < 2 or not parts[1]:
            return self._json(404, {"statusCode": 404, "error": "Not Found",
                                    "message": f"Route {method}:{self._path} not found"})
        if parts[1] in ("info", "sign", "authenticated") and len(parts) >= 4:
            bucket, path = parts[2], "/".join(parts[3:])
            self._bucket(bucket)
            if parts[1] == "info" and method == "GET":
                return self._json(200, self._info(bucket, path))
            if parts[1] == "sign" and method == "POST":
                return self._sign(bucket, path)
            if parts[1] == "authenticated" and method in ("GET", "HEAD"):
                return self._send_object(bucket, path, query)
        bucket, path = parts[1], "/".join(parts[2:])
        self._bucket(bucket)
        if not path:
            if method == "DELETE":
                return self._remove(bucket)
        elif method in ("GET", "HEAD"):
            return self._send_object(bucket, path, query)
        elif method in ("POST", "PUT"):
            return self._upload(bucket, path, update=method == "PUT")
        elif method == "DELETE":
            with supa._lock:
                found = supa.objects.pop((bucket, path), None) is not None
                supa.meta.pop((bucket, path), None)
            if not found:
                raise _storage_error(OBJECT_NOT_FOUND)
            return self._json(200, {"message": "Successfully deleted"})
        self._json(404, {"statusCode": 404, "error": "Not Found", "message": f"Route {method}:{self._path} not found"})

    def _buckets(self, bucket_id: str | None):
        supa = self.server.supa
        with supa._lock:
            names = sorted(supa.buckets)

        def info(name):
            return {"id": name, "name": name, "owner": "", "public": False, "type": "STANDARD",
                    "file_size_limit": None, "allowed_mime_types": None,
                    "created_at": supa._started_at, "updated_at": supa._started_at}
        if bucket_id is None:
            return self._json(200, [info(n) for n in names])
        if bucket_id not in names:
            raise _storage_error(BUCKET_NOT_FOUND)
        self._json(200, info(bucket_id))

    def _object(self, bucket: str, path: str) -> tuple[bytes, ObjectMeta]:
        supa = self.server.supa
        with supa._lock:
            data, meta = supa.objects.get((bucket, path)), supa.meta.get((bucket, path))
        if data is None:
            raise _storage_error(OBJECT_NOT_FOUND)
        if meta is None:  # a test wrote objects[...] directly
            meta = ObjectMeta("application/octet-stream", "no-cache", f'"{hashlib.md5(data).hexdigest()}"')
        return data, meta

    def _info(self, bucket: str, path: str) -> dict:
        data, meta = self._object(bucket, path)
        return {"id": meta.id, "name": path, "version": meta.version, "bucket_id": bucket, "size": len(data),
                "content_type": meta.content_type, "cache_control": meta.cache_control, "etag": meta.etag,
                "last_modified": meta.updated_at, "created_at": meta.created_at, "updated_at": meta.updated_at,
                "metadata": {"eTag": meta.etag, "size": len(data), "mimetype": meta.content_type,
                             "cacheControl": meta.cache_control, "lastModified": meta.updated_at,
                             "contentLength": len(data), "httpStatusCode": 200}}

    def _send_object(self, bucket: str, path: str, query: dict):
        data, meta = self._object(bucket, path)
        headers = {"Content-Type": meta.content_type, "ETag": meta.etag, "Cache-Control": meta.cache_control,
                   "Last-Modified": datetime.fromisoformat(meta.updated_at.replace("Z", "+00:00")).strftime(
                       "%a, %d %b %Y %H:%M:%S GMT"), "Accept-Ranges": "bytes"}
        if "download" in query:
            name = query["download"] or path.rsplit("/", 1)[-1]
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        self._send(200, headers, data)

    def _sign(self, bucket: str, path: str):
        try:
            expires_in = int(json.loads(self._read_body() or b"{}").get("expiresIn"))
        except (ValueError, TypeError, AttributeError):
            raise StorageError(400, "400", "Error", "body must have required property 'expiresIn'") from None
        if expires_in < 1:
            raise StorageError(400, "400", "Error", "body/expiresIn must be >= 1")
        self._object(bucket, path)
        token = self.server.supa._issue_token(bucket, path, expires_in)
        self._json(200, {"signedURL": f"/object/sign/{bucket}/{quote(path)}?token={token}"})

    def _signed_download(self, bucket: str, path: str, query: dict):
        supa = self.server.supa
        token = query.get("token")
        if not token:
            raise StorageError(400, "400", "Error", "querystring must have required property 'token'")
        with supa._lock:
            issued = supa.tokens.get(token)
        if issued is None:
            raise StorageError(400, "400", "InvalidJWT", "invalid signature")
        t_bucket, t_path, exp = issued
        if exp <= time.time():
            raise StorageError(400, "400", "InvalidJWT", EXP_FAILED)
        if (t_bucket, t_path) != (bucket, path):
            raise StorageError(400, "400", "InvalidJWT", "invalid signature")
        self._bucket(bucket)
        self._send_object(bucket, path, query)

    def _remove(self, bucket: str):
        supa = self.server.supa
        try:
            prefixes = json.loads(self._read_body() or b"{}")["prefixes"]
            assert isinstance(prefixes, list) and all(isinstance(p, str) for p in prefixes)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise StorageError(400, "400", "Error", "body must have required property 'prefixes'") from None
        removed = []
        for path in prefixes:
            try:
                removed.append(self._info(bucket, path))
            except StorageError:
                continue
            with supa._lock:
                supa.objects.pop((bucket, path), None)
                supa.meta.pop((bucket, path), None)
        self._json(200, removed)

    def _upload(self, bucket: str, path: str, update: bool):
        supa = self.server.supa
        body, ctype = self._read_body(), self.headers.get("Content-Type", "")
        cache_control = self.headers.get("cache-control") or "no-cache"
        if ctype.lower().startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body)
            data, content_type = None, "text/plain;charset=UTF-8"
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name == "cacheControl":
                    cache_control = f"max-age={part.get_payload(decode=True).decode().strip()}"
                elif data is None and (name == "file" or part.get_filename() is not None or name == ""):
                    data = part.get_payload(decode=True) or b""
                    content_type = str(part.get("Content-Type", content_type))
            if data is None:
                raise StorageError(400, "400", "Error", "No file was uploaded")
        else:  # a raw body, as supabase-js sends a Blob
            data, content_type = body, ctype or "text/plain;charset=UTF-8"
        upsert = update or self.headers.get("x-upsert", "false").lower() == "true"
        if len(data) > supa.file_size_limit:
            raise _storage_error(TOO_LARGE)
        with supa._lock:
            exists = (bucket, path) in supa.objects
            if update and not exists:
                raise _storage_error(OBJECT_NOT_FOUND)
            if exists and not upsert:
                raise _storage_error(DUPLICATE)
            meta = supa._store(bucket, path, data, content_type, cache_control, f'"{hashlib.md5(data).hexdigest()}"')
        self._json(200, {"Key": f"{bucket}/{path}", "Id": meta.id})


class _Tus:
    """Supabase Storage's TUS 1.0.0 endpoint, /storage/v1/upload/resumable[/<id>]."""

    TUS_HEADERS = {"Tus-Resumable": "1.0.0"}

    def __init__(self, handler: _StorageRoutes, supa):
        self.h, self.supa = handler, supa

    def route(self, rest: list[str]):
        h, method = self.h, self.h.command
        if method == "OPTIONS":
            return h._send(204, {**self.TUS_HEADERS, "Tus-Version": "1.0.0",
                                 "Tus-Extension": "creation,creation-with-upload,termination",
                                 "Tus-Max-Size": str(self.supa.file_size_limit)})
        h._storage_auth()
        if h.headers.get("Tus-Resumable") != "1.0.0":
            raise StorageError(412, "412", "Precondition Failed", "Tus-Resumable 1.0.0 is required")
        upload_id = rest[0] if rest and rest[0] else None
        if upload_id is None:
            if method != "POST":
                raise StorageError(405, "405", "Method Not Allowed", f"{method} needs an upload URL")
            return self._create()
        if len(rest) != 1 or method not in ("PATCH", "HEAD", "DELETE"):
            raise StorageError(405, "405", "Method Not Allowed", f"{method} is not allowed on an upload URL")
        with self.supa._lock:
            upload = self.supa.uploads.get(upload_id)
        if upload is None:
            raise StorageError(404, "404", "not_found", "Upload not found")
        if method == "HEAD":
            return h._send(200, {**self.TUS_HEADERS, "Upload-Offset": str(upload.offset),
                                 "Upload-Length": str(upload.length), "Cache-Control": "no-store",
                                 "Upload-Metadata": upload.metadata})
        if method == "DELETE":
            with self.supa._lock:
                self.supa.uploads.pop(upload_id, None)
            return h._send(204, self.TUS_HEADERS)
        return self._patch(upload)

    def _create(self):
        h, supa = self.h, self.supa
        try:
            length = int(h.headers.get("Upload-Length", ""))
            assert length >= 0
        except (ValueError, AssertionError):
            raise StorageError(400, "400", "InvalidUploadLength", "Upload-Length must be a non-negative integer "
                               "(Upload-Defer-Length is not supported)") from None
        raw_meta = h.headers.get("Upload-Metadata", "")
        meta = {}
        try:
            for pair in filter(None, (p.strip() for p in raw_meta.split(","))):
                key, _, value = pair.partition(" ")
                meta[key] = base64.b64decode(value, validate=True).decode() if value else ""
        except ValueError:
            raise StorageError(400, "400", "InvalidUploadMetadata", "Upload-Metadata is not valid") from None
        bucket, path = meta.get("bucketName"), meta.get("objectName")
        if not bucket or not path:
            raise StorageError(400, "400", "InvalidUploadMetadata",
                               "Upload-Metadata must have bucketName and objectName")
        with supa._lock:
            if bucket not in supa.buckets:
                raise _storage_error(BUCKET_NOT_FOUND, 404)
        if length > supa.file_size_limit:
            raise _storage_error(TOO_LARGE, 413)
        upsert = h.headers.get("x-upsert", "false").lower() == "true"
        cache = meta.get("cacheControl") or "3600"
        upload = TusUpload(id=_b64url(f"{bucket}/{path}/{uuid.uuid4()}".encode()), bucket=bucket, path=path,
                           length=length, content_type=meta.get("contentType") or "application/octet-stream",
                           cache_control=cache if "=" in cache else f"max-age={cache}", upsert=upsert,
                           metadata=raw_meta)
        with supa._lock:
            if (bucket, path) in supa.objects and not upsert:
                raise _storage_error(DUPLICATE, 409)
            supa.uploads[upload.id] = upload
        headers = {**self.TUS_HEADERS, "Location": f"{supa.url}/storage/v1/upload/resumable/{upload.id}"}
        body = h._read_body()
        if body and h.headers.get("Content-Type", "") == "application/offset+octet-stream":
            self._append(upload, 0, body)
            headers["Upload-Offset"] = str(upload.offset)
        elif length == 0:
            self._append(upload, 0, b"")
        h._send(201, headers)

    def _patch(self, upload: TusUpload):
        h, supa = self.h, self.supa
        if h.headers.get("Content-Type", "").split(";")[0].strip() != "application/offset+octet-stream":
            raise StorageError(415, "415", "Unsupported Media Type",
                               "Content-Type must be application/offset+octet-stream")
        try:
            offset = int(h.headers.get("Upload-Offset", ""))
        except ValueError:
            raise StorageError(400, "400", "InvalidUploadOffset", "Upload-Offset must be an integer") from None
        if offset != upload.offset:
            raise StorageError(409, "409", "Conflict", f"Upload-Offset {offset} is not the upload's offset "
                               f"{upload.offset}")
        with supa._lock:
            cut, supa.cut_next_patch = supa.cut_next_patch, None
        if cut is not None:
            self._append(upload, offset, h._read_body(limit=cut)[:cut])
            raise _DropConnection
        chunk = h._read_body()
        end = offset + len(chunk)
        if end > upload.length:
            raise StorageError(400, "400", "InvalidChunkSize", f"the chunk ends at {end}, past Upload-Length "
                               f"{upload.length}")
        if end < upload.length and len(chunk) != TUS_CHUNK:
            raise StorageError(400, "400", "InvalidChunkSize", f"every chunk but the last must be {TUS_CHUNK} bytes "
                               f"(6 MiB); this one is {len(chunk)}")
        self._append(upload, offset, chunk)
        h._send(204, {**self.TUS_HEADERS, "Upload-Offset": str(upload.offset)})

    def _append(self, upload: TusUpload, offset: int, chunk: bytes):
        with self.supa._lock:  # checked again here: two PATCHes at the same offset keep only the first
            if upload.offset != offset:
                raise StorageError(409, "409", "Conflict", f"Upload-Offset {offset} is not the upload's offset "
                                   f"{upload.offset}")
            upload.data += chunk
        self._complete_if_done(upload)

    def _complete_if_done(self, upload: TusUpload):
        supa = self.supa
        with supa._lock:
            if upload.offset != upload.length or upload.done:
                return
            key = (upload.bucket, upload.path)
            if key in supa.objects and not upload.upsert:
                raise _storage_error(DUPLICATE, 409)
            data = bytes(upload.data)
            supa._store(upload.bucket, upload.path, data, upload.content_type, upload.cache_control,
                        multipart_etag(data))
            upload.done = True
