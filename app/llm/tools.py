"""Tools the model may call: how a deployment registers them, and how one runs.

A tool is a Python callable with a JSON Schema for its input::

    from app.llm.tools import tool

    @tool(description="Look up an order.", input_schema={
        "type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"],
    })
    async def order_status(input: dict) -> str: ...

Tools come from the entry point group ``durable_chat.tools`` of installed
packages (each entry point names a ``Tool`` or a list of them) and from
``CHAT_TOOLS``: comma-separated ``module`` (its ``Tool`` attributes) or
``module:attr`` paths, or ``clock`` for the built-in clock. The fake model
always has the clock, so tests need no configuration.

``ToolBox.run`` never raises for the tool's sake: malformed arguments, an
unknown name, input the schema refuses, an exception, a timeout all come
back as an error result the model reads. Only cancellation (a cancelled
turn, a draining pod) propagates. Async tools are cancelled with their turn;
a sync tool runs in a worker thread, which Python cannot stop: its result is
dropped instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from app import metrics
from app.llm.base import ToolCall, ToolSpec, clip
from app.settings import ConfigError, Settings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "durable_chat.tools"

ToolFunction = Callable[[dict[str, Any]], Any | Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Tool:
    """A callable the model may use. ``timeout_s`` None: CHAT_TOOL_TIMEOUT_S."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    function: ToolFunction
    timeout_s: float | None = None


def tool(
    name: str | None = None,
    *,
    description: str | None = None,
    input_schema: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
) -> Callable[[ToolFunction], Tool]:
    """Decorate a function (sync or async, taking the input dict) into a Tool."""

    def wrap(function: ToolFunction) -> Tool:
        return Tool(
            name=name or function.__name__,
            description=description or inspect.getdoc(function) or "",
            input_schema=input_schema or {"type": "object"},
            function=function,
            timeout_s=timeout_s,
        )

    return wrap


@tool(
    description="The current date and time (ISO 8601), in UTC or an IANA time zone.",
    input_schema={
        "type": "object",
        "properties": {"timezone": {"type": "string", "description": "e.g. Europe/Paris"}},
        "additionalProperties": False,
    },
    timeout_s=5,
)
def clock(input: dict[str, Any]) -> str:
    zone_name = input.get("timezone") or "UTC"
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {zone_name!r}") from None
    return dt.datetime.now(zone).isoformat(timespec="seconds")


BUILTIN = {"clock": clock}


@dataclass(frozen=True, slots=True)
class Outcome:
    """A call's input as parsed (its raw text when it did not parse), its
    output for the model, and whether that output is an error."""

    input: Any
    output: str
    is_error: bool


def _validator(t: Tool) -> Any:
    """A validator of ``t``'s input, of the JSON Schema draft the schema names
    (ConfigError when the schema is not one). jsonschema is imported here: it
    is a large part of a pod's start-up time."""
    import jsonschema

    cls = jsonschema.validators.validator_for(t.input_schema)
    try:
        cls.check_schema(t.input_schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"tool {t.name!r}: invalid input schema: {exc.message}") from None
    return cls(t.input_schema)


