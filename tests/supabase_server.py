"""A local stand-in for a Supabase project's REST API (PostgREST) and Storage API, enough for the real
`postgrest` (SyncPostgrestClient) and `storage3` (SyncStorageClient) 2.34 clients and for raw TUS uploads.

The REST API is backed by a real PostgreSQL (tests/postgres.py starts one) holding the BrightRun app's own
migration (fixtures/supabase/20260110_create_pipeline_tables.sql, on top of fixtures/supabase/prelude.sql:
`apply_schema(dsn)`), so PostgreSQL itself judges every value, as it does behind the real PostgREST.
Storage keeps its objects in memory. `SupabaseServer.url` is what a deployment sets as SUPABASE_URL.

What it mimics, and where in the clients each part is read (postgrest 2.34.1, storage3 2.34.1):

REST, under /rest/v1/ (`SyncPostgrestClient(f"{url}/rest/v1", headers=...)`; `_sync/request_builder.py` sends,
`base_request_builder.py` builds the query string and the Prefer header, `exceptions.py` parses errors):
- The API gateway's key check: `apikey: <service key>` and `Authorization: Bearer <service key>` on every request.
  No apikey: 401 `{"message": "No API key found in request", "hint": "No `apikey` request header or url param was
  found."}`; a wrong apikey or a missing/wrong bearer: 401 `{"message": "Invalid API key", "hint": "Double check
  your Supabase `anon` or `service_role` API key."}` (the body the gateway sends; `APIError` reads `message`).
- `GET /rest/v1/<table>?select=<*|a,b,alias:c>&<filters>&order=<col>.asc|desc[.nullsfirst|.nullslast],...
  &limit=&offset=` → 200, a JSON list (`APIResponse.data`), built by PostgreSQL's own json_agg as PostgREST
  does: timestamptz as ISO 8601 in UTC (`2026-01-10T12:00:00.123456+00:00`), uuids as strings, jsonb as JSON,
  numeric as numbers. `Content-Range: <first>-<last>/<total or *>` (the total with `Prefer: count=exact`, which
  `APIResponse.count` reads). `Accept: application/vnd.pgrst.object+json` (`.single()`) answers the one row as an
  object, or 406 PGRST116 when there are 0 or several.
- Filters (`eq`, `neq`, `gt`, `gte`, `lt`, `lte`, `like`, `ilike` (`*` as `%`), `in.(a,"b,c")`, `is.null`,
  `is.not_null`, `is.true`, `is.false`, and `not.<op>`), ANDed; values are bound as parameters of unknown type, so
  PostgreSQL casts them to the column's type (an invalid uuid fails with 22P02, as it does on Supabase).
- `PATCH /rest/v1/<table>?<filters>` with a JSON object: `UPDATE t SET (cols) = (SELECT cols FROM
  json_populate_record(NULL::t, $1)) WHERE ... RETURNING *`, as PostgREST writes it. 200 with the updated rows
  under `Prefer: return=representation` (what `.update()` sends), else 204; no row matched is 200 `[]`.
- `POST /rest/v1/<table>` with an object or a list of objects (bulk): `INSERT INTO t (cols) SELECT cols FROM
  json_populate_recordset(NULL::t, $1) RETURNING *`; the columns are the `columns=` query parameter (which
  `.insert([...])` sends: keys missing from a row are NULL), else the object's keys (a list's rows must all have
  the first row's keys, or 400 PGRST102). 201 with the rows (`return=representation`) or empty (`return=minimal`,
  and without Prefer). `Prefer: resolution=merge-duplicates|ignore-duplicates` (`.upsert()`) adds `ON CONFLICT
  (<on_conflict= or the primary key>) DO UPDATE SET ... | DO NOTHING`.
- `DELETE /rest/v1/<table>?<filters>` → 200 rows / 204, like PATCH.
- Errors as PostgREST maps them (`{"code", "details", "hint", "message"}`, which `APIError` exposes): a PostgreSQL
  error answers its SQLSTATE (`22P02` invalid integer "12.5", `23502` NOT NULL, ...) with HTTP 400, 409 for
  23503 (foreign key) and 23505 (unique), 5xx for server-side classes; an unknown table 404 PGRST205 ("Could not
  find the table 'public.<t>' in the schema cache"), an unknown body column 400 PGRST204 ("Could not find the
  '<c>' column of '<t>' in the schema cache"), an unknown filter/select/order column 400 42703, a bad body 400
  PGRST102, an unparsable filter 400 PGRST100, a schema other than public (Accept-/Content-Profile) 406 PGRST106.
  Every request is one transaction: an error rolls it back whole (a bulk insert stores no row).
- Not mimicked: RPC (`/rest/v1/rpc/...` answers 404 PGRST202), embedded resources, `or=`/`and=` groups, JSON path
  filters, `Prefer: missing=default`, `max-affected`, CSV/explain, RLS as the anon role (every request runs as the
  database superuser, which bypasses RLS as Supabase's service_role does).

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

Every answer is HTTP/1.1 with a Content-Length (keep-alive works with httpx); an unexpected exception in a handler
answers 500 JSON (and is kept in `errors`), never a hung client.

Test hooks (on the `SupabaseServer`):
- `requests`: `(method, path, query, status)` for every request, REST and Storage; `path` unquoted and without
  its query, `query` the raw query string, `status` the HTTP status answered, or None when the connection was
  dropped without an answer. `errors`: tracebacks of handler exceptions (answered 500).
- `objects[(bucket, path)]`: the stored bytes; `meta[(bucket, path)]`: their `ObjectMeta` (content type, etag, id,
  times); `put_object(bucket, path, data, content_type=...)` seeds one (e.g. a dataset in `training-files`).
  `uploads[id]`: the TUS uploads (`TusUpload`: offset, length, data so far).
- `buckets` (default {"lora-models", "training-files"}); `file_size_limit` (default 50 MiB, Supabase's free-plan
  global limit) for standard and TUS uploads.
- `rest_down(mode="503"|"reset")` / `rest_up()`: while down every /rest/v1 request is answered 503
  `{"message": "upstream unavailable"}`, or ("reset") has its connection closed without an answer (the client
  sees "Server disconnected"); Storage is unaffected.
- `fail_next[(method, path_prefix)] = [status, ...]`: the next requests whose method matches and whose path starts
  with the prefix (e.g. `("PATCH", "/rest/v1/pipeline_training_jobs")`) are answered with these statuses in turn,
  before serving normally: a JSON error body in the area's shape, `Retry-After: 1` on a 429; the entry "reset"
  closes the connection without an answer instead.
- `cut_next_patch = n`: the next TUS PATCH reads only n body bytes, keeps them (the offset advances by n, as a
  real tus server keeps what it received) and drops the connection without answering: the client must HEAD and
  resume. Reset to None once used.
- `sign(bucket, path, expires_in=3600)` → a full signed download URL; `expire(url_or_token)` makes its token
  expired; `tokens[token]`: (bucket, path, exp).
- `sql(query, params=())` → list of dict rows: SQL run directly on the database, in its own committed
  transaction (insert a job row, set `status = 'cancelled'` mid-job, read rows back).
- `close()` (or leaving the `with` block): stops serving, drops open connections, closes database connections.

Module helpers: `apply_schema(dsn)` runs prelude.sql and the migration; `truncate_tables(dsn)` empties every
table of the public schema and auth.users.
"""

