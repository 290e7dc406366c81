"""The TypeScript client (clients/js) under Node's test runner, against real
pods and a real redis-server started here: ``node --test`` gets the pods'
addresses (and one pod it may kill) in its environment, so the README's one
test command runs the JS tests too.

Node and the client's npm packages (``npm ci`` in clients/js) are required
in CI (DURABLE_CHAT_REQUIRE_NODE=1); elsewhere their absence skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.shared_pods import pods
from tests.integration.tokens import AUTH_ENV, token

pytestmark = pytest.mark.integration

JS = Path(__file__).resolve().parents[2] / "clients" / "js"
WEB = Path(__file__).resolve().parents[2] / "app" / "web"


def require_node() -> str:
    """The ``node`` binary with the client's packages installed, or skip (fail in CI)."""
    node = shutil.which("node")
    problem = None
    if node is None or shutil.which("npm") is None:
        problem = "node and npm are not installed (Node >= 20)"
    elif not (JS / "node_modules").is_dir():
        problem = "the JS client's packages are not installed: (cd clients/js && npm ci)"
    if problem:
        if os.environ.get("DURABLE_CHAT_REQUIRE_NODE") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    assert node is not None
    return node


def build_client() -> None:
    """Compile the client into clients/js/dist (tsc, strict): a type error fails here."""
    built = subprocess.run(
        ["npx", "--no-install", "tsc", "-p", "tsconfig.json"],
        cwd=JS, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr


@pytest.fixture(scope="module")
def node() -> str:
    """``node``, once the client is compiled (once for the module)."""
    binary = require_node()
    build_client()
    return binary


@pytest.mark.timeout(180)  # every node test file, in one run of node
def test_js_client_against_real_pods(request, node, tmp_path):
    # A short lock lease: the turn of the pod killed mid-reply is closed (as
    # interrupted) by a surviving pod's reaper within about a second.
    env = dict(
        AUTH_ENV, CHAT_FAKE_REPLY_TOKENS=30, CHAT_FAKE_TOKEN_DELAY_MS=10,
        CHAT_LOCK_TTL_MS=1000, CHAT_REAPER_INTERVAL_MS=200,
        # One user sends every prompt of every node test, in well under a minute.
        CHAT_RATE_PROMPTS_PER_MIN=1000, CHAT_RATE_PROMPT_BURST=1000,
    )  # fmt: skip
    with pods(request, tmp_path, count=3, **env) as (victim, a, b):
        env = {
            **os.environ,
            "DC_PODS": f"{a.http},{b.http}",
            "DC_VICTIM": victim.http,
            "DC_VICTIM_PID": str(victim.pid),
            "DC_TOKENS": json.dumps({"alice": token("alice"), "mallory": token("mallory")}),
        }
        run = subprocess.run(
            [node, "--experimental-websocket", "--test", "--test-reporter=tap", "test/"],
            cwd=JS, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    # Every test ran: none skipped for want of the pods' addresses.
    assert "\n# fail 0\n" in report and "\n# skipped 0\n" in report, report
    assert int(re.search(r"\n# pass (\d+)\n", report)[1]) >= 15, report  # type: ignore[index]


def test_the_page_serves_the_client_it_was_built_from(node):
    """app/web/durable-chat-client.js is the compiled client, byte for byte
    (``npm run build`` in clients/js copies it there)."""
    assert (WEB / "durable-chat-client.js").read_bytes() == (JS / "dist" / "client.js").read_bytes()


def test_the_packed_package_installs_in_a_fresh_node_project(node, tmp_path):
    """``npm pack`` then ``npm install`` of the tarball in an empty project (no
    network: the package has no dependencies), and both entry points import."""
    packed = subprocess.run(
        ["npm", "pack", "--ignore-scripts", "--pack-destination", str(tmp_path), "--silent"],
        cwd=JS, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr
    tarball = tmp_path / packed.stdout.strip().splitlines()[-1]
    project = tmp_path / "fresh"
    project.mkdir()
    (project / "package.json").write_text('{"name": "fresh", "private": true, "type": "module"}')
    installed = subprocess.run(
        ["npm", "install", "--offline", "--no-audit", "--no-fund", str(tarball)],
        cwd=project, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    script = (
        "import { DurableChatClient, compareIds } from 'durable-chat-client';"
        "import { DurableChatTransport } from 'durable-chat-client/ai-sdk';"
        "const t = new DurableChatTransport({ urls: ['http://127.0.0.1:1'] });"
        "console.log(typeof DurableChatClient, compareIds('2-0', '10-0'), t.resumeStreamIsReplay);"
    )
    ran = subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=project, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.stdout.split() == ["function", "-1", "true"], ran.stderr
