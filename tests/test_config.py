"""proxy.config: the YAML file validated once, with one clear line per mistake."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from proxy.config import ConfigError, Settings, config_path, load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"
LOCAL = ROOT / "config" / "local.yaml"
EXAMPLE_ENV = {"OPENAI_API_KEY": "sk-example-secret"}

Mutation = Callable[[dict[str, Any]], None]


def _local() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(LOCAL.read_text())
    return copy.deepcopy(raw)


def _experiment(raw: dict[str, Any]) -> dict[str, Any]:
    exp: dict[str, Any] = raw["experiments"]["sales-companion"]
    return exp


def _assert_names_key(mutate: Mutation, key: str, problem: str) -> None:
    raw = _local()
    mutate(raw)
    message = _config_error(raw)
    assert f": {key}: " in message, message
    assert problem in message, message


def _config_error(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw, env or {})
    return _one_line(str(info.value))


def _one_line(message: str) -> str:
    assert "\n" not in message
    assert "Traceback" not in message
    assert message.startswith("config error: ")
    return message


class TestValidFiles:
    def test_example_loads_with_its_key(self) -> None:
        """config/example.yaml loads when OPENAI_API_KEY is in the environment, and the key is filled in."""
        settings = load_settings(EXAMPLE, EXAMPLE_ENV)
        assert settings.upstreams["openai"].api_key == "sk-example-secret"
        assert settings.experiments["sales-companion"].control == "base"
        assert settings.experiments["sales-companion"].salt == "sales-v2"

    def test_local_loads_with_an_empty_environment(self) -> None:
        """config/local.yaml needs no key at all: it points at the mock upstreams."""
        settings = load_settings(LOCAL, {})
        assert set(settings.upstreams) == {"mock-base", "mock-finetuned"}
        assert settings.upstreams["mock-base"].api_key is None
        assert settings.server.port == 8080

    def test_defaults(self) -> None:
        """Omitted sections take their documented defaults."""
        settings = load_settings(EXAMPLE, EXAMPLE_ENV)
        assert settings.server.port == 8080 and settings.server.workers == 1
        assert settings.rollout.resync_interval_s == 5.0
        assert settings.redis_url == "redis://127.0.0.1:6379/0"
        assert settings.admin_token is None

    def test_base_url_trailing_slash_is_dropped(self) -> None:
        """base_url 'http://h/v1/' is stored as 'http://h/v1', so paths join with one slash."""
        raw = _local()
        raw["upstreams"]["mock-base"]["base_url"] = "http://127.0.0.1:9001/v1/"
        assert settings_from_dict(raw, {}).upstreams["mock-base"].base_url == "http://127.0.0.1:9001/v1"

    def test_two_decimal_percent_is_accepted(self) -> None:
        """rollout_percent 12.34 is valid: the bucket grid is 0.01 % wide."""
        raw = _local()
        _experiment(raw)["rollout_percent"] = 12.34
        assert settings_from_dict(raw, {}).experiments["sales-companion"].rollout_percent == 12.34

    def test_settings_are_frozen(self) -> None:
        """Validated settings cannot be changed after start-up."""
        settings = load_settings(LOCAL, {})
        with pytest.raises(ValidationError):
            settings.redis_url = "redis://elsewhere:6379/0"


class TestErrors:
    @pytest.mark.parametrize(
        ("mutate", "key", "problem"),
        [
            pytest.param(
                lambda r: _experiment(r).update(control="nope"),
                "experiments.sales-companion.control", "unknown model 'nope'", id="unknown-control-model",
            ),
            pytest.param(
                lambda r: _experiment(r).update(treatment="ghost"),
                "experiments.sales-companion.treatment", "unknown model 'ghost'", id="unknown-treatment-model",
            ),
            pytest.param(
                lambda r: r["models"]["base"].update(upstream="nowhere"),
                "models.base.upstream", "unknown upstream 'nowhere'", id="unknown-upstream",
            ),
            pytest.param(
                lambda r: _experiment(r).update(rollout_percent=100.01),
                "experiments.sales-companion.rollout_percent", "between 0 and 100", id="percent-above-100",
            ),
            pytest.param(
                lambda r: _experiment(r).update(rollout_percent=-0.01),
                "experiments.sales-companion.rollout_percent", "between 0 and 100", id="percent-negative",
            ),
            pytest.param(
                lambda r: _experiment(r).update(rollout_percent=12.345),
                "experiments.sales-companion.rollout_percent", "two decimals", id="percent-three-decimals",
            ),
            pytest.param(
                lambda r: _experiment(r).update(rollout_percent=float("nan")),
                "experiments.sales-companion.rollout_percent", "finite", id="percent-nan",
            ),
            pytest.param(
                lambda r: _experiment(r).update(rollout_percent=float("inf")),
                "experiments.sales-companion.rollout_percent", "finite", id="percent-inf",
            ),
            pytest.param(
                lambda r: _experiment(r).update(rollout_percent=True),
                "experiments.sales-companion.rollout_percent", "number", id="percent-yes",
            ),
            pytest.param(
                lambda r: _experiment(r).update(rollout_percent="ten"),
                "experiments.sales-companion.rollout_percent", "number", id="percent-text",
            ),
            pytest.param(
                lambda r: _experiment(r).update(slat="sales-v3"),
                "experiments.sales-companion.slat", "unknown key", id="typo-in-experiment",
            ),
            pytest.param(
                lambda r: r.update(servr=r.pop("server")), "servr", "unknown key", id="typo-at-top-level",
            ),
            pytest.param(
                lambda r: r.update(experiment=r.pop("experiments")),
                "experiment", "unknown key", id="misspelt-required-section",  # the typo, not its effect
            ),
            pytest.param(
                lambda r: r["upstreams"]["mock-base"].update(timeout=5),
                "upstreams.mock-base.timeout", "unknown key", id="typo-in-upstream",
            ),
            pytest.param(
                lambda r: r["upstreams"]["mock-base"].update(base_url="127.0.0.1:9001/v1"),
                "upstreams.mock-base.base_url", "http:// or https://", id="base-url-without-scheme",
            ),
            pytest.param(
                lambda r: r["upstreams"]["mock-base"].update(base_url="ftp://127.0.0.1/v1"),
                "upstreams.mock-base.base_url", "http:// or https://", id="base-url-wrong-scheme",
            ),
            pytest.param(
                lambda r: r.pop("models"), "models", "required", id="missing-section",
            ),
            pytest.param(
                lambda r: _experiment(r).update(aliases=[]),
                "experiments.sales-companion.aliases", "at least 1", id="no-aliases",
            ),
            pytest.param(
                lambda r: r["upstreams"]["mock-base"].update(retries=6),
                "upstreams.mock-base.retries", "less than or equal to 5", id="too-many-retries",
            ),
            pytest.param(
                lambda r: r["upstreams"]["mock-base"].update(max_in_flight=0),
                "upstreams.mock-base.max_in_flight", "greater than or equal to 1", id="zero-upstream-in-flight",
            ),
            pytest.param(
                lambda r: r.update(client_auth={"key_sha256": ["sk-the-key-itself"]}),
                "client_auth.key_sha256", "not a 64-character hex SHA-256", id="client-key-not-hashed",
            ),
            pytest.param(
                lambda r: r.update(server={"max_body_bytes": 10}),
                "server.max_body_bytes", "greater than or equal to 1024", id="tiny-body-limit",
            ),
            pytest.param(
                lambda r: r.update(admin={"rate_limit_per_minute": -1}),
                "admin.rate_limit_per_minute", "greater than or equal to 0", id="negative-admin-rate",
            ),
            pytest.param(
                lambda r: r["upstreams"]["mock-base"].update(timeout_s=0),
                "upstreams.mock-base.timeout_s", "greater than 0", id="zero-timeout",
            ),
            pytest.param(
                lambda r: r["server"].update(port=70000), "server.port", "65535", id="port-out-of-range",
            ),
        ],
    )  # fmt: skip
    def test_one_line_naming_the_key(self, mutate: Mutation, key: str, problem: str) -> None:
        """Each mistake gives one line, no traceback, naming the key path and the problem."""
        _assert_names_key(mutate, key, problem)

    def test_duplicate_alias_names_both_experiments(self) -> None:
        """An alias routed by two experiments names the alias and both experiments."""
        raw = _local()
        raw["experiments"]["support-bot"] = {
            "aliases": ["support", "gpt-4o-mini"],
            "control": "base",
            "treatment": "finetuned",
        }
        message = _config_error(raw)
        assert "experiments.support-bot.aliases" in message
        assert "'gpt-4o-mini'" in message
        assert "experiments.sales-companion" in message

    def test_missing_env_var_names_key_and_variable(self) -> None:
        """An upstream whose api_key_env is unset names the key path and the variable."""
        with pytest.raises(ConfigError) as info:
            load_settings(EXAMPLE, {})
        message = _one_line(str(info.value))
        assert "upstreams.openai.api_key_env" in message
        assert "OPENAI_API_KEY" in message

    def test_empty_env_var_counts_as_missing(self) -> None:
        """OPENAI_API_KEY set to "" is as good as unset: no upstream is called with an empty key."""
        with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
            load_settings(EXAMPLE, {"OPENAI_API_KEY": ""})

    def test_bad_yaml_names_the_file_and_line(self, tmp_path: Path) -> None:
        """Unparseable YAML names the file and the line of the problem."""
        path = tmp_path / "bad.yaml"
        path.write_text("upstreams:\n  openai: {base_url: x\nmodels: [\n")
        with pytest.raises(ConfigError) as info:
            load_settings(path, {})
        message = _one_line(str(info.value))
        assert str(path) in message and "not valid YAML" in message and "line " in message

    def test_missing_file(self, tmp_path: Path) -> None:
        """A path that does not exist says it cannot be read, naming it."""
        path = tmp_path / "absent.yaml"
        with pytest.raises(ConfigError) as info:
            load_settings(path, {})
        message = _one_line(str(info.value))
        assert f"cannot read {path}" in message

    @pytest.mark.parametrize(
        "text", ["- a\n- b\n", "just a string\n", "", "42\n"], ids=["list", "scalar", "empty", "number"]
    )
    def test_non_mapping_file(self, tmp_path: Path, text: str) -> None:
        """A file that is not a mapping says what it must be."""
        path = tmp_path / "weird.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(path, {})
        assert "must be a mapping" in _one_line(str(info.value))

    def test_no_config_path(self) -> None:
        """With neither --config nor ABPROXY_CONFIG, the error says how to give one."""
        with pytest.raises(ConfigError) as info:
            config_path(None, {})
        message = _one_line(str(info.value))
        assert "--config" in message and "ABPROXY_CONFIG" in message

    def test_config_path_precedence(self) -> None:
        """--config wins over ABPROXY_CONFIG, which is used when --config is absent."""
        assert config_path("a.yaml", {"ABPROXY_CONFIG": "b.yaml"}) == "a.yaml"
        assert config_path(None, {"ABPROXY_CONFIG": "b.yaml"}) == "b.yaml"


class TestCommandLine:
    def _serve(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "serve", *args],
            capture_output=True, text=True, timeout=30, env=env, cwd=ROOT,
        )  # fmt: skip

    def test_bad_file_stops_serve_with_one_line(self, tmp_path: Path) -> None:
        """`abproxy serve --config bad.yaml` exits non-zero with exactly one stderr line naming the key."""
        raw = _local()
        _experiment(raw)["rollout_percent"] = 150
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        result = self._serve("--config", str(path), "--port", "1")
        assert result.returncode != 0
        lines = result.stderr.splitlines()
        assert lines == ["config error: experiments.sales-companion.rollout_percent: must be between 0 and 100"], (
            result.stderr
        )
        assert result.stdout == ""

    def test_missing_env_var_stops_serve_with_one_line(self) -> None:
        """`abproxy serve` on the example without its key exits non-zero naming key and variable."""
        env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
        result = self._serve("--config", str(EXAMPLE), "--port", "1", env=env)
        assert result.returncode != 0
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "upstreams.openai.api_key_env" in result.stderr and "OPENAI_API_KEY" in result.stderr


class TestEnvironment:
    def test_redis_url_and_admin_token_are_read(self) -> None:
        """REDIS_URL and ABPROXY_ADMIN_TOKEN from the environment reach the settings."""
        env = {**EXAMPLE_ENV, "REDIS_URL": "redis://10.0.0.9:6380/3", "ABPROXY_ADMIN_TOKEN": "adm-secret"}
        settings = load_settings(EXAMPLE, env)
        assert settings.redis_url == "redis://10.0.0.9:6380/3"
        assert settings.admin_token == "adm-secret"

    def test_redis_url_env_overrides_the_file(self) -> None:
        """REDIS_URL wins over a redis_url written in the file."""
        raw = _local()
        raw["redis_url"] = "redis://from-file:6379/0"
        assert settings_from_dict(raw, {}).redis_url == "redis://from-file:6379/0"
        assert (
            settings_from_dict(
                _local() | {"redis_url": "redis://from-file:6379/0"}, {"REDIS_URL": "redis://env:1/0"}
            ).redis_url
            == "redis://env:1/0"
        )

    def test_empty_admin_token_disables_admin(self) -> None:
        """ABPROXY_ADMIN_TOKEN="" means no token (admin refused), never an empty password."""
        assert settings_from_dict(_local(), {"ABPROXY_ADMIN_TOKEN": ""}).admin_token is None

    def test_client_key_digests_and_read_token_from_the_environment(self) -> None:
        """ABPROXY_CLIENT_KEY_SHA256 adds to client_auth.key_sha256 (lower-cased); a bad entry names the variable."""
        digest = "AB" * 32
        raw = _local() | {"client_auth": {"key_sha256": ["cd" * 32]}}
        env = {"ABPROXY_CLIENT_KEY_SHA256": f" {digest} ,", "ABPROXY_ADMIN_READ_TOKEN": "r"}
        settings = settings_from_dict(raw, env)
        assert settings.client_auth.key_sha256 == ["cd" * 32, "ab" * 32]
        assert settings.admin_read_token == "r"
        message = _config_error(_local(), {"ABPROXY_CLIENT_KEY_SHA256": "sk-raw-key"})
        assert message.startswith("config error: ABPROXY_CLIENT_KEY_SHA256:") and "sk-raw" not in message

    def test_process_environment_is_the_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without an injected mapping, load_settings reads os.environ."""
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-os-environ")
        monkeypatch.setenv("REDIS_URL", "redis://os-environ:6379/1")
        settings = load_settings(EXAMPLE)
        assert settings.upstreams["openai"].api_key == "sk-from-os-environ"
        assert settings.redis_url == "redis://os-environ:6379/1"

    def test_secrets_never_appear_in_repr_or_dump(self) -> None:
        """api_key, admin_token and the user hash key are absent from repr, str, model_dump and JSON."""
        env = {
            "OPENAI_API_KEY": "sk-top-secret-1",
            "ABPROXY_ADMIN_TOKEN": "adm-top-secret-2",
            "ABPROXY_USER_HASH_KEY": "hk-secret-3",
        }
        settings = load_settings(EXAMPLE, env)
        assert settings.user_hash_key == "hk-secret-3"
        for rendered in (repr(settings), str(settings), repr(settings.model_dump()), settings.model_dump_json(),
                         repr(settings.upstreams["openai"])):  # fmt: skip
            for secret in env.values():
                assert secret not in rendered

    def test_settings_type(self) -> None:
        """load_settings returns Settings (the validated type the runtime takes)."""
        assert isinstance(load_settings(LOCAL, {}), Settings)


