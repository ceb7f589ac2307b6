"""Prometheus collectors on an injected registry, with label children cached per label set.

Looking up `metric.labels(...)` costs a lock and a dict build per call; the hot path instead
finds one cached tuple of children per (experiment, variant, model, endpoint, stream, code).
Label values are all bounded by config (never a user id).

Several workers on one host: prometheus-client's multiprocess mode. `abproxy serve --workers N`
points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start; each worker then
writes its values to mmap files there, and any worker's `/metrics` (or the separate metrics
port) sums them. Gauges say how to combine workers (`multiprocess_mode`); the `live*` modes drop
a worker's gauges when it shuts down (`mark_process_dead`).
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.metrics_core import Metric

# LLM calls range from tens of ms (embeddings, cached) to minutes (long generations).
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
# A young collection takes a few milliseconds (~3-6 ms with thousands of streams open); a full
# one over a large heap tens to hundreds (every open stream waits it out).
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)

ARM = ("experiment", "variant", "model")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, if on. prometheus-client itself reads this variable
    when it is imported, so it is read here too rather than carried in Settings."""
    return os.environ.get(MULTIPROC_ENV) or None


@dataclass(slots=True)
class _Children:
    requests: Counter
    duration: Histogram
    ttft: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    cost: Counter


class _BeforeScrape:
    """A collector that yields nothing and calls its hooks: what must happen before a scrape reads."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def describe(self) -> list[Metric]:
        return []  # no names: registering it never collects, so the hooks run at scrapes only

    def collect(self) -> list[Metric]:
        for hook in self.hooks:
            hook()
        return []


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process_collector: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # First in the registry, which collects in registration order: its hooks run before any value is read.
        self._before_scrape = _BeforeScrape()
        r.register(self._before_scrape)
        if process_collector and multiprocess_dir() is None:
            # RSS, CPU and open fds; not available per worker in multiprocess mode.
            ProcessCollector(registry=r)
            # Leak detection: an idle process's task count returns to its resting level (the stress test
            # checks it). all_tasks() tolerates being read from the scrape thread (it retries a changed set).
            tasks = Gauge("abproxy_asyncio_tasks", "asyncio tasks alive in this process.", registry=r)
            tasks.set_function(_task_count)
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
        self.in_flight = Gauge(
            "abproxy_in_flight_requests", "Requests routed and not yet answered in full.",
            [*ARM, "endpoint"], registry=r, multiprocess_mode="livesum",
        )
        self.unidentified = Counter(
            "abproxy_unidentified_requests", "Requests with no user id, sent to control.", ARM, registry=r
        )
        self.rejected = Counter(
            "abproxy_rejected_requests",
            "Requests refused before routing (bad body, unknown model).",
            ["code"],
            registry=r,
        )
        self.feedback = Counter(
            "abproxy_feedback",
            "Feedback accepted by POST /v1/feedback (refused feedback counts as rejected requests).",
            ["metric"],
            registry=r,
        )
        self.pairs = Counter(
            "abproxy_pair_samples", "Sampled requests also sent to the other variant, by outcome.",
            ["experiment", "outcome"], registry=r,
        )
        self.pair_cost = Counter(
            "abproxy_pair_sampling_cost_usd",
            "Cost of the extra calls pair sampling makes (kept apart from abproxy_cost_usd_total).",
            ["experiment", "model"], registry=r,
        )
        # Every worker follows the same pub/sub channel: the most recent write is the live value.
        self.rollout_percent = Gauge(
            "abproxy_rollout_percent", "Live percent of users in treatment.", ["experiment"],
            registry=r, multiprocess_mode="livemostrecent",
        )
        self.rollout_changed = Gauge(
            "abproxy_rollout_last_change_timestamp_seconds",
            "Unix time of the last rollout change this process has seen (0: never set in Redis).",
            ["experiment"], registry=r, multiprocess_mode="livemax",
        )
        # The worst worker is the one to page on: min for connectivity, max for staleness.
        self.redis_connected = Gauge(
            "abproxy_redis_connected", "1 while the rollout cache follows Redis, 0 while it serves from memory.",
            registry=r, multiprocess_mode="livemin",
        )
        self.rollout_cache_age = Gauge(
            "abproxy_rollout_cache_age_seconds",
            "Seconds since the rollout cache last read Redis (pub/sub or resync); -1 before the first read.",
            registry=r, multiprocess_mode="livemax",
        )
        self.overloaded = Counter(
            "abproxy_overloaded_requests",
            "Requests answered at once with 503 (limit=total: server.max_in_flight) or 429 (limit=<upstream>: "
            "upstreams.X.max_in_flight) instead of being queued.",
            ["limit"], registry=r,
        )
        self.retries = Counter(
            "abproxy_upstream_retries", "Extra upstream attempts (upstreams.X.retries), by the failure retried.",
            ["upstream", "reason"], registry=r,
        )
        self.fallbacks = Counter(
            "abproxy_fallbacks",
            "Treatment requests answered by the control after the treatment's upstream failed "
            "(experiments.X.fallback_to_control), by the treatment's failure.",
            ["experiment", "reason"], registry=r,
        )
        self.events = Counter("abproxy_events", "Per-request events written, by sink.", ["sink"], registry=r)
        self.events_dropped = Counter(
            "abproxy_events_dropped", "Per-request events lost, by sink and reason (buffer_full, sink_error).",
            ["sink", "reason"], registry=r,
        )
        self.gc_pause = Histogram(
            "abproxy_gc_pause_seconds",
            "Pauses of CPython's cyclic garbage collector in this process, by generation (0 young, 2 full): "
            "every request and stream of the process waits them out.",
            ["generation"], buckets=GC_PAUSE_BUCKETS, registry=r,
        )
        self._children: dict[tuple[str, str, str, str, bool, int], _Children] = {}
        self._in_flight: dict[tuple[str, str, str, str], Gauge] = {}

    def watch_gc(self) -> Callable[[], None]:
        """Time every collection of this process into abproxy_gc_pause_seconds; returns the undo.

        gc.callbacks run only when a collection does, so this costs nothing per request."""
        pauses = [self.gc_pause.labels(str(generation)) for generation in range(3)]
        started = [0.0]

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                pauses[info["generation"]].observe(time.perf_counter() - started[0])

        gc.callbacks.append(on_gc)
        return lambda: gc.callbacks.remove(on_gc)

    def before_scrape(self, fn: Callable[[], None]) -> None:
        """Call `fn` at the start of every scrape of this registry (the recorder's pending batch),
        from whichever thread scrapes."""
        self._before_scrape.hooks.append(fn)

    def in_flight_gauge(self, experiment: str, variant: str, model: str, endpoint: str) -> Gauge:
        key = (experiment, variant, model, endpoint)
        gauge = self._in_flight.get(key)
        if gauge is None:
            gauge = self._in_flight[key] = self.in_flight.labels(*key)
        return gauge

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

    def set_rollout(self, experiment: str, percent: float, changed_at: float | None) -> None:
        self.rollout_percent.labels(experiment).set(percent)
        self.rollout_changed.labels(experiment).set(changed_at or 0.0)

    def set_rollout_cache(self, connected: bool | None, age_s: float | None) -> None:
        self.redis_connected.set(1 if connected else 0)
        self.rollout_cache_age.set(-1 if age_s is None else age_s)


class _Off:
    """What every collector and label child is when Prometheus is off: each update returns at once."""

    __slots__ = ()

    def labels(self, *_values: str, **_labels: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_OFF = _Off()


class NullMetrics(Metrics):
    """`server.prometheus_enabled: false`: Metrics' interface with nothing behind it.

    Every collector is one shared no-op object, the per-request methods return at once, and
    nothing is created: no registry entry, no multiprocess file (/metrics answers 404 anyway).
    Collectors are found by name on first use (`__getattr__`, then a plain attribute), so one
    added to `Metrics` later is covered here without a change."""

    def __init__(self) -> None:  # Metrics.__init__ is not called: it would create the collectors
        self.registry = CollectorRegistry()
        self._children = {}
        self._in_flight = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        setattr(self, name, _OFF)  # looked up once: from then on an ordinary instance attribute
        return _OFF

    def in_flight_gauge(self, experiment: str, variant: str, model: str, endpoint: str) -> Gauge:
        return cast(Gauge, _OFF)

    def before_scrape(self, fn: Callable[[], None]) -> None:
        pass  # nothing is scraped

    def watch_gc(self) -> Callable[[], None]:
        return lambda: None

    def observe(
        self,
        experiment: str, variant: str, model: str, endpoint: str, stream: bool, code: int,
        duration_s: float, ttft_s: float | None, prompt_tokens: int, completion_tokens: int, cost_usd: float,
    ) -> None:
        pass

    def upstream_error(self, experiment: str, variant: str, model: str, reason: str) -> None:
        pass

    def set_rollout(self, experiment: str, percent: float, changed_at: float | None) -> None:
        pass

    def set_rollout_cache(self, connected: bool | None, age_s: float | None) -> None:
        pass


def _task_count() -> float:
    loop = _serving_loop
    return float(len(asyncio.all_tasks(loop))) if loop is not None and not loop.is_closed() else 0.0


_serving_loop: asyncio.AbstractEventLoop | None = None


def watch_tasks_of(loop: asyncio.AbstractEventLoop) -> None:
    """The event loop whose tasks abproxy_asyncio_tasks counts (the serving loop, set at start-up)."""
    global _serving_loop
    _serving_loop = loop


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text a scrape gets: this process's registry, or every worker's files in multiprocess mode."""
    path = multiprocess_dir()
    if path is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a stopped worker's live gauges (in-flight, connectivity) from the aggregate."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def prepare_multiprocess_dir() -> str:
    """Before the workers start: a fresh directory, or the configured one wiped.

    Files left by an earlier run would be summed into this run's counters.
    """
    path = multiprocess_dir()
    if path is None:
        path = tempfile.mkdtemp(prefix="abproxy-metrics-")
        os.environ[MULTIPROC_ENV] = path
        # Ours to remove: the supervisor exits after its workers, so nothing still writes there.
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        for stale in Path(path).glob("*.db"):
            stale.unlink()
    return path


def serve_metrics_port(host: str, port: int, registry: CollectorRegistry | None) -> None:
    """/metrics on its own port, from a daemon thread of the serving (or supervising) process.

    `registry=None`: multiprocess mode, the supervisor aggregates the workers' files.
    """
    if registry is None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)
