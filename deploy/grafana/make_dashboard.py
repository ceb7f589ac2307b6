"""Writes dashboards/abproxy.json, the llm-ab-proxy Grafana dashboard, from the panel list below.

    python deploy/grafana/make_dashboard.py           # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check   # exit 1 if the JSON is not this script's output

The JSON is committed (Grafana provisions it as is); tests/test_observability_deploy.py fails when
it differs from this script's output, and evaluates every query in it against a real Prometheus.

Queries use Grafana's variables: `$datasource`, `$experiment`, `$__rate_interval` (time series)
and `$__range` (the seed table, over the whole selected range). The control-vs-treatment row
reads the recording rules of deploy/prometheus/rules/abproxy.rules.yml, so it shows exactly what
the alerts judge. The staged-rollout row reads the series `abproxy controller` exports (its own scrape
job); controller decisions are also an annotation on every panel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "abproxy.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
EXP = 'experiment="$experiment"'
Json = dict[str, Any]


# -- PromQL builders -----------------------------------------------------------------------------
def rate(metric: str, matchers: str = EXP, window: str = "$__rate_interval", fn: str = "rate") -> str:
    selector = f"{metric}{{{matchers}}}" if matchers else metric
    return f"{fn}({selector}[{window}])"


def per_variant(metric: str, matchers: str = EXP, window: str = "$__rate_interval", fn: str = "rate") -> str:
    return f"sum by (variant) ({rate(metric, matchers, window, fn)})"


def requests(window: str = "$__rate_interval", fn: str = "rate") -> str:
    return per_variant("abproxy_requests_total", EXP, window, fn)


def quantile(q: float, histogram: str, window: str = "$__rate_interval", fn: str = "rate") -> str:
    return f"histogram_quantile({q}, sum by (variant, le) ({rate(histogram + '_bucket', EXP, window, fn)}))"


def per_request(metric: str, matchers: str = EXP, window: str = "$__rate_interval", fn: str = "rate") -> str:
    return f"{per_variant(metric, matchers, window, fn)} / {requests(window, fn)}"


def error_ratio(window: str = "$__rate_interval", fn: str = "rate") -> str:
    # A variant with no 5xx at all has no such series: count it as 0 rather than leave a gap.
    errors = per_variant("abproxy_requests_total", f'{EXP}, code=~"5.."', window, fn)
    return f"({errors} or 0 * {requests(window, fn)}) / {requests(window, fn)}"


def share(window: str = "$__rate_interval", fn: str = "rate") -> str:
    total = f"sum({rate('abproxy_requests_total', EXP, window, fn)})"
    return f"{requests(window, fn)} / ignoring (variant) group_left {total}"


# -- panels --------------------------------------------------------------------------------------
def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> Json:
    return {"datasource": DS, "editorMode": "code", "expr": expr, "legendFormat": legend, "range": True,
            "refId": ref, **extra}  # fmt: skip


def timeseries(title: str, targets: list[Json], unit: str, description: str, **defaults: Any) -> Json:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0,
                                                  "spanNulls": False, "showPoints": "never"}, **defaults},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def threshold_line(value: float, unit: str) -> Json:
    """Field defaults that draw a dashed red line at `value` (an alert threshold)."""
    return {
        "unit": unit,
        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                      {"color": "red", "value": value}]},
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "spanNulls": False, "showPoints": "never",
                   "thresholdsStyle": {"mode": "dashed"}},
    }


def ratio_panel(title: str, targets: list[Json], unit: str, alert_at: float, description: str) -> Json:
    panel = timeseries(title, targets, unit, description)
    panel["fieldConfig"]["defaults"] = threshold_line(alert_at, unit)
    return panel


SEED_COLUMNS = [  # (column, unit, instant query over the selected range)
    ("requests", "short", requests("$__range", "increase")),
    ("share", "percentunit", share("$__range", "increase")),
    ("p50", "s", quantile(0.5, "abproxy_request_duration_seconds", "$__range", "increase")),
    ("p99", "s", quantile(0.99, "abproxy_request_duration_seconds", "$__range", "increase")),
    ("TTFT p50", "s", quantile(0.5, "abproxy_time_to_first_token_seconds", "$__range", "increase")),
    ("tokens / response", "short",
     per_request("abproxy_tokens_total", f'{EXP}, kind="completion"', "$__range", "increase")),
    ("$ per 1k queries", "currencyUSD", f"1000 * {per_request('abproxy_cost_usd_total', EXP, '$__range', 'increase')}"),
    ("error rate", "percentunit", error_ratio("$__range", "increase")),
]


def seed_table() -> Json:
    """The demo's per-variant table, over the dashboard's time range: one instant query per column,
    merged on `variant`."""
    refs = [chr(ord("A") + i) for i in range(len(SEED_COLUMNS))]
    targets = [
        {"datasource": DS, "editorMode": "code", "expr": expr, "format": "table", "instant": True, "range": False,
         "legendFormat": "", "refId": ref}
        for ref, (_, _, expr) in zip(refs, SEED_COLUMNS, strict=True)
    ]
    rename = {f"Value #{ref}": name for ref, (name, _, _) in zip(refs, SEED_COLUMNS, strict=True)}
    order = {"variant": 0, **{name: i + 1 for i, (name, _, _) in enumerate(SEED_COLUMNS)}}
    overrides = [
        {"matcher": {"id": "byName", "options": name}, "properties": [{"id": "unit", "value": unit}]}
        for name, unit, _ in SEED_COLUMNS
    ]
    return {
        "type": "table",
        "title": "Per variant over the selected time range",
        "description": "The demo's seed table: requests, share, latency, time to first token, completion tokens "
        "per response, cost per 1,000 queries and 5xx rate, per variant, over the whole time range.",
        "datasource": DS,
        "targets": targets,
        "transformations": [
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}, "indexByName": order,
                                           "renameByName": rename}},
        ],
        "fieldConfig": {"defaults": {"decimals": 3}, "overrides": overrides},
        "options": {"showHeader": True, "cellHeight": "sm"},
    }


def rollout_stat() -> Json:
    return {
        "type": "stat",
        "title": "Rollout percent (live)",
        "description": "Percent of users the proxy sends to the fine-tuned model right now.",
        "datasource": DS,
        "targets": [target(f"max(abproxy_rollout_percent{{{EXP}}})", "rollout %", instant=True, range=False)],
        "fieldConfig": {"defaults": {"unit": "percent", "min": 0, "max": 100, "decimals": 2}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "value"},
    }


def new_or_increase(counter: str, matchers: str = EXP, window: str = "$__rate_interval") -> str:
    """What a counter gained in `window`, first increments included.

    A labelled counter appears only when first incremented, already at 1, and increase() needs two
    samples, so it never sees that first step. A series born inside the window gained its whole
    value there; any other series gained what increase() says.
    """
    selector = f"{counter}{{{matchers}}}"
    return f"({selector} unless {selector} offset {window}) or increase({selector}[{window}])"


def led(metric: str, matchers: str = EXP) -> str:
    """The lease holder's view of a plan gauge: a controller replica that lost the lease keeps its last values."""
    return f"({metric}{{{matchers}}} and on (job, instance) (abproxy_controller_leader == 1))"


