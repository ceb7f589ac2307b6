"""Offline evaluation, piece by piece: scoring, format checks, the test file, the runner against real mock
upstreams and a real SQLite store, and the report's ordering and verdicts. The CLI end to end is in
tests/test_eval_cli.py."""

from __future__ import annotations

import asyncio
import difflib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from sqlalchemy import Engine, func, select

from proxy.config import Settings, load_settings
from proxy.offline_eval import checks as checks_module
from proxy.offline_eval.checks import CheckFileError, FormatCheck, FormatChecks, load_checks
from proxy.offline_eval.report import compare_runs, run_report
from proxy.offline_eval.runner import model_specs, run_eval
from proxy.offline_eval.runs import Result, Scoring, default_run_id, load_run, open_run
from proxy.offline_eval.scoring import normalise, score, similarity
from proxy.offline_eval.testset import TestFileError, load_test_set
from proxy.store import schema
from proxy.store.db import engine_for, migrate
from tests.harness import MockUpstream, proxy_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "examples" / "eval" / "icd10.jsonl"
FORMAT = ROOT / "examples" / "eval" / "format.yaml"
ENV = {"BASE_KEY": "k", "FT_KEY": "k"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _example(note: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": "Code it."}, {"role": "user", "content": note},
                         {"role": "assistant", "content": answer}], **extra}  # fmt: skip


# -- scoring ---------------------------------------------------------------------------------------------------------


class TestScoring:
    def test_exact_match_strips_and_optionally_folds_case(self) -> None:
        assert score("  I10: Essential hypertension\n", "I10: Essential hypertension", checks=None).exact
        assert not score("i10: essential hypertension", "I10: Essential hypertension", checks=None).exact
        assert score("i10: essential hypertension", "I10: Essential hypertension", checks=None, casefold=True).exact
        assert score("STRASSE", "straße", checks=None, casefold=True).exact  # casefold, not lower()

    def test_unicode_forms_compare_equal(self) -> None:
        composed, decomposed = "caf\u00e9", "cafe\u0301"
        assert composed != decomposed and normalise(composed) == normalise(decomposed)
        assert score(decomposed, composed, checks=None).exact

    def test_inner_whitespace_and_line_order_count(self) -> None:
        assert not score("A: x\nB: y", "B: y\nA: x", checks=None).exact
        assert not score("A:  x", "A: x", checks=None).exact

    @pytest.mark.parametrize(("expected", "prediction"), [
        ("I10: Essential (primary) hypertension", "I10: Essential hypertension"),
        ("E11.9: Type 2 diabetes\nI10: Essential (primary) hypertension", "Sure! E11.9; I10."),
        ("abc", ""), ("", ""), ("same", "same"),
        ("x" * 300 + "tail", "x" * 290 + "tail"),  # past difflib's 200-character autojunk threshold
    ])  # fmt: skip
    def test_similarity_is_difflibs_ratio_expected_first(self, expected: str, prediction: str) -> None:
        reference = difflib.SequenceMatcher(None, expected, prediction).ratio()
        assert similarity(expected, prediction) == reference
        assert score(prediction, expected, checks=None).similarity == reference

    def test_similarity_uses_the_normalised_texts(self) -> None:
        assert score("  ABC \n", "abc", checks=None, casefold=True).similarity == 1.0


# -- format checks ---------------------------------------------------------------------------------------------------


