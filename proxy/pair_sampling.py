"""Pairs from production: for a small share of answered requests, ask the other variant too.

    experiments.NAME.pair_sampling: {share: 0.01, max_in_flight: 4}      (off: share 0, the default)

The proxy decides before forwarding (so it keeps that one answer's text), answers the user as
always, and only then, in a background task, sends the same request to the other arm's model.
The two answers become a `pair` event on the stream, which the collector stores as a
comparison for blind human review (proxy/humaneval). Nothing here runs before the user has
their answer; at most `max_in_flight` extra calls run at once per process, and a sample that
would exceed it is skipped and counted rather than queued.

The extra call's cost goes to `abproxy_pair_sampling_cost_usd_total`, never to the variant's
own `abproxy_cost_usd_total`, so sampling does not make either arm look dearer. Prompts are
kept only for these sampled requests.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from proxy.events import EventLog
from proxy.experiments import Arm, Experiment
from proxy.metrics import Metrics
from proxy.sse import first_text
from proxy.upstream import UpstreamPool

log = structlog.get_logger("abproxy")


class PairSampler:
    def __init__(self, upstreams: UpstreamPool, events: EventLog, metrics: Metrics) -> None:
        self.upstreams = upstreams
        self.events = events
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._random = random.Random()

    def wants(self, experiment: Experiment) -> bool:
        """Drawn per request; a float compare when sampling is off."""
        return experiment.pair_share > 0 and self._random.random() < experiment.pair_share

    def submit(
        self, experiment: Experiment, served: Arm, request_id: str, path: str, body: dict[str, Any], answer: str
    ) -> None:
        """Schedule the other variant's answer; called after the user got theirs."""
        if sum(1 for task in self._tasks if not task.done()) >= experiment.pair_max_in_flight:
            self.metrics.pairs.labels(experiment.name, "skipped_busy").inc()
            return
        task = asyncio.create_task(self._ask_other(experiment, served, request_id, path, body, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_other(
        self, experiment: Experiment, served: Arm, request_id: str, path: str, body: dict[str, Any], answer: str
    ) -> None:
        other = experiment.arm("control" if served.variant == "treatment" else "treatment")
        request = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        request["model"] = other.upstream_model
        try:
            status, _headers, payload = await self.upstreams.fetch(other.upstream, path, orjson.dumps(request), {})
            reply = orjson.loads(payload) if status == 200 else None
        except Exception as exc:  # an extra call's failure must never surface anywhere but here
            log.warning("pair_sampling_failed", experiment=experiment.name, error=type(exc).__name__)
            self.metrics.pairs.labels(experiment.name, "failed").inc()
            return
        text = first_text(reply) if isinstance(reply, dict) else None
        if not text:
            self.metrics.pairs.labels(experiment.name, "failed").inc()
            return
        cost = other.pricing.cost_usd(*_tokens(reply))
        self.metrics.pair_cost.labels(experiment.name, other.model_key).inc(cost)
        self.metrics.pairs.labels(experiment.name, "stored").inc()
        now = time.time()
        self.events.emit(
            {
                "kind": "pair",
                "ts": now,
                "time": datetime.fromtimestamp(now, UTC),
                "request_id": request_id,
                "experiment": experiment.name,
                "prompt": body.get("messages", body.get("prompt")),
                "responses": {served.model_key: answer, other.model_key: text},
                "cost_usd": cost,
            }
        )

    async def stop(self) -> None:
        """Shutting down: extra calls are not worth waiting for."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _tokens(reply: Any) -> tuple[int, int]:
    usage = reply.get("usage") if isinstance(reply, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else 0), (completion if isinstance(completion, int) else 0)
