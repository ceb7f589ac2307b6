"""Start-up without Redis: the proxy serves on the config's percents either way; whether it calls
itself ready before it has read Redis is `rollout.ready_requires_redis` (default: not ready).
The default case, and loading Redis's percent once it appears, are in tests/test_rollout.py
(TestProcessFailStatic::test_not_ready_until_redis_answers)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.harness import MockUpstream, ProxyServer, free_port, proxy_config


def test_ready_at_once_on_config_percents_when_configured(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path
) -> None:
    config = proxy_config(*upstreams)
    config["rollout"]["ready_requires_redis"] = False
    config["experiments"]["sales-companion"]["rollout_percent"] = 100
    proxy = ProxyServer(config, tmp_path, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    proxy.start()  # waits for /readyz 200
    try:
        ready = httpx.get(f"{proxy.url}/readyz").json()
        assert ready == {"status": "ready", "rollout_loaded": False, "redis_connected": False}
        body = {"model": "sales-companion", "user": "u1", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=10)
        assert response.status_code == 200 and response.headers["x-abproxy-variant"] == "treatment"
    finally:
        proxy.stop()
