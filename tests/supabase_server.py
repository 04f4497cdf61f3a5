"""A local stand-in for a Supabase project's REST API (PostgREST) and Storage API, enough for the real
`postgrest` (SyncPostgrestClient) and `storage3` (SyncStorageClient) 2.34 clients and for raw TUS uploads.

The REST API is backed by a real PostgreSQL (tests/postgres.py starts one) holding the BrightRun app's own
migration (fixtures/supabase/20260110_create_pipeline_tables.sql, on top of fixtures/supabase/prelude.sql:
`apply_schema(dsn)`), so PostgreSQL itself judges every value, as it does behind the real PostgREST.
Storage keeps its objects in memory. `SupabaseServer.url` is what a deployment sets as SUPABASE_URL.

What it mimics, and where in the clients each part is read (postgrest 2.34.1, storage3 2.34.1), is told in
tests/supabase_rest.py (REST, under /rest/v1/) and tests/supabase_storage.py (Storage, under /storage/v1/,
TUS included); this module holds the server, the HTTP handler's plumbing and routing, the test hooks and the
schema helpers, and tests/supabase_common.py what the parts share.

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

import hashlib
import json
import socket
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from supabase_common import JSON_TYPE, _DropConnection, _now_iso, make_jwt
from supabase_rest import RestError, _RestRoutes
# TUS_CHUNK and multipart_etag are re-exported: tests/test_supabase_server.py imports them from here.
from supabase_storage import TUS_CHUNK, ObjectMeta, StorageError, TusUpload, _StorageRoutes, multipart_etag

__all__ = ["SERVICE_KEY", "TUS_CHUNK", "SupabaseServer", "apply_schema", "make_jwt", "multipart_etag",
           "truncate_tables"]

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "supabase"
PRELUDE = FIXTURES / "prelude.sql"
MIGRATION = FIXTURES / "20260110_create_pipeline_tables.sql"

FREE_PLAN_LIMIT = 50 * 1024 * 1024  # Supabase's free plan's global file size limit
DEFAULT_BUCKETS = ("lora-models", "training-files")


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

SERVICE_KEY = make_jwt({"iss": "supabase", "ref": "brightrun-test", "role": "service_role",
                        "iat": 1767225600, "exp": 2082758400})


# -- the HTTP handler --------------------------------------------------------------------------------------------
class _Handler(_RestRoutes, _StorageRoutes, BaseHTTPRequestHandler):
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
