"""Scenario 4: how fast a rollout change made through one proxy process reaches all three.

Three `python -m proxy serve` processes share one Redis, all pinned to core 0 as three workers of
one host would share its cores (Redis and the watchers are on core 1). Each process has a watcher:
one keep-alive connection asking for a chat completion every `interval` for a user whose bucket
(salt "sales-v2") lies between the two percents the scenario alternates between, so the answer's
x-abproxy-variant flips exactly when that process has applied the change to the table its
request path reads. This observes the in-memory state the requests are routed by, through the
requests themselves; no debug endpoint is involved.

Each of K changes goes through a different process's admin API (PUT .../rollout), in turn. That
process applies its own write before it answers; the other two learn it from Redis pub/sub. For
each process, delay = send time of the first answer with the new variant - the time the PUT was
sent (clamped at 0: a request sent just before the PUT can be routed after it), also given from
the PUT's response. The change was applied between the send of the last old answer and the reply
of the first new one: that bracket is the resolution, reported per change. After all three have
flipped (or 5 s: an error) the next change follows after a random 20-80 ms pause, so changes do
not line up with the 5 s resync or the watchers' rhythm. An answer that flips back before the
next change (a process serving an older state after a newer one) counts as an error. A fourth
subscriber of the rollout channel (in this process) splits the delay in two: PUT sent -> Redis's
message delivered (the admin request's own path, the Lua write), and that message -> the other
two processes routing by it (pub/sub delivery and the apply).

The watchers run on one event loop in this process, pinned to core 1 with the collector paused:
a full collection of their recorded samples would stall all three watchers at once.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from dataclasses import dataclass, field

from bench.core import Context, Result, Table, Target, fmt_ms
from bench.loadgen import JSON_HEADERS, Conn, HTTPError, Watch, watch
from bench.procs import LOAD_CPU, CoreLoad, log
from bench.servers import ADMIN_TOKEN, EXPERIMENT, sanity_check, start_nginx, start_proxy, start_redis
from proxy.assignment import bucket
from proxy.rollout import CHANNEL

NAME = "propagation"
TITLE = "4. Rollout propagation across three proxy processes"
SALT = "sales-v2"
LOW, HIGH = 40.0, 60.0  # a watched user's bucket lies in [4000, 6000): control at LOW, treatment at HIGH
PROCESSES = 3
SETTLE_TIMEOUT_S = 5.0
TARGET_MS = 50.0


@dataclass
class Change:
    index: int
    percent: float
    via: int  # the process whose admin API took the PUT
    put_sent: float
    put_answered: float = 0.0
    status: int = 0
    published: float | None = None  # when a fourth subscriber (this process) got Redis's message
    # per process: first new answer's send time, and the bracket [last old send, first new reply]
    first_new_sent: list[float | None] = field(default_factory=lambda: [None] * PROCESSES)
    bracket_ms: list[float | None] = field(default_factory=lambda: [None] * PROCESSES)


def run(ctx: Context) -> Result:
    changes_wanted = int(ctx.options.get("changes", 20 if ctx.quick else 200))
    interval_s = float(ctx.options.get("interval_ms", 2.0)) / 1000

    nginx = start_nginx(ctx.procs, ctx.workdir)
    redis = start_redis(ctx.procs, ctx.workdir)
    upstream = f"http://127.0.0.1:{nginx}/v1"
    ports = [start_proxy(ctx.procs, ctx.workdir, upstream, redis, name=f"proxy{i}")[0] for i in range(PROCESSES)]
    for i, port in enumerate(ports):
        sanity_check(f"proxy{i}", port, proxy=True)
    users = _users_between(LOW, HIGH, PROCESSES)

    affinity = os.sched_getaffinity(0)
    gc_was_enabled = gc.isenabled()
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    gc.collect()
    gc.disable()
    load = CoreLoad()
    try:
        watches, changes, errors = asyncio.run(_measure(ports, users, changes_wanted, interval_s, redis))
    finally:
        if gc_was_enabled:
            gc.enable()
        os.sched_setaffinity(0, affinity)
    other = load.other()
    ctx.procs.check_alive()
    for e in errors[:10]:
        log(f"  {e}")
    result = _result(ctx, watches, changes, errors, interval_s)
    result.figures["other_load"] = other
    result.notes.append(f"Other jobs' share of each core during the changes: core 0 {other['0']:.0%}, "
                        f"core 1 {other['1']:.0%}.")  # fmt: skip
    return result


def _users_between(low: float, high: float, count: int) -> list[str]:
    """User ids whose bucket is in [low, high) percent, away from the edges."""
    users: list[str] = []
    lo, hi = round(low * 100) + 200, round(high * 100) - 200
    i = 0
    while len(users) < count:
        user = f"propagation-watch-{i}"
        if lo <= bucket(SALT, user) < hi:
            users.append(user)
        i += 1
    return users


async def _measure(
    ports: list[int], users: list[str], count: int, interval_s: float, redis_port: int
) -> tuple[list[Watch], list[Change], list[str]]:
    watches = [Watch(port, user) for port, user in zip(ports, users, strict=True)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(watch(w, stop, interval_s)) for w in watches]
    published: dict[str, float] = {}  # reason -> when the message reached this process
    tasks.append(asyncio.create_task(_listen(redis_port, published, stop)))
    admins = [Conn(port) for port in ports]
    errors: list[str] = []
    changes: list[Change] = []
    rng = random.Random(4)
    try:
        await asyncio.sleep(0.2)  # the watchers' connections are open and answering
        # Priming change to LOW (not measured): every watcher then sees control.
        prime = await _change(admins, Change(-1, LOW, 0, 0.0))
        if prime.status != 200 or not await _settled(watches, prime, "control"):
            raise RuntimeError(f"the priming change did not reach every process: {prime.status} {errors}")
        for k in range(count):
            await asyncio.sleep(rng.uniform(0.02, 0.08))
            percent = HIGH if k % 2 == 0 else LOW
            change = await _change(admins, Change(k, percent, k % PROCESSES, 0.0))
            changes.append(change)
            if change.status != 200:
                errors.append(f"change {k}: PUT answered {change.status}")
                continue
            if not await _settled(watches, change, "treatment" if percent == HIGH else "control"):
                errors.append(f"change {k}: not seen by every process within {SETTLE_TIMEOUT_S:g} s")
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in admins:
            conn.close()
    for change in changes:
        change.published = published.get(_reason(change.index))
    for w in watches:
        errors += [f"watcher {w.port}: {e}" for e in w.errors[:5]]
        if len(w.errors) > 5:
            errors.append(f"watcher {w.port}: {len(w.errors) - 5} more errors")
    errors += _flips_back(watches, changes)
    return watches, changes, errors


def _reason(index: int) -> str:
    return f"propagation benchmark #{index}"


async def _listen(redis_port: int, published: dict[str, float], stop: asyncio.Event) -> None:
    """Another subscriber of the rollout channel: when Redis delivered each change's message."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(port=redis_port)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(CHANNEL)
        while not stop.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if message is not None:
                at = time.monotonic()
                published.setdefault(str(json.loads(message["data"]).get("reason")), at)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def _change(admins: list[Conn], change: Change) -> Change:
    body = json.dumps({"percent": change.percent, "reason": _reason(change.index)}).encode()
    headers = {**JSON_HEADERS, "Authorization": f"Bearer {ADMIN_TOKEN}"}
    change.put_sent = time.monotonic()
    try:
        answer = await admins[change.via].request("PUT", f"/admin/experiments/{EXPERIMENT}/rollout", body, headers)
        change.status = answer.status
    except HTTPError:
        change.status = -1
    change.put_answered = time.monotonic()
    return change


