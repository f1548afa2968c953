"""Coordination on the upstream's observed state from Python: observe/report
with every header container, the traffic light in decisions, sync and async,
and the state shared across processes on Redis and Redis Cluster."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any, Dict, List

import httpx
import pytest

import ratewarden
from ratewarden import Warden

POLICY: Dict[str, Any] = {
    "scopes": {"agent": {"limits": []}},
    "resources": {
        "openai": {"upstream": {}, "limits": [{"name": "calls", "kind": "quota", "limit": 1000, "per": "day"}]},
        "plain": {"limits": []},
    },
}


def openai(remaining: int, limit: int = 100, reset: str = "60s") -> Dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": reset,
    }


def test_a_limited_stage_names_itself_in_the_caps_of_the_stages_after_it() -> None:
    policy: Dict[str, Any] = {
        "scopes": {"agent": {"limits": []}},
        "resources": {"github": {"upstream": {}}, "openai": {"upstream": {}}, "mailer": {}},
        "workflows": {
            "research": {
                "stages": {
                    "fetch": {"resource": "github"},
                    "summarize": {"resource": "openai", "after": ["fetch"]},
                    "publish": {"resource": "mailer", "after": ["summarize"]},
                }
            }
        },
    }
    w = Warden(policy, clock=ratewarden.ManualClock())
    assert w.acquire("agent:a", resource="mailer").outcome == "allow"
    w.report("openai", 429, {"retry-after": "30"})
    d = w.acquire("agent:a", resource="mailer")
    assert d.outcome == "allow_with_caps" and d.caps == {"backpressure": ["research/summarize"]}
    assert w.acquire("agent:a", resource="github").caps == {}


def test_the_light_follows_what_responses_say() -> None:
    clock = ratewarden.ManualClock()
    w = Warden(POLICY, clock=clock)
    v = w.observe("openai", openai(90))
    assert (v["zone"], v["previous"], v["left"]) == ("green", "unknown", 0.9)
    assert v["quotas"][0]["remaining"] == 90 and v["quotas"][0]["reset"] == 60.0
    d = w.acquire("agent:a", resource="openai", priority="background")
    assert d.outcome == "allow" and d.light == {
        "zone": "green",
        "left": 0.9,
        "dimension": "requests",
        "breaker": "closed",
        "sequential": False,
    }

    # Amber from an httpx.Headers: standard gets 500 ms * (40 - 27.5) / 25.
    w.observe("openai", httpx.Headers(openai(275, limit=1000)))
    d = w.acquire("agent:a", resource="openai")
    assert d.outcome == "allow_with_caps" and d.caps == {"delay_ms": 250}
    assert w.acquire("agent:a", resource="openai", priority="critical").outcome == "allow"

    # Red, from (name, value) pairs of a later window.
    w.observe("openai", list(openai(5, reset="90s").items()))
    d = w.acquire("agent:a", resource="openai", priority="background")
    assert not d.allowed and d.retry_after == 90.0 and "red" in (d.reason or "")
    assert w.acquire("agent:a", resource="openai").allowed  # standard: the paced turn
    d = w.acquire("agent:b", resource="openai")
    assert not d.allowed and d.retry_after == 1.0
    clock.advance(1.0)
    assert w.acquire("agent:b", resource="openai").allowed
    assert w.upstream("openai")["quotas"][0]["remaining"] == 5 - 2  # two admitted since


def test_a_reported_429_stops_every_tier_until_retry_after() -> None:
    clock = ratewarden.ManualClock()
    w = Warden(POLICY, clock=clock)
    v = w.report("openai", 429, {"Retry-After": "3"})
    assert (v["zone"], v["blocked"]) == ("red", 3.0)
    d = w.acquire("agent:a", resource="openai", priority="critical")
    assert not d.allowed and d.retry_after == 3.0
    with pytest.raises(ratewarden.RateLimited) as e:

        @w.guard("agent:a", resource="openai")
        def call() -> str:
            return "sent"

        call()
    assert e.value.retry_after == 3.0
    clock.advance(3.0)
    assert w.acquire("agent:a", resource="openai", priority="critical").allowed


def test_async_forms_answer_the_same() -> None:
    w = Warden(POLICY)

    async def main() -> List[Any]:
        a = await w.observe_async("openai", openai(10))
        b = await w.report_async("openai", 200, openai(9))
        c = await w.upstream_async("openai")
        d = await w.acquire_async("agent:a", resource="openai", priority="background")
        return [a, b, c, d]

    a, b, c, d = asyncio.run(main())
    assert (a["zone"], b["zone"], c["quotas"][0]["observed"]) == ("red", "red", 9)
    assert not d.allowed and d.light["zone"] == "red"


def test_malformed_values_are_warnings_and_change_nothing() -> None:
    w = Warden(POLICY)
    v = w.observe("openai", {"x-ratelimit-remaining-requests": "-5", "retry-after": "soon"})
    assert v["zone"] == "unknown" and v["quotas"] == [] and v["blocked"] is None
    assert len(v["warnings"]) == 2 and all("ignored" in x for x in v["warnings"])


@pytest.mark.parametrize(
    ("call", "kind", "needle"),
    [
        (lambda w: w.observe("opnai", {}), ratewarden.InvalidInput, "opnai"),
        (lambda w: w.observe("plain", {}), ratewarden.InvalidInput, "upstream: {}"),
        (lambda w: w.report("openai", 42), ratewarden.InvalidInput, "42 is not an HTTP status"),
        (lambda w: w.report("openai", 70000), ratewarden.InvalidInput, "70000 is not an HTTP status"),
        (lambda w: w.observe("openai", 5), ratewarden.InvalidInput, "int"),
        (lambda w: w.upstream(None), ratewarden.InvalidInput, "resource"),
    ],
)
def test_bad_calls_raise_and_change_nothing(call: Any, kind: type, needle: str) -> None:
    w = Warden(POLICY)
    with pytest.raises(kind) as e:
        call(w)
    assert needle in str(e.value)
    assert w.upstream("openai")["zone"] == "unknown"


def _observer(url: str, namespace: str, q: Any) -> None:
    w = Warden(POLICY, backend=url, namespace=namespace)
    q.put(w.observe("openai", openai(5, reset="1h"))["zone"])


@pytest.mark.parametrize("target", ["url", "cluster_url"])
def test_one_process_observes_and_every_process_obeys(redis_servers: Any, namespace: str, target: str) -> None:
    url = redis_servers.info[target]
    policy: Dict[str, Any] = {**POLICY, "resources": {**POLICY["resources"], "openai": {"upstream": {"pace": "1h"}}}}
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_observer, args=(url, namespace, q))
    p.start()
    assert q.get(timeout=60) == "red"
    p.join(timeout=60)
    w = Warden(POLICY, backend=url, namespace=namespace)
    assert not w.acquire("agent:a", resource="openai", priority="background").allowed
    # Red paces standard callers to one per `pace` across processes: of 6
    # processes asking at once (pace 1 h in their policy), exactly one goes.
    start = ctx.Event()
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=_paced, args=(url, namespace, policy, start, results)) for _ in range(6)]
    for pr in procs:
        pr.start()
    start.set()
    admitted = [results.get(timeout=60) for _ in procs]
    for pr in procs:
        pr.join(timeout=60)
        assert pr.exitcode == 0
    assert sorted(admitted) == [False] * 5 + [True]


def _paced(url: str, namespace: str, policy: Dict[str, Any], start: Any, q: Any) -> None:
    w = Warden(policy, backend=url, namespace=namespace)
    start.wait()
    d = w.acquire("agent:x", resource="openai")
    q.put(d.allowed)


def _probe(url: str, namespace: str, at: float, start: Any, q: Any) -> None:
    w = Warden(POLICY, backend=url, namespace=namespace, clock=ratewarden.ManualClock(at))
    start.wait()
    d = w.acquire("agent:x", resource="openai", priority="critical")
    q.put((d.allowed, d.light["breaker"] if d.light else None))


@pytest.mark.parametrize("target", ["url", "cluster_url"])
def test_exactly_one_half_open_probe_across_8_processes(redis_servers: Any, namespace: str, target: str) -> None:
    url = redis_servers.info[target]
    # Every process reads the same manual time, passed to the scripts: the
    # breaker opened at T for 5 s, the 8 processes ask at T + 6 (half-open).
    t = 1_800_000_000.0
    w = Warden(POLICY, backend=url, namespace=namespace, clock=ratewarden.ManualClock(t))
    assert w.report("openai", 503, {"retry-after": "5"})["breaker"] == "open"
    ctx = multiprocessing.get_context("spawn")
    start, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_probe, args=(url, namespace, t + 6, start, q)) for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(results) == [(False, "half_open")] * 7 + [(True, "half_open")]


def test_the_ordered_lock_sync_and_async() -> None:
    clock = ratewarden.ManualClock()
    w = Warden(POLICY, clock=clock)
    with w.sequential("openai", hold=5, max_wait=0) as turn:
        assert turn.turn is not None and len(turn.turn) == 32
        with pytest.raises(TimeoutError, match="openai"), w.sequential("openai", max_wait=0):
            pass
    with w.sequential("openai", max_wait=0):  # released on exit
        pass

    async def main() -> str:
        async with w.sequential("openai", max_wait=0) as t:
            return t.turn or ""

    assert len(asyncio.run(main())) == 32
    with pytest.raises(ratewarden.InvalidInput, match="upstream"), w.sequential("plain"):
        pass
    with pytest.raises(ratewarden.InvalidInput, match="hold"), w.sequential("openai", hold=-1):
        pass


def _locker(url: str, namespace: str, start: Any, q: Any) -> None:
    import os
    import time

    w = Warden(POLICY, backend=url, namespace=namespace)
    start.wait()
    spans = []
    for _ in range(3):
        with w.sequential("openai", hold=30, max_wait=60):
            entered = time.monotonic()  # held: nobody else is in here
            w.acquire("agent:x", resource="openai")  # some work under the lock
            spans.append((os.getpid(), entered, time.monotonic()))
    q.put(spans)


@pytest.mark.parametrize("target", ["url", "cluster_url"])
def test_the_ordered_lock_excludes_across_4_processes(redis_servers: Any, namespace: str, target: str) -> None:
    url = redis_servers.info[target]
    ctx = multiprocessing.get_context("spawn")
    start, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_locker, args=(url, namespace, start, q)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    spans = sorted(s for _ in procs for s in q.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(spans) == 12
    by_time = sorted(spans, key=lambda s: s[1])
    for a, b in zip(by_time, by_time[1:]):
        assert a[2] <= b[1], f"two holders at once: {a} and {b}"


def test_an_ordered_lock_taken_as_its_await_is_cancelled_is_released(redis_servers: Any, namespace: str) -> None:
    # The turn's answer arrives after its task was cancelled: nobody will
    # release it, so the binding does — not held until `hold` (the clock
    # does not move).
    w = Warden(POLICY, backend=redis_servers.url, namespace=namespace, clock=ratewarden.ManualClock())

    async def take() -> None:
        async with w.sequential("openai", hold=30, max_wait=0):
            pass

    async def main() -> int:
        futs = [asyncio.ensure_future(take()) for _ in range(20)]
        await asyncio.sleep(0)  # every request is in flight
        for f in futs:
            f.cancel()
        done = await asyncio.gather(*futs, return_exceptions=True)
        return sum(isinstance(r, asyncio.CancelledError) for r in done)

    assert asyncio.run(main()) == 20

    def free() -> bool:
        try:
            with w.sequential("openai", max_wait=0):
                return True
        except TimeoutError:
            return False

    assert eventually(free)


def eventually(condition: Any, tries: int = 5000) -> bool:
    """`condition()` becomes true within `tries` tries (each a Redis round trip)."""
    import os

    for _ in range(tries):
        if condition():
            return True
        os.sched_yield()
    return False
