"""The demo page in a real browser (Debian's chromium, headless, driven by
Playwright with ``executable_path``: no browser download), on real pods: it
runs on the TypeScript client the pod serves, two pages on two pods stream
the same reply, and a page whose pod is killed mid-reply resumes on another
pod with no text lost or doubled. Screenshots go to the test's tmp dir.

Without chromium these tests skip, except in CI (DURABLE_CHAT_REQUIRE_CHROMIUM=1).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import require
from tests.integration.shared_pods import pods
from tests.procs import Server

pytestmark = pytest.mark.integration

WAIT_MS = 15000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Records every state the connection label shows, so that a test can see the
# page reconnect, and not only where it ends up.
WATCH_CONNECTION = """
window.__states = [];
const conn = document.getElementById("conn");
new MutationObserver(() => window.__states.push(conn.textContent))
  .observe(conn, { childList: true, characterData: true, subtree: true });
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = require(
        CHROMIUM, "chromium is not installed (apt-get install -y chromium)",
        "DURABLE_CHAT_REQUIRE_CHROMIUM",
    )  # fmt: skip
    # The test extra installs playwright (the driver only): never skipped for want of it.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def three_pods(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    # A short lock lease: a killed pod's turn is closed (interrupted) within a second.
    with pods(
        request, tmp_path_factory.mktemp("page"), count=3, cross_origin=True,
        CHAT_FAKE_REPLY_TOKENS=60, CHAT_FAKE_TOKEN_DELAY_MS=25,
        CHAT_LOCK_TTL_MS=1000, CHAT_REAPER_INTERVAL_MS=200,
    ) as started:  # fmt: skip
        yield started


def open_page(browser: Any, pod: Server, thread: str, *others: Server) -> Any:
    page = browser.new_page()
    page.on("pageerror", lambda error: pytest.fail(f"page error: {error}"))
    extra = f"&pods={','.join(o.http for o in others)}" if others else ""
    page.goto(f"{pod.http}/#thread={thread}{extra}")
    page.wait_for_function("document.getElementById('conn').textContent.startsWith('live')",
                           timeout=WAIT_MS)  # fmt: skip
    page.evaluate(WATCH_CONNECTION)
    return page


def bubbles(page: Any) -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        "#list .msg",
        "els => els.map(e => ({role: e.classList.contains('user') ? 'user' : 'assistant',"
        " text: e.querySelector('.body').textContent, id: e.dataset.id || '',"
        " status: e.querySelector('.status').textContent}))",
    )


def wait_for_reply(page: Any) -> None:
    """Until the page shows a finished assistant message (no streaming bubble)."""
    page.wait_for_function(
        "document.querySelector('#list .msg.assistant[data-id]') &&"
        " !document.querySelector('#list .msg.streaming')",
        timeout=WAIT_MS,
    )


def history(pod: Server, thread: str) -> list[dict[str, Any]]:
    page = httpx.get(f"{pod.http}/v1/threads/{thread}/messages", timeout=10)
    return page.json()["messages"]  # type: ignore[no-any-return]


def test_the_page_runs_on_the_served_client(three_pods: list[Server]) -> None:
    html = httpx.get(three_pods[1].http + "/", timeout=10).text
    assert 'import { DurableChatClient, compareIds } from "/durable-chat-client.js"' in html
    assert "cdn" not in html.lower() and "https://" not in html.split("<script", 1)[1]
    module = httpx.get(three_pods[1].http + "/durable-chat-client.js", timeout=10)
    assert module.headers["content-type"].startswith("text/javascript")
    assert "export class DurableChatClient" in module.text


