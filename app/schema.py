"""The wire protocol as JSON Schemas, found in the pydantic models themselves,
and what is generated from them: the TypeScript client's types
(clients/js/src/protocol.ts) and the AsyncAPI document (/asyncapi.json).

Nothing here lists frames by hand. Client frames are the members of
``app.protocol.ClientFrame``; server events are the models of
``app.protocol`` with a literal ``type`` (timeline events are those built on
``TimelineFrame``). So a frame added to the protocol reaches the generated
types and the document with no change here; tests compare both with what is
generated.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Iterator
from functools import cache
from typing import Any

from pydantic import BaseModel
from starlette.routing import WebSocketRoute

from app import protocol

SchemaDict = dict[str, Any]


def _literal_type(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("type")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    (value,) = typing.get_args(field.annotation)
    return str(value)


def _models(module: Any) -> Iterator[type[BaseModel]]:
    for _, value in inspect.getmembers(module, inspect.isclass):
        if issubclass(value, BaseModel) and value.__module__ == module.__name__:
            yield value


@cache
def client_frames() -> dict[str, type[BaseModel]]:
    """Every frame a client may send, by type."""
    members = typing.get_args(typing.get_args(protocol.ClientFrame)[0])
    return {str(_literal_type(m)): m for m in members}


@cache
def server_events() -> dict[str, type[BaseModel]]:
    """Every event a server sends, by type (sockets and SSE alike)."""
    client = set(client_frames().values())
    events = {str(_literal_type(m)): m for m in _models(protocol) if m not in client}
    return dict(sorted((kind, m) for kind, m in events.items() if kind != "None"))


def is_timeline(model: type[BaseModel]) -> bool:
    return issubclass(model, protocol.TimelineFrame)


def wire_schema(model: type[BaseModel]) -> SchemaDict:
    """The JSON Schema of a frame as it is on the wire. A client frame's is the
    model's own (what the server accepts). In a server event ``type`` is always
    there, and so is any field that cannot be None (events are serialised
    without None fields, ``ready`` aside: see ``protocol.encode``)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    if model in client_frames().values():
        return schema
    if model is protocol.Ready:  # encode() keeps its nulls, but for ``recovered``
        required = [name for name in model.model_fields if name != "recovered"]
    else:
        required = [
            name
            for name, field in model.model_fields.items()
            if name == "type"
            or (
                (field.is_required() or field.default is not None)
                and type(None) not in typing.get_args(field.annotation)
            )
        ]
    schema["required"] = required
    return schema


def nested_schemas() -> dict[str, SchemaDict]:
    """The models frames refer to (``Message``), by name."""
    found: dict[str, SchemaDict] = {}
    for model in (*client_frames().values(), *server_events().values()):
        defs = model.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs")
        found.update(defs or {})
    return dict(sorted(found.items()))


# --- TypeScript ------------------------------------------------------------------


