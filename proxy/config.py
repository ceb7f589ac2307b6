"""Settings: the YAML config file, validated once at start-up into frozen values.

This is the only module that reads the environment. A bad file raises `ConfigError` whose
message is one line naming the key and the problem; the CLI prints it and exits, so an
operator never sees a traceback for a typo.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.controller.plan import PhaseConfig

DEFAULT_PORT = 8080


class ConfigError(Exception):
    """The config file or environment is unusable; the message is one line naming the key."""


class _Strict(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    base_url: str
    api_key_env: str | None = None
    # The longest silence from the upstream before its headers arrive (and within a non-streamed body).
    timeout_s: float = Field(default=120.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # The longest silence between two chunks of a stream (and before a stream's headers); unset: timeout_s.
    stream_idle_timeout_s: float | None = Field(default=None, gt=0)
    # Requests in flight to this upstream at once, per process; beyond it a request gets a fast 429.
    max_in_flight: int | None = Field(default=None, ge=1)
    # Extra attempts after a failure that left no byte with the client and that the upstream cannot
    # have acted on: connection refused, or a 429/502/503/504 answer. Timeouts are never retried.
    retries: int = Field(default=0, ge=0, le=5)
    # A Retry-After longer than this is not waited for: the client gets the upstream's answer.
    max_retry_wait_s: float = Field(default=2.0, ge=0, le=60)
    # Filled in from the environment by `load_settings`; never serialised or logged.
    api_key: str | None = Field(default=None, exclude=True, repr=False)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class Pricing(_Strict):
    input_per_1m: float = Field(default=0.0, ge=0)
    output_per_1m: float = Field(default=0.0, ge=0)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


class ModelConfig(_Strict):
    upstream: str
    model: str
    pricing: Pricing = Pricing()


def validate_percent(value: float) -> float:
    """0..100, finite, at most two decimals: the bucket grid is 0.01 % wide."""
    if isinstance(value, bool) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    if not 0 <= value <= 100:
        raise ValueError("must be between 0 and 100")
    if abs(value * 100 - round(value * 100)) > 1e-6:
        raise ValueError("must have at most two decimals")
    return round(value, 2)


SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# Fits the store's feedback.metric column, and reads well in a report and a URL.
METRIC_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Outcomes the proxy derives from its own events (never declared, never sent as feedback).
IMPLICIT_METRICS = ("error", "empty_response", "regenerated", "turns_per_episode")
# Guardrails over the proxy's own measurements, tested for non-inferiority.
GUARDRAILS = (
    "error_rate", "empty_rate", "cost_per_query", "latency_mean",
    "latency_p50", "latency_p95", "latency_p99", "ttft_p50", "ttft_p95",
)


class MetricConfig(_Strict):
    """An outcome the app reports through POST /v1/feedback."""

    type: Literal["boolean", "float"]
    # request: feedback names a request id (thumbs on an answer). user: names a user id (repeat usage).
    level: Literal["request", "user"] = "request"
    higher_is_better: bool = True
    min: float | None = None
    max: float | None = None
    description: str = ""

    @model_validator(mode="after")
    def _range(self) -> MetricConfig:
        if self.type == "boolean" and (self.min is not None or self.max is not None):
            raise ValueError("min/max apply to float metrics only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class GuardrailConfig(_Strict):
    """How much worse than control the treatment may be: by an amount, or by a factor."""

    max_regression: float | None = Field(default=None, ge=0)
    max_ratio: float | None = Field(default=None, gt=1)

    @model_validator(mode="after")
    def _one_margin(self) -> GuardrailConfig:
        if (self.max_regression is None) == (self.max_ratio is None):
            raise ValueError("set exactly one of max_regression or max_ratio")
        return self


def _default_guardrails() -> dict[str, GuardrailConfig]:
    return {
        "error_rate": GuardrailConfig(max_regression=0.01),
        "latency_p95": GuardrailConfig(max_ratio=1.2),
        "cost_per_query": GuardrailConfig(max_ratio=1.5),
    }


class AnalysisConfig(_Strict):
    """The pre-registered plan of an experiment's analysis (`abproxy report`)."""

    primary_metric: str | None = None
    secondary_metrics: list[str] = []
    guardrails: dict[str, GuardrailConfig] = Field(default_factory=_default_guardrails)
    # Pre-registered users per variant: the fixed-horizon p-value is shown only once it is reached.
    # Unset: computed from `mde` and the control's observed rate (or spread) at `alpha` and `power`.
    planned_users_per_variant: int | None = Field(default=None, ge=2)
    # Smallest absolute change of the primary metric worth detecting (0.05 = five points of a rate).
    mde: float | None = Field(default=None, gt=0)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    power: float = Field(default=0.8, gt=0.5, lt=1)
    # The boolean outcome whose count divides cost in "cost per successful task".
    success_metric: str | None = None
    # Off by default: prompts and completions of this experiment's requests go to the event stream
    # and the store only when this is true.
    store_prompts: bool = False


