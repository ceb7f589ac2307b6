"""The blind comparison web app: the evaluator's pages under /eval/s/{token}, and the /eval router.

    GET  /eval/s/{token}                   303 to the first task without a vote, or the "done" page
    GET  /eval/s/{token}/t/{task_id}       the comparison: prompt, Response A | B, rubric, verdict
    POST /eval/s/{token}/t/{task_id}/vote  store the vote (once), 303 to the next task
    POST /eval/s/{token}/undo              delete the last vote, 303 to its task
    GET  /eval/static/{name}               the stylesheet and the keyboard-shortcut script
    /eval/admin/...                        proxy.humaneval.admin_web

Blindness. Which model is A is decided by the study and kept in the store; `studies.TaskView` is
all an evaluator's page is rendered from, and it holds the answers' texts and a random task id, no
model name and no comparison id. The study's name is never shown either (an admin may have named
it after the models). An unknown, revoked or mistyped link gets the same 404 as a task id that is
not this evaluator's, so a page says nothing about which studies exist.

Time taken. The page carries the unix time (ms) it was rendered at in a hidden field, and the
server subtracts it from the time the vote arrives: it counts reading and thinking, works without
JavaScript, and a reload starts the clock again. A value outside 0..6 h (a tampered or stale form)
is stored as unknown rather than rejected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import Engine

from proxy.humaneval import studies
from proxy.humaneval.admin_web import admin_pages
from proxy.humaneval.pages import PAGE_HEADERS, PageRoute, base, message, page, see_other, site
from proxy.humaneval.rubric import Rubric
from proxy.humaneval.studies import Evaluator, TaskView

Choice = Literal["A", "tie", "B"]
CHOICES: Mapping[str, str] = {"A": "A is better", "tie": "Tie", "B": "B is better"}
PREFERENCES: Mapping[str, str] = {"A": "A better", "tie": "Tie", "B": "B better"}
WHY_MAX = 2000
TIME_TAKEN_MAX_MS = 6 * 3600 * 1000
TOKEN_MAX = 256  # longer than any token create_study hands out: refused before the store is asked
_STATIC = Path(__file__).parent / "static"
_STATIC_FILES = {"eval.css": "text/css", "eval.js": "text/javascript"}
_ROLES = frozenset(("system", "user", "assistant", "tool", "developer"))


class VoteFormError(ValueError):
    """A vote form the server refuses: shown above the form again, with HTTP 400, nothing stored."""


@dataclass(frozen=True, slots=True)
class VoteForm:
    choice: Choice
    why: str | None
    rubric: dict[str, str | int]
    time_taken_ms: float | None


def parse_vote_form(form: Mapping[str, str], rubric: Rubric, *, now_ms: float) -> VoteForm:
    """The submitted form checked against the study's rubric; VoteFormError says what to fix."""
    choice = form.get("choice", "")
    if choice not in CHOICES:
        raise VoteFormError("Choose one: A is better, Tie, or B is better.")
    why = form.get("why", "").strip() or None
    if why is not None and len(why) > WHY_MAX:
        raise VoteFormError(f"Keep the reason under {WHY_MAX} characters (it has {len(why)}).")
    answers: dict[str, str | int] = {}
    expected: dict[str, Mapping[str, str | int]] = {}
    for criterion in rubric.criteria:
        if criterion.kind == "preference":
            expected[criterion.name] = {value: value for value in PREFERENCES}
        else:
            for side in ("A", "B"):
                expected[f"{criterion.name}.{side}"] = {str(score): score for score in range(1, 6)}
    for key, raw in form.items():
        if not key.startswith("rubric."):
            continue
        name = key.removeprefix("rubric.")
        allowed = expected.get(name)
        if allowed is None:
            raise VoteFormError(f"This study's rubric has no question {name!r}: reload the page.")
        if raw == "":
            continue
        if raw not in allowed:
            raise VoteFormError(f"{_question(name)}: {raw!r} is not one of the offered answers.")
        answers[name] = allowed[raw]
    for criterion in rubric.criteria:
        # A score compares the two answers only when both have one; half a pair would be noise.
        scored = [f"{criterion.name}.{side}" in answers for side in ("A", "B")]
        if criterion.kind == "score" and any(scored) and not all(scored):
            raise VoteFormError(f"{_question(criterion.name)}: score both responses, or neither.")
    return VoteForm(cast(Choice, choice), why, answers, _time_taken(form.get("shown_at"), now_ms))


def _question(key: str) -> str:
    name, _, side = key.partition(".")
    label = name.replace("_", " ").capitalize()
    return f"{label}, Response {side}" if side else label


def _time_taken(shown_at: str | None, now_ms: float) -> float | None:
    try:
        taken = now_ms - float(shown_at or "")
    except ValueError:
        return None
    return taken if 0 <= taken <= TIME_TAKEN_MAX_MS else None


@dataclass(frozen=True, slots=True)
class TaskPage:
    """Everything the comparison page is rendered from: nothing here names a model."""

    token: str
    task: TaskView
    voted: int
    total: int
    rubric: Rubric
    shown_at_ms: int
    form: Mapping[str, str] = field(default_factory=dict)  # what to show as chosen: a kept form, or the vote
    error: str | None = None

    @property
    def conversation(self) -> list[tuple[str, str]] | None:
        """The prompt as (role, text) turns, or None for a plain-text prompt."""
        prompt = self.task.prompt
        if isinstance(prompt, str):
            return None
        return [(_role(turn.get("role")), _text(turn.get("content"))) for turn in prompt]


