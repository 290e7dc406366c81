"""What a new user meets in the first hour, on one embedded pod (the README's
first command): documentation pages that work without the internet, a fake
model that says it is fake, refusals and errors that say why."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from urllib.parse import urljoin

import httpx
import pytest

from app.llm.fake import expected_reply
from tests import procs
from tests.integration.conftest import require
from tests.integration.helpers import open_ready, recv_event, turn, unique
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


def test_the_pod_warns_loudly_that_its_model_is_fake(pod: Server) -> None:
    warnings = [line for line in pod.logs().splitlines() if " WARNING " in line]
    assert any("FAKE model" in line and "ANTHROPIC_API_KEY" in line for line in warnings), warnings


async def test_a_fake_reply_reads_as_fake_and_echoes_the_prompt(pod: Server) -> None:
    prompt = "Why is the sky blue?"
    ws, _ = await open_ready(pod.ws, unique("fake"))
    try:
        events = await turn(ws, prompt)
    finally:
        await ws.close()
    reply = events[-2]["message"]["content"]
    assert reply == expected_reply(prompt, 40)  # CHAT_FAKE_REPLY_TOKENS' default
    assert reply.startswith("(fake model) You said: “Why is the sky blue?”")
    assert len(reply.split()) == 40
    assert events[1]["type"] == "loading" and events[1]["model"] == "fake"


def test_the_demo_page_shows_a_banner_while_the_model_is_fake(pod: Server) -> None:
    chromium = require(
        shutil.which("chromium") or shutil.which("chromium-browser"),
        "chromium is not installed (apt-get install -y chromium)",
        "DURABLE_CHAT_REQUIRE_CHROMIUM",
    )
    served = httpx.get(pod.http + "/", timeout=10).text
    assert '<body data-model="fake">' in served
    assert re.search(r'<div id="fake-model"[^>]* hidden>', served), "hidden until the script runs"
    # The page as a browser renders it, its script run.
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
         "--dump-dom", pod.http + "/"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    banner = re.search(r'<div id="fake-model"[^>]*>', dom)
    assert banner is not None, dom[:2000]
    assert "hidden" not in banner.group(0)


def test_every_http_error_has_the_one_error_shape(pod: Server) -> None:
    deep = "[" * 5000 + "]" * 5000
    as_json = {"content-type": "application/json"}
    cases = [
        ("GET", "/no/such/path", {}, 404, "not_found", "no such path: /no/such/path"),
        ("DELETE", "/healthz", {}, 405, "bad_request", "Method Not Allowed"),
        ("POST", "/v1/threads", {"content": "{bad", "headers": as_json}, 422, "bad_request",
         "body is not valid JSON: Expecting property name enclosed in double quotes"),
        ("POST", "/v1/threads", {"content": deep, "headers": as_json}, 422, "bad_request",
         "body is nested too deeply"),
    ]  # fmt: skip
    for method, path, kwargs, status, code, message in cases:
        response = httpx.request(method, pod.http + path, timeout=10, **kwargs)
        assert response.status_code == status, (path, response.text)
        assert response.json() == {"error": {"code": code, "message": message}}, path
    # No body at all creates a thread, as `{}` does.
    created = httpx.post(pod.http + "/v1/threads", timeout=10)
    assert created.status_code == 201, created.text
    assert created.json()["owner"] == "anonymous"


async def test_a_deeply_nested_frame_is_called_that(pod: Server) -> None:
    ws, _ = await open_ready(pod.ws, unique("deep"))
    try:
        await ws.send('{"type":"prompt","content":' + "[" * 5000 + "]" * 5000 + "}")
        error = await recv_event(ws)
    finally:
        await ws.close()
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert "nested deeper than" in error["message"], error