import base64
import email.parser
import email.policy
import hashlib
import hmac
import json
import re
import socket
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "supabase"
PRELUDE = FIXTURES / "prelude.sql"
MIGRATION = FIXTURES / "20260110_create_pipeline_tables.sql"

TUS_CHUNK = 6 * 1024 * 1024  # Supabase's required TUS chunk size (and its S3 multipart part size)
FREE_PLAN_LIMIT = 50 * 1024 * 1024  # Supabase's free plan's global file size limit
DEFAULT_BUCKETS = ("lora-models", "training-files")
JWT_SECRET = b"brightrun-test-jwt-secret-not-a-real-one-32+chars"  # signs the stand-in's own JWTs only

INVALID_KEY = {"message": "Invalid API key", "hint": "Double check your Supabase `anon` or `service_role` API key."}
NO_KEY = {"message": "No API key found in request", "hint": "No `apikey` request header or url param was found."}
OBJECT_NOT_FOUND = ("404", "not_found", "Object not found")
BUCKET_NOT_FOUND = ("404", "Bucket not found", "Bucket not found")
TOO_LARGE = ("413", "Payload too large", "The object exceeded the maximum allowed size")
DUPLICATE = ("409", "Duplicate", "The resource already exists")
EXP_FAILED = '"exp" claim timestamp check failed'
JSON_TYPE = "application/json; charset=utf-8"
OBJECT_ACCEPT = "application/vnd.pgrst.object+json"


