"""Format checks, declared in YAML rather than coded per use case (`abproxy eval run --check format.yaml`).

    checks:
      - name: 'one "CODE: description" per line'
        line_regex: '^[A-TV-Z][0-9][0-9AB](\\.[0-9A-TV-Z]{1,4})?: \\S.*$'   # every line must match
      - regex: '(?s)Answer: .+'                                             # the whole answer must match
      - json_schema: {type: object, required: [label]}                      # or json_schema_file: schema.json
      - entry_point: distinct_lines                                         # Python, group abproxy.format_checks

An answer is well-formatted when every check passes. Checks see the answer with surrounding whitespace
stripped; regexes must match in full (`re.fullmatch`), and a line check applies to every line, blank ones
included, of a non-empty answer. A custom check is a callable `(answer: str) -> bool` registered by any
installed package under the entry-point group `abproxy.format_checks`; one that raises counts as failed.

A bad file is refused before anything runs, with one line naming the key: `format.yaml: checks.1.regex: ...`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import orjson
import yaml
from jsonschema import exceptions as schema_errors
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENTRY_POINT_GROUP = "abproxy.format_checks"
_KINDS = ("line_regex", "regex", "json_schema", "json_schema_file", "entry_point")


class CheckFileError(ValueError):
    """The check file is unusable; one line naming the file and key."""


class CheckSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, min_length=1, max_length=128)
    line_regex: str | None = None
    regex: str | None = None
    json_schema: dict[str, Any] | None = None
    json_schema_file: str | None = None
    entry_point: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> CheckSpec:
        given = [kind for kind in _KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_KINDS)} (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) is not None)


class CheckFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    checks: list[CheckSpec] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class FormatCheck:
    name: str
    passes: Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class FormatChecks:
    checks: tuple[FormatCheck, ...]
    declared: list[dict[str, Any]]  # the file's checks as data, kept with a run (schemas from files inlined)
    source: str | None = None  # the file they came from

    def failures(self, answer: str) -> list[str]:
        """The names of the checks `answer` fails; [] when it is well-formatted."""
        text = answer.strip()
        failed = []
        for check in self.checks:
            try:
                ok = check.passes(text)
            except Exception as exc:  # a custom check's bug is this answer's failure, named, not a crashed run
                failed.append(f"{check.name} (raised {type(exc).__name__})")
                continue
            if not ok:
                failed.append(check.name)
        return failed


def load_checks(path: str | Path) -> FormatChecks:
    """The checks of a YAML file; CheckFileError naming the key when it is unusable."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CheckFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CheckFileError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        parsed = CheckFile.model_validate(data)
    except ValidationError as exc:
        # A misspelt key also makes the real one "missing": naming the typo helps more.
        error = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise CheckFileError(f"{path}: {where}: {error['msg']}") from None
    declared = []
    compiled = []
    for i, spec in enumerate(parsed.checks):
        try:
            check, as_data = _compile(spec, path.parent)
        except ValueError as exc:
            raise CheckFileError(f"{path}: checks.{i}.{spec.kind}: {exc}") from None
        compiled.append(check)
        declared.append(as_data)
    names = [c.name for c in compiled]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CheckFileError(f"{path}: checks: two checks are named {repeated[0]!r}; give each a distinct name")
    return FormatChecks(tuple(compiled), declared, str(path))


def checks_from_data(declared: list[dict[str, Any]]) -> FormatChecks:
    """Checks stored with a run, compiled again (ValueError when one no longer compiles)."""
    compiled = [_compile(CheckSpec.model_validate(d), Path("."))[0] for d in declared]
    return FormatChecks(tuple(compiled), declared)


def _compile(spec: CheckSpec, base: Path) -> tuple[FormatCheck, dict[str, Any]]:
    if spec.line_regex is not None:
        line = _regex(spec.line_regex)

        def every_line(text: str) -> bool:
            return bool(text) and all(line.fullmatch(x) for x in text.split("\n"))

        return FormatCheck(spec.name or f"every line matches {spec.line_regex}", every_line), _data(spec)
    if spec.regex is not None:
        whole = _regex(spec.regex)
        return FormatCheck(spec.name or f"matches {spec.regex}", lambda text: whole.fullmatch(text) is not None), \
            _data(spec)  # fmt: skip
    if spec.json_schema is not None or spec.json_schema_file is not None:
        schema = spec.json_schema if spec.json_schema is not None else _schema_file(base / str(spec.json_schema_file))
        validator = _validator(schema)
        data = {"name": spec.name, "json_schema": schema} if spec.name else {"json_schema": schema}
        return FormatCheck(spec.name or "valid JSON matching the schema", lambda text: _json_valid(validator, text)), \
            data  # fmt: skip
    name = str(spec.entry_point)
    return FormatCheck(spec.name or name, _entry_point(name)), _data(spec)


def _data(spec: CheckSpec) -> dict[str, Any]:
    return spec.model_dump(exclude_none=True)


def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex: {exc}") from None


def _schema_file(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _validator(schema: Any) -> Validator:
    if not isinstance(schema, dict):
        raise ValueError("the JSON Schema must be an object")
    cls = validator_for(schema)  # the draft the schema's $schema names, else the newest
    try:
        cls.check_schema(schema)
    except schema_errors.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _json_valid(validator: Validator, text: str) -> bool:
    try:
        instance = orjson.loads(text)  # strict: NaN and Infinity are not JSON
    except orjson.JSONDecodeError:
        return False
    return bool(validator.is_valid(instance))


def _entry_point(name: str) -> Callable[[str], bool]:
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        installed = ", ".join(known) or "none"
        raise ValueError(f"no entry point {name!r} in group {ENTRY_POINT_GROUP} (installed: {installed})")
    try:
        check = next(iter(found)).load()
    except Exception as exc:  # an installed plugin's import error: say which, not a traceback
        raise ValueError(f"cannot load entry point {name!r}: {type(exc).__name__}: {exc}") from None
    if not callable(check):
        raise ValueError(f"entry point {name!r} is not callable")
    return check  # type: ignore[no-any-return]


# -- checks this package registers under abproxy.format_checks (pyproject.toml) ------------------------------------


def distinct_lines(answer: str) -> bool:
    """No line is listed twice (blank lines aside): a code or item repeated is a malformed list."""
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    return len(lines) == len(set(lines))