class TestFormatChecks:
    def test_shipped_checks(self) -> None:
        checks = load_checks(FORMAT)
        assert checks.failures("I10: Essential (primary) hypertension\nE78.5: Hyperlipidemia, unspecified") == []
        assert checks.failures("  S93.401A: Sprain of ankle  \n") == []  # surrounding whitespace is stripped
        chatty = "Sure! Here are the codes: I10: Essential (primary) hypertension."
        assert checks.failures(chatty) == ['one "CODE: description" per line']
        twice = "I10: Essential (primary) hypertension\nI10: Essential (primary) hypertension"
        assert checks.failures(twice) == ["no code listed twice"]  # the entry point shipped in pyproject.toml
        assert checks.failures("") == ['one "CODE: description" per line']  # no line is no code

    def test_line_regex_applies_to_blank_lines_too(self, tmp_path: Path) -> None:
        checks = load_checks(_write(tmp_path / "f.yaml", "checks: [{line_regex: '[A-Z]\\d+'}]"))
        assert checks.failures("A1\nB2") == []
        assert checks.failures("A1\n\nB2") == ["every line matches [A-Z]\\d+"]

    def test_whole_output_regex_must_match_in_full(self, tmp_path: Path) -> None:
        checks = load_checks(_write(tmp_path / "f.yaml", "checks: [{name: verdict, regex: '(yes|no)'}]"))
        assert checks.failures("yes") == [] and checks.failures("yes, surely") == ["verdict"]

    def test_json_schema_inline_and_from_a_file(self, tmp_path: Path) -> None:
        schema_file = tmp_path / "schema.json"
        schema_file.write_bytes(orjson.dumps({"type": "object", "required": ["label"],
                                              "properties": {"label": {"enum": ["spam", "ham"]}}}))  # fmt: skip
        spec = {"checks": [{"name": "inline", "json_schema": {"type": "object", "required": ["label"]}},
                           {"name": "file", "json_schema_file": "schema.json"}]}  # fmt: skip
        checks = load_checks(_write(tmp_path / "f.yaml", yaml.safe_dump(spec)))
        assert checks.failures('{"label": "spam"}') == []
        assert checks.failures('{"label": "eggs"}') == ["file"]
        assert checks.failures('{"other": 1}') == ["inline", "file"]
        assert checks.failures("not json") == ["inline", "file"]
        assert checks.failures('{"label": NaN}') == ["inline", "file"]  # NaN is not JSON
        # The file's schema is kept inline with the run, so a report does not depend on the file staying put.
        assert checks.declared[1] == {"name": "file", "json_schema": orjson.loads(schema_file.read_bytes())}

    def test_json_schema_formats_are_asserted(self, tmp_path: Path) -> None:
        spec = {"checks": [{"json_schema": {"type": "object", "properties": {"day": {"format": "date"}}}}]}
        checks = load_checks(_write(tmp_path / "f.yaml", yaml.safe_dump(spec)))
        assert checks.failures('{"day": "2026-11-23"}') == []
        assert checks.failures('{"day": "next tuesday"}') == ["valid JSON matching the schema"]

    @pytest.mark.parametrize(("text", "key"), [
        ("checks: [{line_regex: '(unclosed'}]", "checks.0.line_regex: invalid regex"),
        ("checks: [{regex: a, line_regex: b}]", "checks.0: Value error, give exactly one of"),
        ("checks: [{name: x}]", "checks.0: Value error, give exactly one of"),
        ("checks: [{regex: a, colour: red}]", "checks.0.colour: Extra inputs are not permitted"),
        ("checks: []", "checks: List should have at least 1 item"),
        ("chekcs: [{regex: a}]", "chekcs: Extra inputs are not permitted"),
        ("checks: [{json_schema: {type: 12}}]", "checks.0.json_schema: not a valid JSON Schema"),
        ("checks: [{json_schema_file: missing.json}]", "checks.0.json_schema_file: cannot read"),
        ("checks: [{entry_point: no_such_check}]", "checks.0.entry_point: no entry point 'no_such_check'"),
        ("checks: [{name: a, regex: x}, {name: a, regex: y}]", "two checks are named 'a'"),
        ("checks: [{regex: 'a'", "not valid YAML"),
    ])  # fmt: skip
    def test_a_bad_file_names_the_key(self, tmp_path: Path, text: str, key: str) -> None:
        path = _write(tmp_path / "format.yaml", text)
        with pytest.raises(CheckFileError) as raised:
            load_checks(path)
        message = str(raised.value)
        assert message.startswith(f"{path}: ") and key in message and "\n" not in message

    def test_a_raising_custom_check_fails_the_answer_by_name(self) -> None:
        def broken(answer: str) -> bool:
            raise KeyError(answer)

        checks = FormatChecks((FormatCheck("mine", broken), FormatCheck("len", lambda t: len(t) < 5)), [])
        assert checks.failures("hello world") == ["mine (raised KeyError)", "len"]

    def test_entry_points_resolve_through_the_installed_metadata(self) -> None:
        assert checks_module._entry_point("distinct_lines") is checks_module.distinct_lines