class TestMetricsAndEventSettings:
    def test_defaults(self) -> None:
        """No metrics_port (metrics on the serving port); the Redis Stream sink off, key abproxy:events."""
        settings = load_settings(EXAMPLE, EXAMPLE_ENV)
        assert settings.server.metrics_port is None
        stream = settings.events.redis_stream
        assert stream.enabled is False
        assert stream.key == "abproxy:events"
        assert stream.maxlen >= 1

    def test_prometheus_enabled_defaults_to_true_and_is_read(self) -> None:
        """server.prometheus_enabled is true unless the file turns it off."""
        assert load_settings(EXAMPLE, EXAMPLE_ENV).server.prometheus_enabled is True
        raw = _local()
        raw["server"]["prometheus_enabled"] = False
        assert settings_from_dict(raw, {}).server.prometheus_enabled is False

    def test_metrics_port_and_stream_are_read(self) -> None:
        """A distinct metrics_port and a redis_stream section reach the settings as written."""
        raw = _local()
        raw["server"]["metrics_port"] = 9091
        raw["events"] = {"redis_stream": {"enabled": True, "key": "ab:ev", "maxlen": 1000}}
        settings = settings_from_dict(raw, {})
        assert settings.server.metrics_port == 9091
        assert (settings.events.redis_stream.enabled, settings.events.redis_stream.key) == (True, "ab:ev")
        assert settings.events.redis_stream.maxlen == 1000

    @pytest.mark.parametrize(
        ("mutate", "key", "problem"),
        [
            pytest.param(
                lambda r: r["server"].update(metrics_port=8080),
                "server.metrics_port", "must differ from server.port (8080)", id="metrics-port-equals-port",
            ),
            pytest.param(
                lambda r: r.update(server={"metrics_port": 8080}),
                "server.metrics_port", "must differ from server.port (8080)", id="metrics-port-equals-default-port",
            ),
            pytest.param(
                lambda r: r["server"].update(metrics_port=0),
                "server.metrics_port", "greater than or equal to 1", id="metrics-port-zero",
            ),
            pytest.param(
                lambda r: r["server"].update(metrics_port=65536),
                "server.metrics_port", "65535", id="metrics-port-above-range",
            ),
            pytest.param(
                lambda r: r["server"].update(prometheus_enabled=False, metrics_port=9091),
                "server.metrics_port", "must be unset when server.prometheus_enabled is false",
                id="metrics-port-with-prometheus-off",
            ),
            pytest.param(
                lambda r: r["server"].update(prometheus_enabled="sometimes"),
                "server.prometheus_enabled", "boolean", id="prometheus-enabled-not-a-bool",
            ),
            pytest.param(
                lambda r: r.update(events={"redis_stream": {"enabled": True, "maxlenn": 10}}),
                "events.redis_stream.maxlenn", "unknown key", id="redis-stream-unknown-key",
            ),
            pytest.param(
                lambda r: r.update(events={"redis_stream": {"maxlen": 0}}),
                "events.redis_stream.maxlen", "greater than or equal to 1", id="redis-stream-maxlen-zero",
            ),
        ],
    )  # fmt: skip
    def test_one_line_naming_the_key(self, mutate: Mutation, key: str, problem: str) -> None:
        """Each metrics or event-stream mistake gives one line naming the key path and the problem."""
        _assert_names_key(mutate, key, problem)

    def test_serve_refuses_metrics_port_equal_to_the_port_flag(self, tmp_path: Path) -> None:
        """`serve --port P` with server.metrics_port P (server.port elsewhere) exits 2 with one line."""
        raw = _local()
        raw["server"]["metrics_port"] = 18081
        path = tmp_path / "metrics.yaml"
        path.write_text(yaml.safe_dump(raw))
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "18081"],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("config error: server.metrics_port: ")


