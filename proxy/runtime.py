"""Runtime: the long-lived services one proxy process shares between its handlers.

Built by `create_app` from Settings (nothing connects at construction), started and stopped
by the app's lifespan. Tests build it with their own registry and event sink.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import BinaryIO

import redis.asyncio as aioredis
import sqlalchemy as sa
import structlog

from proxy.admin_auth import AdminAuth
from proxy.background import cancel_and_wait
from proxy.config import Settings
from proxy.events import EventLog, RedisStreamSink, Sink, StdoutSink
from proxy.experiments import Router
from proxy.feedback import FeedbackIntake
from proxy.ids import RequestIds, UserHasher
from proxy.metrics import Metrics, NullMetrics, mark_process_dead, watch_tasks_of
from proxy.pair_sampling import PairSampler
from proxy.recorder import Recorder
from proxy.rollout import RolloutCache, RolloutState, RolloutStore
from proxy.upstream import UpstreamPool

log = structlog.get_logger("abproxy")

# How often the rollout-cache gauges (connected, age) are refreshed: a scrape sees them at most
# this stale, and the staleness alert fires at tens of seconds.
CACHE_GAUGE_INTERVAL_S = 1.0


class Runtime:
    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, event_sink: BinaryIO | None = None):
        self.settings = settings
        self.router = Router(settings)
        if metrics is None:
            # server.prometheus_enabled false: a stand-in whose every update returns at once.
            metrics = Metrics(process_collector=True) if settings.server.prometheus_enabled else NullMetrics()
        self.metrics = metrics
        # A blocking pool: redis-py's default pool refuses outright ("Too many connections") past
        # 100 commands in flight, which turned a burst of feedback posts into instant 503s.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.rollout.redis_max_connections,
            timeout=settings.rollout.redis_timeout_s,
            decode_responses=True,
            socket_timeout=settings.rollout.redis_timeout_s,
            socket_connect_timeout=settings.rollout.redis_timeout_s,
        )
        self.redis = aioredis.Redis.from_pool(pool)  # closed with the client
        defaults = self.router.defaults()
        self.store = RolloutStore(self.redis, defaults)
        self.rollout = RolloutCache(
            self.store, defaults, resync_interval_s=settings.rollout.resync_interval_s, on_change=self._on_change
        )
        self.upstreams = UpstreamPool(settings.upstreams)
        self.request_ids = RequestIds(settings.signing_key)
        self.hash_user = UserHasher(settings.user_hash_key)
        self.feedback = FeedbackIntake(settings, self.redis, self.request_ids, self.hash_user)
        self.events = EventLog(
            self._event_sinks(event_sink), self.metrics, flush_interval_s=settings.events.flush_interval_s
        )
        self.pairs = PairSampler(self.upstreams, self.events, self.metrics)
        # Each request's metrics and event, done after it in batches (proxy/recorder.py).
        self.recorder = Recorder()
        self.metrics.before_scrape(self.recorder.run_from_any_thread)
        self.admin_auth = AdminAuth(settings.admin_token, settings.admin_read_token,
                                    per_minute=settings.admin.rate_limit_per_minute)  # fmt: skip
        self._gauges: asyncio.Task[None] | None = None
        self._store_engine: sa.Engine | None = None
        self._store_lock = threading.Lock()  # store_engine() is first called from worker threads

    def store_engine(self) -> sa.Engine:
        """The analysis store, opened on first use: only the admin report reads it, never a request."""
        with self._store_lock:
            if self._store_engine is None:
                from proxy.store.db import engine_for

                self._store_engine = engine_for(self.settings.store.url)
            return self._store_engine

    def _event_sinks(self, stdout: BinaryIO | None) -> list[tuple[Sink, int]]:
        config = self.settings.events
        sinks: list[tuple[Sink, int]] = []
        if config.enabled:
            sinks.append((StdoutSink(stdout), config.max_buffered))
        stream = config.redis_stream
        if stream.enabled:
            sink = RedisStreamSink(
                self.settings.redis_url,
                key=stream.key, maxlen=stream.maxlen, batch_size=stream.batch_size, timeout_s=stream.timeout_s,
            )
            sinks.append((sink, stream.max_buffered))
        return sinks

    def _on_change(self, state: RolloutState) -> None:
        self.metrics.set_rollout(state.experiment, state.percent, state.updated_at)

    def _refresh_cache_gauges(self) -> None:
        synced = self.rollout.last_sync_monotonic
        age = None if synced is None else time.monotonic() - synced
        self.metrics.set_rollout_cache(self.rollout.connected, age)

    async def _keep_cache_gauges(self) -> None:
        while True:
            self._refresh_cache_gauges()
            await asyncio.sleep(CACHE_GAUGE_INTERVAL_S)

    async def start(self) -> None:
        watch_tasks_of(asyncio.get_running_loop())
        await self.upstreams.start()
        await self.events.start()
        await self.rollout.start()
        self._gauges = asyncio.create_task(self._keep_cache_gauges(), name="rollout-cache-gauges")
        log.info(
            "proxy_started",
            experiments=sorted(self.router.experiments),
            rollout_loaded=self.rollout.loaded,
            percents={name: s.percent for name, s in self.rollout.states.items()},
            event_sinks=self.events.sink_names,
        )
        unset = [name for name, value in (("ABPROXY_USER_HASH_KEY", self.settings.user_hash_key),
                                          ("ABPROXY_SIGNING_KEY", self.settings.signing_key)) if not value]
        if unset:
            log.warning(
                "secrets_unset", unset=unset,
                consequence="user hashes can be reversed by guessing ids; request ids are checksummed, not signed",
            )

    async def stop(self) -> None:
        self.recorder.run()  # before the sinks' last flush: the events it still holds
        await cancel_and_wait(self._gauges)
        self._gauges = None
        await self.rollout.stop()
        await self.pairs.stop()
        await self.upstreams.stop()
        await self.events.stop()
        await self.redis.aclose()
        if self._store_engine is not None:
            self._store_engine.dispose()
        mark_process_dead(os.getpid())