class PairSamplingConfig(_Strict):
    """Ask the other variant too, for a share of answered requests, to build blind comparisons."""

    share: float = Field(default=0.0, ge=0, le=1)  # 0.01 = one request in a hundred
    max_in_flight: int = Field(default=4, ge=1)  # extra calls at once per process; beyond, a sample is skipped


class ExperimentConfig(_Strict):
    aliases: list[str] = Field(min_length=1)
    control: str
    treatment: str
    salt: str | None = None
    # Strict: lax mode turns YAML `yes`/`true` into 1.0 before validate_percent can refuse it.
    rollout_percent: float = Field(default=0.0, strict=True)
    analysis: AnalysisConfig = AnalysisConfig()
    pair_sampling: PairSamplingConfig = PairSamplingConfig()
    # Phases the controller walks through (`abproxy controller`); empty: the percent is set by hand only.
    rollout_plan: list[PhaseConfig] = []
    # When the treatment's upstream fails before any byte reached the client, ask the control instead.
    # Off by default: the user then sees the base model, and the event says so (`fallback`).
    fallback_to_control: bool = False

    @field_validator("rollout_percent")
    @classmethod
    def _percent(cls, value: float) -> float:
        return validate_percent(value)


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    workers: int = Field(default=1, ge=1)
    # Set: /metrics is served on this port only (and 404 on `port`), so scrapes need no
    # route through the public listener. Unset: /metrics on `port`.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # false: no Prometheus metrics at all. /metrics answers 404 and the request path makes no
    # metric updates (the benchmark of each feature's cost measures it off).
    prometheus_enabled: bool = True
    # A larger /v1 request body is refused with 413 before it is parsed.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # /v1 requests in flight at once per process; beyond it a request gets a fast 503, not a queue.
    max_in_flight: int = Field(default=4096, ge=1)
    # On SIGTERM: stop accepting, let open requests and streams finish for this long, then flush events.
    shutdown_timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServerConfig:
        if self.metrics_port == self.port:
            raise _KeyProblem("server.metrics_port", f"must differ from server.port ({self.port})")
        if self.metrics_port is not None and not self.prometheus_enabled:
            raise _KeyProblem("server.metrics_port", "must be unset when server.prometheus_enabled is false")
        return self


class ControllerConfig(_Strict):
    """`abproxy controller`: how often it looks, how long its lease on the leader lock lasts, whom it tells."""

    interval_s: float = Field(default=60.0, gt=0)
    # A leader that has not renewed its lease for this long is presumed dead and another takes over.
    lease_s: float = Field(default=30.0, gt=0)
    # A Slack-compatible incoming webhook told of every phase change, rollback and halt (env ABPROXY_WEBHOOK_URL).
    webhook_url: str | None = Field(default=None, repr=False)

    @model_validator(mode="after")
    def _renew_in_time(self) -> ControllerConfig:
        if self.lease_s < 2 * min(self.interval_s, 10.0):
            raise _KeyProblem("controller.lease_s", "must be at least twice the renewal period (min(interval_s, 10))")
        return self


class RolloutConfig(_Strict):
    # Pub/sub carries every change at once; this re-read only heals a missed message.
    resync_interval_s: float = Field(default=5.0, gt=0)
    redis_timeout_s: float = Field(default=1.0, gt=0)
    # Connections one process opens to Redis (admin, feedback, pub/sub). Past it a command waits
    # for a free one up to redis_timeout_s, then fails like a slow Redis (503), never at once.
    redis_max_connections: int = Field(default=256, ge=2)
    # true: /readyz answers 503 until the percents were read from Redis once (requests are served
    # meanwhile, on the config's rollout_percent). false: ready at once on the config's percents.
    ready_requires_redis: bool = True


