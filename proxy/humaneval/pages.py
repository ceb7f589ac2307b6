"""What every /eval page shares: where the store is, the templates, and the response headers.

`EvalSite` is the one thing the pages take from the process serving them, set as
`app.state.eval_site`: the proxy builds it from its Runtime, `abproxy humaneval serve` from a store
URL alone (it has no upstreams, Redis or experiments to start).

Every page answers with `PAGE_HEADERS`. The evaluator's secret is in the URL, so no page may leak it
through a Referer, a shared cache or a search index; the policy allows scripts, styles and form
targets from this origin only (no inline script or style anywhere), and no other site may frame a page.
The admin pages' JSON errors (401, 403) and a wrong method's 405 carry the same headers.

Cross-site forms. A POST (vote, undo, admin login, logout, revoke) sent by another site's page is
refused with 403 before its form is read, so nothing is stored. The browser says where a request comes
from: `Sec-Fetch-Site` (every current browser), else `Origin` compared with `Host`; a request with
neither is not a browser's (curl, a script), which has no ambient credential to abuse. This is the
check Go's net/http CrossOriginProtection makes, and it needs no token in the form. The evaluator's
own link already is the form's unguessable token: a vote URL holds 192 random bits that another
site cannot know, and the evaluator's pages use no cookie at all; the admin cookie is also
SameSite=Strict.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import structlog
from fastapi import Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from proxy.errors import ProxyError

if TYPE_CHECKING:
    import jinja2
    from sqlalchemy import Engine

log = structlog.get_logger("abproxy")

PAGE_HEADERS: Mapping[str, str] = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors 'none' for browsers that predate it
    "Cross-Origin-Opener-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


@dataclass(frozen=True, slots=True)
class EvalSite:
    store: Callable[[], Engine]  # opened on first use, like Runtime.store_engine
    admin_token: str | None  # None: the admin pages answer 403, like the admin API


def site(request: Request) -> EvalSite:
    found: EvalSite = request.app.state.eval_site
    return found


def base(request: Request) -> str:
    """The /eval prefix as the client sees it (behind a proxy that mounts the app under a path)."""
    root: str = request.scope.get("root_path", "")
    return f"{root.rstrip('/')}/eval"


@functools.cache
def _templates() -> jinja2.Environment:
    # Imported here: only a process that serves a page pays for Jinja.
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("proxy.humaneval", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = lambda value: quote(str(value), safe="")
    env.filters["label"] = lambda name: str(name).replace("_", " ").capitalize()
    return env


def page(template: str, *, status: int = 200, headers: Mapping[str, str] | None = None, **context: Any) -> HTMLResponse:
    html = _templates().get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def message(request: Request, title: str, text: str, *, status: int) -> HTMLResponse:
    """A page with a heading and a sentence: not found, unavailable, disabled."""
    return page("message.html", status=status, base=base(request), title=title, text=text)


def see_other(url: str) -> RedirectResponse:
    """303: after a POST the browser GETs the next page, so a reload never re-posts a form."""
    return RedirectResponse(url, status_code=303, headers=dict(PAGE_HEADERS))


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_ORIGIN = frozenset({"same-origin", "none"})  # "none": the user's own action (typed, bookmarked)


def cross_site(request: Request) -> bool:
    """True for a request another site's page made the browser send (see the module's docstring)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.strip().lower() not in _SAME_ORIGIN
    origin = request.headers.get("origin")
    if origin is None:
        return False
    host = request.headers.get("host")
    try:
        origin_host = urlsplit(origin.strip()).netloc
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return True
    return host is None or not origin_host or origin_host.lower() != host.strip().lower()


def _cross_site_refused(request: Request) -> HTMLResponse:
    return message(
        request, "Form sent from another site",
        "This form was not sent from this site's own page, so nothing was saved. Open your link and try again.",
        status=403,
    )  # fmt: skip


class PageRoute(APIRoute):
    """A page route: cross-site POSTs refused, store errors as a 503 page (an evaluator sees "try again",
    not a trace), and `PAGE_HEADERS` on its errors too."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            # Starlette's own 405, with the page headers (the app's handler keeps an exception's headers).
            raise HTTPException(status_code=405, headers={**PAGE_HEADERS, "Allow": ", ".join(sorted(self.methods))})
        await super().handle(scope, receive, send)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            if request.method not in _SAFE_METHODS and cross_site(request):
                # The path template, never the URL: the URL holds the evaluator's token.
                log.warning("eval_cross_site_post", path=self.path, origin=request.headers.get("origin", "")[:200],
                            fetch_site=request.headers.get("sec-fetch-site", "")[:40])  # fmt: skip
                return _cross_site_refused(request)
            try:
                return await handler(request)
            except ProxyError as exc:  # the admin pages' 401 / 403: the API's JSON error, with the page headers
                headers = {**PAGE_HEADERS, **{name.decode(): value.decode() for name, value in exc.headers()}}
                return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)
            except SQLAlchemyError as exc:
                log.warning("eval_store_error", path=self.path, error=type(exc).__name__, detail=str(exc)[:300])
                return message(
                    request, "Temporarily unavailable", "The study cannot be reached right now. Try again in a minute.",
                    status=503,
                )

        return guarded