# The controller's decisions that move the plan (a hold is logged and stored, but not counted).
DECISION_ACTIONS = "start|promote|complete|rollback|halt"
GATE_STATES = {"1": ("pass", "green"), "0": ("wait", "yellow"), "-1": ("fail", "red")}


def rollout_and_phase() -> Json:
    """The live percent (left axis) and the plan's phase index (right axis, stepped)."""
    panel = timeseries("Rollout percent over time, and the plan's phase", [
        target(f"max(abproxy_rollout_percent{{{EXP}}})", "rollout %"),
        target(f"max {led('abproxy_rollout_plan_phase')}", "plan phase (0 = first)"),
    ], "percent", "The live rollout percent (left) and the index of the rollout plan's current phase (right, "
       "from the controller). Rollout changes and controller decisions are marked as annotations.",
       min=0, max=100)  # fmt: skip
    panel["fieldConfig"]["overrides"] = [{
        "matcher": {"id": "byFrameRefID", "options": "B"},
        "properties": [{"id": "unit", "value": "none"}, {"id": "decimals", "value": 0}, {"id": "min", "value": 0},
                       {"id": "max", "value": None}, {"id": "custom.axisPlacement", "value": "right"},
                       {"id": "custom.lineInterpolation", "value": "stepAfter"}],
    }]  # fmt: skip
    return panel


