"""Load balancers in front of test pods: nginx and HAProxy, configured as
docs/operations.md tells operators to, each on a free loopback port.

Their configurations are read from that page's ``nginx`` and ``haproxy``
code blocks; only the pods' addresses, the listening port and, where a test
says so, one idle timeout are put in. So what the tests run is what the docs
say, and a change to either shows in the other.

Without the binaries these tests skip, unless DURABLE_CHAT_REQUIRE_NGINX=1 or
DURABLE_CHAT_REQUIRE_HAPROXY=1 (CI sets both): then they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.integration.conftest import require
from tests.procs import Server, base_env, free_port

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
# Debian installs both in /usr/sbin, which a non-root PATH may lack.
_SBIN = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
NGINX = shutil.which("nginx", path=_SBIN)
HAPROXY = shutil.which("haproxy", path=_SBIN)
# The example pods' lines in the docs: ``server [name] 10.0.0.N:8000 [options]``.
_EXAMPLE_SERVERS = re.compile(
    r"^(?P<indent>[ \t]*)server (?P<name>\w+ )?10\.0\.0\.\d+:8000(?P<rest>.*)$", re.M
)


def documented(kind: str) -> str:
    """The one ``kind`` code block (``nginx``, ``haproxy``) of docs/operations.md."""
    blocks = re.findall(rf"^```{kind}\n(.*?)^```", DOCS.read_text(), re.S | re.M)
    assert len(blocks) == 1, f"docs/operations.md has {len(blocks)} {kind} examples, not one"
    return str(blocks[0])


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the documented config no longer has one {old!r}"
    return text.replace(old, new)


def _with_pods(text: str, pods: Sequence[Server]) -> str:
    """The example's pod lines replaced by one line per test pod, same options."""
    examples = list(_EXAMPLE_SERVERS.finditer(text))
    assert len(examples) == 3, "the documented config should list three example pods"
    first = examples[0]
    lines = [
        f"{first['indent']}server {f'pod{i} ' if first['name'] else ''}127.0.0.1:{pod.port}"
        f"{first['rest']}"
        for i, pod in enumerate(pods)
    ]
    return text[: first.start()] + "\n".join(lines) + text[examples[-1].end() :]


def nginx_site(pods: Sequence[Server], port: int, read_timeout_s: int | None = None) -> str:
    """The documented nginx site for ``pods`` on ``port``, with nginx's
    ``proxy_read_timeout`` shortened to ``read_timeout_s`` if given."""
    site = _replace_once(
        _with_pods(documented("nginx"), pods), "listen 80;", f"listen 127.0.0.1:{port};"
    )
    if read_timeout_s is not None:
        assert "proxy_read_timeout " not in site.replace("# proxy_read_timeout", "")
        site = _replace_once(
            site,
            "proxy_pass http://durable_chat;",
            f"proxy_pass http://durable_chat;\n        proxy_read_timeout {read_timeout_s}s;",
        )
    return site


def haproxy_config(pods: Sequence[Server], port: int, tunnel_timeout_s: int | None = None) -> str:
    """The documented HAProxy configuration for ``pods`` on ``port``, with
    ``timeout tunnel`` shortened to ``tunnel_timeout_s`` if given."""
    config = _replace_once(
        _with_pods(documented("haproxy"), pods), "bind :80", f"bind 127.0.0.1:{port}"
    )
    if tunnel_timeout_s is not None:
        config = _replace_once(config, "timeout tunnel 60s", f"timeout tunnel {tunnel_timeout_s}s")
    return config


def require_nginx() -> str:
    return require(
        NGINX, "nginx is not installed (apt-get install -y nginx)", "DURABLE_CHAT_REQUIRE_NGINX"
    )


def require_haproxy() -> str:
    return require(
        HAPROXY,
        "haproxy is not installed (apt-get install -y haproxy)",
        "DURABLE_CHAT_REQUIRE_HAPROXY",
    )


def nginx(workdir: Path, pods: Sequence[Server], read_timeout_s: int | None = None) -> Server:
    """nginx (not yet started) in front of ``pods`` with the documented site,
    every file it writes inside ``workdir``: its error log is the server's
    log, its access log ``workdir/access.log``."""
    binary = require_nginx()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    temp = "".join(
        f"    {name}_temp_path {workdir / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = workdir / "nginx.conf"
    conf.write_text(
        "worker_processes 1;\n"  # one worker: round-robin is exact
        f"pid {workdir / 'nginx.pid'};\n"
        "error_log stderr info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {workdir / 'access.log'};\n"
        f"{temp}{nginx_site(pods, port, read_timeout_s)}}}\n"
    )
    argv = [binary, "-p", str(workdir), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
    return Server("nginx", argv, base_env(), port, workdir / "nginx.log")


def check_haproxy(config: str, workdir: Path) -> str:
    """``haproxy -c`` on ``config`` (written to ``workdir/haproxy.cfg``): its
    output, after asserting that it passed."""
    binary = require_haproxy()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run(
        [binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    return output


def haproxy(workdir: Path, pods: Sequence[Server], tunnel_timeout_s: int | None = None) -> Server:
    """HAProxy (not yet started, its configuration checked) in front of
    ``pods`` with the documented configuration, in the foreground."""
    port = free_port()
    check_haproxy(haproxy_config(pods, port, tunnel_timeout_s), workdir)
    argv = [require_haproxy(), "-db", "-f", str(workdir / "haproxy.cfg")]
    return Server("haproxy", argv, base_env(), port, workdir / "haproxy.log")
