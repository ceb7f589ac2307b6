"""server.prometheus_enabled: false: no Prometheus at all, everything else as before.

/metrics answers an OpenAI-shaped 404, requests (plain, streamed, refused) are served and routed
by the live percent, and every answered request still writes its event. With two workers the
multiprocess directory stays empty: nothing on the request path touched a metric.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase

from proxy.metrics import Metrics, NullMetrics
from tests.harness import MockUpstream, ProxyServer, eventually, proxy_config

CHAT = "/v1/chat/completions"
CLOSE = {"Connection": "close"}  # a new connection per call, so the kernel spreads calls over workers


def _chat(user: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sales-companion", "messages": [{"role": "user", "content": "hi"}], "user": user, **extra}


def test_null_metrics_stands_in_for_every_collector() -> None:
    """Every collector of Metrics exists on NullMetrics and takes every update; nothing is registered."""
    real = Metrics()
    off = NullMetrics()
    collectors = [name for name, value in vars(real).items() if isinstance(value, MetricWrapperBase)]
    assert len(collectors) > 10
    for name in collectors:
        stand_in = getattr(off, name)
        stand_in.labels("a", "b").inc()
        stand_in.inc(2)
        stand_in.dec()
        stand_in.set(1)
        stand_in.observe(0.5)
    off.in_flight_gauge("exp", "control", "m", "chat").inc()
    off.observe("exp", "control", "m", "chat", False, 200, 0.1, None, 10, 20, 0.01)
    off.upstream_error("exp", "control", "m", "timeout")
    off.set_rollout("exp", 50, None)
    off.set_rollout_cache(True, 0.5)
    assert list(off.registry.collect()) == []
    with pytest.raises(AttributeError):
        off.__wrapped__  # noqa: B018 (dunder names are not stood in for)


@pytest.fixture()
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_off(
    http: httpx.Client,
    upstreams: tuple[MockUpstream, MockUpstream],
    redis_url: str,
    tmp_path: Path,
    workers: int,
) -> None:
    """Metrics off: /metrics is a 404, requests are served by both arms and events are still written."""
    config = proxy_config(*upstreams, server={"prometheus_enabled": False})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    key = f"metrics-off-{workers}"
    server = ProxyServer(config, tmp_path, redis_url, workers=workers, extra_env={"TMPDIR": str(scratch)})
    try:
        server.start()
        server.set_percent(50)

        response = http.get(f"{server.url}/metrics", headers=CLOSE)
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "unknown_url"
        assert "prometheus_enabled" in error["message"]

        variants: dict[str, int] = {}
        sent = 40
        for i in range(sent):
            answer = http.post(f"{server.url}{CHAT}", json=_chat(f"{key}-{i}"), headers=CLOSE)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["total_tokens"] > 0
            variant = answer.headers["x-abproxy-variant"]
            variants[variant] = variants.get(variant, 0) + 1
        assert set(variants) == {"control", "treatment"}, variants
        with http.stream("POST", f"{server.url}{CHAT}", json=_chat(f"{key}-stream", stream=True)) as stream:
            assert stream.status_code == 200
            assert b"data: [DONE]" in b"".join(stream.iter_bytes())
        refused = http.post(f"{server.url}{CHAT}", json={"model": "no-such-model", "messages": []}, headers=CLOSE)
        assert refused.status_code == 404

        server.set_percent(100)  # a rollout change is followed with no gauge to set
        eventually(lambda: _assert_variant(http, server, f"{key}-0", "treatment"))

        def all_events_written() -> None:
            events = [e for e in server.events() if str(e.get("experiment")) == "sales-companion"]
            answered = [e for e in events if e.get("status") == 200]
            assert len(answered) >= sent + 1, len(answered)

        eventually(all_events_written)
        if workers == 2:
            (directory,) = scratch.glob("abproxy-metrics-*")
            assert not list(directory.glob("*.db")), "a worker wrote metrics with prometheus_enabled false"
    finally:
        server.stop()
    errors = server.stderr_path.read_text(errors="replace")
    assert "Traceback" not in errors and '"level": "error"' not in errors, errors[-3000:]


def _assert_variant(http: httpx.Client, server: ProxyServer, user: str, variant: str) -> None:
    answer = http.post(f"{server.url}{CHAT}", json=_chat(user), headers=CLOSE)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-abproxy-variant"] == variant, json.dumps(dict(answer.headers))
