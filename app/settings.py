"""Configuration: every environment variable durable-chat reads, in one place.

Names are the operator-facing contract (README, k8s manifests, tests and
benchmarks rely on them), so each field is named after its variable.
"""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5"


class ConfigError(Exception):
    """The configuration cannot run safely; the message says what to set."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Redis: unset means the embedded in-process fake (one pod only).
    redis_url: str | None = None
    redis_cluster: bool = False
    # Redis with Sentinel (instead of REDIS_URL): the sentinels' addresses,
    # comma-separated ``host:port``, and the name of the primary they watch.
    redis_sentinels: str | None = None
    redis_sentinel_master: str = "mymaster"
    # Credentials of the data nodes when found through Sentinel (a REDIS_URL
    # carries its own), and of the sentinels themselves (Sentinel's own
    # ``requirepass``/ACL, often different).
    redis_username: str | None = None
    redis_password: str | None = Field(default=None, repr=False)
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = Field(default=None, repr=False)
    # TLS to the data nodes and sentinels found through REDIS_SENTINELS (a
    # REDIS_URL says ``rediss://`` itself): CA bundle, and a client
    # certificate for servers that require one (``tls-auth-clients yes``).
    redis_tls: bool = False
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    # How long a command may wait for Redis before the pod counts it failed:
    # the bound on how long a half-open connection (a blackholed network)
    # can stall a request, a turn's write or the readiness probe.
    redis_socket_timeout_s: float = Field(default=10.0, gt=0)
    redis_connect_timeout_s: float = Field(default=5.0, gt=0)

    # Model provider.
    chat_llm: Literal["anthropic", "openai", "fake"] | None = None
    # Unset: DEFAULT_ANTHROPIC_MODEL for anthropic; openai needs it named.
    chat_model: str | None = None
    # Asked for instead when the primary answers "overloaded" (529, 503).
    chat_fallback_model: str | None = None
    anthropic_api_key: str | None = Field(default=None, repr=False)
    openai_api_key: str | None = Field(default=None, repr=False)
    # Any OpenAI-compatible server (vLLM, Ollama, llama.cpp): ``http://host:port/v1``.
    openai_base_url: str | None = None
    chat_system_prompt: str = "You are a helpful assistant."
    chat_max_tokens: int = Field(default=1024, ge=1, le=64000)
    # The model's context budget: history, system prompt and tool schemas,
    # in estimated tokens (app.llm.context.estimate_tokens errs high).
    chat_context_tokens: int = Field(default=32000, ge=500)
    # Per request (the SDK's read timeout: a stream silent this long fails),
    # and the SDK's own retries of a failed request before any text streamed.
    chat_llm_timeout_s: float = Field(default=120.0, gt=0)
    chat_llm_max_retries: int = Field(default=2, ge=0, le=10)
    # Tools (app.llm.tools): module paths (or ``clock``) besides the
    # ``durable_chat.tools`` entry points; limits on running them.
    chat_tools: str | None = None
    chat_tool_timeout_s: float = Field(default=30.0, gt=0)
    chat_tool_concurrency: int = Field(default=8, ge=1)
    chat_tool_max_output_chars: int = Field(default=16000, ge=100)
    chat_max_tool_rounds: int = Field(default=8, ge=1, le=100)
    # Tokens (input + output) a user may spend per UTC day, across pods; 0: no limit.
    chat_user_tokens_per_day: int = Field(default=0, ge=0)
    chat_fake_reply_tokens: int = Field(default=40, ge=1, le=100000)
    chat_fake_token_delay_ms: float = Field(default=20.0, ge=0)
    # Benchmarks: each fake token carries its emission time (app.llm.fake).
    chat_fake_stamp: bool = False

    # Authentication (app.auth). Secrets and keys come from the environment or
    # from files (mounted Kubernetes Secrets); they are never logged or printed.
    chat_auth: Literal["jwt", "off"] = "jwt"
    chat_auth_secret: str | None = Field(default=None, repr=False)
    chat_auth_secret_file: str | None = None
    # Comma-separated. Default: HS256 with a secret, else RS256,ES256.
    chat_auth_algorithms: str | None = None
    chat_auth_public_key: str | None = Field(default=None, repr=False)
    chat_auth_public_key_file: str | None = None
    chat_auth_jwks_file: str | None = None
    chat_auth_issuer: str | None = None
    chat_auth_audience: str | None = None  # comma-separated: any of them
    chat_auth_leeway_s: int = Field(default=30, ge=0, le=300)
    # Users (token subjects, comma-separated) who may erase any user's data
    # (DELETE /v1/users/{user}/data); anyone may erase their own.
    chat_admin_users: str = ""

    # Browser safety: Origins allowed to open sockets besides the page's own
    # (comma-separated ``scheme://host[:port]``; ``*`` allows any, on purpose).
    chat_allowed_origins: str = ""

    # Abuse limits (app.chat.limits). Per user, shared by every pod; 0 = none.
    # With CHAT_AUTH=off every caller is the one user ``anonymous``, so only
    # the per-pod limit applies.
    chat_rate_prompts_per_min: int = Field(default=20, ge=0)
    chat_rate_prompt_burst: int = Field(default=10, ge=1)
    chat_max_sockets_per_user: int = Field(default=20, ge=0)
    chat_max_threads_per_user: int = Field(default=1000, ge=0)
    chat_max_members_per_thread: int = Field(default=100, ge=1)
    chat_max_sockets_per_pod: int = Field(default=10000, ge=1)
    chat_socket_lease_ms: int = Field(default=60000, ge=1000)
    # The user socket (/v1/ws): threads joined on one socket, and the threads
    # of its first ``inbox`` (the rest page on with GET /v1/threads).
    chat_max_joined: int = Field(default=20, ge=1)
    chat_inbox_limit: int = Field(default=200, ge=1, le=1000)

    # Turns, locks and the timeline.
    chat_lock_ttl_ms: int = Field(default=15000, ge=1000)
    chat_reaper_interval_ms: int = Field(default=5000, ge=100)
    chat_reaper_in_pod: bool = True

    # The cold tier (workers.archiver, docs/operations.md "Tiers"): a
    # PostgreSQL URL turns it on. Threads idle longer than
    # CHAT_ARCHIVE_AFTER_DAYS have their history copied there and trimmed
    # from Redis but for the newest CHAT_ARCHIVE_KEEP_HOT messages; reads
    # continue into it. Secret: never logged, never in repr.
    chat_archive_url: str | None = Field(default=None, repr=False)
    chat_archive_after_days: float = Field(default=30.0, ge=0)
    chat_archive_keep_hot: int = Field(default=20, ge=1)
    chat_archive_interval_s: float = Field(default=60.0, gt=0)
    # Connections of one process's pool to PostgreSQL (a pod's reads, or
    # the archiver): the bound PostgreSQL's max_connections is sized by.
    chat_archive_pool_size: int = Field(default=4, ge=1, le=100)
    # Archive from the pods instead of `durable-chat archiver`: the pod whose
    # reaper holds the leader lease sweeps (needs CHAT_REAPER_IN_POD).
    chat_archiver_in_pod: bool = False
    # Retention: whole threads idle longer than this are deleted from both
    # tiers by the archiver's sweep (unset: kept for ever). Runs with the
    # archiver, so it needs CHAT_ARCHIVE_URL too.
    chat_retention_days: float | None = Field(default=None, gt=0)
    # Tests only: the archiver kills itself (SIGKILL) at this named point
    # ("after_commit": between the PostgreSQL commit and the Redis trim,
    # "between_threads": after a thread is done), to prove a crash anywhere
    # loses and duplicates nothing.
    chat_archive_crash_at: Literal["after_commit", "between_threads"] | None = None
    # Tests only: the process stops itself (SIGSTOP) the first time it gets
    # to this named point, until the test continues it (app.chat.faults):
    # "export_read" (a pod, between an export's first read and its next).
    chat_pause_at: Literal["export_read"] | None = None
    chat_event_retention: int = Field(default=10000, ge=100)
    chat_delta_window_ms: float = Field(default=25.0, ge=0)
    chat_delta_max_bytes: int = Field(default=2048, ge=1)
    chat_dedup_ttl_s: int = Field(default=86400, ge=60)
    # What a prompt sent while a turn runs gets, for threads whose owner did
    # not choose (PATCH /v1/threads/{id} {prompt_policy}): thread_busy
    # (reject), a place in the thread's queue (queue), or it stops the turn
    # and runs next (interrupt). At most CHAT_MAX_QUEUED wait per thread.
    chat_prompt_policy: Literal["reject", "queue", "interrupt"] = "reject"
    chat_max_queued: int = Field(default=10, ge=1, le=1000)

    # Input limits.
    chat_max_prompt_chars: int = Field(default=32000, ge=1)
    chat_max_frame_bytes: int = Field(default=262144, ge=1024)

    # Sockets and shutdown.
    chat_send_queue: int = Field(default=1024, ge=8)
    # How often a pod checks its active threads (a turn in flight, or a frame
    # in the last two intervals) for a lost pub/sub message that no later one
    # would reveal (a turn's last). One HMGET per active thread, none for an
    # idle one: pub/sub loses messages only with the subscriber, and the probe
    # below bounds how long that goes unnoticed (app.chat.fanout).
    chat_fanout_audit_s: float = Field(default=5.0, gt=0)
    # The subscriber's proof of hearing (app.chat.fanout): every
    # CHAT_SUBSCRIBER_PROBE_S the pod publishes a probe on its own channel and
    # must hear it on its subscriber within CHAT_SUBSCRIBER_DEADLINE_S, or the
    # subscriber is deaf (half-open, cut, or on a demoted primary): it is
    # reconnected, its threads refilled, and /readyz fails until it hears.
    chat_subscriber_probe_s: float = Field(default=5.0, gt=0)
    chat_subscriber_deadline_s: float = Field(default=3.0, gt=0)
    # A pod deaf that long closes its sockets (1013) so that they resume on a
    # pod that hears; 0 keeps them (they then get events only from audits).
    chat_subscriber_move_s: float = Field(default=15.0, ge=0)
    # permessage-deflate, when a client offers it (browsers always do). Off by
    # default: its zlib contexts cost ~45 KiB per socket, more than the whole
    # rest of an idle socket, and the small JSON frames of a stream (deltas of
    # a few tokens) gain little from it. Turn on for slow links, at that price.
    chat_ws_deflate: bool = False
    # Every CHAT_LOOP_LAG_PROBE_MS the pod measures how late its event loop
    # wakes a sleeper (durable_chat_loop_lag_seconds): a stall of the loop
    # holds back every socket's frames. 0 (the default): not measured.
    chat_loop_lag_probe_ms: float = Field(default=0.0, ge=0)
    # A pod freezes what survives its young garbage collections, so that no
    # collection stalls its loop over all its sockets' objects; at most every
    # CHAT_GC_FULL_S, once enough was frozen since, one full collection of
    # everything reclaims cycles among frozen objects (app.gc_policy). 0: never.
    chat_gc_full_s: float = Field(default=600.0, ge=0)
    # Seconds between keep-alive comments on an idle SSE stream (app.sse), well
    # under the idle timeouts of common proxies (60 s).
    chat_sse_keepalive_s: float = Field(default=15.0, gt=0)
    # Server pings on every socket, every CHAT_WS_PING_INTERVAL_S: they are
    # what keeps an idle socket open through a proxy's idle timeout (nginx's
    # proxy_read_timeout, 60 s by default; HAProxy's timeout tunnel), so keep
    # the interval well below it (docs/operations.md). A socket whose pong
    # does not come within CHAT_WS_PING_TIMEOUT_S is closed: a dead peer.
    chat_ws_ping_interval_s: float = Field(default=20.0, gt=0)
    chat_ws_ping_timeout_s: float = Field(default=20.0, gt=0)
    # Proxies trusted to say who the client is (X-Forwarded-For,
    # X-Forwarded-Proto): comma-separated addresses or networks, ``*`` for
    # any. Empty (the default): the headers are ignored and the pod logs the
    # address that connected, since anyone can send them.
    chat_forwarded_allow_ips: str = ""
    chat_drain_grace_s: float = Field(default=20.0, ge=0)
    chat_pod_id: str = Field(default_factory=lambda: secrets.token_hex(4))
    chat_log_level: str = "INFO"
    chat_log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _choose_provider(self) -> Settings:
        if self.chat_llm is None:
            self.chat_llm = "anthropic" if self.anthropic_api_key else "fake"
        if self.chat_model is None and self.chat_llm == "anthropic":
            self.chat_model = DEFAULT_ANTHROPIC_MODEL
        return self

    @property
    def model_name(self) -> str:
        """The primary model's id (CHAT_MODEL, or the provider's default)."""
        return self.chat_model or DEFAULT_ANTHROPIC_MODEL

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured (neither REDIS_URL nor
        REDIS_SENTINELS): in-process fakeredis, one pod only."""
        return not self.redis_url and not self.redis_sentinels

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; ConfigError when malformed."""
        addresses = []
        for item in (self.redis_sentinels or "").split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(
                    f"REDIS_SENTINELS: {item.strip()!r} is not host:port "
                    "(give a comma-separated list, e.g. sentinel-0:26379,sentinel-1:26379)"
                )
            addresses.append((host.strip("[]"), int(port)))
        return addresses

    @property
    def admin_users(self) -> frozenset[str]:
        return frozenset(u.strip() for u in self.chat_admin_users.split(",") if u.strip())

    @property
    def auth_enabled(self) -> bool:
        """Whether sockets must present a valid token.

        The embedded default is a local toy, so it runs open unless a secret
        is given. Against a real Redis an open server must be asked for by
        name (CHAT_AUTH=off): see check_startable.
        """
        if self.chat_auth == "off":
            return False
        return self.embedded is False or self.auth_key_configured

    @property
    def auth_key_configured(self) -> bool:
        """Whether any token verification key is given (secret, public key, JWKS)."""
        return any(
            (
                self.chat_auth_secret,
                self.chat_auth_secret_file,
                self.chat_auth_public_key,
                self.chat_auth_public_key_file,
                self.chat_auth_jwks_file,
            )
        )

    def check_startable(self) -> None:
        """Refuse configurations that would run unsafely or cannot work."""
        if not self.embedded and self.chat_auth == "jwt" and not self.auth_key_configured:
            raise ConfigError(
                "A Redis is configured but CHAT_AUTH_SECRET is not: a shared deployment must "
                "authenticate its users. Set CHAT_AUTH_SECRET (or CHAT_AUTH_SECRET_FILE, "
                "CHAT_AUTH_PUBLIC_KEY[_FILE], CHAT_AUTH_JWKS_FILE), or CHAT_AUTH=off to run "
                "open on purpose."
            )
        if self.chat_llm == "anthropic" and not self.anthropic_api_key:
            raise ConfigError("CHAT_LLM=anthropic needs ANTHROPIC_API_KEY.")
        if self.chat_llm == "openai":
            if not self.chat_model:
                raise ConfigError(
                    "CHAT_LLM=openai needs CHAT_MODEL: the model id the server serves "
                    "(for example gpt-4.1-mini, or the name vLLM or Ollama was started with)."
                )
            if not (self.openai_api_key or self.openai_base_url):
                raise ConfigError(
                    "CHAT_LLM=openai needs OPENAI_API_KEY, or OPENAI_BASE_URL for a "
                    "self-hosted OpenAI-compatible server."
                )
        if self.chat_archiver_in_pod and not (self.chat_archive_url and self.chat_reaper_in_pod):
            raise ConfigError(
                "CHAT_ARCHIVER_IN_POD needs CHAT_ARCHIVE_URL, and CHAT_REAPER_IN_POD: the pod "
                "whose reaper holds the leader lease is the one that archives."
            )
        if self.redis_cluster and not self.redis_url:
            raise ConfigError("REDIS_CLUSTER=1 needs REDIS_URL (a seed node of the cluster).")
        if self.redis_sentinels:
            if self.redis_url or self.redis_cluster:
                raise ConfigError(
                    "Set either REDIS_SENTINELS (Redis with Sentinel) or REDIS_URL "
                    "(one server, or REDIS_CLUSTER=1), not both."
                )
            self.sentinel_addresses  # noqa: B018 - raises ConfigError when malformed
        if self.chat_subscriber_deadline_s > self.chat_subscriber_probe_s:
            raise ConfigError(
                "CHAT_SUBSCRIBER_DEADLINE_S must not exceed CHAT_SUBSCRIBER_PROBE_S "
                "(a probe is judged before the next one is sent)."
            )
