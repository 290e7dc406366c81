"""Who is calling: bearer tokens (JWT) to user ids.

Tokens come from the ``Authorization: Bearer`` header or, for browsers, the
``token`` query parameter. With auth off every caller is ``anonymous``.
"""

from __future__ import annotations

import jwt
from starlette.requests import HTTPConnection

from app.chat import keys
from app.chat.keys import UserId
from app.settings import Settings

ANONYMOUS = UserId("anonymous")
# Tolerated clock difference between the token issuer and this pod.
LEEWAY_S = 30


class AuthError(Exception):
    """The caller could not be authenticated; the message says why (never the token)."""


class Authenticator:
    """Verifies HS256 tokens signed with CHAT_AUTH_SECRET."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self._secret = settings.chat_auth_secret or ""

    def user_for(self, conn: HTTPConnection) -> UserId:
        if not self.enabled:
            return ANONYMOUS
        token = _bearer(conn)
        if not token:
            raise AuthError("a bearer token is required")
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], leeway=LEEWAY_S,
                options={"require": ["sub", "exp"]},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid token") from None
        try:
            return keys.user_id(str(claims["sub"]))
        except keys.InvalidId as exc:
            raise AuthError(f"token subject: {exc}") from None


def _bearer(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return conn.query_params.get("token")
