"""app.llm.tools: how tools are found (entry points, CHAT_TOOLS, the clock),
what stops a pod, and what one call gives back."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

from app.llm import ToolCall
from app.llm import tools as tools_module
from app.llm.tools import Tool, ToolBox, clock, load_tools, tool
from app.settings import ConfigError, Settings


@tool(input_schema={"type": "object", "properties": {"q": {"type": "string"}}})
async def search(input: dict[str, Any]) -> list[str]:
    """Search the docs."""
    return [input.get("q", ""), "found"]


@tool(name="echo", description="Says it back.")
def say(input: dict[str, Any]) -> str:
    return str(input)


@pytest.fixture
def tools_module_named(monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Install a module of tools under a fresh name; returns the name."""

    def install(name: str, **attributes: Any) -> str:
        module = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
        return name

    return install


class EntryPoint:
    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self._value = value

    def load(self) -> Any:
        if isinstance(self._value, Exception):
            raise self._value
        return self._value


def names(box: ToolBox) -> list[str]:
    return [spec.name for spec in box.specs]


def test_the_fake_model_always_has_the_clock(make_settings: Callable[..., Settings]) -> None:
    assert names(load_tools(make_settings())) == ["clock"]
    # A real provider gets only what the deployment registers.
    real = make_settings(chat_llm="anthropic", anthropic_api_key="k")
    assert names(load_tools(real)) == []
    assert names(load_tools(make_settings(chat_llm="anthropic", anthropic_api_key="k",
                                          chat_tools="clock"))) == ["clock"]  # fmt: skip


def test_chat_tools_takes_modules_and_attributes(
    make_settings: Callable[..., Settings], tools_module_named: Callable[..., str]
) -> None:
    module = tools_module_named("my_tools", search=search, unrelated=42)
    other = tools_module_named("more_tools", TOOLS=[say])
    loaded = load_tools(make_settings(chat_tools=f" {module} , {other}:TOOLS,"))
    assert names(loaded) == ["search", "echo", "clock"]


def test_the_same_name_twice_stops_the_pod(
    make_settings: Callable[..., Settings], tools_module_named: Callable[..., str]
) -> None:
    module = tools_module_named("twice_tools", a=say, b=say)
    with pytest.raises(ConfigError, match="two tools are named 'echo'"):
        load_tools(make_settings(chat_tools=module))


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("no_such_module_anywhere", "cannot load"),
        ("my_bad_tools:missing", "cannot load"),
        ("my_bad_tools:number", "expected a Tool or a list of Tools"),
    ],
)
def test_a_tool_that_cannot_load_stops_the_pod(
    make_settings: Callable[..., Settings],
    tools_module_named: Callable[..., str],
    path: str,
    says: str,
) -> None:
    tools_module_named("my_bad_tools", number=7)
    with pytest.raises(ConfigError, match=says):
        load_tools(make_settings(chat_tools=path))


def test_an_invalid_schema_stops_the_pod() -> None:
    broken = Tool("broken", "x", {"type": "no-such-type"}, say.function)
    with pytest.raises(ConfigError, match="tool 'broken': invalid input schema"):
        ToolBox([broken])


def test_the_built_in_tools_schemas_are_valid() -> None:
    """A pod checks them on their first call, not at start: checked here."""
    from jsonschema.validators import validator_for

    for builtin in tools_module.BUILTIN.values():
        validator_for(builtin.input_schema).check_schema(builtin.input_schema)


def test_a_built_in_tools_input_is_checked_on_its_first_call() -> None:
    box = ToolBox([clock])
    _, why = box.parse(ToolCall(call_id="c1", name="clock", arguments='{"timezone": 7}'))
    assert why is not None and "does not match the tool's schema" in why
    value, why = box.parse(ToolCall(call_id="c2", name="clock", arguments='{"timezone": "UTC"}'))
    assert why is None and value == {"timezone": "UTC"}


def test_entry_points_register_tools(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    points = [EntryPoint("search", search), EntryPoint("several", [say])]
    monkeypatch.setattr(tools_module, "entry_points", lambda group: points)
    assert names(load_tools(make_settings())) == ["search", "echo", "clock"]
    points.append(EntryPoint("broken", ImportError("no module named foo")))
    with pytest.raises(ConfigError, match="entry point 'broken' failed to load"):
        load_tools(make_settings())


async def test_outcomes_of_a_call() -> None:
    box = ToolBox([search, say, clock])
    found = await box.run(ToolCall("1", "search", '{"q": "redis"}'))
    assert (found.input, found.output, found.is_error) == (
        {"q": "redis"},
        '["redis","found"]',
        False,
    )
    wrong = await box.run(ToolCall("2", "search", '{"q": 5}'))
    assert wrong.is_error and "schema at q" in wrong.output and wrong.input == {"q": 5}
    raw = await box.run(ToolCall("3", "echo", "{not json"))
    assert raw.is_error and raw.input == "{not json"
    empty = await box.run(ToolCall("4", "echo", ""))  # no arguments at all: {}
    assert (empty.output, empty.is_error) == ("{}", False)
    paris = await box.run(ToolCall("5", "clock", '{"timezone": "Europe/Paris"}'))
    assert not paris.is_error and paris.output[-6:] in ("+01:00", "+02:00")


async def test_long_outputs_are_cut() -> None:
    @tool()
    def big(input: dict[str, Any]) -> str:
        return "x" * 500

    out = await ToolBox([big], max_output_chars=100).run(ToolCall("1", "big", "{}"))
    assert out.output.startswith("x" * 100) and out.output.endswith("[cut at 100]")


async def test_calls_are_counted_by_tool_and_outcome() -> None:
    from prometheus_client import REGISTRY

    def count(tool_name: str, outcome: str) -> float:
        labels = {"tool": tool_name, "outcome": outcome}
        return REGISTRY.get_sample_value("durable_chat_tool_calls_total", labels) or 0.0

    before = (count("echo", "ok"), count("echo", "error"), count("unknown", "error"))
    box = ToolBox([say])
    await box.run(ToolCall("1", "echo", "{}"))
    await box.run(ToolCall("2", "echo", "{bad"))
    await box.run(ToolCall("3", "made-up-by-the-model", "{}"))
    after = (count("echo", "ok"), count("echo", "error"), count("unknown", "error"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
