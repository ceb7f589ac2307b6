"""The Prometheus rules and scrape config, and the Grafana dashboard, in deploy/.

Three layers of proof: promtool checks the files and runs the rules' unit tests; the dashboard
JSON is checked for what Grafana needs; and a real Prometheus scrapes a real proxy under traffic
while every PromQL expression of the dashboard and the rules is evaluated against it, including a
treatment regression that the alert expressions must catch. A rollout controller with a plan runs next
to the proxy, so the staged-rollout panels, the decision annotation and the controller alerts are
evaluated on its real series too.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.assignment import bucket, choose_variant, threshold
from proxy.store.db import engine_for, migrate
from tests.harness import (
    MockUpstream,
    Process,
    PrometheusServer,
    ProxyServer,
    RedisServer,
    free_port,
    proxy_config,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = REPO / "deploy/prometheus/prometheus.yml"
RULES = REPO / "deploy/prometheus/rules/abproxy.rules.yml"
RULE_TESTS = REPO / "deploy/prometheus/tests/abproxy.rules.test.yml"
GRAFANA = REPO / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/abproxy.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

EXPERIMENT = "sales-companion"
SALT = "sales-v2"
VARIANTS = {"control", "treatment"}


def _promtool(*args: str, cwd: Path = REPO) -> str:
    """Run promtool; fail (never skip) when it is missing or exits non-zero."""
    binary = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if binary is None:
        pytest.fail("promtool is not installed: apt-get install -y --no-install-recommends prometheus")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _annotation(name: str) -> dict[str, Any]:
    (annotation,) = [a for a in _dashboard()["annotations"]["list"] if a["name"] == name]
    return annotation  # type: ignore[no-any-return]


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(where, expr, legend) of every PromQL query in the dashboard: panel targets and annotations."""
    queries = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", ""))
               for p in _panels() for t in p["targets"]]  # fmt: skip
    for annotation in _dashboard()["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']!r}", annotation["expr"], ""))
    return queries


# Grafana expands these before it sends a query; the test does the same, in this one place.
# $__rate_interval is max(4 x scrape interval, $__interval + scrape interval): the test scrapes every
# second, so 1m is a generous stand-in. $__range is the dashboard's time range (seed table).
GRAFANA_VARIABLES = {"experiment": EXPERIMENT, "__rate_interval": "1m", "__interval": "1s", "__range": "5m"}


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables ($name or ${name}) expanded for the test."""
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)
    assert "$" not in expanded, expanded
    return expanded


# -- promtool ------------------------------------------------------------------------------
class TestPromtool:
    def test_check_config(self, tmp_path: Path) -> None:
        """prometheus.yml is valid, and its rule_files glob picks up the repo's rules file."""
        _promtool("check", "config", str(PROMETHEUS_YML))
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]  # docker-compose.yml mounts rules/ there
        config["rule_files"] = [str(RULES.parent / "*.yml")]
        local = tmp_path / "prometheus.yml"
        local.write_text(yaml.safe_dump(config))
        output = _promtool("check", "config", str(local))
        assert str(RULES) in output and "SUCCESS" in output

    def test_scrape_config(self) -> None:
        """The compose stack scrapes job abproxy at proxy:9091, job abproxy-controller at controller:9103 and
        job abproxy-collector at collector:9102, every 5 s; the alert rules name each job."""
        jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
        assert set(jobs) == {"abproxy", "abproxy-controller", "abproxy-collector"}
        assert all(job["scrape_interval"] == "5s" for job in jobs.values())
        assert jobs["abproxy"]["static_configs"] == [{"targets": ["proxy:9091"]}]
        assert jobs["abproxy-controller"]["static_configs"] == [{"targets": ["controller:9103"]}]
        assert jobs["abproxy-collector"]["static_configs"] == [{"targets": ["collector:9102"]}]
        exprs = " ".join(rule["expr"] for rule in _rules())
        assert all(f'job="{job}"' in exprs for job in jobs)

    def test_check_rules(self) -> None:
        """promtool check rules accepts every rule."""
        output = _promtool("check", "rules", str(RULES))
        assert f"{len(_rules())} rules found" in output

    def test_rule_unit_tests(self) -> None:
        """promtool's unit tests for the rules pass."""
        assert "SUCCESS" in _promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)

    def test_every_rule_is_unit_tested(self) -> None:
        """Every alert has a unit test where it fires and one where it stays quiet; every recording
        rule's value is checked."""
        tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
        alert_cases = [case for test in tests for case in test.get("alert_rule_test", [])]
        checked = " ".join(case["expr"] for test in tests for case in test.get("promql_expr_test", []))
        for rule in _rules():
            if "alert" in rule:
                cases = [case for case in alert_cases if case["alertname"] == rule["alert"]]
                assert any(case["exp_alerts"] for case in cases), f"{rule['alert']} is never shown firing"
                assert any(not case["exp_alerts"] for case in cases), f"{rule['alert']} is never shown quiet"
                assert {"for", "labels", "annotations"} <= set(rule), rule["alert"]
                assert rule["labels"]["severity"] in {"warning", "critical"}
                assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            else:
                assert rule["record"] in checked, f"recording rule {rule['record']} has no promql_expr_test"
                assert re.fullmatch(r"abproxy:\w+:\w+", rule["record"]), rule["record"]


