"""proxy.humaneval.studies and the modules it re-exports (importer, rubric, links, summaries) and allocation."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, func, select

from proxy.humaneval import studies
from proxy.humaneval.allocation import Candidate, copies_per_comparison, plan
from proxy.humaneval.studies import Criterion, Evaluator, Rubric, TaskView
from proxy.store import schema
from proxy.store.db import engine_for, migrate

T0 = 1_795_406_672.0
BASE, TUNED = "sales-base-v1", "sales-ft-v2"  # names that appear in no answer text, so a leak is visible
EXAMPLES = Path(__file__).parent.parent / "examples" / "humaneval"
RUBRIC = Rubric((Criterion("accuracy", "preference", "Which is right?"), Criterion("overall", "score", "1..5")))


def pair(i: int, models: Sequence[str] = (BASE, TUNED), *, prompt: Any = None) -> dict[str, Any]:
    """A line of an import file whose answers are unique to i and name no model."""
    return {"prompt": prompt or f"How do I open call {i} with Northwind?",
            "responses": {m: f"Answer {i} of kind {k}: greet, ask one question." for k, m in enumerate(models)},
            "id": f"x{i}", "metadata": {"ignored": True}}  # fmt: skip


def write_jsonl(path: Path, lines: Sequence[dict[str, Any] | str]) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else orjson.dumps(ln).decode()) + "\n" for ln in lines))
    return path


@pytest.fixture()
def engine(store_url: str) -> Iterator[Engine]:
    engine = engine_for(store_url)
    migrate(engine)
    yield engine
    engine.dispose()


def load(engine: Engine, tmp_path: Path, lines: Sequence[dict[str, Any] | str], name: str = "pairs.jsonl") -> Any:
    return studies.import_jsonl(engine, write_jsonl(tmp_path / name, lines), now=T0)


def rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table)).mappings()]


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def study(engine: Engine, name: str = "s1", **overrides: Any) -> studies.CreatedStudy:
    options: dict[str, Any] = {"evaluators": ["ann", "bob", "cy"], "per_evaluator": 6, "overlap": 0.2,
                               "models": (BASE, TUNED), "rubric": RUBRIC, "seed": 1, "now": T0}  # fmt: skip
    options.update(overrides)
    return studies.create_study(engine, name, **options)


def check_tasks(task_rows: Sequence[dict[str, Any]], evaluators: Sequence[str], per_evaluator: int) -> None:
    """The invariants every study must hold, from its task rows."""
    by_evaluator: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in task_rows:
        by_evaluator[t["evaluator"]].append(t)
    assert set(by_evaluator) == set(evaluators)
    for tasks in by_evaluator.values():
        assert sorted(t["position"] for t in tasks) == list(range(per_evaluator))
        assert len({t["comparison_id"] for t in tasks}) == per_evaluator  # nobody sees a comparison twice
        left = Counter(t["model_a"] for t in tasks)
        right = Counter(t["model_b"] for t in tasks)
        assert all(abs(left[m] - right[m]) <= 1 for m in left | right), (left, right)


def shared_share(task_rows: Sequence[dict[str, Any]]) -> float:
    seen = Counter(t["comparison_id"] for t in task_rows)
    return sum(1 for n in seen.values() if n >= 2) / len(seen)


class TestImport:
    def test_added_then_duplicates(self, engine: Engine, tmp_path: Path) -> None:
        """A second import of the same file adds nothing; a line repeated in the file counts as a duplicate."""
        first = load(engine, tmp_path, [pair(1), pair(2), pair(1), pair(3)])
        assert (first.added, first.duplicates, first.errors, first.source) == (3, 1, [], "import:pairs.jsonl")
        again = load(engine, tmp_path, [pair(1), pair(2), pair(3), pair(4)])
        assert (again.added, again.duplicates) == (1, 3)
        stored = rows(engine, schema.comparisons)
        assert len(stored) == 4 and all(r["id"].startswith("c_") and len(r["id"]) == 18 for r in stored)
        assert {r["source"] for r in stored} == {"import:pairs.jsonl"}

    def test_bad_lines_are_skipped_with_their_line_numbers(self, engine: Engine, tmp_path: Path) -> None:
        """Each bad line is reported by number and reason; blank lines are no error; good lines are stored."""
        result = load(engine, tmp_path, [
            pair(1),
            "{not json",
            {"prompt": "p", "responses": {BASE: "only one"}},
            {"prompt": "p", "responses": {BASE: "x", TUNED: "   "}},
            {"responses": {BASE: "x", TUNED: "y"}},
            "",
            {"prompt": "", "responses": {BASE: "x", TUNED: "y"}},
            "[1, 2]",
            pair(2),
        ])  # fmt: skip
        assert result.added == 2
        numbers = [n for n, _ in result.errors]
        assert numbers == [2, 3, 4, 5, 7, 8]
        messages = dict(result.errors)
        assert messages[2].startswith("not JSON")
        assert "at least 2 models" in messages[3]
        assert "empty" in messages[4] and TUNED in messages[4]
        assert messages[5] == "missing prompt"
        assert messages[7] == "prompt is empty"
        assert "object" in messages[8]

    def test_messages_prompt_is_kept(self, engine: Engine, tmp_path: Path) -> None:
        """A chat-shaped prompt is stored as its messages list and shown as one."""
        messages = [{"role": "system", "content": "You are Acme's companion."}, {"role": "user", "content": "Hi"}]
        load(engine, tmp_path, [pair(1, prompt=messages)])
        assert orjson.loads(rows(engine, schema.comparisons)[0]["prompt"]) == messages

    def test_flagged_comparisons_are_listed_and_stored(self, engine: Engine, tmp_path: Path) -> None:
        """A comparison whose answer names a model is stored with its reason, and listed again on re-import."""
        revealing = {"prompt": "p", "responses": {BASE: "Sure.", TUNED: "As a fine-tuned model I would say hi."}}
        result = load(engine, tmp_path, [pair(1), revealing])
        assert len(result.flagged) == 1
        cid, reason = result.flagged[0]
        assert reason == f"answer of model {TUNED!r} names 'fine-tuned'"
        assert {r["id"]: r["flagged"] for r in rows(engine, schema.comparisons)}[cid] == reason
        assert load(engine, tmp_path, [revealing]).flagged == [(cid, reason)]

    def test_unreadable_file(self, engine: Engine, tmp_path: Path) -> None:
        """A missing file is a ValueError naming it."""
        with pytest.raises(ValueError, match=r"cannot read .*missing\.jsonl"):
            studies.import_jsonl(engine, tmp_path / "missing.jsonl", now=T0)

    def test_the_example_file(self, engine: Engine) -> None:
        """The shipped example imports whole, with its two revealing answers flagged."""
        result = studies.import_jsonl(engine, EXAMPLES / "pairs.jsonl", now=T0)
        assert (result.added, result.errors, len(result.flagged)) == (60, [], 2)


class TestFlagReason:
    @pytest.mark.parametrize(
        ("answer", "named"),
        [
            ("As a fine-tuned model, I suggest...", "fine-tuned"),
            ("I was FINE TUNED on Acme's calls.", "FINE TUNED"),
            ("Being finetuned, I know the product.", "finetuned"),
            ("The base model would say otherwise.", "base model"),
            ("As an AI language model, I cannot.", "As an AI language model"),
            ("I was trained by OpenAI.", "trained by OpenAI"),
            ("ChatGPT here: happy to help.", "ChatGPT"),
            (f"This is {TUNED.upper()} speaking.", TUNED.upper()),
            (f"({BASE}) Hello.", BASE),
        ],
    )
    def test_revealing_answers(self, answer: str, named: str) -> None:
        """An answer that names a compared model or says what it is gets a reason quoting the words."""
        reason = studies.flag_reason({BASE: "Plain answer.", TUNED: answer})
        assert reason == f"answer of model {TUNED!r} names {named!r}"

    @pytest.mark.parametrize(
        ("responses"),
        [
            {BASE: "Grow your customer base this quarter.", TUNED: "Tune the pitch to the buyer."},
            {"base": "Our base plan costs less.", "finetuned": "Fine: tune in at nine."},
            {"acme-ft": "Try acme-ftx pricing.", "acme-base": "Open with a question."},
            {"ft": "A gift for the team.", "b2": "Left as is."},
        ],
    )
    def test_ordinary_answers(self, responses: dict[str, str]) -> None:
        """Everyday words equal to a generic variant name, or a name inside a longer word, are not flags."""
        assert studies.flag_reason(responses) is None


class TestRubric:
    def test_example_rubric(self) -> None:
        """The shipped rubric: four preferences and an overall score, each with guidance; JSON round trip."""
        rubric = studies.load_rubric(EXAMPLES / "rubric.yaml")
        assert [(c.name, c.kind) for c in rubric.criteria] == [
            ("accuracy", "preference"), ("completeness", "preference"), ("tone", "preference"),
            ("company_voice", "preference"), ("overall", "score"),
        ]  # fmt: skip
        assert all(c.guidance for c in rubric.criteria)
        assert Rubric.from_json(rubric.to_json()) == rubric
        assert Rubric.from_json(None) == Rubric(())

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("criteria:\n  - {name: tone, kind: stars}\n", "kind must be 'preference' or 'score'"),
            ("criteria:\n  - {name: tone, kind: score}\n  - {name: tone, kind: preference}\n", "duplicate.*tone"),
            ("criteria:\n  - {name: Tone!, kind: score}\n", "name must be 1-40 characters"),
            ("criteria: 3\n", "'criteria' list"),
            ("criteria: [\n", "not valid YAML"),
        ],
    )
    def test_bad_rubric(self, tmp_path: Path, text: str, message: str) -> None:
        """A bad rubric is one ValueError line naming the file and the problem."""
        path = tmp_path / "rubric.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as caught:
            studies.load_rubric(path)
        assert "\n" not in str(caught.value) and "rubric.yaml" in str(caught.value)


class TestAllocation:
    """The pure plan, over many seeds and sizes (no store)."""

    def test_invariants_over_seeds_and_sizes(self) -> None:
        """Exact list sizes, no repeats, overlap at least asked, sides within one, same pair for a shared comparison."""
        rng = random.Random(7)
        for seed in range(300):
            n = rng.randint(1, 8)
            k = rng.randint(1, 30)
            overlap = 0.0 if n == 1 else rng.choice([0.0, 0.1, 0.2, 0.35, 0.5, 1.0, rng.random()])
            model_sets = [("m1", "m2"), ("m1", "m2", "m3"), ("m2", "m3", "m4", "m1")]
            pool = [Candidate(f"c{i}", rng.choice(model_sets)) for i in range(rng.randint(k, n * k + 5))]
            fixed = ("m2", "m1") if seed % 2 else None
            if fixed:
                pool = [c for c in pool if {"m1", "m2"} <= set(c.models)]
                if len(pool) < k:
                    continue
            result = plan(pool, [f"e{i}" for i in range(n)], k, overlap, models=fixed, seed=seed)
            task_rows = [{"evaluator": t.evaluator, "position": t.position, "comparison_id": t.comparison_id,
                          "model_a": t.model_a, "model_b": t.model_b} for t in result.tasks]  # fmt: skip
            check_tasks(task_rows, [f"e{i}" for i in range(n)], k)
            assert result.overlap_share == pytest.approx(shared_share(task_rows))
            assert result.overlap_share >= overlap - 1e-9
            models_of = {c.id: set(c.models) for c in pool}
            pairs: dict[str, set[frozenset[str]]] = defaultdict(set)
            for t in result.tasks:
                assert {t.model_a, t.model_b} <= models_of[t.comparison_id] and t.model_a != t.model_b
                if fixed:
                    assert {t.model_a, t.model_b} == set(fixed)
                pairs[t.comparison_id].add(frozenset((t.model_a, t.model_b)))
            assert all(len(p) == 1 for p in pairs.values())  # sharers judge the same pair

    def test_least_sharing_that_meets_the_overlap(self) -> None:
        """3 x 20 at 0.2 shares 10 of 50 comparisons; a small pool shares more; 1.0 shares everything."""
        assert Counter(copies_per_comparison(3, 20, 0.2, 100)) == {1: 40, 2: 10}
        assert Counter(copies_per_comparison(3, 20, 0.2, 30)) == {2: 30}
        assert Counter(copies_per_comparison(3, 20, 0.0, 100)) == {1: 60}
        assert Counter(copies_per_comparison(3, 5, 1.0, 100)) == {2: 6, 3: 1}

    def test_every_pair_of_evaluators_shares(self) -> None:
        """With enough overlap, every pair of evaluators shares comparisons to compute agreement on."""
        pool = [Candidate(f"c{i}", ("a", "b")) for i in range(200)]
        names = [f"e{i}" for i in range(5)]
        result = plan(pool, names, 40, 0.2, models=None, seed=3)
        holders: dict[str, set[str]] = defaultdict(set)
        for t in result.tasks:
            holders[t.comparison_id].add(t.evaluator)
        together = Counter(frozenset(p) for h in holders.values() for p in itertools.combinations(sorted(h), 2))
        assert len(together) == 10 and min(together.values()) >= 2


class TestCreateStudy:
    @pytest.mark.parametrize(
        ("evaluators", "per_evaluator", "overlap", "pool"),
        [(3, 10, 0.2, 40), (5, 6, 0.5, 30), (2, 9, 1.0, 20), (6, 5, 0.3, 12), (1, 7, 0.0, 9)],
    )
    def test_invariants(self, engine: Engine, tmp_path: Path, evaluators: int, per_evaluator: int, overlap: float,
                        pool: int) -> None:
        """Stored studies hold every invariant, for several seeds; flagged comparisons are never used."""
        revealing = {"prompt": "p", "responses": {BASE: "I am the base model.", TUNED: "Hi."}}
        load(engine, tmp_path, [pair(i) for i in range(pool)] + [revealing])
        flagged_id = next(r["id"] for r in rows(engine, schema.comparisons) if r["flagged"])
        names = [f"rep{i}@acme.example" for i in range(evaluators)]
        for seed in range(3):
            created = study(engine, f"s{seed}", evaluators=names, per_evaluator=per_evaluator, overlap=overlap,
                            seed=seed)  # fmt: skip
            task_rows = [t for t in rows(engine, schema.tasks) if t["study"] == f"s{seed}"]
            check_tasks(task_rows, names, per_evaluator)
            assert created.tasks == len(task_rows) == evaluators * per_evaluator
            assert created.comparisons == len({t["comparison_id"] for t in task_rows})
            assert created.overlap_share == pytest.approx(shared_share(task_rows)) and created.overlap_share >= overlap
            assert created.excluded_flagged == 1 and flagged_id not in {t["comparison_id"] for t in task_rows}
            assert {t["model_a"] for t in task_rows} | {t["model_b"] for t in task_rows} == {BASE, TUNED}

    def test_deterministic_for_a_seed(self, engine: Engine, tmp_path: Path) -> None:
        """The same seed over the same comparisons gives the same lists and sides, in another store too."""
        other = engine_for(f"sqlite:///{tmp_path / 'other.db'}")
        migrate(other)

        def lists(store: Engine, name: str) -> list[tuple[str, int, str, str, str]]:
            prompts = {r["id"]: r["prompt"] for r in rows(store, schema.comparisons)}  # ids differ across stores
            return sorted((t["evaluator"], t["position"], prompts[t["comparison_id"]], t["model_a"], t["model_b"])
                          for t in rows(store, schema.tasks) if t["study"] == name)  # fmt: skip

        try:
            for store in (engine, other):
                load(store, tmp_path, [pair(i) for i in range(30)])
                study(store, "one", seed=5)
            study(engine, "two", seed=5)
            study(engine, "three", seed=6)
            assert lists(engine, "one") == lists(engine, "two") == lists(other, "one") != lists(engine, "three")
        finally:
            other.dispose()

    def test_only_the_chosen_models(self, engine: Engine, tmp_path: Path) -> None:
        """With models given, comparisons lacking one are skipped and every task compares exactly those two."""
        three = (BASE, TUNED, "sales-ft-v3")
        load(engine, tmp_path, [pair(i, three) for i in range(10)] + [pair(100 + i, (BASE, "sales-ft-v3"))
                                                                      for i in range(10)])  # fmt: skip
        study(engine, models=("sales-ft-v3", TUNED), per_evaluator=5)
        task_rows = rows(engine, schema.tasks)
        assert {frozenset((t["model_a"], t["model_b"])) for t in task_rows} == {frozenset(("sales-ft-v3", TUNED))}
        with pytest.raises(ValueError, match="not enough comparisons: 10 eligible"):
            study(engine, "s2", models=(BASE, TUNED), per_evaluator=11)

    def test_several_models_without_models(self, engine: Engine, tmp_path: Path) -> None:
        """Without models, 3-model comparisons compare a pair of their own models, every pair drawn."""
        three = (BASE, TUNED, "sales-ft-v3")
        load(engine, tmp_path, [pair(i, three) for i in range(30)])
        study(engine, models=None, per_evaluator=10)
        pairs = Counter(frozenset((t["model_a"], t["model_b"])) for t in rows(engine, schema.tasks))
        assert set(pairs) == {frozenset(p) for p in itertools.combinations(three, 2)}
        assert sorted(studies.get_study(engine, "s1").models) == sorted(three)  # type: ignore[union-attr]

    def test_source_restricts(self, engine: Engine, tmp_path: Path) -> None:
        """With a source, only that import's comparisons are drawn."""
        load(engine, tmp_path, [pair(i) for i in range(6)], name="a.jsonl")
        load(engine, tmp_path, [pair(100 + i) for i in range(6)], name="b.jsonl")
        study(engine, evaluators=["ann"], per_evaluator=6, overlap=0, source="import:b.jsonl")
        by_id = {r["id"]: r["source"] for r in rows(engine, schema.comparisons)}
        assert {by_id[t["comparison_id"]] for t in rows(engine, schema.tasks)} == {"import:b.jsonl"}

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"name": "s1"}, "a study named 's1' already exists"),
            ({"evaluators": []}, "at least one evaluator"),
            ({"evaluators": ["ann", "bob", "ann"]}, "duplicate evaluator name.*ann"),
            ({"evaluators": ["ann", "bob smith"]}, "evaluator name must be"),
            ({"name": "bad/name"}, "study name must be"),
            ({"per_evaluator": 0}, "per_evaluator must be an integer >= 1"),
            ({"overlap": 1.5}, "overlap must be between 0 and 1"),
            ({"overlap": -0.1}, "overlap must be between 0 and 1"),
            ({"evaluators": ["ann"], "overlap": 0.2}, "overlap needs at least two evaluators"),
            ({"models": (BASE, BASE)}, "two different model names"),
            ({"per_evaluator": 13}, "not enough comparisons: 12 eligible"),
            ({"models": (BASE, "nobody")}, f"no comparison with both '{BASE}' and 'nobody' is stored"),
            ({"source": "import:other.jsonl"}, "no comparison .*from source 'import:other.jsonl' is stored"),
        ],
    )
    def test_bad_input_writes_nothing(self, engine: Engine, tmp_path: Path, overrides: dict[str, Any],
                                      message: str) -> None:
        """Each bad input is one clear ValueError line, and the store is left as it was."""
        load(engine, tmp_path, [pair(i) for i in range(12)])
        study(engine, "s1", per_evaluator=4)
        before = [count(engine, t) for t in (schema.studies, schema.evaluators, schema.tasks)]
        arguments = {"name": "s2", **overrides}
        with pytest.raises(ValueError, match=message) as caught:
            study(engine, **arguments)
        assert "\n" not in str(caught.value)
        assert [count(engine, t) for t in (schema.studies, schema.evaluators, schema.tasks)] == before


