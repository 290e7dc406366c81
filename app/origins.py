"""Browser safety: which web pages may open a socket (cross-site WebSocket hijacking).

A browser lets any web page open a WebSocket to any server, and sends along
whatever the page's user has for that server. So a socket upgrade is checked
against its ``Origin`` header, before it is accepted:

- no ``Origin`` at all: not a browser (CLI, SDK, server), allowed; such a
  caller must still bring a token;
- the page's own origin (its host and port are the ``Host`` the request was
  sent to): allowed, so the demo page works with the default config;
- an origin listed in CHAT_ALLOWED_ORIGINS (``scheme://host[:port]``, comma
  separated), or any origin when that list holds ``*`` (on purpose only);
- anything else, ``null`` included (sandboxed frames, ``file:``): refused
  with HTTP 403 before the upgrade.

Behind a proxy that rewrites ``Host``, list the public origin explicitly.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from app.settings import ConfigError

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


class OriginPolicy:
    """The configured allow-list, and the same-origin rule."""

    def __init__(self, allowed: str) -> None:
        entries = [part.strip() for part in allowed.split(",") if part.strip()]
        self.any = "*" in entries
        self.origins: set[str] = set()
        for entry in entries:
            if entry == "*":
                continue
            normal = normalize(entry)
            if normal is None:
                raise ConfigError(
                    f"CHAT_ALLOWED_ORIGINS: {entry!r} is not an origin like https://app.example.com"
                )
            self.origins.add(normal)

    @property
    def explicit(self) -> list[str]:
        """The origins listed (for CORS on the REST API)."""
        return ["*"] if self.any else sorted(self.origins)

    def allows(self, conn: HTTPConnection) -> bool:
        origin = conn.headers.get("origin")
        if origin is None:
            return True
        if self.any:
            return True
        normal = normalize(origin)
        if normal is None:
            return False
        if normal in self.origins:
            return True
        host = conn.headers.get("host")
        return host is not None and normal.split("://", 1)[1] == _strip_default_port(host.lower())


def normalize(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None
    when ``origin`` is not one (``null``, a path, garbage)."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if port is not None and str(port) != _DEFAULT_PORTS[parts.scheme]:
        netloc = f"{netloc}:{port}"
    return f"{parts.scheme}://{netloc}"


def _strip_default_port(host: str) -> str:
    for port in ("80", "443"):
        if host.endswith(f":{port}"):
            return host[: -len(port) - 1]
    return host
