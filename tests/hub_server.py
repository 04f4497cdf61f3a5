"""A local stand-in for the Hugging Face Hub's HTTP API, enough for the real `huggingface_hub` client (2.4).

What it mimics, and where in the client each part is read (huggingface_hub 2.4):

- `GET /api/models/<org>/<name>[/revision/<rev>]` (`HfApi.model_info`, `repo_info`; `?blobs=true` adds sizes, blob
  ids and LFS info to `siblings`): a JSON body that `hf_api.ModelInfo` parses. Answered for gated repos too, as the
  Hub does (`"gated": "manual"`): a repo's card and file list are public, only its files' contents are gated.
- `GET /api/models/<org>/<name>/tree/<rev>[/<path>][?recursive=true]` (`list_repo_tree`, used by
  `snapshot_download`): a JSON list that `hf_api.RepoFile` / `RepoFolder` parse, in one page (no `Link` header).
- `HEAD`/`GET /<org>/<name>/resolve/<rev>/<file>` (`file_download.get_hf_file_metadata`, `http_get`): a regular
  file answers 200 with `ETag` (its git blob id), `X-Repo-Commit` and `Content-Length`. An "LFS" file (*.safetensors,
  *.bin, *.model) answers `302` to a "CDN", with `X-Linked-Etag` (its sha256), `X-Linked-Size` and `X-Repo-Commit`.
  The CDN is a second server on another port, so the client treats it as another host, as it treats the real CDN:
  it stops following redirects there on HEAD and sends no `Authorization` header to it.
- Errors as `utils/_http.py:hf_raise_for_status` maps them: headers `X-Error-Code` (`RepoNotFound`, `GatedRepo`,
  `RevisionNotFound`, `EntryNotFound`) and `X-Error-Message`, a body `{"error": message}`; a missing repo is 401 for
  an anonymous request and 404 with a token, a gated repo 401 without a token and 403 with a token it does not let in.
  (The client's fallback "any 401 on a repo URL is RepoNotFound" only matches `https://` URLs, so the codes matter.)

Repos are folders: `root/<org>/<name>`; every regular file under one is a repo file. Revisions are "main" and the
commit id, a hash of the repo's file names and contents (it changes when a file does).

Test hooks (on the `HubServer`, shared by both ports):
- `gated[repo_id] = {"hf_good_token", ...}`: gate the repo's files; `gate_api = True` gates its API answers too
  (the real Hub does not).
- `requests`: `(method, path)` of every request, path unquoted and without its query; CDN paths start with
  `/cdn-lfs/`; `tokens[i]`: the bearer token `requests[i]` carried, or None. `bytes_served[(repo_id, filename)]`:
  body bytes sent per file (a Counter: 0 when never sent).
- `cut_after[(repo_id, filename)] = n`: the next GET of that file's content sends its headers (full length announced)
  and n body bytes, then closes the connection (FIN); once. `reset_after[...] = n`: the same, but the connection is
  reset (RST), as a dropped NAT entry or a killed proxy does. `Range: bytes=a-`, `a-b` and `-n` answer 206.
- `loopback_only_client`: a client factory for `huggingface_hub.set_client_factory` that refuses any request to a
  host other than 127.0.0.1, so a call that forgot its `endpoint=` fails instead of reaching huggingface.co.
- `slow_s`: a delay after every 64 KiB of body sent.
"""

import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

import httpx2  # huggingface_hub 2.x's HTTP client
from huggingface_hub.utils._http import hf_request_event_hook

LFS_SUFFIXES = (".safetensors", ".bin", ".model")
CHUNK = 64 * 1024
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
DATE = "2024-01-01T00:00:00.000Z"


class HubFile(NamedTuple):
    path: str  # forward slashes, relative to the repo
    size: int
    oid: str  # git blob id: of the file, or of its LFS pointer file
    sha256: str | None  # LFS files only
    pointer_size: int | None  # LFS files only
    local: Path


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def scan(repo_dir: Path) -> tuple[str, dict[str, HubFile]]:
    """The repo's commit id and files, as git and git-lfs would see them."""
    files = {}
    for p in sorted(repo_dir.rglob("*")):
        if not p.is_file():
            continue
        rel, data = p.relative_to(repo_dir).as_posix(), p.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest() if rel.endswith(LFS_SUFFIXES) else None
        blob = data if sha256 is None else (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode())
        oid = _sha1(b"blob %d\0" % len(blob) + blob)
        files[rel] = HubFile(rel, len(data), oid, sha256, None if sha256 is None else len(blob), p)
    commit = _sha1("".join(f"{f.path}\0{f.oid}\n" for f in files.values()).encode())
    return commit, files


