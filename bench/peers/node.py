"""The Node peer (bench/peers/node-socketio): installing it and starting it.

Its server is JavaScript (``server.js``: Socket.IO with the official Redis
adapter), its packages pinned by the committed package-lock.json and
installed with ``npm ci`` the first time a run needs them. A machine without
Node skips this peer, saying why; the rest of the run goes on.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests import procs
from tests.procs import ROOT, Server

HOME = ROOT / "bench" / "peers" / "node-socketio"
INSTALL_TIMEOUT_S = 300


def unavailable() -> str | None:
    """Why the Node peer cannot run here (None: it can), installing its
    packages first when node_modules is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return "node is not installed (apt-get install -y nodejs npm)"
    if (HOME / "node_modules").is_dir():
        return None
    if npm is None:
        return f"npm is not installed, and {HOME}/node_modules is missing"
    print(f"installing the Node peer's packages (npm ci in {HOME})", flush=True)
    try:
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=HOME, capture_output=True, text=True,
            timeout=INSTALL_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"npm ci took more than {INSTALL_TIMEOUT_S} s"
    if proc.returncode != 0:
        shutil.rmtree(HOME / "node_modules", ignore_errors=True)
        return f"npm ci failed: {proc.stderr.strip()[-500:]}"
    return None


def server(name: str, redis_url: str, log_path: Path, turn_env: dict[str, str]) -> Server:
    """One process of the Node peer on a free port, with the same token stream."""
    port = procs.free_port()
    env = procs.base_env()
    env.update(turn_env)
    node = shutil.which("node") or "node"
    argv = [node, str(HOME / "server.js"), "--port", str(port), "--redis", redis_url]
    return Server(name, argv, env, port, log_path)