def test_two_pages_on_two_pods_stream_the_same_reply(
    browser: Any, three_pods: list[Server], tmp_path: Path
) -> None:
    _, pod_a, pod_b = three_pods
    thread = f"page-{uuid.uuid4().hex[:8]}"
    page_a = open_page(browser, pod_a, thread)
    page_b = open_page(browser, pod_b, thread)
    try:
        page_a.fill("#input", "hello from a browser")
        page_a.press("#input", "Enter")
        # B sees the reply stream in (a bubble still growing), not only its end.
        page_b.wait_for_selector("#list .msg.streaming .body:not(:empty)", timeout=WAIT_MS)
        page_b.screenshot(path=tmp_path / "b-streaming.png")
        wait_for_reply(page_a)
        wait_for_reply(page_b)
        page_a.screenshot(path=tmp_path / "a-done.png")
        page_b.screenshot(path=tmp_path / "b-done.png")
        seen_a, seen_b = bubbles(page_a), bubbles(page_b)
    finally:
        page_a.close()
        page_b.close()
    stored = history(pod_b, thread)
    expected = [{"role": m["role"], "text": m["content"], "id": m["id"], "status": ""}
                for m in stored]  # fmt: skip
    assert seen_a == seen_b == expected
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "hello from a browser"


def test_a_page_whose_pod_dies_mid_reply_resumes_on_another_pod(
    browser: Any, three_pods: list[Server], tmp_path: Path
) -> None:
    victim, pod_a, pod_b = three_pods
    thread = f"kill-{uuid.uuid4().hex[:8]}"
    page = open_page(browser, victim, thread, pod_a)  # the victim's page knows pod A too
    watcher = open_page(browser, pod_b, thread)
    try:
        page.fill("#input", "keep going while I kill your pod")
        page.press("#input", "Enter")
        page.wait_for_function(
            "(document.querySelector('#list .msg.streaming .body') || {}).textContent?.length > 20",
            timeout=WAIT_MS,
        )
        page.screenshot(path=tmp_path / "before-kill.png")
        victim.kill()  # kill -9, mid-reply
        wait_for_reply(page)
        wait_for_reply(watcher)
        page.screenshot(path=tmp_path / "resumed.png")
        states: list[str] = page.evaluate("window.__states")
        seen, watched = bubbles(page), bubbles(watcher)
    finally:
        page.close()
        watcher.close()
    assert "reconnecting" in states and states[-1] == "live", states
    stored = history(pod_a, thread)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    reply = stored[1]
    assert reply["status"] == "interrupted" and reply["content"]
    # Exactly the stored text, once: nothing lost, nothing doubled, on both pages.
    assert [b["text"] for b in seen] == [m["content"] for m in stored]
    assert seen == watched
    assert seen[1]["status"] == "\u26a0 interrupted"


def versions(page: Any, role: str) -> list[str]:
    """The "n/m" counters shown on the page's messages of ``role``."""
    return page.eval_on_selector_all(
        f"#list .msg.{role} .tools .count", "els => els.map(e => e.textContent)"
    )


def test_branches_on_the_page_edit_regenerate_and_switch(
    browser: Any, three_pods: list[Server], tmp_path: Path
) -> None:
    """Regenerate shows "2/2" on the reply, "<" goes back to the first reply
    (on the other page too), and an edit starts a branch of the prompt."""
    _, pod_a, pod_b = three_pods
    thread = f"branch-{uuid.uuid4().hex[:8]}"
    page_a = open_page(browser, pod_a, thread)
    page_b = open_page(browser, pod_b, thread)
    try:
        page_a.fill("#input", "first question")
        page_a.press("#input", "Enter")
        wait_for_reply(page_a)
        first_reply = bubbles(page_a)[1]["text"]
        page_a.click("#list .msg.assistant .tools .act")  # Regenerate
        for page in (page_a, page_b):
            page.wait_for_function(
                "[...document.querySelectorAll('#list .msg.assistant .count')]"
                ".some(e => e.textContent === '2/2')",
                timeout=WAIT_MS,
            )
        page_a.screenshot(path=tmp_path / "regenerated.png")
        assert versions(page_b, "assistant") == ["2/2"]
        page_b.click("#list .msg.assistant .tools .prev")  # back to the first reply
        for page in (page_a, page_b):
            page.wait_for_function(
                "document.querySelector('#list .msg.assistant .count')?.textContent === '1/2'",
                timeout=WAIT_MS,
            )
        assert bubbles(page_a)[1]["text"] == first_reply
        # Edit the prompt: a new branch of it, shown with its reply.
        page_a.click("#list .msg.user .tools .act")
        page_a.fill("#input", "first question, edited")
        page_a.press("#input", "Enter")
        page_a.wait_for_function(
            "document.querySelector('#list .msg.user .count')?.textContent === '2/2'"
            " && !document.querySelector('#list .msg.streaming')",
            timeout=WAIT_MS,
        )
        page_a.screenshot(path=tmp_path / "edited.png")
        shown = bubbles(page_a)
    finally:
        page_a.close()
        page_b.close()
    assert shown[0]["text"] == "first question, edited"
    assert [b["id"] for b in shown] == [m["id"] for m in history(pod_a, thread)]