def plan_stat() -> Json:
    """The plan's current phase and status, by name (each series is 1 only for the current one)."""
    return {
        "type": "stat",
        "title": "Plan phase and status (live)",
        "description": "The rollout plan's current phase and its status: running, paused, halted, rolled_back, "
        "aborted or completed, as the controller holding the lease reports them. Empty: no leading controller, or no "
        "plan for this experiment.",
        "datasource": DS,
        "targets": [
            target(f"max by (phase) ({led('abproxy_rollout_plan_phase_current')} == 1)", "{{phase}}", instant=True,
                   range=False),
            target(f"max by (status) ({led('abproxy_rollout_plan_status')} == 1)", "{{status}}", "B", instant=True,
                   range=False),
        ],
        "fieldConfig": {"defaults": {"unit": "none", "color": {"mode": "fixed", "fixedColor": "text"}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "none", "graphMode": "none", "textMode": "name", "orientation": "vertical"},
    }


def leader_stat() -> Json:
    return {
        "type": "stat",
        "title": "Controller leader",
        "description": "Controllers holding the Redis lease, over all controller replicas: 1 is right (only the "
        "holder acts); 0 for 5 minutes alerts (RolloutControllerNoLeader).",
        "datasource": DS,
        "targets": [target("sum(abproxy_controller_leader)", "leaders", instant=True, range=False)],
        "fieldConfig": {"defaults": {
            "unit": "none", "decimals": 0,
            "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                          {"color": "green", "value": 1}]},
        }, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "none", "textMode": "value"},
    }


def gate_timeline() -> Json:
    mappings = [{"type": "value", "options": {value: {"text": text, "color": color, "index": i}
                                              for i, (value, (text, color)) in enumerate(GATE_STATES.items())}}]
    return {
        "type": "state-timeline",
        "title": "Gates of the current phase",
        "description": "Each gate the controller judges the current phase by: pass, wait (not enough evidence "
        "yet) or fail. min_duration and min_users are the phase's own minimums.",
        "datasource": DS,
        "targets": [target(f"max by (gate) {led('abproxy_rollout_gate')}", "{{gate}}")],
        "fieldConfig": {"defaults": {"mappings": mappings, "color": {"mode": "thresholds"},
                                     "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                                                  {"color": "yellow", "value": 0},
                                                                                  {"color": "green", "value": 1}]},
                                     "custom": {"fillOpacity": 80, "lineWidth": 0}},
                        "overrides": []},
        "options": {"showValue": "auto", "mergeValues": True, "rowHeight": 0.9, "alignValue": "left",
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
                    "tooltip": {"mode": "single", "sort": "none"}},
    }


def decisions_panel() -> Json:
    panel = timeseries("Controller decisions by action", [
        target(f"sum by (action) ({new_or_increase('abproxy_controller_decisions_total')})", "{{action}}"),
    ], "short", "Decisions the controller wrote per interval: start, promote, complete, rollback, halt. A hold "
       "is not counted; it is in the decision log (abproxy rollout plan NAME).", min=0)  # fmt: skip
    panel["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "bars", "lineWidth": 1, "fillOpacity": 80,
                                                  "spanNulls": False, "showPoints": "never"}
    return panel


def row(title: str) -> Json:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


S = "abproxy_request_duration_seconds"
T = "abproxy_time_to_first_token_seconds"
R = ":rate5m"