# -- the test file ---------------------------------------------------------------------------------------------------


class TestTestFile:
    def test_shipped_set(self) -> None:
        test = load_test_set(SHIPPED)
        assert len(test.examples) == 40 and len({e.id for e in test.examples}) == 40
        assert all(e.prompt[-1]["role"] == "user" and e.expected for e in test.examples)
        assert [e.position for e in test.examples] == list(range(40))

    def test_prompt_is_all_but_the_last_message_and_ids_follow_content(self, tmp_path: Path) -> None:
        rows = [_example("Note: a", "A00: x", id="first"), _example("Note: b", "B00: y")]
        test = load_test_set(_jsonl(tmp_path / "t.jsonl", rows))
        first, second = test.examples
        assert first.id == "first" and first.expected == "A00: x"
        assert first.prompt == rows[0]["messages"][:-1]
        # The same example elsewhere in another file keeps its id: runs pair answers by content.
        moved = load_test_set(_jsonl(tmp_path / "u.jsonl", [_example("Note: c", "C"), rows[1]]))
        assert moved.examples[1].id == second.id and moved.examples[1].line == 2

    def test_system_prompt_replaces_or_comes_first(self, tmp_path: Path) -> None:
        bare = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        test = load_test_set(_jsonl(tmp_path / "t.jsonl", [_example("q1", "a1"), bare]), system_prompt="Be terse.")
        assert [m["content"] for m in test.examples[0].prompt] == ["Be terse.", "q1"]
        assert [m["content"] for m in test.examples[1].prompt] == ["Be terse.", "q"]

    def test_training_only_keys_are_not_sent(self, tmp_path: Path) -> None:
        row = {"messages": [{"role": "user", "content": "q", "weight": 0},
                            {"role": "assistant", "content": "a", "weight": 1}]}  # fmt: skip
        sent = load_test_set(_jsonl(tmp_path / "t.jsonl", [row])).examples[0].prompt
        assert sent == [{"role": "user", "content": "q"}]

    def test_every_bad_line_is_named_and_nothing_is_used(self, tmp_path: Path) -> None:
        path = tmp_path / "t.jsonl"
        good = orjson.dumps(_example("q", "a"))
        path.write_bytes(b"\n".join([
            good, b"{not json", b"[1]", orjson.dumps({"messages": [{"role": "user", "content": "q"}]}),
            orjson.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}]}),
            orjson.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}),
            good, orjson.dumps({**_example("z", "a"), "id": "has space"}),
        ]))  # fmt: skip
        with pytest.raises(TestFileError) as raised:
            load_test_set(path)
        message = str(raised.value)
        assert [f"line {n}:" in message for n in range(1, 9)] == [False] + [True] * 5 + [False] * 2
        assert message.endswith("(and 2 more)")  # line 7 repeats line 1, line 8's id has a space
        path.write_bytes(b"\n".join([good, good]))
        with pytest.raises(TestFileError, match="line 2: repeats the example of line 1"):
            load_test_set(path)

    def test_empty_or_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(TestFileError, match="no examples"):
            load_test_set(_write(tmp_path / "t.jsonl", "\n\n"))
        with pytest.raises(TestFileError, match="cannot read"):
            load_test_set(tmp_path / "nope.jsonl")


# -- the runner, against mock upstreams and a SQLite store -------------------------------------------------------------


