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
import typing
from collections.abc import Iterator
from functools import cache
from typing import Any

from pydantic import BaseModel

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
    there, and so is a field with a default unless that default is None
    (events are serialised without None fields, see ``protocol.encode``)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    if model in client_frames().values():
        return schema
    required = [
        name
        for name, field in model.model_fields.items()
        if field.is_required() or field.default is not None or name == "type"
    ]
    if model is protocol.Ready:  # encode() keeps its nulls
        required += [n for n in ("last_event_id", "generation_id", "leaf_id") if n not in required]
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
