"""Fallbacks from treatment to control, counted on every request and logged without flooding.

A fallback changes what a treatment user saw, so each one must be visible: the counter
`abproxy_fallbacks_total{experiment,reason}`, the request's event (`fallback: true`), and a log
line. During an outage of the treatment's upstream every treatment request falls back; one log
line each would be thousands of synchronous writes on the request path, so the log says the
first one at once and then one summary line per experiment per `interval_s` with the count.
"""

from __future__ import annotations

import time

import structlog

from proxy.metrics import Metrics

log = structlog.get_logger("abproxy")


class FallbackLog:
    def __init__(self, metrics: Metrics, *, interval_s: float = 10.0) -> None:
        self._metrics = metrics
        self._interval_s = interval_s
        self._next_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def record(self, experiment: str, reason: str, request_id: str) -> None:
        self._metrics.fallbacks.labels(experiment, reason).inc()
        now = time.monotonic()
        unlogged = self._unlogged.get(experiment, 0) + 1
        if now < self._next_log.get(experiment, 0.0):
            self._unlogged[experiment] = unlogged
            return
        self._unlogged[experiment] = 0
        self._next_log[experiment] = now + self._interval_s
        log.warning("treatment_fell_back_to_control", experiment=experiment, reason=reason,
                    request_id=request_id, fallbacks_since_last_line=unlogged)  # fmt: skip