def _settings(tmp_path: Path, base: MockUpstream, finetuned: MockUpstream) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(proxy_config(base, finetuned)))
    return load_settings(path, ENV)


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = engine_for(f"sqlite:///{tmp_path / 'store.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


def _run(engine: Engine, settings: Settings, test_file: Path, *, waits: list[float] | None = None,
         checks: FormatChecks | None = None, **options: Any) -> Any:  # fmt: skip
    test = load_test_set(test_file)
    specs = model_specs(settings, ["base", "finetuned"])
    clock = itertools.count(1000.0)

    async def record(seconds: float) -> None:
        if waits is not None:
            waits.append(seconds)

    run_id = options.pop("run_id", None) or default_run_id(test, specs, None, 512)
    return asyncio.run(run_eval(engine, settings, test, specs, run_id=run_id, scoring=Scoring(False, checks),
                                now=lambda: next(clock), sleep=record, **options))  # fmt: skip


class TestRunner:
    def test_retry_after_is_honoured_for_429_and_5xx(self, tmp_path: Path, engine: Engine) -> None:
        limited = MockUpstream("limited", tmp_path, answers=str(SHIPPED), fail_first=2, fail_status=429, retry_after=2)
        failing = MockUpstream("failing", tmp_path, answers=str(SHIPPED), fail_first=1, fail_status=503, retry_after="")
        limited.start()
        failing.start()
        try:
            waits: list[float] = []
            outcome = _run(engine, _settings(tmp_path, limited, failing), SHIPPED, waits=waits, concurrency=1)
            assert (outcome.answered, outcome.failed, outcome.retries) == (80, 0, 3)
            # Retry-After: 2 twice from the 429s; the 503 without one backs off from half a second.
            assert sorted(waits) == [0.5, 2.0, 2.0]
            assert limited.stats()["requests"] == 40 + 2 and failing.stats()["requests"] == 40 + 1
            with engine.connect() as conn:
                attempts = conn.execute(select(func.sum(schema.eval_results.c.attempts))).scalar()
            assert attempts == 80 + 3
        finally:
            limited.stop()
            failing.stop()

    def test_failures_are_not_stored_and_are_asked_again(self, tmp_path: Path, engine: Engine) -> None:
        healthy = MockUpstream("healthy", tmp_path, answers=str(SHIPPED))
        # 40 examples, 1 retry each: 80 failures, then the upstream is back.
        down = MockUpstream("down", tmp_path, answers=str(SHIPPED), fail_first=80, fail_status=500)
        healthy.start()
        down.start()
        try:
            settings = _settings(tmp_path, healthy, down)
            first = _run(engine, settings, SHIPPED, retries=1)
            assert (first.answered, first.failed) == (40, 40)
            assert first.first_error and "finetuned" in first.first_error and "500" in first.first_error
            with engine.connect() as conn:
                stored = conn.execute(select(schema.eval_results.c.model).distinct()).scalars().all()
            assert stored == ["base"]
            second = _run(engine, settings, SHIPPED)
            assert (second.skipped_existing, second.answered, second.failed) == (40, 40, 0)
            assert healthy.stats()["requests"] == 40 and down.stats()["requests"] == 80 + 40
        finally:
            healthy.stop()
            down.stop()

    def test_stored_answers_match_the_mock_and_the_pricing(self, tmp_path: Path, engine: Engine) -> None:
        base = MockUpstream("base", tmp_path, answers=str(SHIPPED), skill=0.35)
        finetuned = MockUpstream("finetuned", tmp_path, answers=str(SHIPPED), skill=0.85)
        base.start()
        finetuned.start()
        try:
            settings = _settings(tmp_path, base, finetuned)
            outcome = _run(engine, settings, SHIPPED, checks=load_checks(FORMAT))
            run = load_run(engine, outcome.run_id)
            assert run is not None and run.answered == 80
            sent = {r["body"]["messages"][-1]["content"]: r["body"] for r in finetuned.requests()}
            for example in run.examples:
                body = sent.get(example.prompt[-1]["content"])
                if body is not None:  # the mock keeps the last 50 requests
                    assert body["temperature"] == 0 and body["max_tokens"] == 512
                    assert body["messages"] == example.prompt and body["model"] == settings.models["finetuned"].model
            pricing = settings.models["finetuned"].pricing
            for result in run.results["finetuned"].values():
                assert result.prompt_tokens and result.completion_tokens
                assert result.cost_usd == pytest.approx(pricing.cost_usd(result.prompt_tokens,
                                                                         result.completion_tokens))  # fmt: skip
            assert outcome.cost_usd == pytest.approx(sum(r.cost_usd or 0 for m in run.results.values()
                                                         for r in m.values()))  # fmt: skip
            report = run_report(run)
            comparison = report.comparisons[0]
            assert comparison.verdict == "better" and comparison.exact.p_value < 0.01
            assert comparison.format is not None and comparison.format.p_value < 0.01
            assert comparison.regressions and comparison.changes[0].change == "regressed"
            assert report.models[1].exact_rate > report.models[0].exact_rate + 0.3
        finally:
            base.stop()
            finetuned.stop()

    def test_a_run_name_that_asked_something_else_is_refused(self, tmp_path: Path, engine: Engine) -> None:
        test = load_test_set(SHIPPED)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(proxy_config(MockUpstream("a", tmp_path), MockUpstream("b", tmp_path))))
        specs = model_specs(load_settings(path, ENV), ["base", "finetuned"])
        scoring = Scoring(False, None)
        open_run(engine, "r1", test, specs, system_prompt=None, max_tokens=512, scoring=scoring, now=1.0)
        with pytest.raises(ValueError, match="another system prompt and max_tokens"):
            open_run(engine, "r1", test, specs, system_prompt="x", max_tokens=64, scoring=scoring, now=2.0)
        with pytest.raises(ValueError, match="another models"):
            open_run(engine, "r1", test, specs[::-1], system_prompt=None, max_tokens=512, scoring=scoring, now=2.0)
        with pytest.raises(ValueError, match="run name must be"):
            open_run(engine, "has space", test, specs, system_prompt=None, max_tokens=512, scoring=scoring, now=2.0)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(schema.eval_runs)).scalar() == 1
        assert default_run_id(test, specs, None, 512) != default_run_id(test, specs, None, 256)
        assert default_run_id(test, specs, None, 512).startswith("icd10-")

    def test_unknown_or_repeated_models(self, tmp_path: Path) -> None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(proxy_config(MockUpstream("a", tmp_path), MockUpstream("b", tmp_path))))
        settings = load_settings(path, ENV)
        with pytest.raises(ValueError, match="no model named 'gpt5'"):
            model_specs(settings, ["base", "gpt5"])
        with pytest.raises(ValueError, match="named twice"):
            model_specs(settings, ["base", "base"])