def test_the_page_queues_a_prompt_sent_during_a_reply(
    browser: Any, three_pods: list[Server]
) -> None:
    _, pod_a, pod_b = three_pods
    thread = f"queue-{uuid.uuid4().hex[:8]}"
    page_a = open_page(browser, pod_a, thread)
    page_b = open_page(browser, pod_b, thread)
    try:
        page_a.select_option("#policy", "queue")
        page_a.wait_for_function(
            f"fetch('/v1/threads/{thread}').then(r => r.json())"
            ".then(t => t.prompt_policy === 'queue')",
            timeout=WAIT_MS,
        )
        page_a.fill("#input", "a long answer please")
        page_a.press("#input", "Enter")
        page_b.wait_for_selector("#list .msg.streaming", timeout=WAIT_MS)
        page_b.fill("#input", "and then this")
        page_b.press("#input", "Enter")
        page_a.wait_for_selector("#queue .waiting", timeout=WAIT_MS)
        assert "and then this" in page_a.text_content("#queue")
        # It runs after the first reply: two replies, and the queue is empty again.
        page_a.wait_for_function(
            "document.querySelectorAll('#list .msg.assistant[data-id]').length === 2"
            " && !document.querySelector('#list .msg.streaming')"
            " && !document.querySelector('#queue .waiting')",
            timeout=WAIT_MS,
        )
        texts = [b["text"] for b in bubbles(page_a) if b["role"] == "user"]
    finally:
        page_a.close()
        page_b.close()
    assert texts == ["a long answer please", "and then this"]


def test_the_thread_list_is_the_live_inbox(browser: Any, three_pods: list[Server]) -> None:
    _, pod_a, pod_b = three_pods
    shown, other = f"inbox-{uuid.uuid4().hex[:8]}", f"inbox-{uuid.uuid4().hex[:8]}"
    page = open_page(browser, pod_b, shown)
    try:
        # Another thread of the same user gets a message and a reply, on another pod.
        with httpx.Client(base_url=pod_a.http, timeout=10) as http:
            assert http.post("/v1/threads", json={"id": other}).status_code == 201
            body = {"content": "how do sourdough starters work in winter"}
            assert http.post(f"/v1/threads/{other}/messages", json=body).status_code == 202
        # The list shows it titled by the model, with its unread reply.
        item = f"#threads li:has(a[title='{other}'])"
        page.wait_for_selector(f"{item} .badge", timeout=WAIT_MS)
        title = "how do sourdough starters work in"
        page.wait_for_function(
            f"document.querySelector(\"{item} a\").textContent === '{title}'", timeout=WAIT_MS
        )
        assert page.text_content(f"{item} .badge") == "1"
        # Opened, it is read: the badge goes.
        page.click(f"{item} a")
        page.wait_for_selector(f"{item} .badge", state="detached", timeout=WAIT_MS)
    finally:
        page.close()