def _tree_entry(f: HubFile) -> dict:
    entry = {"type": "file", "oid": f.oid, "size": f.size, "path": f.path}
    if f.sha256:
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
    return entry


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer has a Content-Length
    timeout = 30  # an idle kept-alive connection's thread ends after this

    def log_message(self, *args):
        pass

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def do_POST(self):  # e.g. paths-info, commits: not mimicked, but recorded
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.hub._record("POST", unquote(urlsplit(self.path).path), self._token())
        self._error(404, None, "Not Found")

    def _handle(self):
        hub, url = self.server.hub, urlsplit(self.path)
        parts = url.path.split("/")[1:]
        hub._record(self.command, unquote(url.path), self._token())
        try:
            if self.server.is_cdn and parts[0] == "cdn-lfs" and len(parts) >= 5:
                self._cdn("/".join(parts[1:3]), parts[3], unquote("/".join(parts[4:])))
            elif not self.server.is_cdn and parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(unquote("/".join(parts[2:4])), parts[4:], parse_qs(url.query))
            elif not self.server.is_cdn and len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(unquote("/".join(parts[:2])), unquote(parts[3]), unquote("/".join(parts[4:])))
            else:
                self._error(404, None, "Not Found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = _handle

    # -- answers -------------------------------------------------------------------------------------------------
    def _send(self, status: int, headers: dict, body: bytes = b""):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj):
        self._send(200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(obj).encode())

    def _error(self, status: int, code: str | None, message: str, headers=None):
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message, **(headers or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _repo(self, repo_id: str, rev: str, gate: bool):
        """(commit, files) of the repo at `rev`, or None once the error is answered."""
        hub, token = self.server.hub, self._token()
        if not REPO_ID.fullmatch(repo_id) or not (hub.root / repo_id).is_dir():
            return self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        allowed = hub.gated.get(repo_id)
        if gate and allowed is not None and token not in allowed:
            if token is None:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                   "to it and be authenticated to access it. Please log in.")
            return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                               f"authorized list. Visit {hub.endpoint}/{repo_id} to ask for access.")
        commit, files = scan(hub.root / repo_id)
        if rev not in ("main", commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit, files

    def _api(self, repo_id: str, rest: list[str], query: dict):
        kind, rev = (rest[0], unquote(rest[1])) if len(rest) >= 2 else ("revision", "main")
        sub = unquote("/".join(rest[2:])).strip("/")
        if (rest and len(rest) < 2) or kind not in ("revision", "tree") or (kind == "revision" and sub):
            return self._error(404, None, "Not Found")
        hub = self.server.hub
        if (repo := self._repo(repo_id, rev, gate=hub.gate_api)) is None:
            return
        commit, files = repo
        if kind == "tree":
            return self._tree(commit, files, sub, query.get("recursive", ["false"])[0].lower() == "true")
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [{"rfilename": f.path} | ({"size": f.size, "blobId": f.oid} if blobs else {})
                    | ({"lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}}
                       if blobs and f.sha256 else {}) for f in files.values()]
        self._json({"_id": _sha1(repo_id.encode())[:24], "id": repo_id, "modelId": repo_id,
                    "author": repo_id.split("/")[0], "sha": commit, "lastModified": DATE, "createdAt": DATE,
                    "private": False, "gated": "manual" if repo_id in hub.gated else False, "disabled": False,
                    "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                    "usedStorage": sum(f.size for f in files.values())})

    def _tree(self, commit: str, files: dict, sub: str, recursive: bool):
        prefix, entries = f"{sub}/" if sub else "", {}
        for f in files.values():
            if not f.path.startswith(prefix):
                continue
            steps = f.path[len(prefix):].split("/")
            for i in range(1, len(steps) if recursive else min(2, len(steps))):
                folder = prefix + "/".join(steps[:i])
                entries.setdefault(folder, {"type": "directory", "size": 0, "path": folder, "oid": _sha1(
                    "".join(g.oid for g in files.values() if g.path.startswith(folder + "/")).encode())})
            if recursive or len(steps) == 1:
                entries[f.path] = _tree_entry(f)
        if sub and not entries:
            return self._error(404, "EntryNotFound", f"{sub} does not exist on \"{commit}\"")
        self._json([entries[p] for p in sorted(entries)])

    def _resolve(self, repo_id: str, rev: str, filename: str):
        if (repo := self._repo(repo_id, rev, gate=True)) is None:
            return
        commit, files = repo
        if (f := files.get(filename)) is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.oid}"'}
        if f.sha256 is None:
            return self._send_file(repo_id, f, headers)
        location = f"{self.server.hub.cdn_endpoint}/cdn-lfs/{repo_id}/{f.sha256}/{quote(filename)}"
        self._send(302, {**headers, "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                         "Location": location, "Content-Type": "text/plain; charset=utf-8"},
                   f"Found. Redirecting to {location}".encode())

    def _cdn(self, repo_id: str, sha256: str, filename: str):
        """The "CDN" serves an LFS file by (repo, sha256, name) to anyone: the URL is the credential, as if signed."""
        repo_dir = self.server.hub.root / repo_id
        f = scan(repo_dir)[1].get(filename) if REPO_ID.fullmatch(repo_id) and repo_dir.is_dir() else None
        if f is None or f.sha256 != sha256:
            return self._send(404, {"Content-Type": "text/plain"}, b"NoSuchKey")
        self._send_file(repo_id, f, {"ETag": f'"{sha256}"'})

    def _send_file(self, repo_id: str, f: HubFile, headers: dict):
        hub, start, end, status = self.server.hub, 0, f.size - 1, 200
        if rng := self.headers.get("Range"):
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
            if m and m[1]:
                start, end = int(m[1]), min(int(m[2]), f.size - 1) if m[2] else f.size - 1
            elif m and m[2]:
                start = max(f.size - int(m[2]), 0)
            if not m or not (m[1] or m[2]) or start > end:
                return self._send(416, {"Content-Range": f"bytes */{f.size}"})
            status, headers = 206, {**headers, "Content-Range": f"bytes {start}-{end}/{f.size}"}
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                            "Content-Length": str(end - start + 1)}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        key = (repo_id, f.path)
        with hub._lock:
            cut, reset = hub.cut_after.pop(key, None), hub.reset_after.pop(key, None)
        cut = reset if reset is not None else cut
        sent, left = 0, end - start + 1
        with open(f.local, "rb") as fh:
            fh.seek(start)
            while left > 0:
                if cut is not None and sent >= cut:  # the announced length is never reached: drop the connection
                    self.close_connection = True
                    if reset is None:
                        return self.connection.shutdown(socket.SHUT_RDWR)  # FIN: the body just ends early
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return self.connection.close()  # RST: the client's read fails with ECONNRESET
                chunk = fh.read(min(CHUNK, left) if cut is None else min(CHUNK, left, cut - sent))
                if not chunk:  # the file shrank under us
                    self.close_connection = True
                    return
                with hub._lock:  # counted before it is written: a client that has every byte finds them all counted
                    hub.bytes_served[key] += len(chunk)
                self.wfile.write(chunk)
                sent, left = sent + len(chunk), left - len(chunk)
                if hub.slow_s:
                    time.sleep(hub.slow_s)


def loopback_only_client() -> httpx2.Client:
    """The client `huggingface_hub` builds by default (`utils/_http.py:default_client_factory`), loopback only."""
    def refuse_other_hosts(request: httpx2.Request):
        if request.url.host != "127.0.0.1":
            raise RuntimeError(f"test Hub: refused a request to {request.url} (pass endpoint=hub.endpoint)")

    return httpx2.Client(event_hooks={"request": [hf_request_event_hook, refuse_other_hosts]},
                         follow_redirects=True, timeout=None)


class HubServer:
    """`with HubServer(root) as hub:` a Hub on `hub.endpoint` (and its CDN on `hub.cdn_endpoint`), both loopback."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.gated: dict[str, set[str]] = {}
        self.gate_api = False
        self.requests: list[tuple[str, str]] = []
        self.tokens: list[str | None] = []
        self.bytes_served: Counter = Counter()
        self.cut_after: dict[tuple[str, str], int] = {}
        self.reset_after: dict[tuple[str, str], int] = {}
        self.slow_s = 0.0
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    def commit(self, repo_id: str) -> str:
        """The repo's current commit id (what `model_info(...).sha` reports)."""
        return scan(self.root / repo_id)[0]

    def _record(self, method: str, path: str, token: str | None):
        with self._lock:
            self.requests.append((method, path))
            self.tokens.append(token)

    def __enter__(self):
        for is_cdn in (False, True):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.hub, server.is_cdn = self, is_cdn
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        self.endpoint, self.cdn_endpoint = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def __exit__(self, *exc):
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()