def _ts(schema: SchemaDict) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "const" in schema:
        return _literal(schema["const"])
    if "enum" in schema:
        return " | ".join(_literal(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(_ts(s) for s in schema["anyOf"])
    kind = schema.get("type")
    if kind == "array":
        return f"Array<{_ts(schema.get('items', {}))}>"
    if kind == "object":
        if "properties" in schema:
            return _ts_object(schema, "")
        extra = schema.get("additionalProperties")
        return f"Record<string, {_ts(extra) if isinstance(extra, dict) else 'unknown'}>"
    return {"string": "string", "integer": "number", "number": "number", "boolean": "boolean",
            "null": "null"}.get(str(kind), "unknown")  # fmt: skip


def _literal(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower()


def _ts_object(schema: SchemaDict, indent: str) -> str:
    required = set(schema.get("required", []))
    lines = ["{"]
    for name, prop in schema["properties"].items():
        mark = "" if name in required else "?"
        lines.append(f"{indent}  {name}{mark}: {_ts(prop)};")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _interface(name: str, schema: SchemaDict, doc: str | None) -> str:
    comment = f"/** {' '.join(doc.split())} */\n" if doc else ""
    return f"{comment}export interface {name} {_ts_object(schema, '')}\n"


def typescript() -> str:
    """clients/js/src/protocol.ts: one interface per frame and the unions."""
    out = [
        "// Generated from the server's pydantic models by `durable-chat schema typescript`.\n"
        "// Do not edit: tests/test_schema.py fails when this file and the models differ.\n",
        f"export const PROTOCOL_VERSION = {protocol.PROTOCOL_VERSION};\n",
    ]
    for name, schema in nested_schemas().items():
        out.append(_interface(name, schema, schema.get("description")))
    server = server_events()
    client = client_frames()
    for kind, model in server.items():
        out.append(_interface(_event_name(kind), wire_schema(model), model.__doc__))
    for kind, model in client.items():
        out.append(_interface(_frame_name(kind), wire_schema(model), model.__doc__))
    timeline = [_event_name(k) for k, m in server.items() if is_timeline(m)]
    out.append(f"export type ServerEvent =\n  | {_union(_event_name(k) for k in server)};\n")
    out.append(f"export type TimelineEvent =\n  | {_union(timeline)};\n")
    out.append(f"export type ClientFrame =\n  | {_union(_frame_name(k) for k in client)};\n")
    codes = _literals(protocol.ErrorCode)
    out.append(f"export type ErrorCode = {' | '.join(_literal(c) for c in codes)};\n")
    kinds = ", ".join(f'"{k}"' for k, m in server.items() if is_timeline(m))
    out.append(f"export const TIMELINE_TYPES: ReadonlySet<string> = new Set([{kinds}]);\n")
    return "\n".join(out)


def _literals(annotation: Any) -> list[str]:
    """The values of a Literal, or of a union of Literals."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    return [v for member in typing.get_args(annotation) for v in _literals(member)]


def _union(names: Any) -> str:
    return "\n  | ".join(names)


def _camel(kind: str) -> str:
    return "".join(part.capitalize() for part in kind.split("_"))


def _event_name(kind: str) -> str:
    return f"{_camel(kind)}Event"


def _frame_name(kind: str) -> str:
    return f"{_camel(kind)}Frame"


# --- AsyncAPI ----------------------------------------------------------------------

ASYNCAPI_VERSION = "3.1.0"
# The SSE stream of a thread (app.sse): the server events of a thread socket.
SSE_PATH = "/v1/threads/{thread_id}/events"


def websocket_paths(routes: Any) -> list[str]:
    """The protocol's socket paths (under /v1) among an app's routes, included
    routers too: a socket added to the pod is documented with no change here."""
    found: list[str] = []
    for route in routes:
        if isinstance(route, WebSocketRoute) and route.path.startswith("/v1/"):
            found.append(route.path)
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        if inner is not None and inner is not route:
            found += websocket_paths(inner.routes)
    return sorted(set(found))


def _channel_id(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")


def _parameters(path: str) -> SchemaDict:
    names = re.findall(r"\{(\w+)\}", path)
    return {n: {"description": _PARAMETERS.get(n, n)} for n in names}


_PARAMETERS = {"thread_id": "1 to 64 characters of A-Za-z0-9_-"}
_RESUME_QUERY = {
    "type": "object",
    "properties": {
        "after": {"type": "string", "description": "resume after this event id"},
        "epoch": {"type": "string", "description": "the thread's epoch from ready"},
        "token": {"type": "string", "description": "a JWT (prefer a header or subprotocol)"},
    },
}


def _message(kind: str, model: type[BaseModel], name: str) -> SchemaDict:
    doc = " ".join((model.__doc__ or "").split()) or f"The `{kind}` frame."
    return {
        "name": kind,
        "title": name,
        "summary": doc,
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{name}"},
    }


def asyncapi(socket_paths: list[str], version: str = "0.1.0") -> SchemaDict:
    """The AsyncAPI 3 document of the protocol's sockets and the SSE stream,
    from the server's side: it receives client frames and sends events."""
    server = server_events()
    client = client_frames()
    schemas: dict[str, SchemaDict] = dict(nested_schemas())
    messages: dict[str, SchemaDict] = {}
    for kind, model in server.items():
        schemas[_event_name(kind)] = wire_schema(model)
        messages[_event_name(kind)] = _message(kind, model, _event_name(kind))
    for kind, model in client.items():
        schemas[_frame_name(kind)] = wire_schema(model)
        messages[_frame_name(kind)] = _message(kind, model, _frame_name(kind))

    def refs(names: list[str]) -> SchemaDict:
        return {n: {"$ref": f"#/components/messages/{n}"} for n in names}

    events = [_event_name(k) for k in server]
    frames = [_frame_name(k) for k in client]
    channels: SchemaDict = {}
    operations: SchemaDict = {}
    for path in socket_paths:
        cid = _channel_id(path)
        channels[cid] = {
            "address": path,
            "title": f"WebSocket {path}",
            "description": "Frames are UTF-8 JSON text frames, one object each, with a `type`.",
            "servers": [{"$ref": "#/servers/websocket"}],
            "parameters": _parameters(path),
            "messages": refs(events + frames),
            "bindings": {
                "ws": {"method": "GET", "query": _RESUME_QUERY, "bindingVersion": "0.1.0"}
            },
        }
        operations[f"{cid}_send"] = _operation("send", cid, events, "Events to the client.")
        operations[f"{cid}_receive"] = _operation("receive", cid, frames, "Frames from the client.")
    sse = _channel_id(SSE_PATH)
    channels[sse] = {
        "address": SSE_PATH,
        "title": f"Server-Sent Events {SSE_PATH}",
        "description": "`text/event-stream`: each event's `id:` is its event id, `event:` its "
        "type, `data:` the frame a socket gets. `Last-Event-ID` or `?after=` resumes.",
        "servers": [{"$ref": "#/servers/http"}],
        "parameters": _parameters(SSE_PATH),
        "messages": refs(events),
        "bindings": {"http": {"method": "GET", "bindingVersion": "0.3.0"}},
    }
    operations[f"{sse}_send"] = _operation("send", sse, events, "The thread's events as SSE.")
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "durable-chat",
            "version": version,
            "description": f"durable-chat wire protocol, version {protocol.PROTOCOL_VERSION} "
            "(docs/protocol.md). Generated from the server's models; the REST API is in "
            "/openapi.json.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "websocket": {"host": "localhost:8000", "protocol": "ws", "description": "any pod"},
            "http": {"host": "localhost:8000", "protocol": "http", "description": "any pod"},
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def _operation(action: str, channel: str, names: list[str], summary: str) -> SchemaDict:
    return {
        "action": action,
        "summary": summary,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{n}"} for n in names],
    }