async def _settled(watches: list[Watch], change: Change, new: str) -> bool:
    """Wait until every watcher has an answer with the new variant; fill in the change's figures."""
    deadline = change.put_sent + SETTLE_TIMEOUT_S
    scanned = [_first_index_after(w, change.put_sent) for w in watches]
    while True:
        for p, w in enumerate(watches):
            if change.first_new_sent[p] is not None:
                continue
            while scanned[p] < len(w.variant):
                i = scanned[p]
                if w.variant[i] == new:
                    change.first_new_sent[p] = w.sent[i]
                    last_old = w.sent[i - 1] if i > 0 else w.sent[i]
                    change.bracket_ms[p] = (w.answered[i] - last_old) * 1000
                    break
                scanned[p] += 1
        if all(t is not None for t in change.first_new_sent):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.001)


def _first_index_after(w: Watch, t: float) -> int:
    """The first request that may have been routed after `t`: answered after it."""
    i = len(w.answered)
    while i > 0 and w.answered[i - 1] > t:
        i -= 1
    return i


def _flips_back(watches: list[Watch], changes: list[Change]) -> list[str]:
    """An old variant after the new one, before the next change was sent: a process went backwards."""
    found = []
    for k, change in enumerate(changes):
        end = changes[k + 1].put_sent if k + 1 < len(changes) else float("inf")
        new = "treatment" if change.percent == HIGH else "control"
        for p, w in enumerate(watches):
            first = change.first_new_sent[p]
            if first is None:
                continue
            back = sum(1 for s, v in zip(w.sent, w.variant, strict=True) if first < s < end and v not in (new, "error"))
            if back:
                found.append(f"change {change.index}: process {p} answered the old variant {back} times after the new")
    return found


