"""FastAPI routes off the hot path: the admin API, health, readiness and metrics.

The admin API is refused outright when no token is configured: a rollout switch that anyone
on the network can flip is worse than none.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proxy.config import validate_percent
from proxy.controller.overrides import OVERRIDES, OverrideRefused, override
from proxy.controller.state import DecisionRecord, PlanState, PlanStore
from proxy.errors import (
    InvalidRequest,
    NotFound,
    StateConflict,
    StateUnavailable,
)
from proxy.experiments import Arm, Experiment
from proxy.metrics import exposition
from proxy.rollout import AuditEntry, RolloutState
from proxy.runtime import Runtime


class RolloutUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    percent: Annotated[float, Field(strict=True)]
    reason: Annotated[str | None, Field(max_length=500)] = None

    @field_validator("percent")
    @classmethod
    def _percent(cls, value: float) -> float:
        return validate_percent(value)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """Token (constant time), role and rate limit (proxy/admin_auth.py); returns who is acting, for the audit.

    async although it never awaits: FastAPI runs a plain function dependency in its threadpool, and
    the hop to a worker thread and back through a busy event loop measured ~4 ms of every admin
    call (bench/scenarios/propagation.py); the check itself is microseconds of CPU."""
    client = request.client.host if request.client else "unknown"
    role = _runtime(request).admin_auth.check(authorization, request.method, client)
    # Printable ASCII only: the actor lands in the audit stream, logs and a terminal table.
    actor = "".join(ch for ch in request.headers.get("x-abproxy-actor", "") if " " <= ch <= "~").strip()
    return actor[:128] or ("admin" if role == "admin" else "admin-read")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _arm_view(arm: Arm) -> dict[str, Any]:
    return {"model": arm.model_key, "upstream": arm.upstream, "upstream_model": arm.upstream_model}


def experiment_view(exp: Experiment, state: RolloutState, *, stale: bool = False) -> dict[str, Any]:
    return {
        "name": exp.name,
        "aliases": list(exp.aliases),
        "salt": exp.salt,
        "control": _arm_view(exp.control),
        "treatment": _arm_view(exp.treatment),
        "percent": state.percent,
        "source": state.source,
        "rev": state.rev,
        "updated_at": _iso(state.updated_at),
        "updated_by": state.updated_by,
        "reason": state.reason,
        "stale": stale,
    }


def _audit_view(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "from": entry.from_percent,
        "to": entry.to_percent,
        "by": entry.by,
        "at": _iso(entry.at),
        "reason": entry.reason,
    }


def _experiment(runtime: Runtime, name: str) -> Experiment:
    exp = runtime.router.experiments.get(name)
    if exp is None:
        raise NotFound(f"no experiment named {name!r}", param="name", code="experiment_not_found")
    return exp


async def _current(runtime: Runtime, exp: Experiment) -> dict[str, Any]:
    """Redis is the truth; if it is down, say what this process routes by, marked stale."""
    try:
        return experiment_view(exp, await runtime.store.get(exp.name))
    except StateUnavailable:
        return experiment_view(exp, runtime.rollout.states[exp.name], stale=True)


admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@admin.get("/experiments")
async def list_experiments(request: Request) -> dict[str, Any]:
    runtime = _runtime(request)
    return {"experiments": [await _current(runtime, exp) for exp in runtime.router.experiments.values()]}


@admin.get("/experiments/{name}")
async def get_experiment(request: Request, name: str) -> dict[str, Any]:
    runtime = _runtime(request)
    return await _current(runtime, _experiment(runtime, name))


async def rollout_update(request: Request, _: Annotated[str, Depends(require_admin)]) -> RolloutUpdate:
    """The PUT body, read only once the caller is authenticated.

    FastAPI reads and JSON-decodes a body declared as a parameter before any dependency runs,
    so a malformed body from a caller with no valid token would get a 422, not a 401/403.
    """
    try:
        return RolloutUpdate.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


_ROLLOUT_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": RolloutUpdate.model_json_schema()}}}
}


@admin.put("/experiments/{name}/rollout", openapi_extra=_ROLLOUT_BODY)
async def set_rollout(
    request: Request,
    name: str,
    update: Annotated[RolloutUpdate, Depends(rollout_update)],
    actor: Annotated[str, Depends(require_admin)],
) -> dict[str, Any]:
    runtime = _runtime(request)
    exp = _experiment(runtime, name)
    state, previous = await runtime.store.set_percent(name, update.percent, by=actor, reason=update.reason)
    # This instance follows at once; the others follow from the pub/sub message.
    runtime.rollout.apply_own_write(state)
    paused = await _pause_plan_for_manual_change(runtime, name, actor, update.percent)
    return {**experiment_view(exp, state), "previous_percent": previous, "plan_paused": paused}


async def _pause_plan_for_manual_change(runtime: Runtime, name: str, actor: str, percent: float) -> bool:
    """A person set the percent by hand: a running plan must not move it back, so it pauses (audited)."""
    plan = runtime.settings.experiments[name].rollout_plan
    if not plan:
        return False
    plans = _plans(runtime)
    current = await plans.get(name)
    if current is None or current.status != "running":
        return False
    try:
        await override(plans, plan, name, "pause", by=actor, reason=f"percent set by hand to {percent:g}",
                       clock_now=time.time(), wall_now=time.time())  # fmt: skip
    except OverrideRefused:
        return False  # paused by someone else in between: the outcome wanted
    return True


def _plans(runtime: Runtime) -> PlanStore:
    defaults = {n: e.rollout_percent for n, e in runtime.settings.experiments.items()}
    return PlanStore(runtime.redis, defaults)


def _plan_view(state: PlanState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {"phase": state.phase, "phase_name": state.phase_name, "status": state.status,
            "entered_at": _iso(state.entered_at), "data_since": _iso(state.data_since), "rev": state.rev,
            "updated_at": _iso(state.updated_at), "updated_by": state.updated_by, "reason": state.reason}  # fmt: skip


def _decision_view(d: DecisionRecord) -> dict[str, Any]:
    return {"id": d.id, "at": _iso(d.at), "by": d.by, "action": d.action, "phase_from": d.phase_from,
            "phase_to": d.phase_to, "status": d.status, "percent_from": d.percent_from,
            "percent_to": d.percent_to, "reason": d.reason, "evidence": d.evidence}  # fmt: skip


@admin.get("/experiments/{name}/plan")
async def get_plan(
    request: Request, name: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 20
) -> dict[str, Any]:
    """The rollout plan as configured, where it stands, and its latest decisions with their evidence."""
    runtime = _runtime(request)
    _experiment(runtime, name)
    plans = _plans(runtime)
    return {
        "experiment": name,
        "phases": [p.model_dump() for p in runtime.settings.experiments[name].rollout_plan],
        "state": _plan_view(await plans.get(name)),
        "decisions": [_decision_view(d) for d in await plans.decisions(name, limit)],
    }


class PlanOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=500)]


async def plan_override(request: Request, _: Annotated[str, Depends(require_admin)]) -> PlanOverride:
    """The POST body, read once the caller is authenticated (as `rollout_update`)."""
    try:
        return PlanOverride.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


@admin.post("/experiments/{name}/plan/{action}",
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                "schema": PlanOverride.model_json_schema()}}}})  # fmt: skip
async def override_plan(
    request: Request,
    name: str,
    action: str,
    body: Annotated[PlanOverride, Depends(plan_override)],
    actor: Annotated[str, Depends(require_admin)],
) -> dict[str, Any]:
    """pause | resume | promote | abort: a person's word, which always wins over the controller's."""
    runtime = _runtime(request)
    _experiment(runtime, name)
    if action not in OVERRIDES:
        raise NotFound(f"no plan action {action!r} (one of {', '.join(OVERRIDES)})", param="action",
                       code="unknown_action")  # fmt: skip
    plan = runtime.settings.experiments[name].rollout_plan
    try:
        state = await override(_plans(runtime), plan, name, action, by=actor, reason=body.reason,
                               clock_now=time.time(), wall_now=time.time())  # fmt: skip
    except OverrideRefused as exc:
        raise StateConflict(str(exc), param="action", code="plan_action_refused") from None
    runtime.rollout.apply_own_write(await runtime.store.get(name))
    return {"experiment": name, "state": _plan_view(state)}


@admin.get("/experiments/{name}/audit")
async def get_audit(
    request: Request, name: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> dict[str, Any]:
    runtime = _runtime(request)
    _experiment(runtime, name)
    entries = await runtime.store.audit(name, limit)
    return {"experiment": name, "entries": [_audit_view(e) for e in entries]}


@admin.get("/experiments/{name}/report")
async def get_report(
    request: Request, name: str, since: str | None = None, until: str | None = None
) -> dict[str, Any]:
    """The same report as `abproxy report NAME --format json`, from the analysis store."""
    runtime = _runtime(request)
    _experiment(runtime, name)
    return await asyncio.to_thread(_report_json, runtime, name, since, until, time.time())


def _report_json(runtime: Runtime, name: str, since: str | None, until: str | None, now: float) -> dict[str, Any]:
    """Runs in a worker thread, imports included: the analysis stack (scipy, statsmodels, pandas)
    is ~1 s of imports and ~100 MiB that a serving process only needs once someone asks for a
    report, and importing it on the event loop would stall every open stream meanwhile."""
    from proxy.analysis.render import to_json
    from proxy.analysis.service import StoreNotReady, parse_bounds, report_from_store

    try:
        start, end = parse_bounds(since, until, now)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=str(exc).split(":")[0], code="invalid_time") from None
    try:
        report = report_from_store(runtime.store_engine(), runtime.settings, name, since=start, until=end, now=now)
    except StoreNotReady as exc:
        raise StateUnavailable(str(exc), code="store_unavailable") from None
    return to_json(report)


ops = APIRouter()


@ops.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz")
async def readyz(request: Request) -> Response:
    runtime = _runtime(request)
    rollout = runtime.rollout
    ready = rollout.loaded or not runtime.settings.rollout.ready_requires_redis
    body = {
        "status": "ready" if ready else "not ready",
        "rollout_loaded": rollout.loaded,
        "redis_connected": bool(rollout.connected),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    runtime = _runtime(request)
    if not runtime.settings.server.prometheus_enabled:
        raise NotFound("metrics are off (server.prometheus_enabled: false)", code="unknown_url")
    if runtime.settings.server.metrics_port is not None:
        raise NotFound(f"metrics are served on port {runtime.settings.server.metrics_port}", code="unknown_url")
    # In multiprocess mode the scrape reads the workers' files, not this registry: run this process's
    # pending records first here (the registry's own hook covers the single process).
    runtime.recorder.run()
    # In a thread: multiprocess mode reads every worker's files, which should not stall the loop.
    body, content_type = await asyncio.to_thread(exposition, runtime.metrics.registry)
    return Response(body, media_type=content_type)