class TestLinks:
    def test_token_finds_its_evaluator_and_only_a_hash_is_stored(self, engine: Engine, tmp_path: Path) -> None:
        """A link's token names its evaluator; the store holds its sha256, never the token."""
        load(engine, tmp_path, [pair(i) for i in range(12)])
        created = study(engine)
        for name, token in created.links.items():
            assert len(token) == 32
            assert studies.evaluator_for(engine, token) == Evaluator("s1", name)
        stored = {r["name"]: r["token_hash"] for r in rows(engine, schema.evaluators)}
        assert stored == {n: hashlib.sha256(t.encode()).hexdigest() for n, t in created.links.items()}
        assert studies.evaluator_for(engine, "not-a-token") is None
        assert studies.evaluator_for(engine, "") is None

    def test_revoke_and_new_link(self, engine: Engine, tmp_path: Path) -> None:
        """Revoked: no evaluator; a new link replaces the old token and reopens the link; others untouched."""
        load(engine, tmp_path, [pair(i) for i in range(12)])
        links = study(engine).links
        assert studies.revoke(engine, "s1", "bob", now=T0) is True
        assert studies.revoke(engine, "s1", "bob", now=T0) is False  # already revoked
        assert studies.revoke(engine, "s1", "zed", now=T0) is False
        assert studies.evaluator_for(engine, links["bob"]) is None
        fresh = studies.new_link(engine, "s1", "bob")
        assert studies.evaluator_for(engine, fresh) == Evaluator("s1", "bob")
        assert studies.evaluator_for(engine, links["bob"]) is None
        newer = studies.new_link(engine, "s1", "bob")
        assert studies.evaluator_for(engine, fresh) is None and studies.evaluator_for(engine, newer) is not None
        assert studies.evaluator_for(engine, links["ann"]) == Evaluator("s1", "ann")
        with pytest.raises(KeyError):
            studies.new_link(engine, "s1", "zed")