# -- the report: ordering and verdicts, on hand-made results -------------------------------------------------


def _result(model: str, example_id: str, *, exact: bool, fmt: bool | None, sim: float, latency: float = 10.0) -> Result:
    return Result(model=model, example_id=example_id, prediction=f"{model}:{example_id}", finish_reason="stop",
                  exact=exact, format_ok=fmt, format_failures=[] if fmt in (True, None) else ["f"], similarity=sim,
                  latency_ms=latency, prompt_tokens=10, completion_tokens=5, cost_usd=0.001, attempts=1,
                  created_at=1.0)  # fmt: skip


Outcome = tuple[bool, bool | None, float]  # exact, format ok, similarity


def _fake_run(tmp_path: Path, rows: list[tuple[Outcome, Outcome]], name: str = "r", notes: str = "note") -> Any:
    """A run of hand-made results: examples "<notes> <i>", models base (the baseline) and ft."""
    from proxy.offline_eval.runs import ModelSpec, Run

    examples = [_example(f"{notes} {i}", f"a{i}") for i in range(len(rows))]
    test = load_test_set(_jsonl(tmp_path / f"{name}.jsonl", examples))
    results: dict[str, dict[str, Result]] = {"base": {}, "ft": {}}
    for example, (b, c) in zip(test.examples, rows, strict=True):
        results["base"][example.id] = _result("base", example.id, exact=b[0], fmt=b[1], sim=b[2])
        results["ft"][example.id] = _result("ft", example.id, exact=c[0], fmt=c[1], sim=c[2])
    return Run(id=name, created_at=1.0, test_file=test.path, test_sha256=test.sha256,
               models=[ModelSpec("base", "u", "m1"), ModelSpec("ft", "u", "m2")], system_prompt=None, max_tokens=5,
               scoring={}, examples=test.examples, results=results)  # fmt: skip


