"""The ``durable-chat`` command: ``serve`` runs a pod, ``worker`` the reaper,
``archiver`` the cold tier's archiver (``migrate`` creates its tables), and
the operator's commands ``tail``, ``history``, ``threads``, ``turns``, ``chat``,
and ``schema`` (what is generated from the protocol's models)."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
from typing import Any

import redis
import redis.cluster
import typer
import typer.core
import uvicorn

from app import ops
from app.chat import keys
from app.chat.keys import ThreadId
from app.chat.redis_types import SyncRedisClient
from app.logs import configure as configure_logging
from app.settings import ConfigError, Settings


class Failed(Exception):
    """A command failed in a way the user can act on: ``message`` says what
    failed and what to do; exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _plain_flags(params: list[Any]) -> list[Any]:
    """Flags take no value: show none (typer would print ``<bool>``)."""
    for param in params:
        if isinstance(param, typer.core.TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class _Command(typer.core.TyperCommand):
    """Help as a terminal user reads it: ``history [OPTIONS] THREAD``, not
    ``{thread}``; flags without a ``<bool>``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = (param.metavar or param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


cli = typer.Typer(
    help="durable-chat: durable multi-user AI chat on stateless pods and Redis.",
    cls=_Group,
    # Locals may hold tokens and secrets: a traceback (--debug) never shows them.
    pretty_exceptions_show_locals=False,
)
command = functools.partial(cli.command, cls=_Command)
_debug = False


@cli.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of failures."),
) -> None:
    global _debug
    _debug = debug


def _settings(pod: bool = True) -> Settings:
    """The settings; ``pod``: also those only a pod needs (authentication)."""
    try:
        settings = Settings()
        if pod:
            settings.check_startable()
    except (ConfigError, ValueError) as exc:
        typer.echo(f"durable-chat: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(
        settings.chat_log_level, settings.chat_pod_id, settings.chat_log_format == "json"
    )
    return settings


@command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Run one pod: the WebSocket API and the demo page at http://HOST:PORT/."""
    settings = _settings()
    from app.main import create_app
    from app.ws import ThreadSockets

    try:
        app = create_app(settings)
    except ConfigError as exc:  # a bad key, key file or origin list
        typer.echo(f"durable-chat: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    from app.process import SOCKETS_CLOSE_S, PodServer, PortInUse, bind

    try:
        sock = bind(host, port)
    except PortInUse as exc:
        typer.echo(f"durable-chat: {exc} (is another pod running? pick another --port)", err=True)
        raise typer.Exit(1) from None
    # uvicorn drains on SIGTERM and then raises the signal again, so the
    # process would end "killed by SIGTERM". A finished drain is a clean exit:
    # with a handler of our own installed first, that re-raise lands here and
    # the process exits 0, as orchestrators expect of a graceful stop.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    config = uvicorn.Config(
        ThreadSockets(app),  # thread sockets ahead of the app's stack: a connect skips it
        ws_max_size=settings.chat_max_frame_bytes,
        ws_per_message_deflate=settings.chat_ws_deflate,  # see Settings.chat_ws_deflate
        ws_ping_interval=settings.chat_ws_ping_interval_s,
        ws_ping_timeout=settings.chat_ws_ping_timeout_s,
        # uvicorn would trust X-Forwarded-For from 127.0.0.1 (or its own
        # FORWARDED_ALLOW_IPS) by default; a sidecar on the pod's loopback
        # would then let any client choose the address logged for it.
        proxy_headers=bool(settings.chat_forwarded_allow_ips),
        forwarded_allow_ips=settings.chat_forwarded_allow_ips or None,
        # Sockets are closed (1012) at once on SIGTERM; this bounds how long
        # uvicorn waits for their handlers. Turns are drained by the lifespan.
        timeout_graceful_shutdown=SOCKETS_CLOSE_S,
        log_level=settings.chat_log_level.lower(),
        log_config=None,  # keep ours (app.logs): JSON lines, tokens redacted
    )
    try:
        PodServer(config, settings.chat_drain_grace_s).run(sockets=[sock])
    except KeyboardInterrupt:  # SIGINT, re-raised by uvicorn after a finished drain
        pass


@command()
def worker() -> None:
    """Run the reaper on its own (pods also run it unless CHAT_REAPER_IN_POD=0)."""
    settings = _settings()
    if settings.embedded:
        typer.echo(
            "durable-chat: the worker needs REDIS_URL (the embedded Redis is per process)",
            err=True,
        )
        raise typer.Exit(2)

    from workers.reaper import run

    asyncio.run(run(settings))


def _archive_url(settings: Settings) -> str:
    if not settings.chat_archive_url:
        typer.echo("durable-chat: set CHAT_ARCHIVE_URL=postgresql://... (the archive)", err=True)
        raise typer.Exit(2)
    return settings.chat_archive_url


@command()
def migrate() -> None:
    """Create or upgrade the archive's tables in PostgreSQL (CHAT_ARCHIVE_URL)."""
    from app.chat.archive import migrate as upgrade

    upgrade(_archive_url(_settings(pod=False)))
    typer.echo("durable-chat: the archive's schema is up to date")


@command()
def archiver(
    once: bool = typer.Option(False, "--once", help="One sweep, then exit."),
    metrics_port: int = typer.Option(
        0, help="Serve /metrics (Prometheus) on this port of every address; 0: none."
    ),
) -> None:
    """Move cold threads' history to PostgreSQL and expire threads past
    CHAT_RETENTION_DAYS (CHAT_ARCHIVE_URL, REDIS_URL)."""
    settings = _settings(pod=False)
    _archive_url(settings)
    if settings.embedded:
        typer.echo("durable-chat: the archiver needs REDIS_URL", err=True)
        raise typer.Exit(2)
    from workers.archiver import run

    if metrics_port:
        import prometheus_client

        prometheus_client.start_http_server(metrics_port)

    asyncio.run(run(settings, once=once))


def _redis_for_ops() -> SyncRedisClient:
    """A synchronous client for the operator's commands (they need REDIS_URL)."""
    settings = Settings()
    if not settings.redis_url:
        typer.echo("durable-chat: set REDIS_URL to the Redis your pods use", err=True)
        raise typer.Exit(2)
    if settings.redis_cluster:
        return redis.cluster.RedisCluster.from_url(settings.redis_url, decode_responses=True)
    return redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=None)


