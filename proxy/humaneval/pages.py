"""What every /eval page shares: where the store is, the templates, and the response headers.

`EvalSite` is the one thing the pages take from the process serving them, set as
`app.state.eval_site`: the proxy builds it from its Runtime, `abproxy humaneval serve` from a store
URL alone (it has no upstreams, Redis or experiments to start).

Every page answers with `PAGE_HEADERS`. The evaluator's secret is in the URL, so no page may leak it
through a Referer, a shared cache or a search index; and the policy allows scripts, styles and form
targets from this origin only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog
from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    import jinja2
    from sqlalchemy import Engine

log = structlog.get_logger("abproxy")

PAGE_HEADERS: Mapping[str, str] = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
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


class PageRoute(APIRoute):
    """A page route whose store errors become a 503 page: an evaluator sees "try again", not a trace."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except SQLAlchemyError as exc:
                log.warning("eval_store_error", path=self.path, error=type(exc).__name__, detail=str(exc)[:300])
                return message(
                    request, "Temporarily unavailable", "The study cannot be reached right now. Try again in a minute.",
                    status=503,
                )

        return guarded