class ToolBox:
    """The tools of this pod, their specs for the model, and how to run them."""

    def __init__(
        self,
        tools: Iterable[Tool] = (),
        timeout_s: float = 30.0,
        concurrency: int = 8,
        max_output_chars: int = 16000,
    ) -> None:
        self._tools: dict[str, Tool] = {}
        # A deployment's tool schemas are checked now (a bad one stops the
        # pod); the built-in tools' own are checked by the tests, and their
        # validators built on a first call, so that a pod that never runs a
        # tool never imports jsonschema.
        self._validators: dict[str, Any] = {}
        for t in tools:
            if t.name in self._tools:
                raise ConfigError(f"two tools are named {t.name!r}")
            if BUILTIN.get(t.name) is not t:
                self._validators[t.name] = _validator(t)
            self._tools[t.name] = t
        self._timeout_s = timeout_s
        self._max_output_chars = max_output_chars
        # Bounded per pod, not per turn: many turns calling slow tools must
        # not exhaust the pod's threads or the services the tools call.
        self._slots = asyncio.Semaphore(concurrency)
        self.specs: Sequence[ToolSpec] = [
            ToolSpec(t.name, t.description, t.input_schema) for t in self._tools.values()
        ]

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def parse(self, call: ToolCall) -> tuple[Any, str | None]:
        """The call's input, and why it cannot run (None when it can)."""
        try:
            value = orjson.loads(call.arguments or "{}")
        except orjson.JSONDecodeError as exc:
            return call.arguments, f"the arguments are not valid JSON ({exc})"
        known = self._tools.get(call.name)
        if known is None:
            offered = ", ".join(self._tools) or "none"
            return value, f"there is no tool named {call.name!r} (tools: {offered})"
        validator = self._validators.get(call.name)
        if validator is None:
            validator = self._validators[call.name] = _validator(known)
        from jsonschema.exceptions import best_match  # loaded by _validator

        error = best_match(validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "input"
            return value, f"the input does not match the tool's schema at {where}: {error.message}"
        return value, None

    async def run(self, call: ToolCall) -> Outcome:
        """Run one call (bounded by the pod's concurrency and the tool's
        timeout); every failure is an error outcome, cancellation propagates."""
        outcome = await self._run(call)
        name = call.name if call.name in self._tools else "unknown"
        metrics.TOOL_CALLS.labels(name, "error" if outcome.is_error else "ok").inc()
        return outcome

    async def _run(self, call: ToolCall) -> Outcome:
        value, problem = self.parse(call)
        if problem is not None:
            return Outcome(value, clip(problem), True)
        known = self._tools[call.name]
        timeout_s = known.timeout_s or self._timeout_s
        try:
            async with self._slots:
                async with asyncio.timeout(timeout_s):
                    if inspect.iscoroutinefunction(known.function):
                        result = await known.function(value)
                    else:
                        result = await asyncio.to_thread(known.function, value)
        except TimeoutError:
            return Outcome(value, f"the tool {call.name!r} timed out after {timeout_s:g}s", True)
        except Exception as exc:
            log.warning("tool %s failed: %r", call.name, exc)
            return Outcome(value, clip(f"{type(exc).__name__}: {exc}"), True)
        output = result if isinstance(result, str) else orjson.dumps(result, default=str).decode()
        if len(output) > self._max_output_chars:
            output = output[: self._max_output_chars] + f"… [cut at {self._max_output_chars}]"
        return Outcome(value, output, False)


def load_tools(settings: Settings) -> ToolBox:
    """The tools of this deployment: entry points, CHAT_TOOLS, and the clock
    for the fake model. A tool that cannot load stops the pod (ConfigError)."""
    found: list[Tool] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:  # any failure of a plugin's import stops the pod cleanly
            raise ConfigError(f"tool entry point {ep.name!r} failed to load: {exc!r}") from None
        found += _tools_in(loaded, f"entry point {ep.name}")
    for path in filter(None, (p.strip() for p in (settings.chat_tools or "").split(","))):
        found += _load_path(path)
    if settings.chat_llm == "fake" and all(t.name != "clock" for t in found):
        found.append(clock)
    return ToolBox(
        found,
        timeout_s=settings.chat_tool_timeout_s,
        concurrency=settings.chat_tool_concurrency,
        max_output_chars=settings.chat_tool_max_output_chars,
    )


def _load_path(path: str) -> list[Tool]:
    if path in BUILTIN:
        return [BUILTIN[path]]
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        target = getattr(module, attr) if attr else module
    except Exception as exc:  # a missing module, or one that fails as it is imported
        raise ConfigError(f"CHAT_TOOLS: cannot load {path!r}: {exc!r}") from None
    if attr:
        return _tools_in(target, f"CHAT_TOOLS {path}")
    return [v for v in vars(module).values() if isinstance(v, Tool)]


def _tools_in(target: object, where: str) -> list[Tool]:
    if isinstance(target, Tool):
        return [target]
    if isinstance(target, list | tuple) and all(isinstance(t, Tool) for t in target):
        return list(target)
    raise ConfigError(f"{where}: expected a Tool or a list of Tools, got {type(target).__name__}")
