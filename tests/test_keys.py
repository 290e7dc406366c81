"""Key layout: id validation, hash tags, channel round trip, event ids."""

from __future__ import annotations

import fnmatch
import inspect

import pytest

from app.chat import keys


@pytest.mark.parametrize(
    "raw", ["a", "T", "0", "thread-1", "my_thread", "A-Z_a-z_0-9", "x" * 64, "-", "_"]
)
def test_thread_id_accepts_valid_ids(raw: str) -> None:
    assert keys.thread_id(raw) == raw


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "x" * 65,
        "a{b",
        "a}b",
        "{t}",
        "a:b",
        "a b",
        " a",
        "a\n",
        "thé",
        "日本",
        "a/b",
        "a.b",
        "a*",
    ],
)
def test_thread_id_rejects_invalid_ids(raw: str) -> None:
    with pytest.raises(keys.InvalidId):
        keys.thread_id(raw)


@pytest.mark.parametrize("raw", [None, 5, b"abc", ["a"], 1.5])
def test_thread_id_rejects_non_strings(raw: object) -> None:
    with pytest.raises(keys.InvalidId):
        keys.thread_id(raw)  # type: ignore[arg-type]


def test_invalid_id_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        keys.thread_id("a b")


@pytest.mark.parametrize("raw", ["alice", "a@b.com", "auth0|123", "x" * 128, "u:1+2=3"])
def test_user_id_accepts_token_subjects(raw: str) -> None:
    assert keys.user_id(raw) == raw


@pytest.mark.parametrize("raw", ["", "x" * 129, "a{b", "a}b", "a b", "é", None, 3])
def test_user_id_rejects_unsafe_ids(raw: object) -> None:
    with pytest.raises(keys.InvalidId):
        keys.user_id(raw)  # type: ignore[arg-type]


# Every key builder of a thread, found in the module rather than listed here:
# a new one is checked (and must be in all_thread_keys) without anyone
# remembering to add it to a list.
THREAD_KEY_BUILDERS = [
    builder
    for name, builder in inspect.getmembers(keys, inspect.isfunction)
    if builder.__module__ == keys.__name__
    and not name.startswith("_")
    and name != "all_thread_keys"
    and [p.annotation for p in inspect.signature(builder).parameters.values()] == ["ThreadId"]
]


def test_the_builders_are_found() -> None:
    names = {builder.__name__ for builder in THREAD_KEY_BUILDERS}
    assert {"history", "events", "lock", "fence", "meta", "live"} <= names


@pytest.mark.parametrize("builder", THREAD_KEY_BUILDERS, ids=lambda b: b.__name__)
def test_every_thread_key_carries_the_hash_tag(builder) -> None:  # type: ignore[no-untyped-def]
    t = keys.thread_id("T-1_x")
    key = builder(t)
    assert key.startswith("chat:")
    # Exactly one hash tag, and it is the thread id: one cluster slot per thread.
    assert key.count("{") == 1 and key.count("}") == 1
    assert key[key.index("{") + 1 : key.index("}")] == "T-1_x"


def test_thread_keys_are_distinct_and_complete() -> None:
    t = keys.thread_id("abc")
    built = [builder(t) for builder in THREAD_KEY_BUILDERS]
    assert len(set(built)) == len(built)
    assert keys.history(t) == "chat:{abc}:history"
    assert keys.live(t) == "chat:{abc}:live"
    # Every key (not the channel) is listed for deletion.
    assert set(keys.all_thread_keys(t)) == set(built) - {keys.live(t)}


def test_thread_keys_of_different_threads_never_collide() -> None:
    a, b = keys.thread_id("a"), keys.thread_id("ab")
    for builder in THREAD_KEY_BUILDERS:
        assert builder(a) != builder(b)


def test_user_keys_carry_the_user_hash_tag() -> None:
    u = keys.user_id("bob@example.com")
    built = [
        keys.user_threads(u), keys.user_owned(u), keys.user_sockets(u),
        keys.user_usage(u, 20000), keys.user_usage(u, 20001), keys.user_inflight(u),
    ]  # fmt: skip
    for key in built:
        assert "{bob@example.com}" in key
    assert len(set(built)) == len(built)


@pytest.mark.parametrize("raw", ["a", "thread-1", "x" * 64, "live", "_-_"])
def test_thread_of_channel_round_trips(raw: str) -> None:
    t = keys.thread_id(raw)
    assert keys.thread_of_channel(keys.live(t)) == t


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0-0", (0, 0)),
        ("1-2", (1, 2)),
        ("1700000000000-15", (1700000000000, 15)),
        ("18446744073709551615-18446744073709551615", (2**64 - 1, 2**64 - 1)),
    ],
)
def test_event_id_parses(raw: str, expected: tuple[int, int]) -> None:
    assert keys.event_id(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "1", "1-", "-1", "a-b", "1-2-3", "1_2", " 1-2", "1-2 ", "+", "-", None, 12]
)
def test_event_id_rejects_other_shapes(raw: object) -> None:
    with pytest.raises(keys.InvalidId):
        keys.event_id(raw)  # type: ignore[arg-type]


def test_event_ids_order_numerically_not_lexically() -> None:
    ids = ["10-0", "9-5", "9-10", "100-0", "9-9"]
    ordered = sorted(ids, key=keys.event_id)
    assert ordered == ["9-5", "9-9", "9-10", "10-0", "100-0"]
    assert keys.event_id("1-10") > keys.event_id("1-9")
    assert keys.event_id("2-0") > keys.event_id("1-999")


@pytest.mark.parametrize("raw", ["\u0661-\u0660", "\uff11-0", "1-\u0969"])
def test_event_id_rejects_non_ascii_digits(raw: str) -> None:
    """Other scripts' digits parse with int() but Redis refuses them."""
    with pytest.raises(keys.InvalidId):
        keys.event_id(raw)


@pytest.mark.parametrize("raw", [f"{2**64}-0", f"0-{2**64}", "99999999999999999999-0"])
def test_event_id_rejects_parts_beyond_64_bits(raw: str) -> None:
    with pytest.raises(keys.InvalidId):
        keys.event_id(raw)


def test_meta_keys_name_their_thread_and_only_checked_ids() -> None:
    thread = keys.thread_id("t-1")
    assert keys.thread_of_meta(keys.meta(thread)) == thread
    assert keys.thread_of_meta("chat:{bad id}:meta") is None
    assert keys.thread_of_meta(keys.history(thread)) is None
    user = keys.user_id("u@x")
    assert fnmatch.fnmatchcase(keys.user_threads(user), keys.user_keys_pattern(user))
    assert not fnmatch.fnmatchcase(
        keys.user_threads(keys.user_id("u@xy")), keys.user_keys_pattern(user)
    )
