"""Comparisons from a JSONL file: one prompt with two or more models' answers per line.

A line is {"prompt": str | messages list, "responses": {model name: answer text, ...}}; other keys
("id", "metadata") are allowed and ignored. A comparison is stored once by the hash of its content,
so importing a file again, or a file that repeats a line, adds nothing.

`flag_reason` marks a comparison whose answer may give its model away ("As a fine-tuned model...").
Blind comparison is the point of a study, so `create_study` leaves flagged comparisons out; public
arenas (Chatbot Arena) do the same with answers that reveal their model's identity.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, select

from proxy.humaneval.insert import insert_for
from proxy.store.schema import comparisons

MODEL_NAME_MAX = 128  # tasks.model_a / model_b
SOURCE_MAX = 256
_IN_CHUNK = 500  # content hashes per IN (...) lookup

# Phrases by which an answer says what it is, whatever the compared models are called.
_REVEALING = re.compile(
    r"\bfine[\s-]?tun(?:ed|ing)\b"
    r"|\bbase[\s-]model\b"
    r"|\bas an? (?:ai language model|large language model|language model|llm|ai)\b"
    r"|\b(?:trained|developed|created|built|made) by (?:openai|anthropic|google|meta|mistral)\b"
    r"|\b(?:chatgpt|gpt-?[345][a-z0-9.-]*|openai|claude|llama[\s-]?\d*|gemini|mistral)\b",
    re.IGNORECASE,
)
# Variant labels that are also everyday words: "our customer base" names no model. Their revealing use
# ("the base model") is caught by the phrases above.
_GENERIC_NAMES = frozenset(
    {"a", "b", "base", "baseline", "control", "treatment", "default", "current", "new", "old", "candidate", "model"}
)


@dataclass(frozen=True, slots=True)
class ImportResult:
    added: int
    duplicates: int  # same content_hash already stored, or earlier in the file
    flagged: list[tuple[str, str]]  # (comparison id, reason) for every flagged comparison of the file
    errors: list[tuple[int, str]]  # (line number, message): the line was skipped
    source: str = ""

    @property
    def parsed(self) -> int:
        return self.added + self.duplicates


def import_jsonl(engine: Engine, path: str | Path, *, source: str | None = None, now: float) -> ImportResult:
    """Store the file's comparisons in one transaction; ValueError when the file cannot be read.

    `source` (default "import:<file name>") is what `create_study(source=...)` selects by. A comparison
    already stored keeps its first source.
    """
    path = Path(path)
    source = source if source is not None else f"import:{path.name}"
    if not source or len(source) > SOURCE_MAX:
        raise ValueError(f"source must be 1-{SOURCE_MAX} characters, got {len(source)}")
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None

    rows: dict[str, dict[str, Any]] = {}  # content_hash -> row, first copy in the file
    errors: list[tuple[int, str]] = []
    parsed = 0
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            prompt, responses = parse_line(raw)
        except ValueError as exc:
            errors.append((number, str(exc)))
            continue
        parsed += 1
        row = comparison_row(prompt, responses, source=source, now=now)
        rows.setdefault(row["content_hash"], row)

    added = 0
    ids: dict[str, str] = {}
    if rows:
        with engine.begin() as conn:
            statement = insert_for(conn)(comparisons).on_conflict_do_nothing(index_elements=["content_hash"])
            result = conn.execute(statement.execution_options(preserve_rowcount=True), list(rows.values()))
            added = max(result.rowcount, 0)
            hashes = list(rows)
            for start in range(0, len(hashes), _IN_CHUNK):
                chunk = hashes[start : start + _IN_CHUNK]
                query = select(comparisons.c.content_hash, comparisons.c.id, comparisons.c.flagged)
                for content_hash, cid, flagged in conn.execute(query.where(comparisons.c.content_hash.in_(chunk))):
                    ids[content_hash] = cid
                    rows[content_hash]["flagged"] = flagged  # a stored row keeps the reason it was stored with
    flagged = [(ids[h], row["flagged"]) for h, row in rows.items() if row["flagged"] and h in ids]
    return ImportResult(added=added, duplicates=parsed - added, flagged=flagged, errors=errors, source=source)


def comparison_row(
    prompt: str | list[dict[str, str]], responses: dict[str, str], *, source: str, now: float,
    experiment: str | None = None, request_id: str | None = None,
) -> dict[str, Any]:
    """A `comparisons` row: imported pairs and production pairs (the collector) are built alike."""
    content_hash = hashlib.sha256(orjson.dumps([prompt, responses], option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {
        "id": "c_" + secrets.token_hex(8), "source": source, "prompt": orjson.dumps(prompt).decode(),
        "responses": orjson.dumps(responses).decode(), "content_hash": content_hash,
        "flagged": flag_reason(responses), "experiment": experiment, "request_id": request_id, "created_at": now,
    }  # fmt: skip


def checked_pair(prompt: Any, responses: Any) -> tuple[str | list[dict[str, str]], dict[str, str]]:
    """(prompt, responses) validated as an imported line's are; ValueError naming the problem."""
    return _prompt(prompt), _responses(responses)