def _role(role: object) -> str:
    return role if isinstance(role, str) and role in _ROLES else "other"


def _text(content: object) -> str:
    """A message's content: a string, or the text parts of a content list (images are not shown)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return "\n\n".join(str(text) for text in texts)
    return "" if content is None else orjson.dumps(content).decode()


def _vote_form(task: TaskView) -> dict[str, str]:
    if task.vote is None:
        return {}
    shown = {f"rubric.{key}": str(value) for key, value in task.vote.rubric.items()}
    return {**shown, "choice": task.vote.choice, "why": task.vote.why or ""}


def _evaluator(engine: Engine, token: str) -> Evaluator | None:
    if not token or len(token) > TOKEN_MAX:
        return None
    return studies.evaluator_for(engine, token)


def _rubric(engine: Engine, study: str) -> Rubric:
    summary = studies.get_study(engine, study)
    return summary.rubric if summary is not None else Rubric()


def _task_page(engine: Engine, token: str, task_id: str, *, now_ms: int) -> tuple[Evaluator, TaskPage] | None:
    evaluator = _evaluator(engine, token)
    if evaluator is None:
        return None
    task = studies.get_task(engine, evaluator, task_id)
    if task is None:
        return None
    voted, total = studies.progress(engine, evaluator)
    rubric = _rubric(engine, evaluator.study)
    return evaluator, TaskPage(token, task, voted, total, rubric, now_ms, _vote_form(task))


def _not_found(request: Request) -> Response:
    # One page for every miss: an unknown, revoked or mistyped link, or a task not this evaluator's.
    return message(
        request, "Link not found",
        "This link does not work. Check that you opened the whole link you were sent, or ask for a new one.",
        status=404,
    )  # fmt: skip


def _render_task(request: Request, task_page: TaskPage, *, status: int = 200) -> Response:
    return page(
        "task.html", status=status, base=base(request), page=task_page, choices=CHOICES, preferences=PREFERENCES
    )


def _task_url(request: Request, token: str, task_id: str) -> str:
    return f"{base(request)}/s/{token}/t/{task_id}"


router = APIRouter(prefix="/eval", route_class=PageRoute, include_in_schema=False)
router.include_router(admin_pages)


@router.get("/s/{token}")
def start(request: Request, token: str) -> Response:
    engine = site(request).store()
    evaluator = _evaluator(engine, token)
    if evaluator is None:
        return _not_found(request)
    task = studies.current_task(engine, evaluator)
    if task is not None:
        return see_other(_task_url(request, token, task.id))
    voted, total = studies.progress(engine, evaluator)
    return page("done.html", base=base(request), token=token, voted=voted, total=total)


@router.get("/s/{token}/t/{task_id}")
def show_task(request: Request, token: str, task_id: str) -> Response:
    found = _task_page(site(request).store(), token, task_id, now_ms=int(time.time() * 1000))
    return _not_found(request) if found is None else _render_task(request, found[1])


@router.post("/s/{token}/t/{task_id}/vote")
async def vote(request: Request, token: str, task_id: str) -> Response:
    form = {key: value for key, value in (await request.form()).multi_items() if isinstance(value, str)}
    # The store is synchronous: its work runs in a thread, off the event loop.
    return await asyncio.to_thread(_vote, request, token, task_id, form, time.time())


def _vote(request: Request, token: str, task_id: str, form: Mapping[str, str], now: float) -> Response:
    engine = site(request).store()
    found = _task_page(engine, token, task_id, now_ms=int(now * 1000))
    if found is None:
        return _not_found(request)
    evaluator, task_page = found
    try:
        parsed = parse_vote_form(form, task_page.rubric, now_ms=now * 1000)
        studies.cast_vote(
            engine, evaluator, task_id, parsed.choice, why=parsed.why, rubric=parsed.rubric,
            time_taken_ms=parsed.time_taken_ms, now=now,
        )  # fmt: skip
    except ValueError as exc:  # VoteFormError, or the store's own check
        # The clock keeps running from the first render: fixing a mistake is part of the time taken.
        first_shown = _time_taken(form.get("shown_at"), now * 1000)
        shown_at_ms = task_page.shown_at_ms if first_shown is None else int(now * 1000 - first_shown)
        kept = TaskPage(
            token, task_page.task, task_page.voted, task_page.total, task_page.rubric, shown_at_ms,
            form=dict(form), error=str(exc),
        )  # fmt: skip
        return _render_task(request, kept, status=400)
    # A double submit lands here too: cast_vote kept the first vote, and the evaluator moves on.
    following = studies.current_task(engine, evaluator)
    return see_other(_task_url(request, token, following.id) if following else f"{base(request)}/s/{token}")


@router.post("/s/{token}/undo")
def undo(request: Request, token: str) -> Response:
    engine = site(request).store()
    evaluator = _evaluator(engine, token)
    if evaluator is None:
        return _not_found(request)
    task_id = studies.undo_last(engine, evaluator)
    return see_other(_task_url(request, token, task_id) if task_id else f"{base(request)}/s/{token}")


@router.get("/static/{name}")
def static(name: str) -> Response:
    media_type = _STATIC_FILES.get(name)
    if media_type is None:
        return Response("not found", status_code=404, media_type="text/plain", headers=dict(PAGE_HEADERS))
    # Shared by every page and free of anything personal: caching it is safe.
    headers = {**PAGE_HEADERS, "Cache-Control": "public, max-age=3600"}
    return FileResponse(_STATIC / name, media_type=media_type, headers=headers)
