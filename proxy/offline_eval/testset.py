"""A held-out test file: OpenAI fine-tuning chat JSONL, read and checked whole before any model is asked.

A line is `{"messages": [..., {"role": "assistant", "content": expected}]}`: the prompt is every message
but the last, the expected answer is the last. An optional `"id"` names the example; without one the id is
a hash of its messages, so an example keeps its id when lines are added or reordered, and a resumed run
or a comparison of two runs pairs answers by what was asked, not by line number.

Every problem of the file is collected with its line number, and none of it is used unless all is well:
a run that starts has a test set that will not fail half-way.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

Message = dict[str, Any]
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Fine-tuning-only keys of a message, which the chat API refuses.
_TRAINING_KEYS = frozenset({"weight"})
_ERRORS_SHOWN = 5


class TestFileError(ValueError):
    """The file cannot be used; the message names the file and the first problems with their lines."""

    __test__ = False  # not a pytest class, whatever its name


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    position: int  # 0-based, among the file's examples
    line: int  # 1-based line in the file
    prompt: list[Message]  # sent as is (after the run's system prompt is applied)
    expected: str


@dataclass(frozen=True, slots=True)
class TestSet:
    __test__ = False
    path: str
    sha256: str  # of the file's bytes: a run is tied to exactly this file
    examples: list[Example]


def load_test_set(path: str | Path, *, system_prompt: str | None = None) -> TestSet:
    """The file's examples; TestFileError when it cannot be read or any line is unusable.

    `system_prompt`, when given, is every example's system message: it replaces the example's own system
    (or developer) messages, or comes first when it has none.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TestFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    examples: list[Example] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example_id, prompt, expected = _parse(line)
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
            continue
        if example_id in seen:
            errors.append(f"line {number}: repeats the example of line {seen[example_id]} (id {example_id})")
            continue
        seen[example_id] = number
        if system_prompt is not None:
            prompt = [{"role": "system", "content": system_prompt},
                      *(m for m in prompt if m["role"] not in ("system", "developer"))]  # fmt: skip
        examples.append(Example(example_id, len(examples), number, prompt, expected))
    if errors:
        more = f" (and {len(errors) - _ERRORS_SHOWN} more)" if len(errors) > _ERRORS_SHOWN else ""
        raise TestFileError(f"{path}: " + "; ".join(errors[:_ERRORS_SHOWN]) + more)
    if not examples:
        raise TestFileError(f"{path}: no examples (one JSON object with \"messages\" per line)")
    return TestSet(path=str(path), sha256=hashlib.sha256(raw).hexdigest(), examples=examples)


def _parse(line: bytes) -> tuple[str, list[Message], str]:
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ValueError("not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError('"messages" must be a list of at least two messages (the prompt, then the answer)')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}] must be an object with a role ({', '.join(sorted(_ROLES))})")
    *prompt, answer = messages
    if answer["role"] != "assistant" or not isinstance(answer.get("content"), str):
        raise ValueError("the last message must be the assistant's answer, with text content (tool calls are "
                         "not evaluated)")  # fmt: skip
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("the prompt (every message but the last) has no user message")
    prompt = [{k: v for k, v in m.items() if k not in _TRAINING_KEYS} for m in prompt]
    given = data.get("id")
    if given is not None:
        if not isinstance(given, str) or not _ID.fullmatch(given):
            raise ValueError('"id" must be 1-64 characters of A-Z a-z 0-9 _ . : -')
        return given, prompt, answer["content"]
    digest = hashlib.sha256(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return digest[:16], prompt, answer["content"]


def last_user_text(prompt: list[Message]) -> str:
    """The prompt's last user message as text: what a report shows to say which example this is."""
    for message in reversed(prompt):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
