"""What a new user meets in the first hour, on one embedded pod (the README's
first command): documentation pages that work without the internet, a fake
model that says it is fake, refusals and errors that say why."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urljoin

import httpx
import pytest

from tests import procs
from tests.procs import Server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pod(tmp_path_factory) -> Iterator[Server]:
    """The README's pod: no REDIS_URL, so embedded Redis and the fake model."""
    log = tmp_path_factory.mktemp("first-hour") / "pod.log"
    with procs.running([procs.pod("first", None, log, CHAT_FAKE_TOKEN_DELAY_MS=1)]) as started:
        yield started[0]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_documentation_pages_load_everything_from_the_pod(pod: Server, page: str) -> None:
    # An air-gapped cluster reaches nothing but the pod: every script and
    # style the page names must be the pod's own, and load.
    html = httpx.get(pod.http + page, timeout=10).text
    assets = re.findall(r'<(?:script|link)[^>]*?(?:src|href)="([^"]+)"', html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        url = urljoin(pod.http + page, asset)
        assert url.startswith(pod.http + "/"), f"{page} loads {asset} from elsewhere"
        response = httpx.get(url, timeout=10, follow_redirects=True)
        assert response.status_code == 200, (asset, response.status_code)
        assert len(response.content) > 1000, asset
    assert httpx.get(pod.http + "/openapi.json", timeout=10).json()["info"]["title"]


def test_the_browser_finds_a_favicon(pod: Server) -> None:
    response = httpx.get(pod.http + "/favicon.ico", timeout=10, follow_redirects=True)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