def _styler() -> ops.Styler:
    """Colours when a person is watching a terminal, plain text otherwise."""
    if not sys.stdout.isatty():
        return ops.plain
    return lambda text, colour: typer.style(text, fg=colour)


def _thread_arg(raw: str) -> ThreadId:
    try:
        return keys.thread_id(raw)
    except keys.InvalidId as exc:
        raise typer.BadParameter(str(exc)) from None


@command()
def tail(
    thread: str = typer.Argument(..., help="Thread id."),
    last: int = typer.Option(10, help="How many past events to show first."),
) -> None:
    """Follow a thread's timeline live, decoded (Ctrl-C to stop)."""
    style = _styler()
    client = _redis_for_ops()
    try:
        for entry_id, fields in ops.follow_events(client, _thread_arg(thread), last):
            typer.echo(ops.render_event(entry_id, fields, style))
    except KeyboardInterrupt:
        pass


@command()
def history(
    thread: str = typer.Argument(..., help="Thread id."),
    limit: int = typer.Option(20, help="How many of the newest messages."),
) -> None:
    """Print a thread's committed messages, oldest first."""
    thread_id = _thread_arg(thread)
    client = _redis_for_ops()
    if not client.exists(keys.meta(thread_id)):
        raise Failed(f"no thread {thread_id} in this Redis (check the id, and REDIS_URL)")
    for line in ops.render_history(client, thread_id, limit, _styler()):
        typer.echo(line)


@command()
def threads(
    user: str = typer.Option(..., "--user", help="User id."),
    limit: int = typer.Option(50, help="How many."),
) -> None:
    """List a user's threads, most recently active first."""
    try:
        user_id = keys.user_id(user)
    except keys.InvalidId as exc:
        raise typer.BadParameter(str(exc)) from None
    for line in ops.render_threads(_redis_for_ops(), user_id, limit):
        typer.echo(line)


@command()
def turns() -> None:
    """Turns in progress: which pod runs them, their fencing numbers and lock TTLs."""
    style = _styler()
    running = ops.running_turns(_redis_for_ops())
    if not running:
        typer.echo("no turn is running")
    for turn in running:
        typer.echo(ops.render_turn(turn, style))