# -- schema helpers ----------------------------------------------------------------------------------------------
def apply_schema(dsn: str) -> None:
    """Run fixtures/supabase/prelude.sql, then the app's migration, on the database at `dsn`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(PRELUDE.read_text())
        conn.execute(MIGRATION.read_text())


def truncate_tables(dsn: str) -> None:
    """Empty every table of the public schema, and auth.users (what a fresh project has)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = [sql.Identifier("public", r[0]) for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
        if conn.execute("SELECT to_regclass('auth.users')").fetchone()[0] is not None:
            names.append(sql.Identifier("auth", "users"))
        if names:
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(sql.SQL(", ").join(names)))


# -- small helpers -----------------------------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(payload: dict, secret: bytes = JWT_SECRET) -> str:
    """An HS256 JWT (the shape of Supabase's keys and signed-URL tokens)."""
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


SERVICE_KEY = make_jwt({"iss": "supabase", "ref": "brightrun-test", "role": "service_role",
                        "iat": 1767225600, "exp": 2082758400})


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def multipart_etag(data: bytes, part_size: int = TUS_CHUNK) -> str:
    """S3's etag of an object uploaded in parts of `part_size`: md5 of the parts' md5 digests, '-', the count."""
    parts = [data[i:i + part_size] for i in range(0, len(data), part_size)] or [b""]
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    return f'"{digest}-{len(parts)}"'


def _split_list(value: str) -> list[str]:
    """Split PostgREST's comma list (`a,"b,c",d`): double quotes group, a backslash escapes; quotes removed."""
    items, current, quoted, escaped, was_quoted = [], [], False, False, False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted, was_quoted = not quoted, True
        elif ch == "," and not quoted:
            items.append("".join(current) if was_quoted else "".join(current).strip())
            current, was_quoted = [], False
        else:
            current.append(ch)
    items.append("".join(current) if was_quoted else "".join(current).strip())
    return items


def _pg_status(code: str) -> int:
    """The HTTP status PostgREST answers for a PostgreSQL error's SQLSTATE (PostgREST's errors documentation)."""
    if code in ("23503", "23505"):
        return 409
    if code == "25006":
        return 405
    if code in ("42P01", "42883"):
        return 404
    if code == "42501":
        return 403
    if code == "42P17":
        return 500
    if code == "P0001":
        return 400
    return {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500, "39": 500,
            "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500, "F0": 500, "HV": 500,
            "P0": 500, "XX": 500}.get(code[:2], 400)


class RestError(Exception):
    def __init__(self, status: int, code: str | None, message: str, details=None, hint=None):
        super().__init__(message)
        self.status, self.body = status, {"code": code, "details": details, "hint": hint, "message": message}


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


