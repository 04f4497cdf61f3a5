"""A local stand-in for Supabase Storage's signed URLs, on loopback, for the demo and the tests.

Serves the files of one directory at `/storage/v1/object/sign/<bucket>/<name>?token=<token>`:
- a known token gets the file (200, with Content-Length);
- an expired token gets what Supabase answers: HTTP 400 with
  `{"statusCode":"400","error":"InvalidJWT","message":"\\"exp\\" claim timestamp check failed"}`;
- an unknown file gets 404; any other token gets 400 InvalidJWT "invalid signature".
Faults can be injected per file name (`fail_first[name] = n` answers `fail_status` (503) n times;
`cut[name] = k` sends k bytes and drops the connection; `delay[name] = s` waits s seconds before
answering). Every request is counted in `hits`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PREFIX = "/storage/v1/object/sign/lora-datasets/"


class SignedUrlServer:
    def __init__(self, root: str | Path, host: str = "127.0.0.1"):
        self.root = Path(root)
        self.tokens: set[str] = set()
        self.expired: set[str] = set()
        self.fail_first: Counter = Counter()
        self.cut: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.fail_status = 503
        self.hits: Counter = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                name = parts.path.removeprefix(PREFIX)
                token = parse_qs(parts.query).get("token", [""])[0]
                server.hits[name] += 1
                if name in server.delay:
                    time.sleep(server.delay[name])
                if server.fail_first[name] > 0:
                    server.fail_first[name] -= 1
                    return self._json(server.fail_status, {"error": "try again later"})
                if token in server.expired:
                    return self._json(400, {"statusCode": "400", "error": "InvalidJWT",
                                            "message": '"exp" claim timestamp check failed'})
                if token not in server.tokens:
                    return self._json(400, {"statusCode": "400", "error": "InvalidJWT", "message": "invalid signature"})
                path = server.root / name
                if not parts.path.startswith(PREFIX) or "/" in name or not path.is_file():
                    return self._json(404, {"statusCode": "404", "error": "not_found", "message": "Object not found"})
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut:
                    self.wfile.write(body[:server.cut[name]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _json(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str, token: str) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}{name}?token={token}"

    def __enter__(self) -> "SignedUrlServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
