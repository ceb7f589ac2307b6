"""RELIABILITY.md's table must match the tests: every test it cites exists, and every test module
of the reliability work is cited, so a renamed or deleted test cannot leave the table lying."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "RELIABILITY.md"
# tests/test_x.py::Class::test_name[param] or tests/test_x.py::test_name
NODE = re.compile(r"`(tests/[\w/]+\.py)::([\w:]+)(?:\[[^\]`]*\])?`")
# Modules written for issue 9: each must be cited, every one of its tests accounted for.
RELIABILITY_MODULES = ("test_faults_upstream.py", "test_hostile_input.py", "test_security.py", "test_shutdown.py",
                       "test_stress.py", "test_readiness.py", "test_security_eval.py", "test_properties.py",
                       "test_admin_schemathesis.py", "test_faults_redis.py",
                       "test_faults_feedback.py", "test_faults_pipeline.py",
                       "test_faults_controller.py")  # fmt: skip


TEST_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _tests_in(path: Path) -> set[str]:
    """`Class::test_name` and `test_name` of every test function in a module."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            found |= {f"{node.name}::{f.name}" for f in node.body
                      if isinstance(f, TEST_DEFS) and f.name.startswith("test_")}  # fmt: skip
        elif isinstance(node, TEST_DEFS) and node.name.startswith("test_"):
            found.add(node.name)
    return found


def test_every_cited_test_exists() -> None:
    cited = NODE.findall(DOC.read_text())
    assert len(cited) > 50
    missing = [f"{file}::{name}" for file, name in cited
               if not (ROOT / file).exists() or name not in _tests_in(ROOT / file)]  # fmt: skip
    assert not missing, f"RELIABILITY.md cites tests that do not exist: {missing}"


def test_every_reliability_test_is_cited() -> None:
    cited = {(Path(file).name, name) for file, name in NODE.findall(DOC.read_text())}
    uncited = [f"{module}::{name}" for module in RELIABILITY_MODULES
               for name in sorted(_tests_in(ROOT / "tests" / module)) if (module, name) not in cited]  # fmt: skip
    assert not uncited, f"tests missing from RELIABILITY.md: {uncited}"