# -- the HTTP handler --------------------------------------------------------------------------------------------
class _DropConnection(Exception):
    """Close the connection without answering."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
    timeout = 30  # an idle kept-alive connection's thread ends after this

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed-ACK stalls
        self.server.supa._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.supa._track(self.connection, add=False)

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _read_body(self, limit: int | None = None) -> bytes:
        """The request body (Content-Length or chunked), or its first `limit` bytes."""
        if self._body is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(chunks)
            return self._body
        length = int(self.headers.get("Content-Length") or 0)
        if limit is not None and limit < length:
            self.close_connection = self._partial = True  # the rest is never read: no other request can follow
            return self.rfile.read(limit)
        self._body = self.rfile.read(length) if length else b""
        return self._body

    def _send(self, status: int, headers: dict | None = None, body: bytes = b""):
        self._answered = True
        self.server.supa._record(self.command, self._path, self._query, status)  # before the client can see it
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, {"Content-Type": JSON_TYPE, **(headers or {})},
                   json.dumps(obj, separators=(",", ":")).encode())

    def _drop(self):
        """Close the connection without an answer (FIN; unread request bytes make the kernel send RST)."""
        self.close_connection = True
        self._answered = True
        self.server.supa._record(self.command, self._path, self._query, None)
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self):
        supa = self.server.supa
        url = urlsplit(self.path)
        self._path, self._query, self._body, self._answered = unquote(url.path), url.query, None, False
        self._partial = False  # only part of the body was read (cut_next_patch)
        is_rest = self._path.startswith("/rest/v1/") or self._path == "/rest/v1"
        is_storage = self._path.startswith("/storage/v1/")
        streamed = (self.command == "PATCH" and self._path.startswith("/storage/v1/upload/resumable/"))
        try:
            if supa._closed:
                raise _DropConnection
            if not streamed:
                self._read_body()
            if (status := supa._take_failure(self.command, self._path)) is not None:
                self._read_body()
                if status == "reset":
                    raise _DropConnection
                return self._fail(int(status), is_rest)
            if is_rest:
                if (mode := supa._rest_down) is not None:
                    if mode == "reset":
                        raise _DropConnection
                    return self._json(503, {"message": "upstream unavailable"})
                return self._rest(url)
            if is_storage:
                return self._storage(url)
            self._json(404, {"message": "no Route matched with those values"})
        except _DropConnection:
            self._drop()
        except (RestError, StorageError) as e:
            if self._partial:  # after a cut_next_patch: no answer either way
                return self._drop()
            self._read_body()  # e.g. a refused chunk is read and dropped, so the client gets the answer
            if isinstance(e, RestError):
                return self._json(e.status, e.body)
            tus = {"Tus-Resumable": "1.0.0"} if self._path.startswith("/storage/v1/upload/resumable") else {}
            self._json(e.http_status, e.body, tus)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug in this stand-in is logged (SupabaseServer.errors) and answered 500
            supa._log_error(traceback.format_exc())
            self.close_connection = True
            if not self._answered:
                try:
                    message = "test server error (see SupabaseServer.errors)"
                    self._json(500, {"code": "XX000", "details": None, "hint": None, "message": message} if is_rest
                               else {"statusCode": "500", "error": "internal", "message": message})
                except OSError:
                    pass

    do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = do_DELETE = do_OPTIONS = _handle

    def _fail(self, status: int, is_rest: bool):
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        headers = {"Retry-After": "1"} if status == 429 else {}
        if is_rest:
            body = {"message": "upstream unavailable"} if status == 503 else {"message": phrase}
        else:
            body = {"statusCode": str(status), "error": phrase, "message": phrase}
        self._json(status, body, headers)

    # -- REST (PostgREST) ----------------------------------------------------------------------------------------
    def _rest(self, url):
        supa = self.server.supa
        apikey = self.headers.get("apikey")
        if apikey is None:
            return self._json(401, NO_KEY)
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if apikey != supa.service_key or scheme.lower() != "bearer" or token.strip() != supa.service_key:
            return self._json(401, INVALID_KEY)
        for header in ("Accept-Profile", "Content-Profile"):
            if (profile := self.headers.get(header)) not in (None, "public"):
                raise RestError(406, "PGRST106", f"Invalid schema: {profile}",
                                hint="Only the following schemas are exposed: public, graphql_public")
        rest = self._path[len("/rest/v1/"):] if self._path.startswith("/rest/v1/") else ""
        if rest.startswith("rpc/"):
            raise RestError(404, "PGRST202", f"Could not find the function public.{rest[4:]} without parameters "
                            "in the schema cache")
        if not rest or "/" in rest:
            raise RestError(404, "PGRST125", "Invalid path specified in request URL")
        if self.command not in ("GET", "HEAD", "POST", "PATCH", "DELETE"):
            raise RestError(405, "PGRST117", f"Unsupported HTTP method: {self.command}")
        _Rest(self, supa, rest, url.query).run()

    # -- Storage -------------------------------------------------------------------------------------------------
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


class _Rest:
    """One PostgREST request on one table."""

    def __init__(self, handler: _Handler, supa: "SupabaseServer", table: str, query: str):
        self.h, self.supa, self.table = handler, supa, table
        self.query = parse_qsl(query, keep_blank_values=True)
        self.prefer = {p.strip() for p in handler.headers.get("Prefer", "").split(",") if p.strip()}
        self.single = OBJECT_ACCEPT in handler.headers.get("Accept", "")

    def run(self):
        method = self.h.command
        try:
            with self.supa._db() as conn:
                self.columns = self._columns(conn)
                with conn.transaction():  # one transaction per request: an error rolls it all back
                    if method in ("GET", "HEAD"):
                        status, headers, body = self._select(conn)
                    elif method == "POST":
                        status, headers, body = self._insert(conn)
                    elif method == "PATCH":
                        status, headers, body = self._update(conn)
                    else:
                        status, headers, body = self._delete(conn)
        except psycopg.Error as e:
            if e.sqlstate is None:  # no answer from PostgreSQL at all
                raise RestError(503, "PGRST000", "Database connection error", details=str(e)) from None
            d = e.diag
            raise RestError(_pg_status(e.sqlstate), e.sqlstate, d.message_primary or str(e),
                            details=d.message_detail, hint=d.message_hint) from None
        self.h._send(status, {"Content-Type": JSON_TYPE, "Content-Profile": "public", **headers}, body)

    # -- parsing -------------------------------------------------------------------------------------------------
    def _columns(self, conn) -> list[str]:
        cols = [r[0] for r in conn.execute(
            "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relname = %s "
            "AND c.relkind IN ('r', 'v', 'm', 'f', 'p') AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY a.attnum", (self.table,))]
        if not cols:
            raise RestError(404, "PGRST205", f"Could not find the table 'public.{self.table}' in the schema cache")
        return cols

    @property
    def ident(self):
        return sql.Identifier("public", self.table)

    def _column(self, name: str):
        if name not in self.columns:
            raise RestError(400, "42703", f"column {self.table}.{name} does not exist")
        return sql.Identifier(name)

    def _select_list(self):
        value = next((v for k, v in self.query if k == "select"), "*")
        if value.strip() in ("", "*"):
            return sql.SQL("*")
        items = []
        for item in _split_list(value):
            alias, _, name = item.rpartition(":") if ":" in item and "::" not in item else ("", "", item)
            if not name or name == "*":
                if name == "*" and not alias:
                    items.append(sql.SQL("*"))
                    continue
                raise RestError(400, "PGRST100", f'"failed to parse select parameter ({value})"')
            if not re.fullmatch(r"[^()!>.\-]+", name):
                raise RestError(400, "PGRST100", f'"failed to parse select parameter ({value})"',
                                details="embedded resources, casts and JSON paths are not mimicked")
            col = self._column(name)
            items.append(sql.SQL("{} AS {}").format(col, sql.Identifier(alias)) if alias else col)
        return sql.SQL(", ").join(items)

    def _where(self):
        conds, params = [], []
        reserved = {"select", "order", "limit", "offset", "columns", "on_conflict", "apikey"}
        for key, value in self.query:
            if key in reserved:
                continue
            if key in ("or", "and", "not.or", "not.and"):
                raise RestError(400, "PGRST100", f"logic trees ({key}=) are not mimicked by the test server")
            col = self._column(key)
            expr, negate = value, False
            if expr.startswith("not."):
                expr, negate = expr[4:], True
            op, dot, arg = expr.partition(".")
            ops = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "like": "LIKE",
                   "ilike": "ILIKE"}
            if not dot:
                raise RestError(400, "PGRST100", f'"failed to parse filter ({value})" (line 1, column 1)')
            if op in ops:
                cond = sql.SQL("{} " + ops[op] + " {}").format(col, sql.Placeholder())
                params.append(arg.replace("*", "%") if op in ("like", "ilike") else arg)
            elif op == "in":
                if not (arg.startswith("(") and arg.endswith(")")):
                    raise RestError(400, "PGRST100", f'"failed to parse filter ({value})" (line 1, column 4)')
                values = _split_list(arg[1:-1]) if arg[1:-1] else []
                if values:
                    cond = sql.SQL("{} IN ({})").format(col, sql.SQL(", ").join(sql.Placeholder() * len(values)))
                    params.extend(values)
                else:
                    cond = sql.SQL("FALSE")
            elif op == "is":
                words = {"null": "IS NULL", "not_null": "IS NOT NULL", "true": "IS TRUE", "false": "IS FALSE",
                         "unknown": "IS UNKNOWN"}
                if arg.lower() not in words:
                    raise RestError(400, "PGRST100", f'"failed to parse filter ({value})" (line 1, column 4)')
                cond = sql.SQL("{} " + words[arg.lower()]).format(col)
            else:
                raise RestError(400, "PGRST100", f'"failed to parse filter ({value})" (line 1, column 1)',
                                details=f"operator {op!r} is not mimicked by the test server")
            conds.append(sql.SQL("NOT ({})").format(cond) if negate else cond)
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
        return where, params

    def _order_limit(self):
        parts, params = [], []
        order = next((v for k, v in self.query if k == "order"), None)
        if order:
            terms = []
            for term in order.split(","):
                name, *mods = term.split(".")
                sql_mods = []
                for m in mods:
                    if m not in ("asc", "desc", "nullsfirst", "nullslast"):
                        raise RestError(400, "PGRST100", f'"failed to parse order ({order})" (line 1, column 1)')
                    sql_mods.append({"asc": "ASC", "desc": "DESC", "nullsfirst": "NULLS FIRST",
                                     "nullslast": "NULLS LAST"}[m])
                terms.append(sql.SQL(" ").join([self._column(name), *map(sql.SQL, sql_mods)]))
            parts.append(sql.SQL(" ORDER BY ") + sql.SQL(", ").join(terms))
        for key, word in (("limit", " LIMIT "), ("offset", " OFFSET ")):
            value = next((v for k, v in self.query if k == key), None)
            if value is not None:
                if not value.isdigit():
                    raise RestError(400, "PGRST100", f'"failed to parse {key} ({value})"')
                parts.append(sql.SQL(word) + sql.Placeholder())
                params.append(int(value))
        return sql.Composed(parts), params

    def _body(self):
        try:
            return json.loads(self.h._read_body() or b"")
        except ValueError:
            raise RestError(400, "PGRST102", "Empty or invalid json") from None

    def _check_body_columns(self, names) -> list[str]:
        for name in names:
            if name not in self.columns:
                raise RestError(400, "PGRST204", f"Could not find the '{name}' column of '{self.table}' in the "
                                "schema cache")
        return list(names)

    # -- answers -------------------------------------------------------------------------------------------------
    def _result(self, conn, cte, params):
        """Run `WITH pgrst_source AS (<cte>) SELECT count, json` and shape the answer (status, headers, body)."""
        query = sql.SQL("WITH pgrst_source AS ({}) SELECT count(*), coalesce(json_agg(_pgrst_t), '[]')::text "
                        "FROM (SELECT {} FROM pgrst_source) _pgrst_t").format(cte, self._select_list())
        count, text = conn.execute(query, params).fetchone()
        if self.single and count != 1:
            raise RestError(406, "PGRST116", "JSON object requested, multiple (or no) rows returned",
                            details=f"The result contains {count} rows")
        body = json.dumps(json.loads(text)[0], separators=(",", ":")) if self.single else text
        return count, body.encode()

    def _select(self, conn):
        where, params = self._where()
        tail, tail_params = self._order_limit()
        cte = sql.SQL("SELECT * FROM {}{}{}").format(self.ident, where, tail)
        count, body = self._result(conn, cte, params + tail_params)
        total = "*"
        if any(p.startswith("count=") for p in self.prefer):
            total = str(conn.execute(sql.SQL("SELECT count(*) FROM {}{}").format(self.ident, where),
                                     params).fetchone()[0])
        offset = int(next((v for k, v in self.query if k == "offset"), "0") or 0)
        rng = f"{offset}-{offset + count - 1}/{total}" if count else f"*/{total}"
        return 200, {"Content-Range": rng}, body

    def _write_answer(self, count: int, body: bytes, created: bool):
        rng = f"*/{count}" if any(p.startswith("count=") for p in self.prefer) else "*/*"
        if "return=representation" in self.prefer:
            return (201 if created else 200), {"Content-Range": rng}, body
        return (201 if created else 204), {"Content-Range": rng}, b""

    def _update(self, conn):
        patch = self._body()
        if not isinstance(patch, dict):
            raise RestError(400, "PGRST102", "Empty or invalid json")
        cols = self._check_body_columns(patch)
        where, params = self._where()
        if not cols:  # an empty patch changes nothing and returns no row, as PostgREST
            cte = sql.SQL("SELECT * FROM {} WHERE FALSE").format(self.ident)
            params = []
        else:
            idents = sql.SQL(", ").join(map(sql.Identifier, cols))
            cte = sql.SQL("UPDATE {t} SET ({c}) = (SELECT {c} FROM json_populate_record(NULL::{t}, {p}::json)){w} "
                          "RETURNING {t}.*").format(t=self.ident, c=idents, p=sql.Placeholder(), w=where)
            params = [json.dumps(patch)] + params
        count, body = self._result(conn, cte, params)
        return self._write_answer(count, body, created=False)

    def _insert(self, conn):
        payload = self._body()
        rows = payload if isinstance(payload, list) else [payload]
        if not all(isinstance(r, dict) for r in rows):
            raise RestError(400, "PGRST102", "Empty or invalid json")
        columns_param = next((v for k, v in self.query if k == "columns"), None)
        if columns_param is not None:
            cols = self._check_body_columns([c for c in _split_list(columns_param) if c])
        else:
            cols = self._check_body_columns(rows[0] if rows else [])
            if any(set(r) != set(cols) for r in rows[1:]):
                raise RestError(400, "PGRST102", "All object keys must match")
        if not rows:
            return self._write_answer(0, b"[]", created=True)
        if not cols:  # `{}` (or a list of them): rows of column defaults
            cte = sql.SQL("INSERT INTO {} SELECT FROM generate_series(1, {}) RETURNING *").format(
                self.ident, sql.Placeholder())
            count, body = self._result(conn, cte, [len(rows)])
            return self._write_answer(count, body, created=True)
        idents = sql.SQL(", ").join(map(sql.Identifier, cols))
        conflict = sql.SQL("")
        resolution = next((p.split("=", 1)[1] for p in self.prefer if p.startswith("resolution=")), None)
        if resolution in ("merge-duplicates", "ignore-duplicates"):
            on = next((v for k, v in self.query if k == "on_conflict"), None)
            keys = [c for c in _split_list(on) if c] if on else [r[0] for r in conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
                (f'public."{self.table}"',))]
            key_idents = sql.SQL(", ").join(self._column(k) for k in keys)
            if resolution == "ignore-duplicates":
                conflict = sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(key_idents)
            else:
                excluded = sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in cols)
                conflict = sql.SQL(" ON CONFLICT ({}) DO UPDATE SET ({}) = ROW({})").format(key_idents, idents,
                                                                                             excluded)
        cte = sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM json_populate_recordset(NULL::{t}, {p}::json){o} "
                      "RETURNING {t}.*").format(t=self.ident, c=idents, p=sql.Placeholder(), o=conflict)
        count, body = self._result(conn, cte, [json.dumps(rows)])
        return self._write_answer(count, body, created=True)

    def _delete(self, conn):
        where, params = self._where()
        cte = sql.SQL("DELETE FROM {}{} RETURNING *").format(self.ident, where)
        count, body = self._result(conn, cte, params)
        return self._write_answer(count, body, created=False)


class _Tus:
    """Supabase Storage's TUS 1.0.0 endpoint, /storage/v1/upload/resumable[/<id>]."""

    TUS_HEADERS = {"Tus-Resumable": "1.0.0"}

    def __init__(self, handler: _Handler, supa: "SupabaseServer"):
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


