"""`--since` / `?since=`: when an analysis window starts or ends, as a person would type it.

    7d, 12h, 30m      that long before now
    2026-11-01        midnight UTC that day
    2026-11-01T09:00  ISO 8601; without an offset, UTC
    1763800000        unix seconds
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float) -> float:
    """Unix seconds for `text`; raises ValueError with the accepted forms."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        return now - float(relative.group(1)) * _UNIT_S[relative.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        forms = "7d / 12h / 30m, an ISO date or datetime, or unix seconds"
        raise ValueError(f"{text!r} is not a time: use {forms}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