def parse_line(raw: bytes) -> tuple[str | list[dict[str, str]], dict[str, str]]:
    """(prompt, responses) of one line; ValueError naming the first problem."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson's message ends with its own "line 1 column N", which would read as the file's line.
        raise ValueError(f"not JSON ({str(exc).split(': line ')[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if "prompt" not in data:
        raise ValueError("missing prompt")
    prompt = _prompt(data["prompt"])
    if "responses" not in data:
        raise ValueError("missing responses")
    return prompt, _responses(data["responses"])


def _prompt(value: Any) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("prompt is empty")
        return _no_nul(value, "prompt")
    if isinstance(value, list) and value:
        messages = []
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"prompt message {i}: expected {{'role': str, 'content': str}}")
            messages.append({"role": _no_nul(message["role"], "prompt"),
                             "content": _no_nul(message["content"], "prompt")})
        if not any(m["content"].strip() for m in messages):
            raise ValueError("prompt is empty")
        return messages
    raise ValueError("prompt must be a non-empty string or a non-empty list of messages")


def _responses(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("responses must be an object {model name: answer text}")
    if len(value) < 2:
        raise ValueError(f"responses needs at least 2 models, got {len(value)}")
    for name, text in value.items():
        if not name.strip() or len(name) > MODEL_NAME_MAX or "\x00" in name:
            raise ValueError(f"model name must be 1-{MODEL_NAME_MAX} characters, got {name!r:.60}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"response of model {name!r} is empty or not text")
        _no_nul(text, f"response of model {name!r}")
    return dict(value)


def _no_nul(text: str, what: str) -> str:
    # PostgreSQL text cannot hold NUL; refusing keeps the stored text equal to the hashed text.
    if "\x00" in text:
        raise ValueError(f"{what} holds a NUL character")
    return text


def flag_reason(responses: Mapping[str, str]) -> str | None:
    """Why an answer may reveal its model, or None: it names a compared model, or says what it is.

    Model names match case-insensitively between non-alphanumeric boundaries; generic variant labels
    ("base", "control", ...) are left to the phrase check, since "customer base" is ordinary prose.
    """
    names = [n for n in responses if len(n) >= 3 and n.lower() not in _GENERIC_NAMES]
    name_patterns = [re.compile(rf"(?<![A-Za-z0-9]){re.escape(n)}(?![A-Za-z0-9])", re.IGNORECASE) for n in names]
    for model, text in responses.items():
        for pattern in name_patterns:
            named = pattern.search(text)
            if named:
                return _reason(model, named.group(0))
        found = _REVEALING.search(text)
        if found:
            return _reason(model, found.group(0))
    return None


def _reason(model: str, named: str) -> str:
    return f"answer of model {model!r} names {named!r}"[:SOURCE_MAX]
