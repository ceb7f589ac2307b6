"""`abproxy humaneval import | create-study | link | revoke | studies`, run as the commands a user types."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Engine, select

from proxy.humaneval.studies import Evaluator, evaluator_for
from proxy.store import schema
from proxy.store.db import engine_for

EXAMPLES = Path(__file__).parent.parent / "examples" / "humaneval"
LINK = re.compile(r"^\s+(\S+)\s+http://eval\.example:8080/eval/s/(\S+)$", re.MULTILINE)


def abproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "humaneval", *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin"})  # fmt: skip


@pytest.fixture()
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture()
def engine(store: str) -> Iterator[Engine]:
    engine = engine_for(store)
    yield engine
    engine.dispose()


class TestImport:
    def test_added_duplicates_flagged_and_errors(self, tmp_path: Path, store: str, engine: Engine) -> None:
        """The report lists counts, each flag with its reason and each bad line by number; re-import adds nothing."""
        lines = EXAMPLES.joinpath("pairs.jsonl").read_text().splitlines()[:10]
        path = tmp_path / "pairs.jsonl"
        path.write_text("\n".join([*lines[:3], "{oops", *lines[3:]]) + "\n")
        done = abproxy("import", str(path), "--store", store)
        assert done.returncode == 0, done.stderr
        assert "as import:pairs.jsonl: 10 added, 0 duplicate(s), 1 flagged, 1 error(s)" in done.stdout
        assert "answer of model 'finetuned' names 'fine-tuned'" in done.stdout
        assert "line 4: not JSON" in done.stdout
        again = abproxy("import", str(path), "--store", store, "--source", "demo")
        assert again.returncode == 0 and "as demo: 0 added, 10 duplicate(s), 1 flagged" in again.stdout
        with engine.connect() as conn:
            assert set(conn.execute(select(schema.comparisons.c.source)).scalars()) == {"import:pairs.jsonl"}

    def test_nothing_usable_exits_2(self, tmp_path: Path, store: str) -> None:
        """A missing file, or one without a valid line, is exit 2 and one line on stderr."""
        missing = abproxy("import", str(tmp_path / "nope.jsonl"), "--store", store)
        assert missing.returncode == 2 and missing.stderr.count("\n") == 1
        assert "cannot read" in missing.stderr and "nope.jsonl" in missing.stderr
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{oops\n{"prompt": "p", "responses": {"a": "x"}}\n')
        done = abproxy("import", str(bad), "--store", store)
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert done.stderr.startswith(f"no valid comparison in {bad} (2 line(s) with errors: line 1: not JSON")


class TestStudy:
    def test_create_link_revoke_and_list(self, tmp_path: Path, store: str, engine: Engine) -> None:
        """create-study prints one link per evaluator (only hashes stored); link replaces one; revoke closes it."""
        done = abproxy(
            "create-study", "demo", "--from", str(EXAMPLES / "pairs.jsonl"), "--evaluators", "ann,bob,cy",
            "--per-evaluator", "20", "--overlap", "0.2", "--rubric", str(EXAMPLES / "rubric.yaml"),
            "--models", "base,finetuned", "--seed", "4", "--base-url", "http://eval.example:8080/", "--store", store,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "60 added" in done.stdout and "2 flagged" in done.stdout
        assert "study demo: 3 evaluator(s) x 20 tasks, 50 comparisons (2 flagged left out), seed 4" in done.stdout
        assert "overlap: 20.0% of the comparisons go to two or more evaluators (asked at least 20.0%)" in done.stdout
        assert "shown once" in done.stdout
        links = dict(LINK.findall(done.stdout))
        assert set(links) == {"ann", "bob", "cy"}
        with engine.connect() as conn:
            hashes = dict(conn.execute(select(schema.evaluators.c.name, schema.evaluators.c.token_hash)).all())
            settings = orjson.loads(conn.execute(select(schema.studies.c.settings)).scalar_one())
        assert hashes == {n: hashlib.sha256(t.encode()).hexdigest() for n, t in links.items()}
        assert settings["seed"] == 4 and settings["models"] == ["base", "finetuned"]
        # grep in another process: opening the database file here would drop this process's SQLite locks.
        # -e: a urlsafe token may start with "-" (grep then exits 2 on an unknown option).
        for token in links.values():
            assert subprocess.run(["grep", "-rqF", "-e", token, str(tmp_path)]).returncode == 1  # in no file, WAL too
        assert evaluator_for(engine, links["bob"]) == Evaluator("demo", "bob")

        relinked = abproxy("link", "demo", "bob", "--base-url", "http://eval.example:8080", "--store", store)
        assert relinked.returncode == 0, relinked.stderr
        fresh = re.search(r"http://eval\.example:8080/eval/s/(\S+)", relinked.stdout)
        assert fresh is not None and "previous link no longer works" in relinked.stdout
        assert evaluator_for(engine, links["bob"]) is None
        assert evaluator_for(engine, fresh.group(1)) == Evaluator("demo", "bob")

        revoked = abproxy("revoke", "demo", "bob", "--store", store)
        assert revoked.returncode == 0 and "demo / bob: link revoked" in revoked.stdout
        assert evaluator_for(engine, fresh.group(1)) is None
        assert evaluator_for(engine, links["ann"]) == Evaluator("demo", "ann")
        unknown = abproxy("revoke", "demo", "zed", "--store", store)
        assert unknown.returncode == 2 and "no evaluator 'zed' in study 'demo'" in unknown.stderr

        listed = abproxy("studies", "--store", store)
        assert listed.returncode == 0, listed.stderr
        rows = {line.split("│")[5].strip(): line for line in listed.stdout.splitlines() if line.count("│") == 9}
        assert set(rows) == {"ann", "bob", "cy"}
        assert "demo" in rows["ann"] and "base vs finetuned" in rows["ann"] and "50" in rows["ann"]
        assert all("0/20" in row for row in rows.values())
        assert "revoked" in rows["bob"] and "open" in rows["ann"]

    def test_errors_exit_2_and_write_nothing(self, tmp_path: Path, store: str, engine: Engine) -> None:
        """A study that cannot be made is exit 2 with the reason, and no study is stored."""
        args = ["create-study", "big", "--from", str(EXAMPLES / "pairs.jsonl"), "--evaluators", "ann,bob",
                "--per-evaluator", "59", "--store", store]  # fmt: skip
        done = abproxy(*args)
        assert done.returncode == 2
        assert "cannot create study 'big': not enough comparisons: 58 eligible" in done.stderr
        bad_models = abproxy(*args[:-4], "--models", "base", "--store", store)
        assert bad_models.returncode == 2 and "--models needs two" in bad_models.stderr
        with engine.connect() as conn:
            assert conn.execute(select(schema.studies)).first() is None
        empty = abproxy("studies", "--store", store)
        assert empty.returncode == 0 and "no studies yet" in empty.stdout


class TestReportCommand:
    def test_report_after_votes(self, tmp_path: Path, store: str) -> None:
        """Three evaluators vote the fine-tune better most of the time; the report ranks it first in every format."""
        import json
        import random
        import time

        from proxy.humaneval import studies
        from proxy.store.db import migrate

        engine = engine_for(store)
        migrate(engine)
        studies.import_jsonl(engine, EXAMPLES / "pairs.jsonl", now=time.time())
        created = studies.create_study(engine, "voice", evaluators=["ann", "bo", "cy"], per_evaluator=20,
                                       overlap=0.3, models=("base", "finetuned"), seed=3, now=time.time())
        rng = random.Random(1)
        for name, token in created.links.items():
            who = studies.evaluator_for(engine, token)
            assert who is not None and who.name == name
            while (task := studies.current_task(engine, who)) is not None:
                # Blind: decide by the answer's text, the way a person would (the fine-tune's voice is crisper).
                ft_left = len(task.response_a) < len(task.response_b)
                choice = ("A" if ft_left else "B") if rng.random() < 0.8 else ("B" if ft_left else "A")
                studies.cast_vote(engine, who, task.id, choice, why=None, rubric={}, time_taken_ms=9000.0,
                                  now=time.time())
        engine.dispose()

        done = abproxy("report", "voice", "--store", store, "--format", "json", "--bootstrap", "200")
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert body["votes"] == 60 and body["evaluators"] == 3 and body["multi_rated"] > 0
        assert {r["model"] for r in body["bradley_terry"]} == {"base", "finetuned"}
        table = abproxy("report", "voice", "--store", store, "--bootstrap", "50")
        assert table.returncode == 0 and "Bradley-Terry" in table.stdout
        assert abproxy("report", "voice", "--store", store, "--format", "markdown").stdout.startswith("## Study voice")
        assert abproxy("report", "voice", "--store", store, "--format", "csv").stdout.startswith("section,model")
        missing = abproxy("report", "nope", "--store", store)
        assert missing.returncode == 2 and "no study named 'nope'" in missing.stderr
