"""Pair sampling from production against a real proxy and two real mock upstreams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from proxy.store.db import engine_for
from proxy.store.schema import comparisons
from tests.harness import MockUpstream, ProxyServer, outcomes_config, wait_until

EXPERIMENT = "sales-companion"


def _proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path, **sampling: Any
) -> ProxyServer:
    config = outcomes_config(*upstreams)
    config["experiments"][EXPERIMENT]["pair_sampling"] = sampling
    server = ProxyServer(config, tmp_path, redis_url)
    server.start()
    return server


def _samples(server: ProxyServer, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(server.metrics_text())
        for s in family.samples
        if s.name == name
    }


def _pairs(server: ProxyServer) -> list[dict[str, Any]]:
    return [e for e in server.events() if e.get("kind") == "pair"]


class TestPairSampling:
    def test_every_sampled_answer_gets_the_other_variants(
        self, upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path
    ) -> None:
        server = _proxy(upstreams, redis_url, tmp_path, share=1.0)
        try:
            server.set_percent(50)
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk", max_retries=0)
            answers: dict[str, tuple[str, str]] = {}
            for i in range(6):
                messages: Any = [{"role": "user", "content": f"pitch {i}"}]
                raw = client.chat.completions.with_raw_response.create(model=EXPERIMENT, messages=messages,
                                                                       user=f"u{i}")
                answers[raw.headers["x-request-id"]] = (raw.headers["x-abproxy-variant"],
                                                        raw.parse().choices[0].message.content or "")
            with client.chat.completions.create(model=EXPERIMENT, messages=[{"role": "user", "content": "s"}],
                                                user="streamer", stream=True) as chunks:
                streamed_id = chunks.response.headers["x-request-id"]
                streamed_variant = chunks.response.headers["x-abproxy-variant"]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            answers[streamed_id] = (streamed_variant, text)

            wait_until(lambda: len(_pairs(server)) == len(answers), what="a pair event per request")
            for pair in _pairs(server):
                variant, answer = answers[pair["request_id"]]
                served, other = ("base", "finetuned") if variant == "control" else ("finetuned", "base")
                assert pair["experiment"] == EXPERIMENT and set(pair["responses"]) == {"base", "finetuned"}
                assert pair["responses"][served] == answer  # the user's own answer, as they got it
                assert pair["responses"][other] and pair["prompt"][0]["role"] == "user"
                assert pair["cost_usd"] > 0

            # The extra calls' cost is counted apart, never in the variants' own cost.
            extra = sum(_samples(server, "abproxy_pair_sampling_cost_usd_total").values())
            assert extra == pytest.approx(sum(p["cost_usd"] for p in _pairs(server)))
            own = sum(_samples(server, "abproxy_cost_usd_total").values())
            requests = [e for e in server.events() if e.get("request_id") in answers and "kind" not in e]
            assert own == pytest.approx(sum(e["cost_usd"] for e in requests))
            stored = _samples(server, "abproxy_pair_samples_total")
            assert stored[frozenset({("experiment", EXPERIMENT), ("outcome", "stored")})] == len(answers)
            # Prompts stay out of the request events: only the sampled pair carries one.
            assert not any("prompt" in e for e in requests)

            # The collector turns the pairs into comparisons for blind review.
            store = f"sqlite:///{tmp_path / 'store.db'}"
            config_file = str(tmp_path / f"proxy-{server.port}.yaml")
            done = subprocess.run([sys.executable, "-m", "proxy", "collect", "--once", "--config", config_file,
                                   "--store", store], env={**os.environ, "REDIS_URL": redis_url},
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            engine = engine_for(store)
            with engine.connect() as conn:
                rows = conn.execute(sa.select(comparisons.c.source, comparisons.c.request_id,
                                              comparisons.c.responses)).all()
            engine.dispose()
            assert {r.request_id for r in rows} == set(answers)
            assert {r.source for r in rows} == {f"production:{EXPERIMENT}"}
            assert all(set(json.loads(r.responses)) == {"base", "finetuned"} for r in rows)
        finally:
            server.set_percent(0)
            server.stop()

    def test_off_by_default(self, upstreams: tuple[MockUpstream, MockUpstream], redis_url: str,
                            tmp_path: Path) -> None:
        server = _proxy(upstreams, redis_url, tmp_path)
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk", max_retries=0)
            ids = {client.chat.completions.create(model=EXPERIMENT, messages=[{"role": "user", "content": "x"}],
                                                  user=f"u{i}")._request_id for i in range(5)}
            wait_until(lambda: ids <= {e.get("request_id") for e in server.events()}, what="events")
            assert _pairs(server) == []
        finally:
            server.stop()

    def test_busy_sampler_skips_instead_of_queueing(
        self, upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path
    ) -> None:
        """One extra call at a time, each slow: samples arriving meanwhile are skipped and counted."""
        server = _proxy(upstreams, redis_url, tmp_path, share=1.0, max_in_flight=1)
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk", max_retries=0)

            def ask(i: int) -> None:
                # mock_latency_ms travels with the copied body, so the extra call is slow too: the four
                # answers arrive within milliseconds of each other, while the first extra call takes 1.5 s.
                client.chat.completions.create(model=EXPERIMENT, messages=[{"role": "user", "content": f"{i}"}],
                                               user=f"u{i}", extra_body={"mock_latency_ms": 1500})

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(ask, range(4)))
            outcomes = _samples(server, "abproxy_pair_samples_total")
            skipped = outcomes.get(frozenset({("experiment", EXPERIMENT), ("outcome", "skipped_busy")}), 0)
            assert skipped >= 1
            stored = outcomes.get(frozenset({("experiment", EXPERIMENT), ("outcome", "stored")}), 0)
            assert stored + skipped <= 4
        finally:
            server.stop()
