"""The recorder: what a request leaves to be recorded runs after it, in batches, and a scrape or a
shutdown never reads before the batch has run."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from proxy.metrics import Metrics
from proxy.recorder import Recorder


def test_a_batch_runs_once_after_its_first_item_in_order() -> None:
    done: list[int] = []

    async def scenario() -> None:
        recorder = Recorder(delay_s=0.05)
        for i in range(5):
            recorder.add(done.append, i)
        assert done == [] and recorder.pending == 5  # nothing on the request's own path
        await asyncio.sleep(0.2)
        assert done == [0, 1, 2, 3, 4] and recorder.pending == 0
        recorder.add(done.append, 5)  # a new batch starts its own timer
        await asyncio.sleep(0.2)
        assert done == [0, 1, 2, 3, 4, 5]

    asyncio.run(scenario())


def test_a_full_batch_runs_next_without_waiting_for_its_timer() -> None:
    done: list[int] = []

    async def scenario() -> None:
        recorder = Recorder(delay_s=60, max_batch=3)
        for i in range(3):
            recorder.add(done.append, i)
        assert done == []
        await asyncio.sleep(0)  # one turn of the loop
        assert done == [0, 1, 2] and recorder.pending == 0
        recorder.add(done.append, 3)  # the next batch waits for its own timer
        await asyncio.sleep(0.05)
        assert done == [0, 1, 2]

    asyncio.run(scenario())


def test_a_record_that_fails_is_logged_and_the_rest_of_its_batch_still_runs() -> None:
    done: list[str] = []

    def broken(_: str) -> None:
        raise KeyError("a bug")

    recorder = Recorder()

    async def scenario() -> None:
        recorder.add(done.append, "before")
        recorder.add(broken, "x")
        recorder.add(done.append, "after")

    asyncio.run(scenario())
    with capture_logs() as logs:
        recorder.run()
    assert done == ["before", "after"]
    assert [entry["event"] for entry in logs] == ["record_failed"]
    assert "broken" in logs[0]["recorder"]


def test_a_scrape_from_another_thread_reads_what_the_last_requests_recorded() -> None:
    """The batch waits a minute here; the scrape, from prometheus-client's thread as in production,
    still counts every request: the registry's hook runs the batch on the loop's thread first."""
    metrics = Metrics(CollectorRegistry())
    recorder = Recorder(delay_s=60)
    metrics.before_scrape(recorder.run_from_any_thread)
    scraped: dict[str, Any] = {}

    def observe() -> None:
        metrics.observe("exp", "treatment", "ft", "chat.completions", False, 200, 0.1, None, 10, 5, 0.01)

    async def scenario() -> None:
        for _ in range(3):
            recorder.add(observe)
        loop_thread = threading.get_ident()

        def scrape() -> None:
            scraped["thread"] = threading.get_ident() != loop_thread
            scraped["text"] = generate_latest(metrics.registry).decode()

        await asyncio.to_thread(scrape)  # the loop stays free to run the batch, as in /metrics

    asyncio.run(scenario())
    assert scraped["thread"]
    lines = [line for line in scraped["text"].splitlines() if line.startswith("abproxy_requests_total{")]
    assert len(lines) == 1 and lines[0].endswith(" 3.0"), lines
    assert 'abproxy_tokens_total{experiment="exp",kind="prompt",model="ft",variant="treatment"} 30.0' in scraped["text"]


def test_a_scrape_on_the_loops_thread_runs_the_batch_itself() -> None:
    metrics = Metrics(CollectorRegistry())
    recorder = Recorder(delay_s=60)
    metrics.before_scrape(recorder.run_from_any_thread)
    done: list[int] = []

    async def scenario() -> str:
        recorder.add(done.append, 1)
        return generate_latest(metrics.registry).decode()

    asyncio.run(scenario())
    assert done == [1]


def test_a_scrape_with_the_loop_stopped_runs_the_batch_in_the_scraping_thread() -> None:
    recorder = Recorder(delay_s=60)
    done: list[int] = []

    async def scenario() -> None:
        recorder.add(done.append, 1)

    asyncio.run(scenario())
    thread = threading.Thread(target=recorder.run_from_any_thread)
    thread.start()
    thread.join(5)
    assert done == [1]


@pytest.mark.parametrize("pending", [0, 2])
def test_run_with_nothing_or_something_pending_leaves_nothing_behind(pending: int) -> None:
    done: list[int] = []
    recorder = Recorder(delay_s=60)

    async def scenario() -> None:
        for i in range(pending):
            recorder.add(done.append, i)
        recorder.run()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert done == list(range(pending)) and recorder.pending == 0
