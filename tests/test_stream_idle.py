"""The stream idle timeout's watch (proxy/stream_idle.py) on real aiohttp streams from a mock upstream process.

The watch is driven by hand (`check(now)` with a chosen loop time) so each test is exact; the upstream's
timeout is long enough that the watch's own task never acts meanwhile. The same timeout end to end (a
stalled stream becomes an error event, a paced one is not cut) is in tests/test_faults_upstream.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.config import UpstreamConfig
from proxy.upstream import UpstreamPool
from tests.harness import MockUpstream

TIMEOUT_S = 60.0  # the watch's task ticks every second and never reaches it: the tests move time by hand
PATH = "/chat/completions"


@pytest.fixture(scope="module")
def mock(session_dir: Path) -> Iterator[MockUpstream]:
    upstream = MockUpstream("idle-watch", session_dir, tokens_per_s=0)
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def paced_mock(session_dir: Path) -> Iterator[MockUpstream]:
    upstream = MockUpstream("idle-watch-paced", session_dir, tokens_per_s=20)  # a token every 50 ms
    upstream.start()
    yield upstream
    upstream.stop()


async def _pool_for(upstream: MockUpstream) -> UpstreamPool:
    upstreams = UpstreamPool({"up": UpstreamConfig(base_url=f"{upstream.url}/v1", stream_idle_timeout_s=TIMEOUT_S)})
    await upstreams.start()
    return upstreams


@pytest.fixture()
async def pool(mock: MockUpstream) -> AsyncIterator[UpstreamPool]:
    upstreams = await _pool_for(mock)
    yield upstreams
    await upstreams.stop()


@pytest.fixture()
async def paced(paced_mock: MockUpstream) -> AsyncIterator[UpstreamPool]:
    upstreams = await _pool_for(paced_mock)
    yield upstreams
    await upstreams.stop()


def _body(**extra: object) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": True,
                         **extra})  # fmt: skip


def _later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_a_silent_stream_is_cut_with_a_timeout_and_its_connection_dropped(pool: UpstreamPool) -> None:
    response = await pool.open_stream("up", PATH, _body(mock_stall_after=1), {})
    assert response.status == 200 and len(pool.idle) == 1
    first = await response.content.readany()  # the one event sent before the stall: all that will come
    assert first.startswith(b"data: ")
    pool.idle.check(_later(0))  # the watch sees those bytes now (they may have come after it took the stream)
    pool.idle.check(_later(TIMEOUT_S / 2))
    assert len(pool.idle) == 1, "cut before its timeout"
    pool.idle.check(_later(TIMEOUT_S + 1))
    assert len(pool.idle) == 0
    with pytest.raises(aiohttp.SocketTimeoutError):
        await asyncio.wait_for(response.content.readany(), 10)
    assert response.connection is not None
    protocol = response.connection.protocol
    assert protocol is not None and protocol.should_close
    pool.release_stream(response)
    await asyncio.sleep(0)
    assert protocol.transport is None, "a half-read connection went back to the pool"


async def test_bytes_keep_a_stream_alive_and_a_finished_one_is_forgotten(paced: UpstreamPool) -> None:
    response = await paced.open_stream("up", PATH, _body(), {})
    paced.idle.check(_later(0))
    looked_at = response.content.total_bytes
    while response.content.total_bytes == looked_at:  # bytes that came after that look
        assert await asyncio.wait_for(response.content.readany(), 10)
    paced.idle.check(_later(TIMEOUT_S + 1))
    assert len(paced.idle) == 1, "a stream that had just sent bytes was cut"
    text = await asyncio.wait_for(response.read(), 30)
    assert text.rstrip().endswith(b"data: [DONE]")
    paced.idle.check(_later(0))
    assert len(paced.idle) == 0, "a stream read to its end is still watched"
    paced.release_stream(response)


async def test_paused_reading_is_not_silence(pool: UpstreamPool) -> None:
    """aiohttp stops reading when its buffer is full (the client is slower than the upstream): the
    upstream is then not silent, it is waited for, as aiohttp's own timer stops then."""
    response = await pool.open_stream("up", PATH, _body(mock_stall_after=1), {})
    assert response.connection is not None and response.connection.transport is not None
    response.connection.transport.pause_reading()
    pool.idle.check(_later(TIMEOUT_S + 1))
    assert len(pool.idle) == 1, "a paused stream was cut"
    response.connection.transport.resume_reading()
    pool.idle.check(_later(TIMEOUT_S + 2))  # the silence counts from the last look while paused
    assert len(pool.idle) == 1
    pool.idle.check(_later(2 * TIMEOUT_S + 3))
    assert len(pool.idle) == 0
    pool.release_stream(response)


async def test_released_streams_are_forgotten(pool: UpstreamPool) -> None:
    kept = await pool.open_stream("up", PATH, _body(mock_stall_after=1), {})
    left = await pool.open_stream("up", PATH, _body(mock_stall_after=1), {})
    assert len(pool.idle) == 2
    pool.release_stream(kept)
    left.close()  # closed without release_stream: the next look drops it
    assert len(pool.idle) == 1
    pool.idle.check(_later(0))
    assert len(pool.idle) == 0
