"""What is generated from the protocol's models (app.schema) matches them: the
TypeScript client's types are the committed ones, every frame is found, and
the frames a real turn produces are what the generated schemas describe."""

from __future__ import annotations

from pathlib import Path

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