class AdminConfig(_Strict):
    # Requests per minute per token and process; 0 = unlimited. Past it: 429 with Retry-After.
    rate_limit_per_minute: int = Field(default=600, ge=0)


class ClientAuthConfig(_Strict):
    """Optional: /v1 requests need `Authorization: Bearer <key>` whose SHA-256 is listed here."""

    # Hex SHA-256 of each accepted client key (`abproxy hash-key`); empty: no client authentication.
    # Also ABPROXY_CLIENT_KEY_SHA256 (comma-separated), added to these.
    key_sha256: list[str] = []

    @field_validator("key_sha256")
    @classmethod
    def _hex_digests(cls, values: list[str]) -> list[str]:
        for value in values:
            if not SHA256_HEX.fullmatch(value):
                raise ValueError(f"{value[:12]!r}... is not a 64-character hex SHA-256 (abproxy hash-key)")
        return [value.lower() for value in values]


class RedisStreamConfig(_Strict):
    """The event sink the analysis features read: a Redis Stream on the proxy's Redis."""

    enabled: bool = False
    key: str = Field(default="abproxy:events", min_length=1)
    # Trimmed approximately (MAXLEN ~), which lets Redis drop whole nodes: O(1) per XADD.
    maxlen: int = Field(default=1_000_000, ge=1)
    # One atomic script call per batch: Redis serves no one else meanwhile (~1 ms per 500).
    batch_size: int = Field(default=500, ge=1, le=5_000)
    max_buffered: int = Field(default=20_000, ge=1)
    timeout_s: float = Field(default=1.0, gt=0)


class FeedbackConfig(_Strict):
    # A request id accepts feedback for this long after the request (7 days).
    ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    # A request with the same prompt from the same user within this window marks the earlier answer regenerated.
    regeneration_window_s: float = Field(default=120.0, gt=0)


