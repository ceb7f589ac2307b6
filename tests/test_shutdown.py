"""Graceful shutdown of a real proxy process: SIGTERM stops accepting at once, lets open streams
finish up to server.shutdown_timeout_s, ends the ones still open with a well-formed error event,
and flushes every request's event to the Redis Stream before the process exits."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.harness import MockUpstream, ProxyServer, RedisServer, proxy_config, wait_until

DEADLINE_S = 5
TOKENS = 24  # the mock's reply to a 16-character prompt: 8 + 16 % 17 tokens, 2.4 s at 10 tokens/s


@pytest.fixture()
def slow(session_dir: Path) -> Iterator[MockUpstream]:
    mock = MockUpstream("slow-stream", session_dir, tokens_per_s=10)
    mock.start()
    yield mock
    mock.stop()


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_drains_streams_ends_the_rest_cleanly_and_flushes_events(
    slow: MockUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    config = proxy_config(slow, slow, server={"shutdown_timeout_s": DEADLINE_S},
                          events={"redis_stream": {"enabled": True}})  # fmt: skip
    for upstream in config["upstreams"].values():
        upstream.pop("api_key_env")
        upstream["timeout_s"] = 60  # the stalled stream must outlast the shutdown deadline, not time out
    proxy = ProxyServer(config, tmp_path, redis_server.url)
    proxy.start()
    first_chunk = {"finishing": threading.Event(), "stalled": threading.Event()}
    results: dict[str, dict[str, Any]] = {}

    def stream(name: str, **extra: Any) -> None:
        body = {"model": "sales-companion", "stream": True, "user": name,
                "messages": [{"role": "user", "content": "x" * 16}], **extra}  # fmt: skip
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
            text = ""
            for piece in response.iter_text():
                text += piece
                first_chunk[name].set()
            results[name] = {"text": text, "request_id": response.headers["x-request-id"]}

    threads = [threading.Thread(target=stream, args=("finishing",)),
               threading.Thread(target=stream, args=("stalled",), kwargs={"mock_stall_after": 3})]  # fmt: skip
    for t in threads:
        t.start()
    assert all(event.wait(10) for event in first_chunk.values())
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: _refused(proxy.port), timeout=5, what="the listener to close")
    # New connections are refused while the first stream is still being served.
    assert "finishing" not in results
    # uvicorn re-raises the SIGTERM it handled once it is done, so the exit status says how it was stopped.
    assert proxy.proc.wait(DEADLINE_S + 15) == -signal.SIGTERM
    for t in threads:
        t.join(10)

    finished = results["finishing"]["text"]
    assert finished.endswith("data: [DONE]\n\n")
    tokens = [json.loads(line[6:]) for line in finished.split("\n") if line.startswith("data: {")]
    assert sum(1 for c in tokens if c["choices"] and c["choices"][0]["delta"].get("content")) == TOKENS
    cut = results["stalled"]["text"]
    last = json.loads(cut.rstrip("\n").split("\n")[-1].removeprefix("data: "))
    assert last["error"]["code"] == "shutting_down" and cut.endswith("\n\n")

    events = {json.loads(fields[b"event"])["request_id"]: json.loads(fields[b"event"])
              for _, fields in client.xrange("abproxy:events")}  # fmt: skip
    done, cancelled = events[results["finishing"]["request_id"]], events[results["stalled"]["request_id"]]
    assert (done["status"], done["error"], done["completion_tokens"]) == (200, None, TOKENS)
    assert (cancelled["status"], cancelled["error"]) == (499, "cancelled")
    client.close()
