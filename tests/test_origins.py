"""The Origin check of socket upgrades (app.origins)."""

from __future__ import annotations

import pytest
from starlette.requests import HTTPConnection

from app.origins import OriginPolicy, normalize
from app.settings import ConfigError


def _conn(origin: str | None, host: str = "chat.example.com") -> HTTPConnection:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return HTTPConnection({"type": "websocket", "headers": headers, "query_string": b""})


def test_default_allows_the_page_itself_and_non_browsers_only() -> None:
    policy = OriginPolicy("")
    assert policy.allows(_conn(None))
    assert policy.allows(_conn("https://chat.example.com"))
    assert policy.allows(_conn("http://127.0.0.1:8000", host="127.0.0.1:8000"))
    assert policy.allows(_conn("https://chat.example.com:443", host="chat.example.com"))
    for foreign in [
        "https://evil.example.com",
        "https://chat.example.com.evil.net",
        "http://127.0.0.1:9999",
        "null",
        "file://",
        "garbage",
    ]:
        assert not policy.allows(_conn(foreign, host="chat.example.com")), foreign
    assert not policy.allows(_conn("http://127.0.0.1:9999", host="127.0.0.1:8000"))


def test_listed_origins_and_the_wildcard() -> None:
    policy = OriginPolicy(" https://app.example.com , http://localhost:3000")
    assert policy.allows(_conn("https://APP.example.com"))
    assert policy.allows(_conn("http://localhost:3000"))
    assert not policy.allows(_conn("http://localhost:3001"))
    assert policy.explicit == ["http://localhost:3000", "https://app.example.com"]
    anything = OriginPolicy("*")
    assert anything.allows(_conn("https://evil.example.com")) and anything.explicit == ["*"]


@pytest.mark.parametrize("bad", ["app.example.com", "https://a.example.com/path", "ftp://x"])
def test_a_malformed_allow_list_refuses_to_start(bad: str) -> None:
    with pytest.raises(ConfigError, match="CHAT_ALLOWED_ORIGINS"):
        OriginPolicy(bad)


def test_normalize() -> None:
    assert normalize("HTTPS://Example.com:443/") == "https://example.com"
    assert normalize("http://[::1]:8000") == "http://[::1]:8000"
    assert normalize("http://user@example.com") is None
    assert normalize("http://example.com:99999") is None
