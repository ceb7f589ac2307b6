"""proxy.metrics end to end: real proxy processes scraped over HTTP, parsed by prometheus_client's parser.

Metric names and label sets are contracts (dashboards and alerts in deploy/ use them), so they
are checked by name. One single-process proxy on its own Redis serves most tests, which read
counters as before/after deltas. Multi-worker proxies prove that every scrape, whichever worker
answers, sums all workers: each test first makes sure both workers served traffic, by reading
the per-process files in the multiprocess directory.
"""

from __future__ import annotations

import gc
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from tests.harness import MockUpstream, ProxyServer, RedisServer, eventually, free_port, proxy_config, wait_until

EXPERIMENT = "sales-companion"
BASE_MODEL = "gpt-4o-mini"
CHAT = "/v1/chat/completions"
CLOSE = {"Connection": "close"}  # a new connection per call, so the kernel spreads calls over workers
ERROR_KEYS = {"message", "type", "param", "code"}
ARM = {"experiment", "variant", "model"}

# Sample name -> (family type, label names). The names and labels are what dashboards query.
CONTRACT: dict[str, tuple[str, set[str]]] = {
    "abproxy_requests_total": ("counter", ARM | {"endpoint", "stream", "code"}),
    "abproxy_in_flight_requests": ("gauge", ARM | {"endpoint"}),
    "abproxy_unidentified_requests_total": ("counter", ARM),
    "abproxy_upstream_errors_total": ("counter", ARM | {"reason"}),
    "abproxy_rollout_percent": ("gauge", {"experiment"}),
    "abproxy_rollout_last_change_timestamp_seconds": ("gauge", {"experiment"}),
    "abproxy_redis_connected": ("gauge", set()),
    "abproxy_rollout_cache_age_seconds": ("gauge", set()),
    "abproxy_events_total": ("counter", {"sink"}),
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers -------------------------------------------------------------------------------
def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _scrape(http: httpx.Client, url: str) -> Samples:
    response = http.get(url, headers=CLOSE)
    assert response.status_code == 200, response.text
    return _parse(response.text)


def _value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none exists yet)."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def _only(samples: Samples, name: str) -> float:
    """The one sample of an unlabelled metric; fails if it is missing."""
    values = [v for (n, _), v in samples.items() if n == name]
    assert len(values) == 1, (name, values)
    return values[0]



def _assert_eq(actual: float, expected: float) -> None:
    assert actual == expected