@command()
def token(
    user: str = typer.Option(..., "--user", help="User id: the token's sub."),
    ttl: int = typer.Option(3600, "--ttl", min=1, help="Lifetime in seconds."),
) -> None:
    """For development: print a token for USER, signed with CHAT_AUTH_SECRET
    (or CHAT_AUTH_SECRET_FILE), the secret your pods use. Real users get
    their tokens from your backend or identity provider."""
    from app.auth import development_token

    try:
        minted = development_token(Settings(), user, ttl)
    except keys.InvalidId as exc:
        raise typer.BadParameter(str(exc), param_hint="--user") from None
    except (ConfigError, ValueError) as exc:
        raise Failed(f"configuration error: {exc}", code=2) from None
    typer.echo(minted)
    typer.echo(f"a development token for {user}, valid {ttl}s", err=True)


@command()
def chat(
    thread: str = typer.Argument(..., help="Thread id."),
    url: list[str] = typer.Option(
        ["ws://127.0.0.1:8000"], help="Pod URL (repeat for several: the client fails over)."
    ),
    token: str | None = typer.Option(None, envvar="CHAT_TOKEN", help="Bearer token."),
) -> None:
    """Chat in a thread from the terminal: type a line, watch the reply stream."""
    _thread_arg(thread)
    from app.client import ChatClosed

    try:
        asyncio.run(_chat(thread, url, token.strip() if token else None))
    except ChatClosed as exc:
        raise Failed(f"{exc}; check the thread id and the token (--token or CHAT_TOKEN)") from exc
    except (OSError, TimeoutError) as exc:
        reason = "refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or "timed out"
        raise Failed(
            f"cannot connect to {' or '.join(url)} ({reason}); is a pod running there? "
            "Give its address with --url"
        ) from exc


async def _chat(thread: str, urls: list[str], token: str | None) -> None:
    from app.client import ChatClient

    style = _styler()
    loop = asyncio.get_running_loop()
    async with ChatClient(urls, thread, token=token) as client:
        await client.get_history(limit=20)
        events = client.events()
        while True:
            event = await anext(events)
            if event["type"] == "history":
                for message in event["messages"]:
                    typer.echo(f"{style(message['role'], 'cyan')}: {message['content']}")
                break
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            if not line.strip():
                continue
            await client.prompt(line.rstrip("\n"))
            async for event in events:
                kind = event["type"]
                if kind == "delta":
                    sys.stdout.write(event["text"])
                    sys.stdout.flush()
                elif kind == "done":
                    status = event["status"]
                    typer.echo("" if status == "complete" else style(f" [{status}]", "red"))
                    break
                elif kind == "error":
                    typer.echo(style(f"error {event['code']}: {event['message']}", "red"))
                    break


@command()
def schema(
    kind: str = typer.Argument(
        ..., help="typescript (clients/js/src/protocol.ts) or asyncapi (/asyncapi.json)"
    ),
) -> None:
    """Print what is generated from the protocol's models: the TypeScript
    client's types or the AsyncAPI document of the sockets and SSE stream."""
    from app import schema as generated
    from app.main import create_app

    if kind == "typescript":
        sys.stdout.write(generated.typescript())
    elif kind == "asyncapi":
        app = create_app(Settings(chat_auth="off"))
        document = generated.asyncapi(generated.websocket_paths(app.routes), app.version)
        typer.echo(json.dumps(document, indent=2))
    else:
        raise typer.BadParameter("typescript or asyncapi", param_hint="KIND")


def _explain(exc: Exception) -> Failed:
    """One line for a failure: what failed and what to do."""
    if isinstance(exc, Failed):
        return exc
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Failed(f"cannot reach Redis ({exc}); check REDIS_URL and that Redis is up")
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return Failed(f"Redis refused us ({exc}); check the password in REDIS_URL")
    return Failed(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")


def main() -> None:
    """The command line: failures are one line on stderr and exit code 1
    (2 for usage and configuration errors); tracebacks only with --debug."""
    try:
        cli()
    except Exception as exc:
        if _debug:
            raise
        failed = _explain(exc)
        typer.echo(f"durable-chat: {failed}", err=True)
        raise SystemExit(failed.code) from None
