"""What the parts of the Supabase stand-in (tests/supabase_server.py, tests/supabase_rest.py,
tests/supabase_storage.py) share: the JSON content type, the HS256 JWTs the stand-in signs (its service key,
signed-URL tokens), UTC timestamps, and the exception that closes a connection without an answer."""

import base64
import hashlib
import hmac
import json
from datetime import datetime, timezone

JWT_SECRET = b"brightrun-test-jwt-secret-not-a-real-one-32+chars"  # signs the stand-in's own JWTs only
JSON_TYPE = "application/json; charset=utf-8"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(payload: dict, secret: bytes = JWT_SECRET) -> str:
    """An HS256 JWT (the shape of Supabase's keys and signed-URL tokens)."""
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"



def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _DropConnection(Exception):
    """Close the connection without answering."""