LAYOUT: list[tuple[Json, int, int]] = [  # (panel, width of 24, height)
    (row("Now: rollout and the seed table"), 24, 1),
    (rollout_stat(), 4, 8),
    (seed_table(), 20, 8),
    (row("Per variant over time"), 24, 1),
    (timeseries("Request latency p50 / p99", [
        target(quantile(0.5, S), "{{variant}} p50"),
        target(quantile(0.99, S), "{{variant}} p99"),
    ], "s", "Time from request received to last byte sent, all endpoints."), 12, 8),
    (timeseries("Time to first token p50 / p99", [
        target(quantile(0.5, T), "{{variant}} p50"),
        target(quantile(0.99, T), "{{variant}} p99"),
    ], "s", "Streams only: time from request received to the first upstream chunk."), 12, 8),
    (timeseries("Completion tokens per response", [
        target(per_request("abproxy_tokens_total", f'{EXP}, kind="completion"'), "{{variant}}"),
    ], "short", "Completion tokens reported by the upstream, divided by requests answered."), 8, 8),
    (timeseries("Cost per query", [
        target(per_request("abproxy_cost_usd_total"), "{{variant}}"),
    ], "currencyUSD", "USD from the models' configured pricing, divided by requests answered."), 8, 8),
    (timeseries("Error rate (5xx answers)", [
        target(error_ratio(), "{{variant}}"),
    ], "percentunit", "Share of answers with a 5xx status: upstream 5xx passed through and the proxy's "
       "502/504."), 8, 8),
    (timeseries("Request share", [
        target(share(), "{{variant}}"),
    ], "percentunit", "Each variant's share of the experiment's requests; follows the rollout percent."), 12, 8),
    (timeseries("Requests per second by status code", [
        target(f"sum by (variant, code) ({rate('abproxy_requests_total')})", "{{variant}} {{code}}"),
    ], "reqps", "Answers per second, by variant and HTTP status sent to the client (499: client closed)."), 12, 8),
    (row("Staged rollout"), 24, 1),
    (rollout_and_phase(), 12, 8),
    (plan_stat(), 8, 8),
    (leader_stat(), 4, 8),
    (gate_timeline(), 12, 8),
    (decisions_panel(), 12, 8),
    (row("Control vs treatment (5-minute windows, as the alerts see them)"), 24, 1),
    (ratio_panel("Latency ratio (treatment / control)", [
        target(f'abproxy:request_duration_seconds_p99_ratio{R}{{{EXP}}}', "p99"),
        target(f'abproxy:request_duration_seconds_p50_ratio{R}{{{EXP}}}', "p50"),
        target(f'abproxy:time_to_first_token_seconds_p50_ratio{R}{{{EXP}}}', "TTFT p50"),
    ], "suffix:x", 1.2, "Above 1: the fine-tuned model is slower. The p99 ratio alerts above 1.2 for 10 min."), 8, 8),
    (ratio_panel("Error-rate difference (treatment - control)", [
        target(f'abproxy:request_error_ratio_difference{R}{{{EXP}}}', "5xx rate difference"),
    ], "percentunit", 0.05, "Percentage points; alerts above 5 points for 5 minutes."), 8, 8),
    (ratio_panel("Cost per query ratio (treatment / control)", [
        target(f'abproxy:cost_usd_per_request_ratio{R}{{{EXP}}}', "cost per query ratio"),
    ], "suffix:x", 2.0, "What a query costs on the fine-tuned model, relative to the base model."), 8, 8),
    (row("Health"), 24, 1),
    (timeseries("Upstream errors by reason", [
        target(f"sum by (variant, reason) ({rate('abproxy_upstream_errors_total')})", "{{variant}} {{reason}}"),
    ], "reqps", "timeout, connect, 4xx, 5xx, and cancelled (the client hung up)."), 8, 8),
    (timeseries("In-flight requests", [
        target(f"sum by (variant) (abproxy_in_flight_requests{{{EXP}}})", "{{variant}}"),
    ], "short", "Requests routed and not yet answered in full, summed over instances."), 8, 8),
    (timeseries("Requests without a user id", [
        # Unidentified requests always go to control; treatment's zero line says so explicitly.
        target(f"{per_variant('abproxy_unidentified_requests_total')} or 0 * {requests()}", "{{variant}}"),
    ], "reqps", "Requests with no X-User-Id, user or safety_identifier: sent to control, never bucketed."), 8, 8),
    (timeseries("Rejected before routing", [
        target(f"sum by (code) ({rate('abproxy_rejected_requests_total', '')})", "{{code}}"),
    ], "reqps", "Requests refused before an experiment was chosen (400 bad body, 404 unknown model, 413)."), 6, 7),
    (timeseries("Redis connected", [
        target("min by (instance) (abproxy_redis_connected)", "{{instance}}"),
    ], "short", "1 while the rollout cache follows Redis; 0 while it routes from memory (fail static).",
       min=0, max=1), 6, 7),
    (ratio_panel("Rollout cache age", [
        target("max by (instance) (abproxy_rollout_cache_age_seconds)", "{{instance}}"),
    ], "s", 60, "Seconds since the rollout cache last read Redis; it re-syncs every 5 s. Alerts above 60 s."), 6, 7),
    (timeseries("Events written / dropped", [
        target(f"sum by (sink) ({rate('abproxy_events_total', '')})", "{{sink}} written"),
        # Zero-filled per sink, so "nothing dropped" reads as 0 rather than as no data.
        target(f"sum by (sink, reason) ({rate('abproxy_events_dropped_total', '')})"
               f" or 0 * sum by (sink) ({rate('abproxy_events_total', '')})", "{{sink}} dropped {{reason}}"),
    ], "reqps", "The per-request event stream (stdout, Redis stream) the experiment analysis reads."), 6, 7),
]  # fmt: skip


