"""Configuration from the environment, and the refusal of unsafe setups."""

from __future__ import annotations

import pydantic
import pytest

from app.llm import make_model
from app.llm.fake import FakeModel
from app.settings import ConfigError, Settings


@pytest.fixture
def env(clean_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    return clean_env


def test_defaults(env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.redis_url is None and settings.embedded is True
    assert settings.chat_llm == "fake"
    assert settings.chat_auth == "jwt"
    assert settings.chat_event_retention == 10000
    assert settings.chat_lock_ttl_ms == 15000
    assert settings.chat_pod_id  # a random id of its own
    assert Settings().chat_pod_id != settings.chat_pod_id
    settings.check_startable()  # the embedded default starts as it is


def test_llm_defaults_to_fake_without_a_key(env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.chat_llm == "fake"
    assert isinstance(make_model(settings), FakeModel)


def test_llm_defaults_to_anthropic_with_a_key(env: pytest.MonkeyPatch) -> None:
    env.setenv("ANTHROPIC_API_KEY", "sk-test")
    settings = Settings()
    assert settings.chat_llm == "anthropic"
    settings.check_startable()


def test_an_explicit_llm_wins_over_the_key(env: pytest.MonkeyPatch) -> None:
    env.setenv("ANTHROPIC_API_KEY", "sk-test")
    env.setenv("CHAT_LLM", "fake")
    assert Settings().chat_llm == "fake"


def test_anthropic_without_a_key_cannot_start(env: pytest.MonkeyPatch) -> None:
    env.setenv("CHAT_LLM", "anthropic")
    settings = Settings()
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        settings.check_startable()


def test_the_key_is_not_in_the_repr(env: pytest.MonkeyPatch) -> None:
    env.setenv("ANTHROPIC_API_KEY", "sk-very-secret")
    env.setenv("CHAT_AUTH_SECRET", "hunter2-secret")
    text = repr(Settings())
    assert "sk-very-secret" not in text and "hunter2-secret" not in text


def test_redis_url_without_an_auth_secret_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://localhost:6379/0")
    settings = Settings()
    assert settings.embedded is False
    with pytest.raises(ConfigError, match="CHAT_AUTH_SECRET"):
        settings.check_startable()


def test_redis_url_with_an_auth_secret_starts(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://localhost:6379/0")
    env.setenv("CHAT_AUTH_SECRET", "s3cret")
    settings = Settings()
    settings.check_startable()
    assert settings.auth_enabled is True


def test_redis_url_with_auth_off_starts_open(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://localhost:6379/0")
    env.setenv("CHAT_AUTH", "off")
    settings = Settings()
    settings.check_startable()
    assert settings.auth_enabled is False


def test_embedded_runs_open_unless_given_a_secret(env: pytest.MonkeyPatch) -> None:
    assert Settings().auth_enabled is False
    env.setenv("CHAT_AUTH_SECRET", "s3cret")
    assert Settings().auth_enabled is True


def test_a_shared_redis_authenticates_by_default(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://localhost:6379/0")
    assert Settings().auth_enabled is True


def test_cluster_needs_a_redis_url(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_CLUSTER", "1")
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Settings().check_startable()


def test_variables_are_read_case_insensitively_and_typed(env: pytest.MonkeyPatch) -> None:
    env.setenv("CHAT_EVENT_RETENTION", "250")
    env.setenv("chat_delta_window_ms", "12.5")
    env.setenv("CHAT_REAPER_IN_POD", "false")
    settings = Settings()
    assert settings.chat_event_retention == 250
    assert settings.chat_delta_window_ms == 12.5
    assert settings.chat_reaper_in_pod is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHAT_EVENT_RETENTION", "99"),
        ("CHAT_LOCK_TTL_MS", "999"),
        ("CHAT_DELTA_MAX_BYTES", "0"),
        ("CHAT_LLM", "gemini"),
        ("CHAT_AUTH", "maybe"),
        ("CHAT_SEND_QUEUE", "many"),
    ],
)
def test_out_of_range_values_are_refused(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(pydantic.ValidationError):
        Settings()
