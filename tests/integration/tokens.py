"""Tokens and authenticated sockets for the security integration tests."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import jwt

from tests.integration.helpers import connect

SECRET = "integration-test-secret-" + "x" * 40
ISSUER = "https://id.example.test/"
AUDIENCE = "durable-chat"
# A pod that checks tokens: pass as pod_factory(server, **AUTH_ENV).
AUTH_ENV = {
    "CHAT_AUTH": "jwt",
    "CHAT_AUTH_SECRET": SECRET,
    "CHAT_AUTH_ISSUER": ISSUER,
    "CHAT_AUTH_AUDIENCE": AUDIENCE,
}


def token(
    sub: str, key: Any = SECRET, algorithm: str = "HS256", kid: str | None = None, **claims: Any
) -> str:
    """A token for ``sub``, valid for 5 minutes unless ``claims`` say otherwise
    (a claim set to None is left out)."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + 300, "iss": ISSUER}
    body["aud"] = AUDIENCE
    body.update(claims)
    headers = {"kid": kid} if kid else None
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm, headers=headers
    )


def forged_hs256(secret: bytes, **claims: Any) -> str:
    """An HS256 token made by hand with any bytes as the secret (PyJWT refuses
    to use a PEM public key as an HMAC secret; an attacker does not)."""
    now = int(time.time())
    body = {"sub": "mallory", "exp": now + 300, "iss": ISSUER, "aud": AUDIENCE, **claims}
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    payload = jwt.utils.base64url_encode(json.dumps(body).encode())
    signing_input = header + b"." + payload
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()


def bearer(sub: str, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, **claims)}"}


async def open_socket(base: str, thread: str, sub: str | None, query: str = "", **kw: Any) -> Any:
    """A raw protocol socket as ``sub`` (token in the Authorization header)."""
    return await connect(base, thread, query, additional_headers=bearer(sub) if sub else {}, **kw)