def _with_outcomes(raw: dict[str, Any]) -> dict[str, Any]:
    raw["metrics"] = {"task_completed": {"type": "boolean"}, "csat": {"type": "float", "min": 1, "max": 5}}
    raw["events"] = {"redis_stream": {"enabled": True}}
    _experiment(raw).pop("analysis", None)
    return raw


class TestAnalysisKeys:
    """Outcome metrics, the per-experiment analysis plan, the store and feedback: issue 5's keys."""

    def test_defaults(self) -> None:
        settings = load_settings(EXAMPLE, EXAMPLE_ENV)
        assert settings.metrics == {} and settings.store.url == "sqlite:///abproxy.db"
        analysis = settings.experiments["sales-companion"].analysis
        assert analysis.primary_metric is None and analysis.alpha == 0.05 and not analysis.store_prompts
        assert load_settings(LOCAL, {}).experiments["sales-companion"].analysis.primary_metric == "task_completed"
        assert set(analysis.guardrails) == {"error_rate", "latency_p95", "cost_per_query"}
        assert settings.feedback.ttl_s == 7 * 24 * 3600 and settings.collector.group == "abproxy-collector"

    def test_a_full_plan_loads(self) -> None:
        raw = _with_outcomes(_local())
        _experiment(raw)["analysis"] = {
            "primary_metric": "task_completed", "secondary_metrics": ["csat", "regenerated"], "mde": 0.05,
            "planned_users_per_variant": 1200, "guardrails": {"ttft_p95": {"max_ratio": 1.1}},
            "success_metric": "task_completed", "store_prompts": True,
        }
        analysis = settings_from_dict(raw, {}).experiments["sales-companion"].analysis
        assert analysis.secondary_metrics == ["csat", "regenerated"] and analysis.store_prompts
        assert analysis.guardrails["ttft_p95"].max_ratio == 1.1

    def test_store_url_and_signing_key_from_the_environment(self) -> None:
        env = {"ABPROXY_STORE_URL": "postgresql://u@db/abproxy", "ABPROXY_SIGNING_KEY": "s3cret"}
        settings = settings_from_dict(_local(), env)
        assert settings.store.url == "postgresql://u@db/abproxy" and settings.signing_key == "s3cret"
        assert "s3cret" not in repr(settings) and "s3cret" not in settings.model_dump_json()

    @pytest.mark.parametrize(
        ("mutate", "key", "problem"),
        [
            pytest.param(lambda r: r.pop("events"), "events.redis_stream.enabled", "must be true",
                         id="metrics-without-stream"),
            pytest.param(lambda r: r["metrics"].update(nps={"type": "integer"}), "metrics.nps.type",
                         "'boolean' or 'float'", id="unknown-type"),
            pytest.param(lambda r: r["metrics"].update(ok={"type": "boolean", "max": 1}), "metrics.ok",
                         "float metrics only", id="range-on-boolean"),
            pytest.param(lambda r: r["metrics"].update(x={"type": "float", "min": 5, "max": 1}), "metrics.x",
                         "above max", id="min-above-max"),
            pytest.param(lambda r: r["metrics"].update(error={"type": "boolean"}), "metrics.error",
                         "derives itself", id="reserved-name"),
            pytest.param(lambda r: r["metrics"].update({"a b": {"type": "boolean"}}), "metrics.a b",
                         "names are", id="bad-name"),
            pytest.param(lambda r: r["metrics"].update(ok={"type": "boolean", "level": "session"}),
                         "metrics.ok.level", "'request' or 'user'", id="bad-level"),
            pytest.param(lambda r: _experiment(r).update(analysis={"primary_metric": "nps"}),
                         "experiments.sales-companion.analysis.primary_metric", "unknown metric 'nps'",
                         id="unknown-primary"),
            pytest.param(lambda r: _experiment(r).update(analysis={"secondary_metrics": ["csat", "nps"]}),
                         "experiments.sales-companion.analysis.secondary_metrics.1", "unknown metric 'nps'",
                         id="unknown-secondary"),
            pytest.param(lambda r: _experiment(r).update(analysis={"primary_metric": "csat",
                                                                   "secondary_metrics": ["csat"]}),
                         "experiments.sales-companion.analysis.secondary_metrics", "already the primary",
                         id="primary-also-secondary"),
            pytest.param(lambda r: _experiment(r).update(analysis={"success_metric": "csat"}),
                         "experiments.sales-companion.analysis.success_metric", "must be a boolean",
                         id="float-success-metric"),
            pytest.param(lambda r: _experiment(r).update(analysis={"guardrails": {"latency_p42": {"max_ratio": 2}}}),
                         "experiments.sales-companion.analysis.guardrails.latency_p42", "unknown guardrail",
                         id="unknown-guardrail"),
            pytest.param(lambda r: _experiment(r).update(analysis={"guardrails": {"error_rate": {}}}),
                         "experiments.sales-companion.analysis.guardrails.error_rate", "exactly one",
                         id="guardrail-without-margin"),
            pytest.param(lambda r: _experiment(r).update(analysis={"guardrails": {"error_rate": {
                "max_ratio": 1.2, "max_regression": 0.01}}}),
                         "experiments.sales-companion.analysis.guardrails.error_rate", "exactly one",
                         id="guardrail-two-margins"),
            pytest.param(lambda r: _experiment(r).update(analysis={"alpha": 0.7}),
                         "experiments.sales-companion.analysis.alpha", "less than 0.5", id="alpha"),
            pytest.param(lambda r: _experiment(r).update(analysis={"mde": 0}),
                         "experiments.sales-companion.analysis.mde", "greater than 0", id="mde"),
            pytest.param(lambda r: r.update(store={"url": "mysql://db/x"}), "store.url", "sqlite:/// or postgresql",
                         id="store-url"),
            pytest.param(lambda r: r.update(feedback={"ttl_s": 0}), "feedback.ttl_s", "greater than or equal to 1",
                         id="feedback-ttl"),
        ],
    )
    def test_one_line_naming_the_key(self, mutate: Mutation, key: str, problem: str) -> None:
        _assert_names_key(lambda r: mutate(_with_outcomes(r)), key, problem)