# -- the server --------------------------------------------------------------------------------------------------
class _QuietServer(ThreadingHTTPServer):
    """A client that drops its connection (as the worker's retries and the fault hooks make them do) is not an error."""

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class SupabaseServer:
    """`with SupabaseServer(dsn) as supa:` Supabase's REST and Storage APIs on `supa.url` (loopback), backed by the
    PostgreSQL database at `dsn` (which `apply_schema` has prepared), answering to `supa.service_key`."""

    def __init__(self, dsn: str, service_key: str = SERVICE_KEY, buckets=DEFAULT_BUCKETS,
                 file_size_limit: int = FREE_PLAN_LIMIT):
        self.dsn = dsn
        self.service_key = service_key
        self.buckets: set[str] = set(buckets)
        self.file_size_limit = file_size_limit
        self.requests: list[tuple[str, str, str, int | None]] = []
        self.errors: list[str] = []
        self.objects: dict[tuple[str, str], bytes] = {}
        self.meta: dict[tuple[str, str], ObjectMeta] = {}
        self.uploads: dict[str, TusUpload] = {}
        self.tokens: dict[str, tuple[str, str, float]] = {}
        self.fail_next: dict[tuple[str, str], list] = {}
        self.cut_next_patch: int | None = None
        self._rest_down: str | None = None
        self._lock = threading.RLock()
        self._pool: list[psycopg.Connection] = []
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._closed = False
        self._started_at = _now_iso()
        self.url = ""

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "SupabaseServer":
        server = _QuietServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.supa = self
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name="supabase-test-server").start()
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop serving, drop the open client connections, close the database connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            conns, pool = list(self._conns), list(self._pool)
            self._pool.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for conn in pool:
            conn.close()

    @property
    def env(self) -> dict[str, str]:
        """The worker's settings that point it here: SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY."""
        return {"SUPABASE_URL": self.url, "SUPABASE_SERVICE_ROLE_KEY": self.service_key}

    # -- hooks ---------------------------------------------------------------------------------------------------
    def rest_down(self, mode: str = "503"):
        """Make /rest/v1 unreachable: "503" answers 503 {"message": "upstream unavailable"}; "reset" closes the
        connection without answering. Storage is unaffected."""
        if mode not in ("503", "reset"):
            raise ValueError(f"mode must be '503' or 'reset', not {mode!r}")
        with self._lock:
            self._rest_down = mode

    def rest_up(self):
        with self._lock:
            self._rest_down = None

    def put_object(self, bucket: str, path: str, data: bytes, content_type: str = "application/octet-stream",
                   cache_control: str = "max-age=3600") -> ObjectMeta:
        """Store an object, as a standard upload would (the bucket is added to `buckets` if new)."""
        with self._lock:
            self.buckets.add(bucket)
            return self._store(bucket, path, bytes(data), content_type, cache_control,
                               f'"{hashlib.md5(data).hexdigest()}"')

    def sign(self, bucket: str, path: str, expires_in: int = 3600) -> str:
        """A signed download URL for the object, as `create_signed_url` gives (the object need not exist yet)."""
        token = self._issue_token(bucket, path, expires_in)
        return f"{self.url}/storage/v1/object/sign/{bucket}/{quote(path)}?token={token}"

    def expire(self, url_or_token: str):
        """Make a signed URL's token expired (its next download answers 400 InvalidJWT, exp check failed)."""
        token = url_or_token
        if "token=" in url_or_token:
            token = dict(parse_qsl(urlsplit(url_or_token).query))["token"]
        with self._lock:
            if token not in self.tokens:
                raise KeyError(f"no such token: {token[:16]}...")
            bucket, path, _ = self.tokens[token]
            self.tokens[token] = (bucket, path, time.time() - 1)

    def sql(self, query, params=()) -> list[dict]:
        """Run SQL on the database in its own transaction; the rows as dicts ([] for a statement without rows)."""
        with self._db() as conn:
            with conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                cur.execute(query, params or None)  # no params: a literal % needs no escaping
                return cur.fetchall() if cur.description is not None else []

    # -- internals -----------------------------------------------------------------------------------------------
    def _record(self, method: str, path: str, query: str, status: int | None):
        with self._lock:
            self.requests.append((method, path, query, status))

    def _log_error(self, text: str):
        with self._lock:
            self.errors.append(text)

    def _track(self, conn: socket.socket, add: bool):
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _take_failure(self, method: str, path: str):
        with self._lock:
            for (m, prefix), statuses in list(self.fail_next.items()):
                if m.upper() == method and path.startswith(prefix) and statuses:
                    status = statuses.pop(0)
                    if not statuses:
                        del self.fail_next[(m, prefix)]
                    return status
        return None

    def _store(self, bucket, path, data, content_type, cache_control, etag) -> ObjectMeta:
        with self._lock:
            old = self.meta.get((bucket, path))
            meta = ObjectMeta(content_type, cache_control, etag)
            if old is not None:
                meta.id, meta.created_at = old.id, old.created_at
            self.objects[(bucket, path)] = data
            self.meta[(bucket, path)] = meta
            return meta

    def _issue_token(self, bucket: str, path: str, expires_in: int) -> str:
        now = int(time.time())
        token = make_jwt({"url": f"{bucket}/{path}", "iat": now, "exp": now + int(expires_in),
                          "jti": str(uuid.uuid4())})
        with self._lock:
            self.tokens[token] = (bucket, path, now + int(expires_in))
        return token

    @contextmanager
    def _db(self):
        with self._lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = psycopg.connect(self.dsn, autocommit=True)
            conn.execute("SET TIME ZONE 'UTC'")
        try:
            yield conn
        finally:
            healthy = not conn.closed and not conn.broken and \
                conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            with self._lock:
                keep = healthy and not self._closed and len(self._pool) < 8
                if keep:
                    self._pool.append(conn)
            if not keep:
                conn.close()
