"""The FastAPI application: create_app(settings) and the pod's lifespan.

The lifespan owns every long-lived resource of a pod: the Redis clients, the
chat service (its fan-out hub and running turns), the in-pod reaper and,
with CHAT_ARCHIVER_IN_POD, the in-pod archiver. On
shutdown it drains: new sockets and turns are refused (readiness fails),
running turns get CHAT_DRAIN_GRACE_S to finish and are then committed as
interrupted, and only then is Redis let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi_offline import FastAPIOffline

from app import gc_policy, metrics, rest, schema, seed, sse, usersock, ws
from app.auth import Authenticator, AuthError
from app.chat import tasks
from app.chat.archiver import Archiver
from app.chat.service import ChatService
from app.llm import make_model
from app.llm.tools import load_tools
from app.origins import OriginPolicy
from app.redis_client import connect, warn_if_evicting
from app.settings import Settings

if TYPE_CHECKING:
    from app.chat.archive import Archive

log = logging.getLogger(__name__)

# How long the start-up check waits for Redis to answer, and then between tries.
REDIS_WAIT_S = 2.0
# Where the documentation pages' scripts, styles and icon are served.
DOCS_ASSETS = "/docs/assets"


async def announce_ready(service: ChatService, pod: str, description: str) -> None:
    """Log ``ready`` once Redis answers; until then, that the pod waits for it
    (the pod serves meanwhile, and /readyz fails, as it should)."""
    waiting = False
    while True:
        try:
            await asyncio.wait_for(service.redis.ping(), REDIS_WAIT_S)
            break
        except Exception as exc:
            if not waiting:
                log.warning(
                    "durable-chat pod %s is up, waiting for Redis (%s): not ready until it answers",
                    pod, exc or type(exc).__name__,
                )  # fmt: skip
                waiting = True
            await asyncio.sleep(REDIS_WAIT_S)
    log.info("durable-chat pod %s ready: %s", pod, description)


async def open_archive(settings: Settings) -> Archive | None:
    """The cold tier's pool of connections, when CHAT_ARCHIVE_URL names one.
    PostgreSQL's driver is imported only then: a pod without an archive
    never loads it (it is a large part of a pod's start-up time)."""
    if not settings.chat_archive_url:
        return None
    from app.chat.archive import Archive

    return await Archive.open(settings.chat_archive_url, settings.chat_archive_pool_size)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A durable-chat pod for ``settings`` (read from the environment if None)."""
    settings = settings or Settings()
    settings.check_startable()
    # Keys, origins and tools are loaded now, so a bad configuration stops the pod
    # before it serves anything (ConfigError, with what to fix).
    authenticator = Authenticator(settings)
    origins = OriginPolicy(settings.chat_allowed_origins)
    tools = load_tools(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        handles = connect(settings)
        model = make_model(settings)
        archive = await open_archive(settings)
        service = ChatService(
            settings, handles.commands, handles.pubsub_factory, model, handles.publish_command,
            turn_writes=handles.turn_writes, tools=tools, archive=archive,
        )  # fmt: skip
        app.state.chat = service
        if not settings.embedded:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(warn_if_evicting(handles.commands), 5.0)
        await service.start()
        metrics.bind_live_gauges(
            lambda: service.hub.followed_threads, lambda: service.manager.running
        )
        # The reaper's leader lease names its holder so: the in-pod archiver
        # sweeps while its own pod holds it.
        holder = f"pod:{settings.chat_pod_id}"
        # Beside a standalone reaper (CHAT_REAPER_IN_POD=false) a pod still
        # starts the queued prompts a dead or drained pod left: the worker
        # has no model to run them.
        reaper = service.reaper(holder=holder, close_orphans=settings.chat_reaper_in_pod)
        reaper_task = asyncio.create_task(reaper.run_forever(), name="reaper")
        archiver_task = None
        if settings.chat_archiver_in_pod and archive is not None:
            archiver = Archiver.configured(
                handles.commands, handles.publish_command, archive, settings
            )
            archiver_task = asyncio.create_task(
                archiver.run_forever(leader=holder), name="archiver"
            )
        gc_policy.freeze_loaded()
        auth = f"jwt {','.join(authenticator.algorithms)}" if settings.auth_enabled else "off"
        described = f"redis={handles.description} model={model.name} auth={auth}"
        announcer = asyncio.create_task(
            announce_ready(service, settings.chat_pod_id, described), name="ready-announcer"
        )
        collector = gc_policy.CollectionPolicy(settings.chat_gc_full_s)
        helpers = [announcer, asyncio.create_task(collector.run_forever(), name="gc-policy")]
        if settings.chat_loop_lag_probe_ms:
            lag = metrics.probe_loop_lag(settings.chat_loop_lag_probe_ms / 1000)
            helpers.append(asyncio.create_task(lag, name="loop-lag-probe"))
        try:
            yield
        finally:
            await tasks.stop_all(helpers, tasks.RELEASE_S)
            # Every step is bounded (app.chat.tasks), so the pod exits even
            # when Redis answers nothing: app.process adds up the bounds.
            log.info("pod %s draining", settings.chat_pod_id)
            stopped = [tasks.stop(t, tasks.RELEASE_S) for t in (reaper_task, archiver_task) if t]
            await asyncio.gather(service.drain(), *stopped)
            await tasks.within(model.aclose(), tasks.RELEASE_S, "closing the model client")
            await tasks.within(handles.aclose(), tasks.RELEASE_S, "closing the Redis clients")
            if archive is not None:
                await tasks.within(archive.close(), tasks.RELEASE_S, "closing the archive's pool")
            log.info("pod %s stopped", settings.chat_pod_id)

    # /docs and /redoc with their scripts and styles served by the pod itself
    # (from the fastapi-offline package), not a CDN: they work air-gapped.
    app = FastAPIOffline(
        title="durable-chat", version="0.1.0", lifespan=lifespan,
        static_url=DOCS_ASSETS, favicon_url="/favicon.ico",
    )  # fmt: skip
    app.state.settings = settings
    app.state.auth = authenticator
    app.state.origins = origins
    app.state.frames = ws.SharedFrames()  # live events' frames, written once per pod
    app.include_router(ws.router)
    app.include_router(usersock.router)
    app.include_router(seed.router)
    app.include_router(sse.router)
    rest.install(app, origins)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page() -> str:
        # The page learns the model's provider from its <body>, so that it can
        # say at once that a fake model is answering (a `loading` event says
        # so too, but only once a turn starts).
        page = resources.files("app.web").joinpath("index.html").read_text()
        return page.replace("<body>", f'<body data-model="{settings.chat_llm}">', 1)

    @app.get("/durable-chat-client.js", include_in_schema=False)
    async def client_module() -> Response:
        """The TypeScript client, built (clients/js), for the demo page and any page."""
        source = resources.files("app.web").joinpath("durable-chat-client.js").read_text()
        return Response(source, media_type="text/javascript")

    @app.get("/asyncapi.json", include_in_schema=False)
    async def asyncapi_document() -> JSONResponse:
        """The WebSocket and SSE API (AsyncAPI 3), as /openapi.json is the REST API's."""
        if not hasattr(app.state, "asyncapi"):
            paths = schema.websocket_paths(app.routes)
            app.state.asyncapi = schema.asyncapi(paths, app.version)
        return JSONResponse(app.state.asyncapi)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> RedirectResponse:
        return RedirectResponse(f"{DOCS_ASSETS}/favicon.png", status_code=308)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Alive: the process serves requests."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        """Ready for traffic: Redis answers, the pod's subscriber hears its
        probes (app.chat.fanout), and the pod is not draining."""
        service: ChatService = request.app.state.chat
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        # Hearing first: it costs no I/O, and over a blackholed network it
        # answers at once where the ping would wait out its timeout.
        if not service.hub.hearing:
            # Connected yet deaf (half-open, or a demoted primary), or not
            # even connected: then Redis itself is out of reach.
            status = "subscriber not hearing" if service.hub.connected else "redis unreachable"
            return JSONResponse({"status": status}, status_code=503)
        try:
            await asyncio.wait_for(service.redis.ping(), 2.0)
        except Exception:
            return JSONResponse({"status": "redis unreachable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/list", tags=["threads"], response_model=list[str])
    async def list_threads(request: Request) -> Response:
        """The caller's thread ids, most recently active first (seed protocol)."""
        try:
            user = request.app.state.auth.user_for(request)
        except AuthError as exc:
            return JSONResponse({"error": str(exc)}, status_code=401)
        service: ChatService = request.app.state.chat
        return JSONResponse(await service.threads.of_user(user))

    return app