# -- the dashboard JSON --------------------------------------------------------------------
class TestDashboard:
    def test_json_is_the_generators_output(self) -> None:
        """dashboards/abproxy.json is exactly what make_dashboard.py writes (edit the script, not the JSON)."""
        spec = importlib.util.spec_from_file_location("make_dashboard", GRAFANA / "make_dashboard.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert DASHBOARD.read_text() == module.render(), "stale: run python deploy/grafana/make_dashboard.py"

    def test_identity(self) -> None:
        """uid abproxy, a schema Grafana 11 reads, and a title."""
        dashboard = _dashboard()
        assert dashboard["uid"] == "abproxy"
        assert 36 <= dashboard["schemaVersion"] <= 41
        assert dashboard["title"]

    def test_datasource_variable(self) -> None:
        """A `datasource` variable of Prometheus type defaults to the provisioned uid, and every panel,
        target, annotation and variable query goes through it."""
        variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
        datasource = variables["datasource"]
        assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
        (provisioned,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
            "datasources"
        ]
        assert datasource["current"]["value"] == provisioned["uid"] == "prometheus"
        for panel in _panels():
            assert panel["datasource"] == DS, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == DS, (panel["title"], target["refId"])
        queries = [a for a in _dashboard()["annotations"]["list"] if "expr" in a]
        assert queries and all(a["datasource"] == DS for a in queries)
        assert variables["experiment"]["datasource"] == DS

    def test_experiment_variable(self) -> None:
        """An `experiment` query variable lists the experiments seen; every query on a per-experiment
        metric filters by it."""
        experiment = {v["name"]: v for v in _dashboard()["templating"]["list"]}["experiment"]
        assert experiment["type"] == "query"
        assert experiment["definition"] == "label_values(abproxy_requests_total, experiment)"
        assert experiment["query"]["query"] == experiment["definition"]
        assert not experiment["multi"] and not experiment["includeAll"]
        unlabelled = {"abproxy_rejected_requests_total", "abproxy_redis_connected", "abproxy_rollout_cache_age_seconds",
                      "abproxy_events_total", "abproxy_events_dropped_total", "abproxy_controller_leader"}  # fmt: skip
        for where, expr, _ in _dashboard_queries():
            for selector in re.findall(r"(abproxy[\w:]*)(\{[^}]*\})?", expr):
                name, matchers = selector
                if name not in unlabelled:
                    assert 'experiment="$experiment"' in matchers, f"{where}: {name} not filtered by experiment"

    def test_panels_have_unique_ids_and_fit_the_grid(self) -> None:
        """Panel ids are unique; each panel has a gridPos inside 24 columns and no two overlap."""
        panels = _dashboard()["panels"]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            pos = panel["gridPos"]
            assert set(pos) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in pos.values())
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
            area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not area & cells, f"{panel['title']} overlaps another panel"
            cells |= area

    def test_every_panel_queries_prometheus(self) -> None:
        """Every panel but rows has targets, each with an expr and a refId unique in the panel."""
        for panel in _panels():
            assert panel["targets"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]

    def test_covers_every_figure(self) -> None:
        """Per-variant panels for every figure, the rollout, the ratio row and the health metrics."""
        titles = " | ".join(p["title"] for p in _panels())
        for words in ("latency p50 / p99", "Time to first token", "tokens per response", "Cost per query",
                      "Error rate", "Request share", "Rollout percent (live)", "Rollout percent over time",
                      "Latency ratio", "Error-rate difference", "Cost per query ratio", "Upstream errors by reason",
                      "In-flight", "without a user id", "Redis connected", "Rollout cache age", "dropped",
                      "plan's phase", "Plan phase and status", "Controller leader", "Gates of the current phase",
                      "Controller decisions by action"):  # fmt: skip
            assert words.lower() in titles.lower(), words
        exprs = " ".join(expr for _, expr, _ in _dashboard_queries())
        for metric in ("abproxy_requests_total", "abproxy_request_duration_seconds_bucket",
                       "abproxy_time_to_first_token_seconds_bucket", "abproxy_tokens_total", "abproxy_cost_usd_total",
                       "abproxy_upstream_errors_total", "abproxy_in_flight_requests",
                       "abproxy_unidentified_requests_total", "abproxy_rejected_requests_total",
                       "abproxy_rollout_percent", "abproxy_rollout_last_change_timestamp_seconds",
                       "abproxy_redis_connected", "abproxy_rollout_cache_age_seconds", "abproxy_events_total",
                       "abproxy_events_dropped_total", "abproxy_rollout_plan_phase",
                       "abproxy_rollout_plan_phase_current", "abproxy_rollout_plan_status", "abproxy_rollout_gate",
                       "abproxy_controller_decisions_total", "abproxy_controller_leader"):  # fmt: skip
            assert metric in exprs, metric
        table = next(p for p in _panels() if p["type"] == "table")
        assert all(t["instant"] and t["format"] == "table" and "$__range" in t["expr"] for t in table["targets"])

    def test_rollout_changes_are_annotated(self) -> None:
        """Rollout changes are annotations placed at the change time (the gauge's value, in ms)."""
        annotation = _annotation("Rollout changes")
        assert annotation["enable"] and annotation["useValueForTime"]
        assert "abproxy_rollout_last_change_timestamp_seconds" in annotation["expr"]
        assert annotation["expr"].endswith("* 1000")
        assert annotation["target"]["expr"] == annotation["expr"]

    def test_controller_decisions_are_annotated(self) -> None:
        """Every decision that moves a plan is an annotation titled by its action and naming the experiment;
        a first decision (a counter born at 1, which increase() cannot see) included."""
        annotation = _annotation("Controller decisions")
        assert annotation["enable"] and not annotation.get("useValueForTime")
        expr = annotation["expr"]
        assert annotation["target"]["expr"] == expr
        assert 'action=~"start|promote|complete|rollback|halt"' in expr
        assert "increase(abproxy_controller_decisions_total{" in expr and " unless " in expr and " offset " in expr
        assert expr.endswith("> 0") and "by (experiment, action)" in expr
        assert "{{action}}" in annotation["titleFormat"] and "{{experiment}}" in annotation["textFormat"]

    def test_staged_rollout_row(self) -> None:
        """A "Staged rollout" row: percent with the plan phase on a second axis, gate states mapped to
        pass/wait/fail, decisions per action and the live leader count."""
        panels = _dashboard()["panels"]
        start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Staged rollout")
        end = next((i for i, p in enumerate(panels) if p["type"] == "row" and i > start), len(panels))
        row = {p["title"]: p for p in panels[start + 1 : end]}
        percent = row["Rollout percent over time, and the plan's phase"]
        assert [re.findall(r"abproxy_rollout_\w+", t["expr"])[0] for t in percent["targets"]] == [
            "abproxy_rollout_percent", "abproxy_rollout_plan_phase"]
        # The plan's gauges as the lease holder reports them: a replica that lost the lease keeps stale values.
        for panel in row.values():
            for t in panel["targets"]:
                if re.search(r"abproxy_rollout_(plan|gate)", t["expr"]):
                    assert "and on (job, instance) (abproxy_controller_leader == 1)" in t["expr"], panel["title"]
        (phase_axis,) = percent["fieldConfig"]["overrides"]
        assert {"id": "custom.axisPlacement", "value": "right"} in phase_axis["properties"]
        gates = row["Gates of the current phase"]
        assert gates["type"] == "state-timeline"
        (mapping,) = gates["fieldConfig"]["defaults"]["mappings"]
        assert {v: m["text"] for v, m in mapping["options"].items()} == {"1": "pass", "0": "wait", "-1": "fail"}
        assert "by (action)" in row["Controller decisions by action"]["targets"][0]["expr"]
        assert row["Controller leader"]["type"] == "stat"

    def test_provisioning(self) -> None:
        """Grafana provisions the datasource at http://prometheus:9090 and the dashboards directory."""
        (source,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
        assert (source["type"], source["url"], source["uid"]) == ("prometheus", "http://prometheus:9090", "prometheus")
        (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/abproxy.yml").read_text())["providers"]
        assert provider["type"] == "file"
        assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# -- a real Prometheus scraping a real proxy -----------------------------------------------
def _users(variant: str, count: int, prefix: str) -> list[str]:
    """`count` user ids the public formula puts in `variant` at 50 %."""
    users = (f"{prefix}-{i}" for i in range(100_000))
    return [u for u in users if choose_variant(bucket(SALT, u), threshold(50)) == variant][:count]


def _chat(user: str | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": EXPERIMENT, "messages": [{"role": "user", "content": "hello there"}], **extra}
    if user is not None:
        body["user"] = user
    return body


class Traffic:
    """Sends requests through the proxy on a thread pool and counts what it sent per variant."""

    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self.http = httpx.Client(base_url=proxy.url, timeout=30)
        self.sent = 0  # requests routed to an experiment (counted in abproxy_requests_total)

    def send(self, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
        def one(request: tuple[str, dict[str, Any]]) -> httpx.Response:
            path, body = request
            response = self.http.post(path, json=body)
            response.read()  # streams too: the whole body, so TTFT and duration are recorded
            return response

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(one, requests))
        self.sent += sum(1 for r in responses if "x-abproxy-variant" in r.headers)
        return responses

    def recorded(self) -> float:
        families = text_string_to_metric_families(self.http.get("/metrics").text)
        return sum(s.value for f in families for s in f.samples
                   if s.name == "abproxy_requests_total" and s.labels.get("experiment") == EXPERIMENT)  # fmt: skip


def _settle(proxy: Traffic, prometheus: PrometheusServer) -> None:
    """Wait until Prometheus holds everything sent and the rules have been evaluated on it since."""
    wait_until(lambda: proxy.recorded() == proxy.sent, timeout=10, what="the proxy to record every request")
    total = f'sum(abproxy_requests_total{{experiment="{EXPERIMENT}"}}) == {proxy.sent}'
    wait_until(lambda: prometheus.query(total), timeout=15, what="a scrape with every request")
    seen = time.time()

    def evaluated_since() -> bool:
        groups = prometheus.api("rules")["groups"]
        # lastEvaluation is the evaluation's start; 1.5 s (1.5 intervals) later its timestamp is past `seen`.
        return all(datetime.fromisoformat(g["lastEvaluation"]).timestamp() > seen + 1.5 for g in groups)

    wait_until(evaluated_since, timeout=15, interval=0.2, what="rule evaluations after the scrape")


def _mix(users: dict[str, list[str]], unidentified: int) -> list[tuple[str, dict[str, Any]]]:
    """Per variant, with n users: all but 2 chat, about 1 in 9 of them streamed, some completions
    and embeddings, and 2 upstream 500s; plus requests with no user (control) and one unknown model."""
    requests: list[tuple[str, dict[str, Any]]] = []
    for variant in sorted(users):
        fine, failing = users[variant][:-2], users[variant][-2:]
        for i, user in enumerate(fine):
            if i % 12 == 1:
                requests.append(("/v1/completions", {"model": EXPERIMENT, "prompt": "hi", "user": user}))
            elif i % 12 == 2:
                requests.append(("/v1/embeddings", {"model": EXPERIMENT, "input": "hi", "user": user}))
            else:
                requests.append(("/v1/chat/completions", _chat(user, stream=i % 9 == 0)))
        requests += [("/v1/chat/completions", _chat(user, mock_status=500)) for user in failing]
    requests += [("/v1/chat/completions", _chat(None)) for _ in range(unidentified)]
    requests.append(("/v1/chat/completions", {**_chat("obs-x"), "model": "no-such-model"}))  # rejected: 404
    return requests


# The controller's plan: it starts at the 50 % the proxy is already set to (so routing stays as the test set
# it) and then holds, its gates waiting for data that the store, which no collector fills, never gets.
PLAN = [{"name": "canary", "percent": 50, "min_duration": "1d",
         "gates": [{"guardrail": "error_rate", "max_regression": 0.01}]},
        {"name": "ga", "percent": 100}]  # fmt: skip


def _controller(config: dict[str, Any], log_dir: Path, redis_url: str) -> tuple[Process, int]:
    """`abproxy controller` with a plan for the experiment, on an empty SQLite store, ticking every second."""
    store = f"sqlite:///{log_dir / 'controller-store.db'}"
    engine = engine_for(store)
    migrate(engine)
    engine.dispose()
    config = {**config, "experiments": {name: {**exp, "rollout_plan": PLAN}
                                        for name, exp in config["experiments"].items()},
              "events": {"redis_stream": {"enabled": True}}, "store": {"url": store},
              "controller": {"interval_s": 1, "lease_s": 5}}  # fmt: skip
    port = free_port()
    config_file = log_dir / f"controller-{port}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "proxy", "controller", "--config", str(config_file), "--metrics-port", str(port)]
    return Process(f"controller-{port}", argv, log_dir, {"REDIS_URL": redis_url}), port


def _controller_leads(port: int) -> bool:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return False
    families = text_string_to_metric_families(text)
    samples = {s.name: s.value for f in families for s in f.samples if not s.labels}
    return samples.get("abproxy_controller_leader") == 1.0 and "abproxy_rollout_gate" in text


@pytest.fixture(scope="module")
def observed(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrometheusServer, Traffic]]:
    """A proxy at 50 % under healthy traffic in both variants and a rollout controller holding its plan's first
    phase at 50 %, both scraped by a real Prometheus every second."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    log_dir = tmp_path_factory.mktemp("observability")
    config = proxy_config(*upstreams)
    proxy = ProxyServer(config, log_dir, redis_server.url)
    proxy.start()
    controller, controller_port = _controller(config, log_dir, redis_server.url)
    prometheus = PrometheusServer(log_dir, [f"127.0.0.1:{proxy.port}", f"127.0.0.1:{controller_port}"], [RULES])
    traffic = Traffic(proxy)
    try:
        proxy.set_percent(50, EXPERIMENT, reason="observability test")
        controller.start()
        try:
            wait_until(lambda: _controller_leads(controller_port), timeout=30, interval=0.2,
                       what="the controller to lead and judge the plan's gates")  # fmt: skip
        except TimeoutError:
            raise RuntimeError(f"the controller did not start\n{controller.logs()}") from None
        prometheus.start()
        # Every series first appears with whatever it counted before its first scrape, and rate()
        # cannot see that first increase; so one round creates every series, then the real traffic.
        warm_up = _mix({variant: _users(variant, 6, f"obs-warm-{variant}") for variant in VARIANTS}, 1)
        assert sorted({r.status_code for r in traffic.send(warm_up)}) == [200, 404, 500]
        _settle(traffic, prometheus)
        traffic.send(_mix({variant: _users(variant, 102, f"obs-{variant}") for variant in VARIANTS}, 3))
        _settle(traffic, prometheus)
        yield prometheus, traffic
    finally:
        traffic.http.close()
        prometheus.stop()
        controller.stop()
        proxy.stop()


def _check_result(where: str, expr: str, result: list[dict[str, Any]], per_variant: bool) -> None:
    assert result, f"{where}: no series for {expr}"
    experiments = {s["metric"]["experiment"] for s in result if "experiment" in s["metric"]}
    assert experiments <= {EXPERIMENT}, f"{where}: {experiments}"
    variants = {s["metric"]["variant"] for s in result if "variant" in s["metric"]}
    if per_variant or variants:
        assert variants == VARIANTS, f"{where}: variants {variants} from {expr}"


class TestAgainstPrometheus:
    def test_rules_load_and_evaluate_cleanly(self, observed: tuple[PrometheusServer, Traffic]) -> None:
        """Prometheus loaded every rule from the repo's file and evaluates each without error."""
        prometheus, _ = observed
        loaded = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert sorted(r["name"] for r in loaded) == sorted(r.get("record") or r.get("alert") for r in _rules())
        assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded), loaded

    def test_every_dashboard_query(self, observed: tuple[PrometheusServer, Traffic]) -> None:
        """Every panel and annotation query succeeds and returns series; per-variant ones for both variants."""
        prometheus, _ = observed
        for where, expr, legend in _dashboard_queries():
            promql = as_promql(expr)
            per_variant = "{{variant}}" in legend or "by (variant" in expr
            _check_result(where, promql, prometheus.query(promql), per_variant)

    def test_experiment_variable_lists_the_experiment(self, observed: tuple[PrometheusServer, Traffic]) -> None:
        """The `experiment` variable's label_values query finds the experiment."""
        prometheus, _ = observed
        experiment = {v["name"]: v for v in _dashboard()["templating"]["list"]}["experiment"]
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", experiment["definition"])
        assert match is not None
        assert EXPERIMENT in prometheus.api(f"label/{match[2]}/values", **{"match[]": match[1]})

    def test_rollout_annotation_is_at_the_change_time(self, observed: tuple[PrometheusServer, Traffic]) -> None:
        """The rollout annotation's value is the change time in milliseconds (Grafana's time unit)."""
        prometheus, _ = observed
        (series,) = prometheus.query(as_promql(_annotation("Rollout changes")["expr"]))
        assert abs(float(series["value"][1]) / 1000 - time.time()) < 3600

    def test_controller_series(self, observed: tuple[PrometheusServer, Traffic]) -> None:
        """The controller's plan started at the percent already set (no rollout change), runs in its first phase,
        and the decision annotation marks that start."""
        prometheus, _ = observed
        assert prometheus.query(f'abproxy_rollout_plan_status{{experiment="{EXPERIMENT}",status="running"}} == 1')
        assert prometheus.query(f'abproxy_rollout_plan_phase_current{{experiment="{EXPERIMENT}",phase="canary"}} == 1')
        gates = {s["metric"]["gate"] for s in prometheus.query(f'abproxy_rollout_gate{{experiment="{EXPERIMENT}"}}')}
        assert gates == {"min_duration", "min_users", "guardrail:error_rate"}
        (percent,) = prometheus.query(f'max(abproxy_rollout_percent{{experiment="{EXPERIMENT}"}})')
        assert float(percent["value"][1]) == 50
        marks = prometheus.query(as_promql(_annotation("Controller decisions")["expr"]))
        assert [{k: s["metric"][k] for k in ("experiment", "action")} for s in marks] == [
            {"experiment": EXPERIMENT, "action": "start"}]

    def test_every_rule_expression(self, observed: tuple[PrometheusServer, Traffic]) -> None:
        """Every recording rule's expr and recorded series returns series (per-variant ones for both
        variants); every alert expr evaluates."""
        prometheus, _ = observed
        for rule in _rules():
            if "record" in rule:
                for expr in (rule["expr"], rule["record"]):
                    _check_result(rule["record"], expr, prometheus.query(expr), "variant" in rule["record"])
            else:
                prometheus.query(rule["expr"])

    def test_alerts_quiet_while_healthy(self, observed: tuple[PrometheusServer, Traffic]) -> None:
        """With equal error rates, Redis up and nothing dropped, the alert expressions return nothing
        (latency is left out: two fast mocks' p99s differ by noise)."""
        prometheus, _ = observed
        for rule in _rules():
            if rule.get("alert") and rule["alert"] != "AbproxyTreatmentLatencyRegression":
                assert prometheus.query(rule["expr"]) == [], rule["alert"]

    def test_treatment_regression_is_caught(self, observed: tuple[PrometheusServer, Traffic]) -> None:
        """Treatment users hitting 500s and slow answers make the error, upstream-error and latency
        alert expressions return the experiment, and the error alert goes pending."""
        prometheus, traffic = observed
        users = _users("treatment", 60, "obs-regress")
        failing = [("/v1/chat/completions", _chat(u, mock_status=500)) for u in users[:40]]
        slow = [("/v1/chat/completions", _chat(u, mock_latency_ms=400)) for u in users[40:]]
        responses = traffic.send(failing + slow)
        assert {r.headers["x-abproxy-variant"] for r in responses} == {"treatment"}
        _settle(traffic, prometheus)
        alerts = {r["alert"]: r["expr"] for r in _rules() if "alert" in r}
        expected = {
            "AbproxyTreatmentErrorRateRegression": [{"experiment": EXPERIMENT}],
            "AbproxyTreatmentLatencyRegression": [{"experiment": EXPERIMENT}],
            "AbproxyUpstreamErrors": [{"experiment": EXPERIMENT, "variant": "treatment"}],
        }
        for name, labels in expected.items():
            series = [{k: v for k, v in s["metric"].items() if k != "__name__"} for s in prometheus.query(alerts[name])]
            assert series == labels, name

        def pending() -> bool:
            states = {a["labels"]["alertname"]: a["state"] for a in prometheus.api("alerts")["alerts"]}
            return states.get("AbproxyTreatmentErrorRateRegression") == "pending"

        wait_until(pending, timeout=10, interval=0.2, what="the error-rate alert to go pending")