class TestReport:
    def test_regressions_first_in_order_of_severity(self, tmp_path: Path) -> None:
        same = ((True, True, 1.0), (True, True, 1.0))
        rows = [
            ((False, False, 0.5), (True, True, 1.0)),  # 0 improved: became exact
            ((False, True, 0.8), (False, True, 0.6)),  # 1 regressed: similarity only (-0.2)
            ((True, True, 1.0), (False, False, 0.7)),  # 2 regressed: lost exact and format
            same,  # 3 unchanged: not listed
            ((False, True, 0.5), (False, False, 0.6)),  # 4 regressed: lost format despite more similarity
            ((False, True, 0.8), (False, True, 0.75)),  # 5 regressed: similarity (-0.05)
        ]
        comparison = run_report(_fake_run(tmp_path, rows)).comparisons[0]
        order = [(c.position, c.change) for c in comparison.changes]
        assert order == [(2, "regressed"), (4, "regressed"), (1, "regressed"), (5, "regressed"), (0, "improved")]
        assert comparison.paired == 6 and len(comparison.regressions) == 4

    def test_verdicts(self, tmp_path: Path) -> None:
        better = [((False, False, 0.3), (True, True, 1.0))] * 30
        worse = [(c, b) for b, c in better]
        flat = [((True, True, 1.0), (True, True, 1.0))] * 30
        assert run_report(_fake_run(tmp_path, better)).comparisons[0].verdict == "better"
        assert run_report(_fake_run(tmp_path, worse)).comparisons[0].verdict == "worse"
        assert run_report(_fake_run(tmp_path, flat)).comparisons[0].verdict == "no_difference"
        # Exact match much better, format much worse: a gate must not read this as a pass.
        mixed = [((False, True, 0.5), (True, False, 0.5))] * 30
        assert run_report(_fake_run(tmp_path, mixed)).comparisons[0].verdict == "mixed"

    def test_unfinished_runs_compare_what_both_answered(self, tmp_path: Path) -> None:
        run = _fake_run(tmp_path, [((True, True, 1.0), (True, True, 1.0))] * 4)
        del run.results["ft"][run.examples[0].id]
        report = run_report(run)
        assert report.comparisons[0].paired == 3 and report.models[1].answered == 3
        assert report.notes and report.notes[0].startswith("incomplete: 7 of 8 answers")

    def test_aggregates(self, tmp_path: Path) -> None:
        run = _fake_run(tmp_path, [((True, True, 1.0), (False, False, 0.2)), ((False, None, 0.5), (True, True, 1.0))])
        base, ft = run_report(run).models
        assert (base.exact_rate, base.format_rate, base.similarity_mean) == (0.5, 1.0, 0.75)
        assert base.similarity_min == 0.5
        assert (ft.tokens_per_answer, ft.cost_per_example, ft.cost_usd) == (5.0, 0.001, 0.002)
        assert base.latency_p50_ms == 10.0

    def test_compare_runs_pairs_by_example(self, tmp_path: Path) -> None:
        run_a = _fake_run(tmp_path, [((False, True, 0.5), (True, True, 1.0))] * 3, "a")
        run_b = _fake_run(tmp_path, [((False, True, 0.5), (False, True, 0.6))] * 3, "b")
        report = compare_runs(run_a, "ft", run_b, "ft")
        comparison = report.comparisons[0]
        assert (comparison.baseline, comparison.candidate, comparison.paired) == ("a:ft", "b:ft", 3)
        assert comparison.exact.regressed == 3 and [m.label for m in report.models] == ["a:ft", "b:ft"]
        with pytest.raises(ValueError, match="has no model 'nope'"):
            compare_runs(run_a, "nope", run_b, "ft")
        other = _fake_run(tmp_path, [((True, True, 1.0), (True, True, 1.0))] * 5, "c", notes="other")
        with pytest.raises(ValueError, match="share no example"):
            compare_runs(run_a, "ft", other, "ft")