def _chat(user: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": EXPERIMENT, "messages": [{"role": "user", "content": "hi"}], **extra}
    if user is not None:
        body["user"] = user
    return body


def _slow_chat(client: openai.OpenAI, user: str, latency_ms: int) -> str | None:
    """A chat completion the mock upstream holds for `latency_ms` before answering."""
    completion = client.chat.completions.create(
        model=EXPERIMENT, messages=[{"role": "user", "content": "slow"}], user=user,
        extra_body={"mock_latency_ms": latency_ms},
    )  # fmt: skip
    return completion.choices[0].message.content


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


def _requests_by_worker(directory: Path, scratch: Path) -> dict[int, float]:
    """abproxy_requests_total per worker pid, read from each pid's file in the multiprocess dir."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        match = re.fullmatch(r"counter_(\d+)\.db", path.name)
        assert match, path.name
        pid = int(match.group(1))
        one = scratch / str(pid)
        shutil.rmtree(one, ignore_errors=True)
        one.mkdir(parents=True)
        shutil.copy(path, one / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(one))  # type: ignore[no-untyped-call]
        total = sum(s.value for m in registry.collect() for s in m.samples if s.name == "abproxy_requests_total")
        counts[pid] = total
    return counts


def _load_both_workers(http: httpx.Client, server: ProxyServer, directory: Path, scratch: Path) -> int:
    """Send requests of both variants (50 %, many users) until both workers served some; returns how many."""
    sent = 0
    for i in range(400):
        response = http.post(f"{server.url}{CHAT}", json=_chat(f"mp-{i}"), headers=CLOSE)
        assert response.status_code == 200, response.text
        sent += 1
        if sent >= 20 and sent % 10 == 0:
            served = [n for n in _requests_by_worker(directory, scratch).values() if n > 0]
            if len(served) == 2:
                return sent
    raise AssertionError(f"one worker served all {sent} requests: {_requests_by_worker(directory, scratch)}")


def _assert_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


# -- fixtures ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Gateway:
    server: ProxyServer
    first_scrape: Samples  # taken right after start-up, before any test changed anything


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client



@pytest.fixture(scope="module")
def gateway(
    upstreams: tuple[MockUpstream, MockUpstream],
    closed_port: int,
    http: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    """One worker on its own Redis, plus failing experiments `impatient` (timeout 0.5 s) and `dead`."""
    log_dir = tmp_path_factory.mktemp("metrics-gateway")
    own_redis = RedisServer(log_dir)
    own_redis.start()
    base, finetuned = upstreams
    config = proxy_config(base, finetuned)
    config["upstreams"].update(
        {
            "up-impatient": {"base_url": f"{base.url}/v1", "api_key_env": "BASE_KEY", "timeout_s": 0.5},
            "up-dead": {"base_url": f"http://127.0.0.1:{closed_port}/v1", "api_key_env": "BASE_KEY"},
        }
    )
    for name in ("impatient", "dead"):
        config["models"][name] = {"upstream": f"up-{name}", "model": f"{name}-model"}
        config["experiments"][f"{name}-exp"] = {"aliases": [name], "control": name, "treatment": "finetuned"}
    server = ProxyServer(config, log_dir, own_redis.url)
    try:
        server.start()
        yield Gateway(server, _scrape(http, f"{server.url}/metrics"))
    finally:
        server.stop()
        own_redis.stop()


@pytest.fixture()
def proxy(gateway: Gateway) -> ProxyServer:
    """The shared single-process proxy, rollout back at 0 %."""
    gateway.server.set_percent(0)
    return gateway.server


@pytest.fixture()
def client(proxy: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-client", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def client_for() -> Iterator[Callable[[ProxyServer], openai.OpenAI]]:
    clients: list[openai.OpenAI] = []

    def make(server: ProxyServer) -> openai.OpenAI:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-client", max_retries=0)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def _metrics(http: httpx.Client, proxy: ProxyServer) -> Samples:
    return _scrape(http, f"{proxy.url}/metrics")


# -- single process ------------------------------------------------------------------------
class TestContract:
    def test_names_types_and_labels(self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI) -> None:
        """Every contract metric exists with its type and exactly its label names."""
        client.chat.completions.create(model=EXPERIMENT, messages=[{"role": "user", "content": "x"}], user="c-1")
        http.post(f"{proxy.url}{CHAT}", json=_chat(), headers={"X-User-Id": ""})
        http.post(f"{proxy.url}{CHAT}", json=_chat("c-2", mock_status=500))

        def check() -> None:
            families: dict[str, Metric] = {}
            labels: dict[str, set[str]] = {}
            for family in text_string_to_metric_families(http.get(f"{proxy.url}/metrics").text):
                for sample in family.samples:
                    families[sample.name] = family
                    labels.setdefault(sample.name, set()).update(sample.labels)
            for name, (kind, label_names) in CONTRACT.items():
                assert name in families, name
                assert families[name].type == kind, name
                assert labels[name] == label_names, name

        eventually(check)

    def test_process_metrics_in_single_process_mode(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """One worker: RSS, CPU and open fds of the process are exported."""
        samples = _metrics(http, proxy)
        for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
            assert _only(samples, name) > 0, name

    def test_no_user_id_in_any_label(self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI) -> None:
        """User ids from the header, the body and safety_identifier never reach /metrics."""
        proxy.set_percent(50)
        marker = "usr-Zq7xW"
        ids = [f"{marker}-{i}" for i in range(6)]
        before = _metrics(http, proxy)
        for user in ids[:3]:
            client.chat.completions.create(model=EXPERIMENT, messages=[{"role": "user", "content": "x"}], user=user)
        http.post(f"{proxy.url}{CHAT}", json=_chat(), headers={"X-User-Id": ids[3]})
        http.post(f"{proxy.url}{CHAT}", json=_chat(safety_identifier=ids[4]))
        http.post(f"{proxy.url}{CHAT}", json=_chat(ids[5], mock_status=503))
        http.post(f"{proxy.url}{CHAT}", json={**_chat(ids[5]), "model": "no-such-model"})

        def check() -> None:
            text = http.get(f"{proxy.url}/metrics").text
            name = "abproxy_requests_total"
            assert _value(_parse(text), name) - _value(before, name) == 6  # all recorded
            assert marker not in text

        eventually(check)


class TestGcPauses:
    def test_every_collection_is_timed_by_generation_until_undone(self) -> None:
        """watch_gc observes each collection of the process under its generation; the undo stops it."""
        metrics = Metrics(CollectorRegistry())
        unwatch = metrics.watch_gc()
        try:
            gc.collect(0)
            gc.collect(2)
            gc.collect(2)
        finally:
            unwatch()
        gc.collect(2)  # after the undo: not counted
        samples = _parse(generate_latest(metrics.registry).decode())
        counts = {g: _value(samples, "abproxy_gc_pause_seconds_count", generation=g) for g in ("0", "1", "2")}
        assert counts["2"] == 2 and counts["1"] == 0 and counts["0"] >= 1  # a young one may also run by itself
        assert _value(samples, "abproxy_gc_pause_seconds_sum", generation="2") > 0

    def test_serving_process_exports_its_pauses(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """The serving process measures its collector from start-up: one series per generation."""
        samples = _metrics(http, proxy)
        for generation in ("0", "1", "2"):
            assert ("abproxy_gc_pause_seconds_count", frozenset({("generation", generation)})) in samples


class TestInFlight:
    def test_rises_during_a_slow_request_and_returns_to_zero(
        self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI
    ) -> None:
        """A request held by a slow upstream shows as 1 in flight for its arm and endpoint, then 0."""
        labels = {"experiment": EXPERIMENT, "variant": "control", "model": BASE_MODEL, "endpoint": "chat.completions"}
        name = "abproxy_in_flight_requests"
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(_slow_chat, client, "inflight-1", 1500)
            wait_until(lambda: _value(_metrics(http, proxy), name, **labels) == 1, timeout=5, what="one in flight")
            assert slow.result()
        eventually(lambda: _assert_eq(_value(_metrics(http, proxy), name, **labels), 0))


class TestUnidentified:
    def test_labelled_by_arm_and_always_control(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """A request with no user id counts under {experiment, variant=control, model=base}, even at 100 %."""
        proxy.set_percent(100)
        name = "abproxy_unidentified_requests_total"
        arm = {"experiment": EXPERIMENT, "variant": "control", "model": BASE_MODEL}
        before = _metrics(http, proxy)
        for _ in range(2):
            response = http.post(f"{proxy.url}{CHAT}", json=_chat(), headers={"X-User-Id": ""})
            assert response.headers["x-abproxy-variant"] == "control"
        http.post(f"{proxy.url}{CHAT}", json=_chat("known-user"))

        def check() -> None:
            after = _metrics(http, proxy)
            assert _value(after, name, **arm) - _value(before, name, **arm) == 2
            assert _value(after, name, variant="treatment") == 0

        eventually(check)


class TestRolloutGauges:
    def test_percent_and_change_time_follow_an_admin_change(
        self, http: httpx.Client, gateway: Gateway, proxy: ProxyServer
    ) -> None:
        """Before any change in Redis the timestamp is 0; after one it is the change's unix time."""
        first = gateway.first_scrape
        assert _value(first, "abproxy_rollout_percent", experiment=EXPERIMENT) == 0
        assert _value(first, "abproxy_rollout_last_change_timestamp_seconds", experiment=EXPERIMENT) == 0
        body = proxy.set_percent(12.5, reason="metrics test")
        changed_at = datetime.fromisoformat(body["updated_at"]).timestamp()
        samples = _metrics(http, proxy)
        assert _value(samples, "abproxy_rollout_percent", experiment=EXPERIMENT) == 12.5
        stamp = _value(samples, "abproxy_rollout_last_change_timestamp_seconds", experiment=EXPERIMENT)
        assert stamp == pytest.approx(changed_at, abs=1e-3)
        assert abs(stamp - time.time()) < 10

    def test_redis_connected_and_cache_age_when_redis_dies(
        self, http: httpx.Client, upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path
    ) -> None:
        """While following Redis: connected 1, cache age small; Redis killed: connected 0, age grows."""
        own_redis = RedisServer(tmp_path)
        own_redis.start()
        server = ProxyServer(proxy_config(*upstreams), tmp_path, own_redis.url)
        try:
            server.start()
            samples = _metrics(http, server)
            assert _only(samples, "abproxy_redis_connected") == 1
            assert 0 <= _only(samples, "abproxy_rollout_cache_age_seconds") < 5
            own_redis.kill()
            wait_until(
                lambda: _only(_metrics(http, server), "abproxy_redis_connected") == 0, timeout=10, what="disconnected"
            )
            age = _only(_metrics(http, server), "abproxy_rollout_cache_age_seconds")
            wait_until(
                lambda: _only(_metrics(http, server), "abproxy_rollout_cache_age_seconds") > age,
                timeout=10, what="cache age to grow",
            )  # fmt: skip
            assert http.post(f"{server.url}{CHAT}", json=_chat("still-served")).status_code == 200
        finally:
            server.stop()
            own_redis.stop()


class TestEventsCounter:
    def test_counts_every_event_written_to_stdout(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """abproxy_events_total{sink="stdout"} equals the JSON lines on stdout, rejected requests included."""
        name = "abproxy_events_total"
        before = _value(_metrics(http, proxy), name, sink="stdout")
        for i in range(3):
            http.post(f"{proxy.url}{CHAT}", json=_chat(f"ev-{i}"))
        http.post(f"{proxy.url}{CHAT}", content=b"{not json")

        def check() -> None:
            counted = _value(_metrics(http, proxy), name, sink="stdout")
            assert counted - before == 4
            try:
                written = len(proxy.events())
            except ValueError:  # a line caught mid-write
                written = -1
            assert counted == written

        eventually(check)


class TestUpstreamErrors:
    @pytest.mark.parametrize(
        ("body", "reason", "model"),
        [
            pytest.param(_chat("err-1", mock_status=429), "4xx", BASE_MODEL, id="4xx"),
            pytest.param(_chat("err-2", mock_status=503), "5xx", BASE_MODEL, id="5xx"),
            pytest.param({**_chat("err-3", mock_latency_ms=2000), "model": "impatient"}, "timeout", "impatient-model",
                         id="timeout"),
            pytest.param({**_chat("err-4"), "model": "dead"}, "connect", "dead-model", id="connect"),
        ],
    )  # fmt: skip
    def test_reason_per_failure(
        self, http: httpx.Client, proxy: ProxyServer, body: dict[str, Any], reason: str, model: str
    ) -> None:
        """Each kind of upstream failure counts once under its reason and the arm that failed."""
        name = "abproxy_upstream_errors_total"
        before = _metrics(http, proxy)
        response = http.post(f"{proxy.url}{CHAT}", json=body)
        assert response.status_code >= 400
        labels = {"variant": "control", "model": model, "reason": reason}

        def check() -> None:
            after = _metrics(http, proxy)
            assert _value(after, name, **labels) - _value(before, name, **labels) == 1
            assert _value(after, name) - _value(before, name) == 1

        eventually(check)


# -- several workers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyServer, Path]]:
    """Two workers, no PROMETHEUS_MULTIPROC_DIR; TMPDIR is empty so the fresh one serve makes can be found."""
    log_dir = tmp_path_factory.mktemp("metrics-pair")
    tmp = log_dir / "tmp"
    tmp.mkdir()
    _flush(redis_server.url)
    server = ProxyServer(proxy_config(*upstreams), log_dir, redis_server.url, workers=2, extra_env={"TMPDIR": str(tmp)})
    try:
        server.start()
        yield server, tmp
    finally:
        server.stop()


class TestMultiprocess:
    def test_every_scrape_sums_both_workers(
        self, http: httpx.Client, pair: tuple[ProxyServer, Path], tmp_path: Path
    ) -> None:
        """With two workers, /metrics on the main port counts every request, whichever worker answers."""
        server, tmp = pair
        (directory,) = tmp.glob("abproxy-metrics-*")  # the fresh directory serve made
        server.set_percent(50)
        before = _scrape(http, f"{server.url}/metrics")
        sent = _load_both_workers(http, server, directory, tmp_path)

        def check() -> None:
            samples = _scrape(http, f"{server.url}/metrics")
            for name in ("abproxy_requests_total", "abproxy_request_duration_seconds_count"):
                assert _value(samples, name) - _value(before, name) == sent, name
            assert _value(samples, "abproxy_in_flight_requests") == 0
            for variant in ("control", "treatment"):
                assert _value(samples, "abproxy_requests_total", variant=variant) > 0, variant

        eventually(check)
        for _ in range(6):
            check()

    def test_in_flight_summed_over_workers(
        self, http: httpx.Client, pair: tuple[ProxyServer, Path], client_for: Callable[[ProxyServer], openai.OpenAI]
    ) -> None:
        """A slow request shows as 1 in flight on every scrape, whichever worker answers, then 0."""
        server, _ = pair
        url = f"{server.url}/metrics"
        answered = _value(_scrape(http, url), "abproxy_requests_total")
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(_slow_chat, client_for(server), "mp-slow", 2000)
            wait_until(lambda: _value(_scrape(http, url), "abproxy_in_flight_requests") == 1, what="one in flight")
            for _ in range(6):
                samples = _scrape(http, url)
                # Not yet counted as answered (recorded just after the in-flight decrement): still in flight.
                if _value(samples, "abproxy_requests_total") == answered:
                    assert _value(samples, "abproxy_in_flight_requests") == 1
            slow.result()
        eventually(lambda: _assert_eq(_value(_scrape(http, url), "abproxy_in_flight_requests"), 0))

    def test_configured_directory_is_wiped_at_start(
        self,
        http: httpx.Client,
        upstreams: tuple[MockUpstream, MockUpstream],
        redis_server: RedisServer,
        tmp_path: Path,
    ) -> None:
        """Proxies started in turn on one PROMETHEUS_MULTIPROC_DIR (1, 2, then 1 worker) each count from 0."""
        directory = tmp_path / "multiproc"  # absent: serve creates it
        env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
        config = proxy_config(*upstreams)
        for run, workers in enumerate((1, 2, 1)):
            if run:
                assert list(directory.glob("counter_*.db")), "the previous run left no counter files"
            server = ProxyServer(config, tmp_path, redis_server.url, workers=workers, extra_env=env)
            url = f"{server.url}/metrics"
            try:
                server.start()
                assert _value(_scrape(http, url), "abproxy_requests_total") == 0, f"run {run}"
                for i in range(3):
                    assert http.post(f"{server.url}{CHAT}", json=_chat(f"wipe-{i}"), headers=CLOSE).status_code == 200
                eventually(lambda: _assert_eq(_value(_scrape(http, url), "abproxy_requests_total"), 3))  # noqa: B023
            finally:
                server.stop()


# -- the separate metrics port ---------------------------------------------------------------
class TestMetricsPort:
    @pytest.mark.parametrize("workers", [1, 2])
    def test_metrics_only_on_their_own_port(
        self,
        http: httpx.Client,
        upstreams: tuple[MockUpstream, MockUpstream],
        redis_server: RedisServer,
        tmp_path: Path,
        workers: int,
    ) -> None:
        """With server.metrics_port, the main port's /metrics is an OpenAI 404; that port counts every worker."""
        metrics_port = free_port()
        config = proxy_config(*upstreams, server={"metrics_port": metrics_port})
        scratch = tmp_path / "tmp"
        scratch.mkdir()
        server = ProxyServer(config, tmp_path, redis_server.url, workers=workers, extra_env={"TMPDIR": str(scratch)})
        try:
            server.start()
            server.set_percent(50)
            error = _assert_error_shape(http.get(f"{server.url}/metrics"), 404)
            assert error["type"] == "invalid_request_error"
            if workers == 2:
                (directory,) = scratch.glob("abproxy-metrics-*")
                sent = _load_both_workers(http, server, directory, tmp_path / "per-worker")
            else:
                sent = 5
                for i in range(sent):
                    assert http.post(f"{server.url}{CHAT}", json=_chat(f"mport-{i}")).status_code == 200
            url = f"http://127.0.0.1:{metrics_port}/metrics"

            def check() -> None:
                response = http.get(url, headers=CLOSE)
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain")
                samples = _parse(response.text)
                assert _value(samples, "abproxy_requests_total") == sent
                assert _value(samples, "abproxy_request_duration_seconds_count") == sent

            eventually(check)
        finally:
            server.stop()
