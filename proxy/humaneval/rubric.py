"""A study's rubric: the criteria an evaluator may answer beside the overall choice.

A preference criterion is answered A | tie | B, like the overall choice; a score criterion gives each
answer 1..5. In a vote's rubric mapping a preference answer sits under "<criterion>" and scores under
"<criterion>.A" and "<criterion>.B" (`proxy.humaneval.ratings.Vote` reads that shape).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import orjson
import yaml

Kind = Literal["preference", "score"]
KINDS: tuple[Kind, ...] = ("preference", "score")
SCORES = range(1, 6)
# Names become form field names, CSS ids and report columns: keep them plain.
_NAME = re.compile(r"[a-z0-9_]{1,40}")
_GUIDANCE_MAX = 500


@dataclass(frozen=True, slots=True)
class Criterion:
    name: str
    kind: Kind  # preference: A | tie | B ; score: 1..5 for each answer
    guidance: str = ""


@dataclass(frozen=True, slots=True)
class Rubric:
    criteria: tuple[Criterion, ...] = ()

    def to_json(self) -> str:
        return orjson.dumps(
            {"criteria": [{"name": c.name, "kind": c.kind, "guidance": c.guidance} for c in self.criteria]}
        ).decode()

    @classmethod
    def from_json(cls, text: str | None) -> Rubric:
        """The rubric `to_json` wrote; the empty rubric for None (a study without one)."""
        if text is None:
            return cls()
        return parse_rubric(orjson.loads(text), where="stored rubric")

    def get(self, name: str) -> Criterion | None:
        return next((c for c in self.criteria if c.name == name), None)

    def kinds(self) -> dict[str, str]:
        """name -> kind, the shape `ratings.per_criterion` takes."""
        return {c.name: c.kind for c in self.criteria}


def load_rubric(path: str | Path) -> Rubric:
    """Read a YAML rubric: {criteria: [{name, kind, guidance}, ...]}; ValueError with a one-line reason."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read rubric {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"rubric {path} is not valid YAML: {first}") from None
    return parse_rubric(data, where=f"rubric {path}")


def parse_rubric(data: Any, *, where: str = "rubric") -> Rubric:
    if not isinstance(data, dict) or not isinstance(data.get("criteria"), list):
        raise ValueError(f"{where}: expected a mapping with a 'criteria' list")
    unknown = set(data) - {"criteria"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    criteria: list[Criterion] = []
    for i, item in enumerate(data["criteria"], start=1):
        criteria.append(_criterion(item, f"{where}: criterion {i}"))
    names = [c.name for c in criteria]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"{where}: duplicate criterion name(s) {', '.join(duplicated)}")
    return Rubric(tuple(criteria))


def _criterion(item: Any, where: str) -> Criterion:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping with name, kind and guidance")
    unknown = set(item) - {"name", "kind", "guidance"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    name, kind, guidance = item.get("name"), item.get("kind"), item.get("guidance", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}: name must be 1-40 characters of a-z, 0-9 and _, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"{where} ({name}): kind must be 'preference' or 'score', got {kind!r}")
    if guidance is None:
        guidance = ""
    if not isinstance(guidance, str) or len(guidance) > _GUIDANCE_MAX:
        raise ValueError(f"{where} ({name}): guidance must be text of at most {_GUIDANCE_MAX} characters")
    return Criterion(name=name, kind=cast(Kind, kind), guidance=guidance.strip())
