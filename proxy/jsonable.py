"""Report values as JSON can carry them: NaN and infinities (an interval with no spread) become null."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float, at any depth, replaced by None (tuples become lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dataclass_json(obj: Any) -> dict[str, Any]:
    body: dict[str, Any] = finite(dataclasses.asdict(obj))
    return body