def place(layout: list[tuple[Json, int, int]]) -> list[Json]:
    """Give each panel an id and a gridPos, filling rows of 24 columns left to right."""
    panels: list[Json] = []
    x = y = line_height = 0
    for number, (panel, width, height) in enumerate(layout, start=1):
        if x + width > 24:
            x, y, line_height = 0, y + line_height, 0
        panels.append({"id": number, "gridPos": {"h": height, "w": width, "x": x, "y": y}, **panel})
        x += width
        line_height = max(line_height, height)
    return panels


def annotations() -> Json:
    rollout_changes = f"max by (experiment) (abproxy_rollout_last_change_timestamp_seconds{{{EXP}}} > 0) * 1000"
    decided = f'{EXP}, action=~"{DECISION_ACTIONS}"'
    decisions = (f"sum by (experiment, action) ({new_or_increase('abproxy_controller_decisions_total', decided, '2m')})"
                 " > 0")
    return {"list": [
        {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
         "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"},
        {
            # The gauge holds the time of the last change; used as the annotation's time, each
            # change appears once, where it happened (Grafana merges the repeated samples).
            "name": "Rollout changes",
            "datasource": DS,
            "enable": True,
            "iconColor": "orange",
            "expr": rollout_changes,
            "step": "15s",
            "useValueForTime": True,
            "titleFormat": "Rollout changed",
            "textFormat": "{{experiment}}",
            "tagKeys": "experiment",
            "target": {"expr": rollout_changes, "refId": "Anno", "interval": "15s"},
        },
        {
            # Shown while a decision is in the last 2 minutes: a mark (a short region) per decision.
            "name": "Controller decisions",
            "datasource": DS,
            "enable": True,
            "iconColor": "purple",
            "expr": decisions,
            "step": "30s",
            "titleFormat": "Controller: {{action}}",
            "textFormat": "{{experiment}}: {{action}}",
            "tagKeys": "experiment,action",
            "target": {"expr": decisions, "refId": "Decisions", "interval": "30s"},
        },
    ]}


def templating() -> Json:
    experiments = "label_values(abproxy_requests_total, experiment)"
    return {"list": [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {"text": "Prometheus", "value": "prometheus"}, "refresh": 1, "hide": 0, "options": [],
         "regex": ""},
        {"type": "query", "name": "experiment", "label": "Experiment", "datasource": DS,
         "definition": experiments,
         "query": {"qryType": 1, "query": experiments, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
         "refresh": 2, "sort": 1, "multi": False, "includeAll": False, "hide": 0, "current": {}, "options": [],
         "regex": ""},
    ]}


def dashboard() -> Json:
    return {
        "uid": "abproxy",
        "title": "llm-ab-proxy: control vs treatment",
        "description": "Per-variant latency, time to first token, tokens, cost, errors and request share of an "
        "llm-ab-proxy experiment, its live rollout and staged-rollout plan, and the proxy's health.",
        "tags": ["llm-ab-proxy"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "links": [],
        "annotations": annotations(),
        "templating": templating(),
        "panels": place(LAYOUT),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
