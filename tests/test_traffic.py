"""`abproxy traffic` (proxy/traffic.py) against a real proxy and a real Redis: with --feedback each
answer is followed by simulated outcomes, drawn from the served variant's truth, that land on the
event stream under the answer's request id; without it, none."""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from statistics import NormalDist
from typing import Any

import pytest
import redis

from proxy.event_stream import decode_entry
from proxy.traffic import TRUTH, SimulatedMetric, TrafficPlan, TrafficStats, run_traffic
from tests.harness import MockUpstream, ProxyServer, RedisServer, outcomes_config, wait_until

STREAM = "abproxy:events"


@pytest.fixture(scope="module")
def outcomes_proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    """A proxy declaring task_completed, csat and escalated, events on the Redis Stream."""
    server = ProxyServer(outcomes_config(*upstreams), tmp_path_factory.mktemp("traffic"), redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def stream(outcomes_proxy: ProxyServer, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The event stream emptied, and the rollout at 50 % (other modules' fixtures flush Redis)."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete(STREAM)
    outcomes_proxy.set_percent(50)
    yield client
    client.close()


def _entries(stream: redis.Redis) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """({request id: request event}, the feedback events) on the stream."""
    entries: Any = stream.xrange(STREAM)  # redis-py types replies loosely; XRANGE's shape is fixed
    events = [decode_entry(eid, fields).event for eid, fields in entries]
    requests = {e["request_id"]: e for e in events if e.get("kind", "request") == "request"}
    return requests, [e for e in events if e.get("kind") == "feedback"]


def _settled(
    stream: redis.Redis, requests: int, feedback: int
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The stream once it holds `requests` request events and `feedback` feedback events (events flush every 100 ms)."""
    wait_until(lambda: [len(x) for x in _entries(stream)] == [requests, feedback], timeout=10, what="stream entries")
    return _entries(stream)


def _summary(line: str) -> tuple[int, dict[str, int], dict[str, int]]:
    """`sent N: ok 3, stream ok 1; feedback accepted 12` -> (N, request outcomes, feedback outcomes)."""
    head, _, rest = line.partition(": ")
    requests, _, feedback = rest.partition("; feedback ")

    def counts(part: str) -> dict[str, int]:
        return {k: int(v) for k, v in (item.rsplit(" ", 1) for item in part.split(", ") if item)}

    return int(head.removeprefix("sent ")), counts(requests), counts(feedback)


def _traffic(proxy: ProxyServer, *options: str) -> tuple[int, dict[str, int], dict[str, int], str]:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "traffic", "--base-url", f"{proxy.url}/v1", "--users", "200", *options],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return *_summary(done.stdout.strip()), done.stderr


def _expected(simulated: SimulatedMetric, variant: str) -> float:
    """The mean of `draw`: the rate itself, or the mean of a normal rounded to whole scores and clipped."""
    mean = simulated.treatment if variant == "treatment" else simulated.control
    if simulated.sd is None:
        return mean
    normal = NormalDist(mean, simulated.sd)
    low, high = int(simulated.low), int(simulated.high)
    edges = [-math.inf, *(k + 0.5 for k in range(low, high)), math.inf]
    return sum(k * (normal.cdf(edges[i + 1]) - normal.cdf(edges[i])) for i, k in enumerate(range(low, high + 1)))


def _plan(proxy: ProxyServer, **options: Any) -> TrafficPlan:
    defaults: dict[str, Any] = {"rps": 40, "users": 100, "stream_share": 0.5, "duration_s": 1.0, "seed": 7}
    return TrafficPlan(base_url=f"{proxy.url}/v1", model="sales-companion", **(defaults | options))


class TestFeedback:
    def test_every_answer_gets_each_outcome(self, outcomes_proxy: ProxyServer, stream: redis.Redis) -> None:
        """`abproxy traffic --feedback` posts task_completed, csat and escalated under each answer's request id."""
        sent, requests, feedback, _ = _traffic(outcomes_proxy, "--rps", "20", "--duration", "3",
                                               "--stream-share", "0.3", "--feedback")  # fmt: skip
        answered = requests.get("ok", 0) + requests.get("stream ok", 0)
        assert answered == sent >= 30 and requests["stream ok"] > 0
        assert feedback == {"accepted": len(TRUTH) * answered}
        served, entries = _settled(stream, answered, len(TRUTH) * answered)
        variants = {request_id: event["variant"] for request_id, event in served.items()}
        # Numbered prompts: no request looks like a regeneration of an earlier one.
        assert len({event["prompt_hash"] for event in served.values()}) == answered
        by_request: dict[str, dict[str, float]] = defaultdict(dict)
        for event in entries:
            assert event["level"] == "request"
            by_request[event["request_id"]][event["metric"]] = event["value"]
        assert set(by_request) == set(variants)
        assert {variants[r] for r in by_request} == {"control", "treatment"}
        for outcomes in by_request.values():
            assert set(outcomes) == set(TRUTH)
            assert outcomes["task_completed"] in (0.0, 1.0) and outcomes["escalated"] in (0.0, 1.0)
            assert outcomes["csat"] in (1.0, 2.0, 3.0, 4.0, 5.0)

    async def test_outcomes_follow_the_served_variant(self, outcomes_proxy: ProxyServer, stream: redis.Redis) -> None:
        """Each outcome is drawn from the truth of the variant the answer's x-abproxy-variant names."""
        truth = {
            "task_completed": SimulatedMetric(0.0, 1.0),  # control never, treatment always
            "csat": SimulatedMetric(2.0, 4.0, sd=0.0),
            "escalated": SimulatedMetric(1.0, 0.0),
        }
        stats = await run_traffic(_plan(outcomes_proxy, feedback=True, truth=truth), lambda _: None)
        answered = stats.by_outcome["ok"] + stats.by_outcome["stream ok"]
        assert answered == stats.sent and stats.feedback == {"accepted": 3 * answered}
        served, entries = _settled(stream, answered, 3 * answered)
        expected = {"control": {"task_completed": 0.0, "csat": 2.0, "escalated": 1.0},
                    "treatment": {"task_completed": 1.0, "csat": 4.0, "escalated": 0.0}}  # fmt: skip
        seen = set()
        for event in entries:
            variant = served[event["request_id"]]["variant"]
            seen.add(variant)
            assert event["value"] == expected[variant][event["metric"]], (variant, event)
        assert seen == {"control", "treatment"}

    def test_none_without_the_option(self, outcomes_proxy: ProxyServer, stream: redis.Redis) -> None:
        """Without --feedback, traffic posts no feedback and its summary has no feedback counts."""
        sent, requests, feedback, _ = _traffic(outcomes_proxy, "--rps", "20", "--duration", "1")
        assert requests.get("ok", 0) + requests.get("stream ok", 0) == sent > 0
        assert feedback == {}
        _, entries = _settled(stream, sent, 0)
        assert entries == []

    async def test_refused_feedback_never_stops_traffic(self, outcomes_proxy: ProxyServer, stream: redis.Redis) -> None:
        """A metric the proxy does not declare is refused (400): counted, reported once, requests and the
        declared metric's feedback go on."""
        truth = {"task_completed": TRUTH["task_completed"], "nps": SimulatedMetric(7.0, 8.0, sd=2.0, low=0, high=10)}
        lines: list[str] = []
        stats = await run_traffic(_plan(outcomes_proxy, feedback=True, truth=truth), lines.append)
        answered = stats.by_outcome["ok"] + stats.by_outcome["stream ok"]
        assert answered == stats.sent > 20
        assert stats.feedback == {"accepted": answered, "http 400": answered}
        (refusal,) = [line for line in lines if line.startswith("feedback")]
        assert "refused (http 400)" in refusal and "unknown metric 'nps'" in refusal
        assert stats.summary().endswith(f"; feedback accepted {answered}, http 400 {answered}")
        _, entries = _settled(stream, answered, answered)
        assert {e["metric"] for e in entries} == {"task_completed"}


class TestSimulatedMetric:
    def test_rates_and_means_match_the_truth(self) -> None:
        """Over many draws, booleans hit their rate and scores the mean of their rounded, clipped normal."""
        rng = random.Random(1)
        for variant in ("control", "treatment"):
            for metric, simulated in TRUTH.items():
                draws = [simulated.draw(variant, rng) for _ in range(20_000)]
                assert statistics.fmean(draws) == pytest.approx(_expected(simulated, variant), abs=0.02), metric
        # Clipping at 5 pulls the treatment's CSAT (4.1) down more than the control's (3.8): the
        # effect a report can find is about 0.27, not 0.3.
        csat = TRUTH["csat"]
        assert _expected(csat, "treatment") - _expected(csat, "control") == pytest.approx(0.27, abs=0.01)

    def test_scores_are_whole_and_in_range(self) -> None:
        """A score is an int within low..high, whatever the spread; a rate is a bool."""
        rng = random.Random(2)
        wide = SimulatedMetric(3.0, 3.0, sd=10.0)
        scores = {wide.draw("control", rng) for _ in range(1000)}
        assert scores == {1, 2, 3, 4, 5}
        assert {type(TRUTH["task_completed"].draw("treatment", rng)) for _ in range(10)} == {bool}


class TestTrafficStats:
    def test_summary_counts_feedback_only_when_posted(self) -> None:
        """The summary names request outcomes, then feedback outcomes if there were any."""
        stats = TrafficStats(sent=3)
        stats.by_outcome.update({"ok": 2, "http 502": 1})
        assert stats.summary() == "sent 3: http 502 1, ok 2"
        stats.feedback.update({"accepted": 5, "http 404": 1})
        assert stats.summary() == "sent 3: http 502 1, ok 2; feedback accepted 5, http 404 1"
