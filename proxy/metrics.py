"""Prometheus collectors on an injected registry, with label children cached per label set.

Looking up `metric.labels(...)` costs a lock and a dict build per call; the hot path instead
finds one cached tuple of children per (experiment, variant, model, endpoint, stream, code).
Label values are all bounded by config (never a user id).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM calls range from tens of ms (embeddings, cached) to minutes (long generations).
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)

ARM = ("experiment", "variant", "model")


@dataclass(slots=True)
class _Children:
    requests: Counter
    duration: Histogram
    ttft: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    cost: Counter


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "abproxy_requests", "Requests answered, by upstream or proxy status code.",
            [*ARM, "endpoint", "stream", "code"], registry=r,
        )
        self.duration = Histogram(
            "abproxy_request_duration_seconds", "Time from request received to last byte sent.",
            [*ARM, "endpoint", "stream"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "abproxy_time_to_first_token_seconds",
            "Streams: time from request received to first upstream chunk.",
            [*ARM, "endpoint"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.tokens = Counter("abproxy_tokens", "Tokens reported by the upstream's usage.", [*ARM, "kind"], registry=r)
        self.cost = Counter("abproxy_cost_usd", "Cost in USD from the model's configured pricing.", ARM, registry=r)
        self.upstream_errors = Counter(
            "abproxy_upstream_errors", "Upstream failures by reason (timeout, connect, 4xx, 5xx, cancelled).",
            [*ARM, "reason"], registry=r,
        )
        self.unidentified = Counter(
            "abproxy_unidentified_requests", "Requests with no user id, sent to control.", ["experiment"], registry=r
        )
        self.rejected = Counter(
            "abproxy_rejected_requests",
            "Requests refused before routing (bad body, unknown model).",
            ["code"],
            registry=r,
        )
        self.rollout_percent = Gauge(
            "abproxy_rollout_percent", "Live percent of users in treatment.", ["experiment"], registry=r
        )
        self._children: dict[tuple[str, str, str, str, bool, int], _Children] = {}

    def _for(self, experiment: str, variant: str, model: str, endpoint: str, stream: bool, code: int) -> _Children:
        key = (experiment, variant, model, endpoint, stream, code)
        children = self._children.get(key)
        if children is None:
            arm = (experiment, variant, model)
            s = "true" if stream else "false"
            children = _Children(
                self.requests.labels(*arm, endpoint, s, str(code)),
                self.duration.labels(*arm, endpoint, s),
                self.ttft.labels(*arm, endpoint),
                self.tokens.labels(*arm, "prompt"),
                self.tokens.labels(*arm, "completion"),
                self.cost.labels(*arm),
            )
            self._children[key] = children
        return children

    def observe(
        self,
        experiment: str, variant: str, model: str, endpoint: str, stream: bool, code: int,
        duration_s: float, ttft_s: float | None, prompt_tokens: int, completion_tokens: int, cost_usd: float,
    ) -> None:
        c = self._for(experiment, variant, model, endpoint, stream, code)
        c.requests.inc()
        c.duration.observe(duration_s)
        if ttft_s is not None:
            c.ttft.observe(ttft_s)
        if prompt_tokens:
            c.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            c.completion_tokens.inc(completion_tokens)
        if cost_usd:
            c.cost.inc(cost_usd)

    def upstream_error(self, experiment: str, variant: str, model: str, reason: str) -> None:
        self.upstream_errors.labels(experiment, variant, model, reason).inc()

    def set_rollout(self, experiment: str, percent: float) -> None:
        self.rollout_percent.labels(experiment).set(percent)
