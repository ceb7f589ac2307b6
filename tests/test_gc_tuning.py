"""The report's pause of the cyclic collector (proxy/gc_tuning.py): off inside, as it was after."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from proxy.gc_tuning import cyclic_collector_paused


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    was_enabled = gc.isenabled()
    yield
    (gc.enable if was_enabled else gc.disable)()


def test_the_collector_is_off_inside_and_back_on_after() -> None:
    gc.enable()
    with cyclic_collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_already_off_stays_off() -> None:
    gc.disable()
    with cyclic_collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_an_error_inside_still_turns_it_back_on() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), cyclic_collector_paused():
        raise RuntimeError("the store cannot be read")
    assert gc.isenabled()
