"""What is generated from the protocol's models (app.schema) matches them: the
TypeScript client's types are the committed ones, every frame is found, and
the frames a real turn produces are what the generated schemas describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from app import protocol, schema

ROOT = Path(__file__).resolve().parents[1]


def test_typescript_types_are_generated_from_the_models():
    committed = (ROOT / "clients" / "js" / "src" / "protocol.ts").read_text()
    assert committed == schema.typescript(), (
        "clients/js/src/protocol.ts is stale: durable-chat schema typescript > "
        "clients/js/src/protocol.ts, then (cd clients/js && npm run build)"
    )


def test_every_frame_of_the_protocol_is_found():
    client = schema.client_frames()
    assert set(client) >= {"prompt", "get_history", "cancel", "resume", "ping"}
    server = schema.server_events()
    assert set(server) >= {"ready", "message", "loading", "delta", "done", "history", "error"}
    timeline = {kind for kind, model in server.items() if schema.is_timeline(model)}
    assert timeline >= {"message", "loading", "delta", "done"}
    assert not timeline & {"ready", "history", "error", "pong"}
    for kind, model in server.items():
        wire = schema.wire_schema(model)
        assert wire["properties"]["type"]["const"] == kind
        assert "type" in wire["required"]
        if schema.is_timeline(model):
            assert {"id", "n", "thread_id"} <= set(wire["required"])
    assert protocol.TimelineFrame not in server.values()


def document_validator(document: dict[str, Any], schema_name: str) -> Draft202012Validator:
    """A validator of one payload schema of an AsyncAPI document (its $refs
    point into the document's components)."""
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def payload_name(document: dict[str, Any], channel: str, kind: str, side: str = "Event") -> str:
    """The payload schema of the message of type ``kind`` on ``channel``: the
    server's event (``side`` Event), or the client's frame (Frame): ``typing``
    is both."""
    for ref in document["channels"][channel]["messages"].values():
        message = document["components"]["messages"][ref["$ref"].rsplit("/", 1)[-1]]
        if message["name"] == kind and message["title"].endswith(side):
            return str(message["payload"]["$ref"].rsplit("/", 1)[-1])
    raise AssertionError(f"no {kind} message on {channel}")


SOCKET = "/v1/threads/{thread_id}/ws"


def example(node: dict[str, Any], defs: dict[str, Any]) -> Any:
    """A minimal value of a JSON Schema (the generated ones: refs, consts, enums,
    anyOf, plain types): required properties only, the first choice of each."""
    if "$ref" in node:
        return example(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][0]
    if "anyOf" in node:
        return example(node["anyOf"][0], defs)
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        return {name: example(props[name], defs) for name in node.get("required", [])}
    if kind == "string":
        return "1-0" if "pattern" in node else "x"
    if kind is None:
        return {}  # a schema with no type takes any JSON value (a tool's input)
    return {"integer": 1, "number": 1.0, "boolean": False, "array": [], "null": None}[kind]


def test_asyncapi_document_accepts_what_the_models_accept():
    document = schema.asyncapi([SOCKET])
    assert document["asyncapi"].startswith("3.")
    channels = {c["address"]: cid for cid, c in document["channels"].items()}
    assert set(channels) == {SOCKET, schema.SSE_PATH}
    for kind, model in schema.server_events().items():
        # A minimal frame as the server sends it, and with every field there.
        defs = schema.nested_schemas()
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        frame = model.model_validate(example(own, defs))
        for data in (orjson.loads(protocol.encode(frame)), frame.model_dump()):
            for address in (SOCKET, schema.SSE_PATH):
                name = payload_name(document, channels[address], kind)
                document_validator(document, name).validate(data)
        # And the document is no blank cheque: a frame without its type is refused.
        without_type = {k: v for k, v in frame.model_dump(exclude_none=True).items() if k != "type"}
        name = payload_name(document, channels[SOCKET], kind)
        assert not document_validator(document, name).is_valid(without_type)
    for kind, model in schema.client_frames().items():
        minimal = model.model_validate(example(model.model_json_schema(), {}))
        name = payload_name(document, channels[SOCKET], kind, "Frame")
        document_validator(document, name).validate(minimal.model_dump(exclude_none=True))
    operations = document["operations"].values()
    assert {(o["action"], o["channel"]["$ref"].rsplit("/", 1)[-1]) for o in operations} == {
        ("send", channels[SOCKET]), ("receive", channels[SOCKET]),
        ("send", channels[schema.SSE_PATH]),
    }  # fmt: skip


def test_every_protocol_socket_of_the_pod_is_documented():
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(chat_auth="off"))
    assert SOCKET in schema.websocket_paths(app.routes)
    assert "/websocket" not in schema.websocket_paths(app.routes)  # the seed's own protocol
