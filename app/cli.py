"""The ``durable-chat`` command: ``serve`` runs a pod, ``worker`` the reaper."""

from __future__ import annotations

import asyncio

import typer
import uvicorn

from app.logs import configure as configure_logging
from app.settings import ConfigError, Settings

cli = typer.Typer(help="durable-chat: durable multi-user AI chat on stateless pods and Redis.")


def _settings() -> Settings:
    try:
        settings = Settings()
        settings.check_startable()
    except (ConfigError, ValueError) as exc:
        typer.echo(f"durable-chat: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(
        settings.chat_log_level, settings.chat_pod_id, settings.chat_log_format == "json"
    )
    return settings


@cli.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Run one pod: the WebSocket API and the demo page at http://HOST:PORT/."""
    settings = _settings()
    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        ws_max_size=settings.chat_max_frame_bytes,
        # Sockets are closed (1012) at once on SIGTERM; this bounds how long
        # uvicorn waits for their handlers. Turns are drained by the lifespan.
        timeout_graceful_shutdown=5,
        log_level=settings.chat_log_level.lower(),
        log_config=None,  # keep ours (app.logs): JSON lines, tokens redacted
    )


@cli.command()
def worker() -> None:
    """Run the reaper on its own (pods also run it unless CHAT_REAPER_IN_POD=0)."""
    settings = _settings()
    if settings.embedded:
        typer.echo("durable-chat: the worker needs REDIS_URL (the embedded Redis is per process)")
        raise typer.Exit(2)

    async def run() -> None:
        from app.chat.service import ChatService
        from app.llm import make_model
        from app.redis_client import connect
        from workers.reaper import Reaper

        handles = connect(settings)
        model = make_model(settings)
        service = ChatService(
            settings, handles.commands, handles.pubsub_factory, model, handles.publish_command
        )
        try:
            await Reaper(service, holder=f"worker:{settings.chat_pod_id}").run_forever()
        finally:
            await handles.aclose()

    asyncio.run(run())


def main() -> None:
    cli()
