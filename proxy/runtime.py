"""Runtime: the long-lived services one proxy process shares between its handlers.

Built by `create_app` from Settings (nothing connects at construction), started and stopped
by the app's lifespan. Tests build it with their own registry and event sink.
"""

from __future__ import annotations

from typing import BinaryIO

import redis.asyncio as aioredis
import structlog

from proxy.config import Settings
from proxy.events import EventLog
from proxy.experiments import Router
from proxy.metrics import Metrics
from proxy.rollout import RolloutCache, RolloutState, RolloutStore
from proxy.upstream import UpstreamPool

log = structlog.get_logger("abproxy")


class Runtime:
    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, event_sink: BinaryIO | None = None):
        self.settings = settings
        self.router = Router(settings)
        self.metrics = metrics if metrics is not None else Metrics()
        self.redis = aioredis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=settings.rollout.redis_timeout_s,
            socket_connect_timeout=settings.rollout.redis_timeout_s,
        )
        defaults = self.router.defaults()
        self.store = RolloutStore(self.redis, defaults)
        self.rollout = RolloutCache(
            self.store, defaults, resync_interval_s=settings.rollout.resync_interval_s, on_change=self._on_change
        )
        self.upstreams = UpstreamPool(settings.upstreams)
        self.events = EventLog(
            event_sink, flush_interval_s=settings.events.flush_interval_s, max_buffered=settings.events.max_buffered
        )

    def _on_change(self, state: RolloutState) -> None:
        self.metrics.set_rollout(state.experiment, state.percent)

    async def start(self) -> None:
        await self.upstreams.start()
        if self.settings.events.enabled:
            await self.events.start()
        await self.rollout.start()
        log.info(
            "proxy_started",
            experiments=sorted(self.router.experiments),
            rollout_loaded=self.rollout.loaded,
            percents={name: s.percent for name, s in self.rollout.states.items()},
        )

    async def stop(self) -> None:
        await self.rollout.stop()
        await self.upstreams.stop()
        await self.events.stop()
        await self.redis.aclose()
