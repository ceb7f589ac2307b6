"""The study admin's pages under /eval/admin: studies, progress, revoking links, results, CSV.

    GET  /eval/admin                                            studies with progress per evaluator
    POST /eval/admin/login, /eval/admin/logout                  the session cookie
    GET  /eval/admin/studies/{name}                             evaluators, revoke buttons, results
    POST /eval/admin/studies/{name}/evaluators/{who}/revoke     the link stops working at once
    GET  /eval/admin/studies/{name}/votes.csv                   every vote, model names included

The admin token guards them as it guards the admin API. A browser cannot send a Bearer header, so
the login form sets a cookie instead: HMAC-SHA256 of a fixed label keyed by the token, which proves
the token was known without storing it, and stops working when the token is changed. HttpOnly keeps
it from scripts, SameSite=Strict from other sites' forms (the revoke button is a POST), Path keeps it
off every other URL. `Authorization: Bearer` works too, for curl.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
import time
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Form, Request, Response

from proxy.errors import AdminDisabled, AuthenticationFailed
from proxy.humaneval import studies
from proxy.humaneval.pages import PAGE_HEADERS, PageRoute, base, message, page, see_other, site
from proxy.humaneval.results import study_results

COOKIE = "abproxy_eval_admin"
_COOKIE_LABEL = b"llm-ab-proxy /eval/admin session v1"
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def session_cookie(admin_token: str) -> str:
    return hmac.new(admin_token.encode(), _COOKIE_LABEL, hashlib.sha256).hexdigest()


def _login_page(request: Request, *, error: str | None = None) -> Response:
    return page("admin_login.html", status=401, base=base(request), error=error)


def _authorised(request: Request) -> Response | None:
    """None when the caller holds the admin token; else the login page (or the API's 401 / 403 error)."""
    expected = site(request).admin_token
    if expected is None:
        raise AdminDisabled("the admin pages are disabled: set ABPROXY_ADMIN_TOKEN to enable them")
    authorization = request.headers.get("authorization")
    if authorization is not None:
        # A client that sends a header means it: a wrong token is the admin API's 401, not a login form.
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode()):
            return None
        raise AuthenticationFailed("missing or invalid admin token (Authorization: Bearer ...)")
    cookie = request.cookies.get(COOKIE, "")
    if cookie and hmac.compare_digest(cookie.encode(), session_cookie(expected).encode()):
        return None
    return _login_page(request)


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


admin_pages = APIRouter(prefix="/admin", route_class=PageRoute)


@admin_pages.get("")
def studies_page(request: Request) -> Response:
    refused = _authorised(request)
    if refused is not None:
        return refused
    found = studies.list_studies(site(request).store())
    return page("admin_studies.html", base=base(request), studies=found, iso=_iso)


@admin_pages.post("/login")
def login(request: Request, token: Annotated[str, Form()] = "") -> Response:
    expected = site(request).admin_token
    if expected is None:
        raise AdminDisabled("the admin pages are disabled: set ABPROXY_ADMIN_TOKEN to enable them")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        return _login_page(request, error="That is not the admin token.")
    response = see_other(f"{base(request)}/admin")
    response.set_cookie(
        COOKIE, session_cookie(expected), path=f"{base(request)}/admin", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return response


@admin_pages.post("/logout")
def logout(request: Request) -> Response:
    response = see_other(f"{base(request)}/admin")
    response.delete_cookie(COOKIE, path=f"{base(request)}/admin", httponly=True, samesite="strict")
    return response


@admin_pages.get("/studies/{name}")
def study_page(request: Request, name: str) -> Response:
    refused = _authorised(request)
    if refused is not None:
        return refused
    engine = site(request).store()
    study = studies.get_study(engine, name)
    if study is None:
        return message(request, "No such study", f"There is no study named {name!r}.", status=404)
    return page("admin_study.html", base=base(request), study=study, results=study_results(engine, study), iso=_iso)


@admin_pages.post("/studies/{name}/evaluators/{evaluator}/revoke")
def revoke(request: Request, name: str, evaluator: str) -> Response:
    refused = _authorised(request)
    if refused is not None:
        return refused
    engine = site(request).store()
    if studies.get_study(engine, name) is None:
        return message(request, "No such study", f"There is no study named {name!r}.", status=404)
    studies.revoke(engine, name, evaluator, now=time.time())
    return see_other(f"{base(request)}/admin/studies/{quote(name, safe='')}")


@admin_pages.get("/studies/{name}/votes.csv")
def votes_csv(request: Request, name: str) -> Response:
    refused = _authorised(request)
    if refused is not None:
        return refused
    engine = site(request).store()
    if studies.get_study(engine, name) is None:
        return message(request, "No such study", f"There is no study named {name!r}.", status=404)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["created_at", "evaluator", "comparison_id", "model_a", "model_b", "choice", "winner", "time_taken_ms",
         "rubric"]
    )  # fmt: skip
    for vote in studies.study_votes(engine, name):
        writer.writerow([
            datetime.fromtimestamp(vote.ts, UTC).isoformat().replace("+00:00", "Z"), vote.evaluator,
            vote.comparison_id, vote.model_a, vote.model_b, vote.choice, vote.winner or "tie",
            "" if vote.time_taken_ms is None else f"{vote.time_taken_ms:.0f}",
            orjson.dumps(dict(vote.rubric), option=orjson.OPT_SORT_KEYS).decode() if vote.rubric else "",
        ])  # fmt: skip
    filename = _FILENAME_UNSAFE.sub("_", name) or "study"
    headers = {**PAGE_HEADERS, "Content-Disposition": f'attachment; filename="{filename}-votes.csv"'}
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
