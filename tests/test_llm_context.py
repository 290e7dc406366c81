"""The context every provider gets: token estimates and the budget they fill."""

from __future__ import annotations

from app.chat.records import Message, Role, ToolUse
from app.llm.anthropic import to_anthropic_messages
from app.llm.context import (
    MESSAGE_OVERHEAD_TOKENS,
    Turn,
    estimate_tokens,
    message_tokens,
    turns,
)
from app.llm.openai import to_openai_messages

PROSE = (
    "Durable chat keeps every thread's history in Redis, streams each reply to "
    "every tab on any pod, and survives the death of the pod that runs a turn. "
) * 20


def test_estimate_errs_high_for_prose() -> None:
    # Tokenizers of current models average about 4 characters of English a
    # token; the estimate must not be below that, or a context could overflow.
    assert estimate_tokens(PROSE) >= len(PROSE) / 4
    assert estimate_tokens(PROSE) == -(-len(PROSE) // 3)


def test_estimate_counts_bytes_not_characters() -> None:
    # Scripts outside ASCII cost more tokens per character: 3 bytes each here.
    assert estimate_tokens("日本語のテキスト") == 8
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1


def test_a_message_costs_its_text_and_an_overhead() -> None:
    message = Message(
        id="1-0", role="user", content="abcdef", user_id="u", created_at=1, status="complete"
    )
    assert message_tokens(message) == 2 + MESSAGE_OVERHEAD_TOKENS


# --- a reply that used tools, as every provider gets it ------------------------------


def use(call_id: str, offset: int, output: str = "12:00", is_error: bool = False) -> ToolUse:
    return ToolUse(call_id, "clock", {"timezone": "UTC"}, output, is_error, offset)


def msg(role: Role, content: str, *uses: ToolUse) -> Message:
    return Message(
        id="1-0", role=role, content=content, user_id="u", created_at=1, status="complete",
        tool_calls=uses,
    )  # fmt: skip


ROUNDS = [
    msg("user", "what time is it twice?"),
    # "Let me look. " then two calls at once, "And again. " then one more, then the answer.
    msg(
        "assistant",
        "Let me look. And again. It is noon.",
        use("a", 13),
        use("b", 13),
        use("c", 24, "boom", is_error=True),
    ),
    msg("user", "thanks"),
]


def test_a_reply_with_tools_becomes_its_rounds() -> None:
    assert turns(ROUNDS) == [
        Turn("user", "what time is it twice?"),
        Turn("assistant", "Let me look. ", calls=[use("a", 13), use("b", 13)]),
        Turn("user", results=[use("a", 13), use("b", 13)]),
        Turn("assistant", "And again. ", calls=[use("c", 24, "boom", True)]),
        Turn("user", results=[use("c", 24, "boom", True)]),
        Turn("assistant", "It is noon."),
        Turn("user", "thanks"),
    ]


def test_a_reply_in_progress_ends_with_its_results() -> None:
    so_far = msg("assistant", "", use("a", 0))
    assert turns([msg("user", "time?"), so_far]) == [
        Turn("user", "time?"),
        Turn("assistant", "", calls=[use("a", 0)]),
        Turn("user", results=[use("a", 0)]),
    ]


def test_results_of_a_dropped_reply_are_dropped_too() -> None:
    # The context starts inside a reply (the budget cut the user's message):
    # its results cannot stand without the calls, its text can.
    assert turns([ROUNDS[1], msg("user", "thanks")]) == [Turn("user", "thanks")]


def test_anthropic_renders_tool_use_and_tool_result_blocks() -> None:
    rendered = to_anthropic_messages(ROUNDS)
    assert [m["role"] for m in rendered] == ["user", "assistant", "user", "assistant", "user",
                                             "assistant", "user"]  # fmt: skip
    assert rendered[1]["content"] == [
        {"type": "text", "text": "Let me look. "},
        {"type": "tool_use", "id": "a", "name": "clock", "input": {"timezone": "UTC"}},
        {"type": "tool_use", "id": "b", "name": "clock", "input": {"timezone": "UTC"}},
    ]
    assert rendered[4]["content"] == [
        {"type": "tool_result", "tool_use_id": "c", "content": "boom", "is_error": True}
    ]
    assert rendered[5] == {"role": "assistant", "content": "It is noon."}


def test_openai_renders_tool_calls_and_tool_messages() -> None:
    rendered = to_openai_messages("sys", ROUNDS)
    assert [m["role"] for m in rendered] == [
        "system", "user", "assistant", "tool", "tool", "assistant", "tool", "assistant", "user",
    ]  # fmt: skip
    call = rendered[2]
    assert call["content"] == "Let me look. "
    assert call["tool_calls"][0] == {  # type: ignore[typeddict-item]
        "id": "a", "type": "function",
        "function": {"name": "clock", "arguments": '{"timezone":"UTC"}'},
    }  # fmt: skip
    assert rendered[3] == {"role": "tool", "tool_call_id": "a", "content": "12:00"}
    assert rendered[6] == {"role": "tool", "tool_call_id": "c", "content": "Error: boom"}


def test_malformed_arguments_go_back_as_sent() -> None:
    raw = ToolUse("x", "clock", '{"timezone": "UT', "not valid JSON", True, 0)
    rendered = to_openai_messages("sys", [msg("user", "hi"), msg("assistant", "ok", raw)])
    assert rendered[2]["tool_calls"][0]["function"]["arguments"] == '{"timezone": "UT'  # type: ignore[typeddict-item]
    # Anthropic wants an object: the raw text cannot go there.
    assert (
        to_anthropic_messages([msg("user", "hi"), msg("assistant", "ok", raw)])[1]["content"][0][
            "input"
        ]
        == {}
    )  # type: ignore[index]
