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
        return _in_range(text, now - float(relative.group(1)) * _UNIT_S[relative.group(2)])
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return _in_range(text, seconds)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        forms = "7d / 12h / 30m, an ISO date or datetime, or unix seconds"
        raise ValueError(f"{text!r} is not a time: use {forms}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _in_range(text, moment.timestamp())


# Unix seconds a report window can sensibly name; beyond, datetime (and the databases) overflow.
_EARLIEST, _LATEST = 0.0, 253_402_300_799.0  # 1970-01-01 .. 9999-12-31T23:59:59Z


def _in_range(text: str, seconds: float) -> float:
    if not _EARLIEST <= seconds <= _LATEST:  # also false for NaN
        raise ValueError(f"{text!r} is outside 1970..9999")
    return seconds