class StoreConfig(_Strict):
    """Where `abproxy collect` writes and `abproxy report` reads; ABPROXY_STORE_URL overrides."""

    url: str = "sqlite:///abproxy.db"

    @field_validator("url")
    @classmethod
    def _supported(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        return value


class CollectorConfig(_Strict):
    group: str = Field(default="abproxy-collector", min_length=1)
    # One transaction per batch: 2,000 cost SQLite a quarter to half less CPU per event than 500
    # (bench scenario 7); a crash re-reads at most one batch, stored once (idempotent writes).
    batch_size: int = Field(default=2_000, ge=1, le=10_000)
    block_ms: int = Field(default=1000, ge=1)
    # Entries a dead collector held this long are taken over by a live one.
    claim_idle_ms: int = Field(default=60_000, ge=1)
    # How often the collector builds the report's rollup of days that are over (proxy/store/rollup.py);
    # 0: never (`abproxy store rollup` builds it by hand).
    rollup_interval_s: float = Field(default=60.0, ge=0)
    # A day is built this long after its end (and the regeneration window): a later event marks it
    # again and it is rebuilt, so this only saves rebuilds while stragglers come in.
    rollup_settle_s: float = Field(default=600.0, ge=0)


class EventsConfig(_Strict):
    enabled: bool = True  # JSON lines on stdout
    flush_interval_s: float = Field(default=0.1, gt=0)
    max_buffered: int = Field(default=100_000, ge=1)
    redis_stream: RedisStreamConfig = RedisStreamConfig()


class Settings(_Strict):
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    models: dict[str, ModelConfig] = Field(min_length=1)
    experiments: dict[str, ExperimentConfig] = Field(min_length=1)
    server: ServerConfig = ServerConfig()
    rollout: RolloutConfig = RolloutConfig()
    events: EventsConfig = EventsConfig()
    metrics: dict[str, MetricConfig] = {}
    feedback: FeedbackConfig = FeedbackConfig()
    store: StoreConfig = StoreConfig()
    collector: CollectorConfig = CollectorConfig()
    controller: ControllerConfig = ControllerConfig()
    admin: AdminConfig = AdminConfig()
    client_auth: ClientAuthConfig = ClientAuthConfig()
    redis_url: str = "redis://127.0.0.1:6379/0"
    admin_token: str | None = Field(default=None, exclude=True, repr=False)
    # A second admin token that may read (GET) but never change anything (ABPROXY_ADMIN_READ_TOKEN).
    admin_read_token: str | None = Field(default=None, exclude=True, repr=False)
    # Keyed hash of user ids in events, so a dictionary of e-mails cannot reverse them.
    user_hash_key: str = Field(default="", exclude=True, repr=False)
    # Signs the request ids the proxy issues, so feedback can tell its own ids (and their age)
    # from made-up ones without a lookup. Every instance of one deployment needs the same key.
    signing_key: str = Field(default="", exclude=True, repr=False)

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for name in self.metrics:
            if not METRIC_NAME.fullmatch(name):
                raise _KeyProblem(f"metrics.{name}", "names are 1-64 letters, digits, '_', '-' or '.'")
            if name in IMPLICIT_METRICS or name in GUARDRAILS:
                raise _KeyProblem(f"metrics.{name}", "is a name the proxy derives itself; choose another")
        for name, model in self.models.items():
            if model.upstream not in self.upstreams:
                raise _KeyProblem(f"models.{name}.upstream", f"unknown upstream {model.upstream!r}")
        seen: dict[str, str] = {}
        for name, exp in self.experiments.items():
            for role in ("control", "treatment"):
                ref = getattr(exp, role)
                if ref not in self.models:
                    raise _KeyProblem(f"experiments.{name}.{role}", f"unknown model {ref!r}")
            for alias in exp.aliases:
                if alias in seen:
                    raise _KeyProblem(
                        f"experiments.{name}.aliases",
                        f"duplicate alias {alias!r} (also in experiments.{seen[alias]})",
                    )
                seen[alias] = name
            self._check_analysis(name, exp.analysis)
            self._check_plan(name, exp)
        if self.metrics and not self.events.redis_stream.enabled:
            raise _KeyProblem(
                "events.redis_stream.enabled", "must be true when metrics are declared (feedback travels on the stream)"
            )
        return self

    def _check_analysis(self, experiment: str, analysis: AnalysisConfig) -> None:
        key = f"experiments.{experiment}.analysis"
        known = {*self.metrics, *IMPLICIT_METRICS}
        named = [("primary_metric", analysis.primary_metric), ("success_metric", analysis.success_metric)]
        named += [(f"secondary_metrics.{i}", m) for i, m in enumerate(analysis.secondary_metrics)]
        for field, metric in named:
            if metric is not None and metric not in known:
                raise _KeyProblem(f"{key}.{field}", f"unknown metric {metric!r} (declare it under metrics:)")
        if analysis.primary_metric is not None and analysis.primary_metric in analysis.secondary_metrics:
            raise _KeyProblem(f"{key}.secondary_metrics", f"{analysis.primary_metric!r} is already the primary metric")
        success = analysis.success_metric
        if success is not None and success in self.metrics and self.metrics[success].type != "boolean":
            raise _KeyProblem(f"{key}.success_metric", f"{success!r} must be a boolean metric")
        for guardrail in analysis.guardrails:
            if guardrail not in GUARDRAILS:
                known_guardrails = ", ".join(GUARDRAILS)
                raise _KeyProblem(f"{key}.guardrails.{guardrail}", f"unknown guardrail (one of {known_guardrails})")


    def _check_plan(self, experiment: str, exp: ExperimentConfig) -> None:
        key = f"experiments.{experiment}.rollout_plan"
        known_metrics = {*self.metrics, *IMPLICIT_METRICS}
        names: set[str] = set()
        previous = 0.0
        for i, phase in enumerate(exp.rollout_plan):
            where = f"{key}.{i}"
            if phase.name in names:
                raise _KeyProblem(f"{where}.name", f"phase {phase.name!r} appears twice")
            names.add(phase.name)
            try:
                percent = validate_percent(phase.percent)
            except ValueError as exc:
                raise _KeyProblem(f"{where}.percent", str(exc)) from None
            if percent <= previous:
                raise _KeyProblem(f"{where}.percent", f"must be above the previous phase's {previous:g}")
            previous = percent
            if i == len(exp.rollout_plan) - 1 and phase.gates:
                raise _KeyProblem(f"{where}.gates", "the last phase has no next phase: its gates are never read")
            for j, gate in enumerate(phase.gates):
                if gate.guardrail is not None and gate.guardrail not in GUARDRAILS:
                    known = ", ".join(GUARDRAILS)
                    problem = f"unknown guardrail {gate.guardrail!r} (one of {known})"
                    raise _KeyProblem(f"{where}.gates.{j}.guardrail", problem)
                if gate.metric is not None and gate.metric not in known_metrics:
                    raise _KeyProblem(f"{where}.gates.{j}.metric",
                                      f"unknown metric {gate.metric!r} (declare it under metrics:)")  # fmt: skip
        if exp.rollout_plan and not self.events.redis_stream.enabled:
            raise _KeyProblem("events.redis_stream.enabled",
                              f"must be true for {key}: the controller reads the store the stream feeds")  # fmt: skip


class _KeyProblem(ValueError):
    """A cross-reference error that knows its own key path (pydantic would report the root)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def _format_validation_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    # A misspelt key also makes its intended key "missing": name the typo, it is the cause.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, _KeyProblem):
        return f"config error: {cause.key}: {cause.problem}"
    key = ".".join(str(part) for part in err["loc"]) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    return f"config error: {key}: {message}"


def load_settings(
    path: str | Path, environ: Mapping[str, str] | None = None, *, upstream_keys: bool = True
) -> Settings:
    """Read and validate the config file, then fill secrets from `environ`.

    `upstream_keys=False` is for tools that never call an upstream (`events tail`, `assign`):
    they should run on an ops box that does not hold the model providers' keys.
    """
    env = os.environ if environ is None else environ
    try:
        raw: Any = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config error: {path} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {path} must be a mapping with upstreams, models, experiments")
    return settings_from_dict(raw, env, upstream_keys=upstream_keys)


def settings_from_dict(raw: dict[str, Any], env: Mapping[str, str], *, upstream_keys: bool = True) -> Settings:
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    upstreams = {}
    for name, upstream in settings.upstreams.items():
        key = None
        if upstream.api_key_env:
            key = env.get(upstream.api_key_env)
            if not key and upstream_keys:
                raise ConfigError(
                    f"config error: upstreams.{name}.api_key_env: environment variable "
                    f"{upstream.api_key_env} is not set"
                )
        upstreams[name] = upstream.model_copy(update={"api_key": key})
    return settings.model_copy(
        update={
            "upstreams": upstreams,
            "redis_url": env.get("REDIS_URL", settings.redis_url),
            "admin_token": env.get("ABPROXY_ADMIN_TOKEN") or None,
            "admin_read_token": env.get("ABPROXY_ADMIN_READ_TOKEN") or None,
            "client_auth": _client_auth(settings.client_auth, env),
            "user_hash_key": env.get("ABPROXY_USER_HASH_KEY", ""),
            "signing_key": env.get("ABPROXY_SIGNING_KEY", ""),
            "controller": settings.controller.model_copy(
                # Stripped: a URL read from a secret file often ends in a newline.
                update={"webhook_url": (env.get("ABPROXY_WEBHOOK_URL") or settings.controller.webhook_url or "").strip()
                        or None}
            ),
            "store": settings.store.model_copy(update={"url": env.get("ABPROXY_STORE_URL", settings.store.url)}),
        }
    )


def _client_auth(config: ClientAuthConfig, env: Mapping[str, str]) -> ClientAuthConfig:
    extra = [value.strip() for value in env.get("ABPROXY_CLIENT_KEY_SHA256", "").split(",") if value.strip()]
    if not extra:
        return config
    try:
        return ClientAuthConfig(key_sha256=[*config.key_sha256, *extra])
    except ValidationError:
        problem = "every entry must be a 64-character hex SHA-256"
        raise ConfigError(f"config error: ABPROXY_CLIENT_KEY_SHA256: {problem}") from None


def config_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    path = explicit or env.get("ABPROXY_CONFIG")
    if not path:
        raise ConfigError("config error: no config file: pass --config FILE or set ABPROXY_CONFIG")
    return path
