"""CPython's cyclic garbage collector, tuned for a long-running process (the server, the collector)
and for a one-shot command (the report)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# gc.set_threshold(young, middle, old) for a long-running process: see freeze_startup_heap.
GC_THRESHOLDS = (10_000, 20, 10)


def freeze_startup_heap() -> int:
    """Move everything alive after start-up out of the cyclic collector's reach; returns how many
    objects that is.

    FastAPI, pydantic, redis-py, prometheus-client and the CLI leave ~90k long-lived objects
    in a serving process. Under load CPython ran a full collection over all of them about
    every 0.7 s, 50-100 ms each, which doubled p99 and cost ~8 % of CPU (bench/forwarders.py).
    Frozen, a full collection scans only what was allocated since. Frozen objects that later
    become cyclic garbage are never freed, which is why only a long-running process whose
    start-up heap lives as long as it does calls this: the proxy's server and the collector.

    Then the thresholds (GC_THRESHOLDS): after the freeze the old generation counts as empty, so
    CPython's rule "full collection once the old generation grew by a quarter" fired on the first
    chance, and with 1,000 streams open (~115 tracked objects each) a full collection paused every
    stream for ~55 ms. A request's objects die by reference counting, so a young collection
    every 10,000 net new objects instead of 700 promotes far fewer of them and full collections
    become rare (none in bench scenarios 2 and 3); a young one then takes ~3-6 ms (~15 ms at
    50,000). Cyclic garbage still counts towards the thresholds, so it is still collected (bench
    soak: RSS flat over 10 minutes).

    The collector holds a batch of events (~10 container objects each) at a time: unfrozen, 18
    full collections over SQLAlchemy's and Alembic's start-up heap took ~1.3 s of a 300,000-event
    drain's ~17 s of CPU (bench scenario 7).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return gc.get_freeze_count()


@contextlib.contextmanager
def cyclic_collector_paused() -> Iterator[None]:
    """For a one-shot command that builds a large heap and exits: no cyclic collection inside.

    `abproxy report` imports scipy, statsmodels and pandas while it reads millions of rows, and
    CPython's collector kept rescanning that growing heap: ~470 collections, 0.4 s of the 10M
    report's ~8 s of CPU (bench scenario 7). What the block leaves unreachable in cycles is
    little, and left to the collections after it (or freed at exit). statsmodels'
    multipletests still runs its one gc.collect().
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
