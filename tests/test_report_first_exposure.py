"""A user's first exposure (proxy/analysis/dataset.py): the earliest request, then the lowest request id.

Found by one GROUP BY (no sort of the window's requests); two groups of one user with the same
earliest `ts` are decided by the request id, as ROW_NUMBER() OVER (ORDER BY ts, request_id) did.
"""

from __future__ import annotations

from typing import Any

from proxy.analysis.dataset import Window, load
from proxy.store.db import Store, engine_for, migrate
from tests.test_store import T0, request_event


def _request(request_id: str, user: str, ts: float, variant: str, percent: float) -> dict[str, Any]:
    return request_event(request_id, user_hash=user, ts=ts, variant=variant, rollout_percent=percent)


def test_first_exposure_breaks_ties_by_request_id(store_url: str) -> None:
    engine = engine_for(store_url)
    migrate(engine)
    Store(engine).write([
        # u1: treatment at 20 % and control at 10 % at the same instant: the lower id (b...) wins.
        _request("c-u1", "u1", T0 + 100, "treatment", 20.0),
        _request("b-u1", "u1", T0 + 100, "control", 10.0),
        _request("a-u1", "u1", T0 + 200, "treatment", 20.0),
        # u2: no tie, the earliest request decides whatever its id.
        _request("z-u2", "u2", T0 + 50, "treatment", 50.0),
        _request("a-u2", "u2", T0 + 60, "control", 50.0),
        # u3: the tie is within one group (same variant and percent): either row says the same.
        _request("b-u3", "u3", T0 + 90_000, "treatment", 30.0),
        _request("a-u3", "u3", T0 + 90_000, "treatment", 30.0),
    ])  # fmt: skip
    with engine.connect() as conn:
        data = load(conn, "sales-companion", Window(T0, T0 + 3 * 86_400), regeneration_window_s=120)
    engine.dispose()
    assert data.users == ["u1", "u2", "u3"]
    assert data.treatment.tolist() == [False, True, True]
    assert data.expected_treatment.tolist() == [0.10, 0.50, 0.30]
    assert data.first_day.tolist() == [0, 0, 1]
    # u1's later treatment requests and u2's control one are crossovers' requests.
    assert data.crossover_users == 2