def _limit(to_publish: list[float], after_publish: list[float]) -> str:
    """Which half of the delay the p99 comes from: the admin request before Redis published, or after."""
    if not to_publish or not after_publish:
        return "no message seen on the rollout channel"
    return (f"PUT sent → Redis's message p99 {fmt_ms(_pct(to_publish, 0.99))} ms (the admin request's own path: "
            f"auth, the Lua write); message → the other processes routing by it p99 "
            f"{fmt_ms(_pct(after_publish, 0.99))} ms")  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _result(ctx: Context, watches: list[Watch], changes: list[Change], errors: list[str], interval_s: float) -> Result:
    done = [c for c in changes if c.status == 200 and all(t is not None for t in c.first_new_sent)]
    per_process: list[list[float]] = [[] for _ in range(PROCESSES)]
    per_process_resp: list[list[float]] = [[] for _ in range(PROCESSES)]
    via: list[float] = []
    pubsub: list[float] = []
    slowest: list[float] = []
    slowest_resp: list[float] = []
    brackets: list[float] = []
    for c in done:
        delays = [max(0.0, (t or 0.0) - c.put_sent) * 1000 for t in c.first_new_sent]
        for p, d in enumerate(delays):
            per_process[p].append(d)
            per_process_resp[p].append(((c.first_new_sent[p] or 0.0) - c.put_answered) * 1000)
            (via if p == c.via else pubsub).append(d)
        slowest.append(max(delays))
        slowest_resp.append(max((t or 0.0) - c.put_answered for t in c.first_new_sent) * 1000)
        brackets += [b for b in c.bracket_ms if b is not None]
    put_ms = [(c.put_answered - c.put_sent) * 1000 for c in done]
    to_publish = [(c.published - c.put_sent) * 1000 for c in done if c.published is not None]
    after_publish = [
        max(0.0, (t or 0.0) - c.published) * 1000
        for c in done if c.published is not None
        for p, t in enumerate(c.first_new_sent) if p != c.via
    ]  # fmt: skip
    gaps = [
        (b - a) * 1000 for w in watches for a, b in zip(w.sent, w.sent[1:], strict=False)
    ]  # time between consecutive requests of a watcher
    answered = sum(len(w.sent) for w in watches)

    def row(label: str, values: list[float], resp: list[float] | None = None) -> list[str]:
        if not values:
            return [label, "0", "-", "-", "-", "-"]
        cells = [label, str(len(values)), fmt_ms(_pct(values, 0.5)), fmt_ms(_pct(values, 0.99)), fmt_ms(max(values))]
        cells.append("-" if not resp else f"{fmt_ms(_pct(resp, 0.5))} / {fmt_ms(_pct(resp, 0.99))}")
        return cells

    rows = [row(f"process {p}", per_process[p], per_process_resp[p]) for p in range(PROCESSES)]
    rows.append(row("the process that took the PUT", via))
    rows.append(row("the other two (pub/sub)", pubsub))
    rows.append(row("slowest of the three, per change", slowest, slowest_resp))
    rows.append(row("PUT sent → Redis's message at a fourth subscriber", to_publish))
    rows.append(row("that message → the other two routing by it", after_publish))
    result = Result(NAME, TITLE, errors=len(errors))
    result.tables.append(Table(
        f"Delay from sending the PUT to the first answer routed by the new percent ({len(done)} changes, ms)",
        ["process", "changes", "p50", "p99", "max", "from the PUT's response p50 / p99"],
        rows,
        note=(f"Resolution: each watcher asks every {interval_s * 1000:g} ms (median gap between its requests "
              f"{fmt_ms(_pct(gaps, 0.5)) if gaps else '-'} ms, p99 {fmt_ms(_pct(gaps, 0.99)) if gaps else '-'}); "
              f"the change landed within a bracket of median {fmt_ms(_pct(brackets, 0.5)) if brackets else '-'} ms, "
              f"p99 {fmt_ms(_pct(brackets, 0.99)) if brackets else '-'} ms. The PUT itself took "
              f"{fmt_ms(_pct(put_ms, 0.5)) if put_ms else '-'} ms p50, {fmt_ms(_pct(put_ms, 0.99)) if put_ms else '-'} "
              f"ms p99. Watchers answered {answered:,} requests in all."),
    ))  # fmt: skip
    result.figures = {
        "delays_ms": {f"process{p}": per_process[p] for p in range(PROCESSES)},
        "delays_from_put_response_ms": {f"process{p}": per_process_resp[p] for p in range(PROCESSES)},
        "slowest_ms": slowest,
        "via_put_ms": via,
        "pubsub_ms": pubsub,
        "put_ms": put_ms,
        "put_to_published_ms": to_publish,
        "published_to_applied_ms": after_publish,
        "bracket_ms": brackets,
        "watch_interval_ms": interval_s * 1000,
        "watch_gap_p50_ms": _pct(gaps, 0.5) if gaps else None,
        "watch_gap_p99_ms": _pct(gaps, 0.99) if gaps else None,
        "changes": len(changes),
        "changes_seen_by_all": len(done),
        "watch_requests": answered,
        "errors": errors[:50],
    }
    p99 = _pct(slowest, 0.99) if slowest else float("inf")
    log(f"propagation: {len(done)} of {len(changes)} changes seen by all; slowest of three p50 "
        f"{fmt_ms(_pct(slowest, 0.5)) if slowest else '-'} p99 {fmt_ms(_pct(slowest, 0.99)) if slowest else '-'} ms")
    result.targets = [
        Target(f"p99 delay < {TARGET_MS:g} ms across three processes (slowest of the three per change)",
               f"{fmt_ms(p99)} ms (p50 {fmt_ms(_pct(slowest, 0.5)) if slowest else '-'}, max "
               f"{fmt_ms(max(slowest)) if slowest else '-'}, {len(done)} changes)",
               (p99 < TARGET_MS and not errors) if not ctx.quick else None,
               limit=_limit(to_publish, after_publish) if p99 >= TARGET_MS else ""),
    ]  # fmt: skip
    result.notes.append(
        "Three processes on core 0 as three workers of one host; Redis, the three watchers and the fourth "
        "subscriber (on the bench's own event loop) on core 1. The "
        "watchers keep each process busy with about one request per interval throughout, so the change is "
        "applied by a process that is serving, not an idle one."
    )
    if errors:
        result.notes.append("Errors: " + "; ".join(errors[:10]))
    return result