@pytest.fixture()
def ann(engine: Engine, tmp_path: Path) -> Evaluator:
    """ann's list of 6 in a study of three evaluators over 12 comparisons, with the test rubric."""
    load(engine, tmp_path, [pair(i) for i in range(12)])
    study(engine)
    return Evaluator("s1", "ann")


def answer_model(engine: Engine, view: TaskView, text: str) -> str:
    """Which model wrote `text` in the task's comparison (read from the store, as the report would)."""
    with engine.connect() as conn:
        cid = conn.execute(select(schema.tasks.c.comparison_id).where(schema.tasks.c.id == view.id)).scalar_one()
        responses: dict[str, str] = orjson.loads(conn.execute(
            select(schema.comparisons.c.responses).where(schema.comparisons.c.id == cid)).scalar_one())
    return next(m for m, t in responses.items() if t == text)


class TestTasks:
    def test_no_model_name_in_any_view(self, engine: Engine, ann: Evaluator) -> None:
        """No field of any evaluator's TaskView, as str or repr, holds a model name or the comparison id."""
        comparison_ids = {r["id"] for r in rows(engine, schema.comparisons)}
        for name in ("ann", "bob", "cy"):
            evaluator = Evaluator("s1", name)
            for t in [r for r in rows(engine, schema.tasks) if r["evaluator"] == name]:
                view = studies.get_task(engine, evaluator, t["id"])
                assert view is not None
                for value in (view, *(getattr(view, f) for f in TaskView.__slots__)):
                    for shown in (str(value), repr(value)):
                        assert BASE not in shown and TUNED not in shown
                        assert not any(cid in shown for cid in comparison_ids)

    def test_vote_flow(self, engine: Engine, ann: Evaluator) -> None:
        """current_task walks the list in order; a vote moves it on; progress counts; the vote is shown back."""
        first = studies.current_task(engine, ann)
        assert first is not None and (first.position, first.total, first.vote) == (0, 6, None)
        assert first.id.startswith("t_") and first.response_a != first.response_b
        assert studies.progress(engine, ann) == (0, 6)
        assert studies.cast_vote(engine, ann, first.id, "B", why=" shorter ", rubric={"accuracy": "tie",
                                 "overall.A": 2, "overall.B": "5"}, time_taken_ms=4200.0, now=T0)  # fmt: skip
        second = studies.current_task(engine, ann)
        assert second is not None and second.position == 1
        assert studies.progress(engine, ann) == (1, 6)
        shown = studies.get_task(engine, ann, first.id)
        assert shown is not None and shown.vote == studies.VoteView(
            "B", "shorter", {"accuracy": "tie", "overall.A": 2, "overall.B": 5})
        for t in [r for r in rows(engine, schema.tasks) if r["evaluator"] == "ann"][:6]:
            studies.cast_vote(engine, ann, t["id"], "tie", why=None, rubric={}, time_taken_ms=None, now=T0 + 1)
        assert studies.current_task(engine, ann) is None and studies.progress(engine, ann) == (6, 6)

    def test_double_submit_keeps_the_first_vote(self, engine: Engine, ann: Evaluator) -> None:
        """A second vote on a task returns False and changes nothing."""
        task = studies.current_task(engine, ann)
        assert task is not None
        assert studies.cast_vote(engine, ann, task.id, "A", why="first", rubric={}, time_taken_ms=1.0, now=T0)
        assert not studies.cast_vote(engine, ann, task.id, "B", why="second", rubric={}, time_taken_ms=2.0, now=T0)
        [vote] = rows(engine, schema.votes)
        assert (vote["choice"], vote["why"], vote["time_taken_ms"]) == ("A", "first", 1.0)

    def test_concurrent_submits_store_one_vote(self, engine: Engine, ann: Evaluator) -> None:
        """Eight simultaneous submits of one task (double clicks, two tabs): exactly one is stored."""
        task = studies.current_task(engine, ann)
        assert task is not None

        def submit(choice: str) -> bool:
            return studies.cast_vote(engine, ann, task.id, choice, why=None, rubric={}, time_taken_ms=None, now=T0)

        with ThreadPoolExecutor(8) as pool:
            stored = list(pool.map(submit, ["A", "B"] * 4))
        assert stored.count(True) == 1 and count(engine, schema.votes) == 1

    def test_other_evaluators_tasks_are_invisible(self, engine: Engine, ann: Evaluator) -> None:
        """ann can neither read nor vote on bob's tasks."""
        bobs = next(r["id"] for r in rows(engine, schema.tasks) if r["evaluator"] == "bob")
        assert studies.get_task(engine, ann, bobs) is None
        with pytest.raises(ValueError, match="unknown task"):
            studies.cast_vote(engine, ann, bobs, "A", why=None, rubric={}, time_taken_ms=None, now=T0)

    @pytest.mark.parametrize(
        ("choice", "extra", "message"),
        [
            ("C", {}, "choice must be"),
            ("A", {"rubric": {"speed": "A"}}, "'speed' is not in this study's rubric"),
            ("A", {"rubric": {"accuracy.A": 3}}, "'accuracy.A' is not in this study's rubric"),
            ("A", {"rubric": {"overall": 3}}, "'overall' is not in this study's rubric"),
            ("A", {"rubric": {"accuracy": "left"}}, "accuracy: answer must be"),
            ("A", {"rubric": {"overall.A": 6}}, "score must be an integer 1..5"),
            ("A", {"rubric": {"overall.B": "good"}}, "score must be an integer 1..5"),
            ("A", {"rubric": {"overall.B": True}}, "score must be an integer 1..5"),
            ("A", {"rubric": {"overall.A": 4}}, "score both responses, or neither"),
            ("A", {"why": "x" * 2001}, "why must be at most 2000"),
            ("A", {"time_taken_ms": -1.0}, "time_taken_ms must be"),
            ("A", {"time_taken_ms": float("nan")}, "time_taken_ms must be"),
        ],
    )
    def test_invalid_votes_write_nothing(self, engine: Engine, ann: Evaluator, choice: str, extra: dict[str, Any],
                                         message: str) -> None:
        """Each invalid vote is a clear ValueError and stores nothing."""
        task = studies.current_task(engine, ann)
        assert task is not None
        arguments: dict[str, Any] = {"why": None, "rubric": {}, "time_taken_ms": None, "now": T0, **extra}
        with pytest.raises(ValueError, match=message):
            studies.cast_vote(engine, ann, task.id, choice, **arguments)
        assert count(engine, schema.votes) == 0

    def test_undo_last(self, engine: Engine, ann: Evaluator) -> None:
        """Undo removes the latest vote only; current_task then returns that task; nothing to undo is None."""
        assert studies.undo_last(engine, ann) is None
        first = studies.current_task(engine, ann)
        assert first is not None
        studies.cast_vote(engine, ann, first.id, "A", why=None, rubric={}, time_taken_ms=None, now=T0)
        second = studies.current_task(engine, ann)
        assert second is not None
        studies.cast_vote(engine, ann, second.id, "B", why=None, rubric={}, time_taken_ms=None, now=T0 + 1)
        assert studies.undo_last(engine, ann) == second.id
        again = studies.current_task(engine, ann)
        assert again is not None and again.id == second.id and again.vote is None
        assert [r["task_id"] for r in rows(engine, schema.votes)] == [first.id]

    def test_study_votes_map_sides_to_models(self, engine: Engine, ann: Evaluator) -> None:
        """Each Vote names the model shown on each side; its winner wrote the answer the evaluator chose."""
        chosen: dict[str, str] = {}
        for i, choice in enumerate(["A", "B", "tie", "A"]):
            view = studies.current_task(engine, ann)
            assert view is not None
            studies.cast_vote(engine, ann, view.id, choice, why=None, rubric={"accuracy": choice},
                              time_taken_ms=100.0 * i, now=T0 + i)  # fmt: skip
            if choice != "tie":
                chosen[view.id] = answer_model(engine, view, view.response_a if choice == "A" else view.response_b)
        task_of = {r["comparison_id"]: r["id"] for r in rows(engine, schema.tasks) if r["evaluator"] == "ann"}
        found = studies.study_votes(engine, "s1")
        assert [v.ts for v in found] == [T0, T0 + 1, T0 + 2, T0 + 3]
        assert [v.choice for v in found] == ["A", "B", "tie", "A"]
        for vote in found:
            assert vote.evaluator == "ann" and {vote.model_a, vote.model_b} == {BASE, TUNED}
            assert vote.rubric == {"accuracy": vote.choice}
            if vote.choice != "tie":
                assert vote.winner == chosen[task_of[vote.comparison_id]]

    def test_summaries(self, engine: Engine, ann: Evaluator) -> None:
        """list_studies and get_study report models, rubric, comparisons and each evaluator's progress."""
        view = studies.current_task(engine, ann)
        assert view is not None
        studies.cast_vote(engine, ann, view.id, "A", why=None, rubric={}, time_taken_ms=None, now=T0 + 9)
        studies.revoke(engine, "s1", "cy", now=T0)
        [summary] = studies.list_studies(engine)
        assert summary == studies.get_study(engine, "s1")
        assert (summary.name, summary.created_at, summary.models, summary.rubric) == ("s1", T0, [BASE, TUNED], RUBRIC)
        assert summary.comparisons == len({r["comparison_id"] for r in rows(engine, schema.tasks)})
        assert summary.evaluators == [
            studies.EvaluatorProgress("ann", 1, 6, False, T0 + 9),
            studies.EvaluatorProgress("bob", 0, 6, False, None),
            studies.EvaluatorProgress("cy", 0, 6, True, None),
        ]
        assert studies.get_study(engine, "nope") is None
