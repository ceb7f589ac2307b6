"""Optional notifications: a Slack-compatible JSON webhook on every phase change, rollback and halt.

The body is `{"text": ...}`, which Slack's incoming webhooks, Mattermost and most chat bridges accept.
A failed post is logged and counted, never retried at the expense of the next decision: the decision is
already written, and the decision stream and audit hold it whatever the chat does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import structlog

if TYPE_CHECKING:
    from proxy.controller.decide import Decision
    from proxy.controller.state import PlanState

log = structlog.get_logger("abproxy.controller")
_ICON = {"start": ":rocket:", "promote": ":arrow_up:", "complete": ":white_check_mark:", "rollback": ":rotating_light:",
         "halt": ":octagonal_sign:"}  # fmt: skip


class Notifier:
    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self.failures = 0

    async def tell(self, experiment: str, decision: Decision, state: PlanState) -> None:
        percent = "" if decision.move is None or decision.move.percent is None else f" ({decision.move.percent:g} %)"
        text = (f"{_ICON.get(decision.action, '')} *{experiment}*: {decision.action} -> {state.phase_name}"
                f"{percent}, {state.status.replace('_', ' ')}\n{decision.reason}")  # fmt: skip
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s) as client:
                response = await client.post(self._url, json={"text": text})
            response.raise_for_status()
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError (a URL with a newline)
            self.failures += 1
            # The URL holds the webhook's secret: never logged.
            log.warning("webhook_failed", experiment=experiment, error=type(exc).__name__)
