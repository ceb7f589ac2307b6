"""A person's word on a rollout plan: pause, resume, promote, abort. It always wins.

Each is a transition at the plan's current revision: a controller that decided on the revision before
finds it moved and its write is refused. If the controller wrote first, the person's action is applied
on top of what it did (read again and retried), so the last word is the person's either way.

    pause     running -> paused; the percent stays; the controller stops acting
    resume    paused -> running (same phase, same data window); halted, rolled back or aborted -> running
              at the current phase (aborted: the first) with its percent and a fresh data window, so old
              evidence (the mismatch, the regression) does not decide again; no plan yet -> started
    promote   to the next phase now, whatever the gates say (not from aborted: resume first)
    abort     to 0 % at once; the plan stops until resumed
"""

from __future__ import annotations

from typing import Literal

from proxy.controller.decide import enter
from proxy.controller.plan import PhaseConfig
from proxy.controller.state import Conflict, PlanState, PlanStore, Transition

Override = Literal["pause", "resume", "promote", "abort"]
OVERRIDES: tuple[Override, ...] = ("pause", "resume", "promote", "abort")
_ATTEMPTS = 5


class OverrideRefused(ValueError):
    """The action makes no sense in the plan's current state; the message says why. Nothing was written."""


async def override(
    store: PlanStore, plan: list[PhaseConfig], experiment: str, action: Override, *, by: str, reason: str,
    clock_now: float, wall_now: float,
) -> PlanState:  # fmt: skip
    if not plan:
        raise OverrideRefused(f"experiment {experiment!r} has no rollout_plan")
    for _ in range(_ATTEMPTS):
        state = await store.get(experiment)
        move = _move(plan, state, action, by=by, reason=reason, clock_now=clock_now, wall_now=wall_now)
        try:
            return await store.apply(experiment, move, expected_rev=state.rev if state else -1, lock_owner=None,
                                     previous=state)  # fmt: skip
        except Conflict:
            continue  # the controller wrote in between: apply the person's action on top of it
    raise OverrideRefused("the plan kept changing; try again")


def _move(plan: list[PhaseConfig], state: PlanState | None, action: Override, *, by: str, reason: str,
          clock_now: float, wall_now: float) -> Transition:  # fmt: skip
    said = f"{action} by {by}: {reason}"
    if state is None:
        if action in ("resume", "promote"):
            return enter(plan, 0, action="start", by=by, reason=said, clock_now=clock_now, wall_now=wall_now)
        if action == "pause":
            raise OverrideRefused("the plan has not started: nothing to pause (abort keeps it from starting)")
        return Transition("abort", 0, plan[0].name, "aborted", clock_now, wall_now, 0.0, by, said)
    if state.status == "completed" and action != "abort":
        raise OverrideRefused(f"the plan is completed (phase {state.phase_name}); abort is the only way back")
    if action == "pause":
        if state.status != "running":
            raise OverrideRefused(f"the plan is {state.status.replace('_', ' ')}, not running")
        return Transition("pause", state.phase, state.phase_name, "paused", state.entered_at, state.data_since, None,
                          by, said)  # fmt: skip
    if action == "resume":
        if state.status == "running":
            raise OverrideRefused("the plan is already running")
        if state.status == "paused":
            return Transition("resume", state.phase, state.phase_name, "running", state.entered_at, state.data_since,
                              None, by, said)  # fmt: skip
        index = 0 if state.status == "aborted" else state.phase
        return enter(plan, index, action="resume", by=by, reason=said, clock_now=clock_now, wall_now=wall_now)
    if action == "promote":
        if state.status == "aborted":
            raise OverrideRefused("the plan is aborted: resume it (from the first phase) before promoting")
        if state.phase >= len(plan) - 1:
            raise OverrideRefused(f"phase {state.phase_name} is the last: nothing to promote to")
        return enter(plan, state.phase + 1, action="promote", by=by, reason=said, clock_now=clock_now,
                     wall_now=wall_now)  # fmt: skip
    if state.status == "aborted":
        raise OverrideRefused("the plan is already aborted")
    return Transition("abort", state.phase, state.phase_name, "aborted", state.entered_at, state.data_since, 0.0, by,
                      said)  # fmt: skip
