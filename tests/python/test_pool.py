"""Soft allocations of a shared pool from Python: allocate / heartbeat /
deallocate, sync and async, on the embedded engine and shared by several
processes on Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any, Dict

import pytest

import ratewarden
from ratewarden import Warden

POLICY: Dict[str, Any] = {
    "defaults": {"floors": {"standard": 0, "background": 0}},
    "scopes": {"agent": {"limits": []}},
    "resources": {"llm": {"limits": [{"name": "pool", "kind": "quota", "limit": 100, "per": "day"}]}},
}


def test_an_allocation_is_kept_for_its_agent_then_donated_when_it_stops_beating() -> None:
    clock = ratewarden.ManualClock()
    w = Warden(POLICY, clock=clock)
    a = w.allocate("agent:a", "llm", {"requests": 30}, lease=10)
    assert a["pools"] == {"pool": 30} and a["active_until"] == pytest.approx(clock.now() + 10)
    assert w.acquire("agent:b", resource="llm", cost={"requests": 70}).allowed
    assert not w.acquire("agent:b", resource="llm").allowed
    assert w.acquire("agent:a", resource="llm", cost={"requests": 10}).allowed
    clock.advance(11)  # no heartbeat: idle, its 20 left are donated
    assert not w.acquire("agent:c", resource="llm", priority="background").allowed
    assert w.acquire("agent:b", resource="llm", cost={"requests": 5}).allowed
    assert w.heartbeat("agent:a") == 1
    assert not w.acquire("agent:b", resource="llm").allowed
    assert w.deallocate("agent:a", "llm") is True and w.deallocate("agent:a", "llm") is False
    assert w.acquire("agent:b", resource="llm", cost={"requests": 15}).allowed


def test_bad_allocations_say_what_is_wrong() -> None:
    w = Warden(POLICY)
    w.allocate("agent:a", "llm", {"requests": 60}, lease=10)
    with pytest.raises(ratewarden.InvalidInput, match="40 of 100 left to allocate"):
        w.allocate("agent:b", "llm", {"requests": 41}, lease=10)
    with pytest.raises(ratewarden.InvalidInput, match="lease"):
        w.allocate("agent:b", "llm", {"requests": 1}, lease=0)
    with pytest.raises(ratewarden.WardenError, match="nope"):
        w.allocate("agent:b", "nope", {"requests": 1}, lease=10)
    with pytest.raises(ratewarden.WardenError):
        w.allocate("agent:b", "llm", "lots", lease=10)  # type: ignore[arg-type]


def test_async_forms() -> None:
    async def main() -> None:
        w = Warden(POLICY)
        a = await w.allocate_async("agent:a", "llm", {"requests": 5}, lease=10)
        assert a["pools"] == {"pool": 5}
        assert await w.heartbeat_async("agent:a") == 1
        assert await w.deallocate_async("agent:a", "llm") is True

    asyncio.run(main())


def _spend(url: str, ns: str, who: str, n: int, out: Any) -> None:
    w = Warden(POLICY, backend=url, namespace=ns)
    out.put(sum(1 for _ in range(n) if w.acquire(who, resource="llm").allowed))


@pytest.mark.parametrize("kind", ["url", "cluster_url"])
def test_an_allocation_holds_across_processes_on_redis(redis_servers: Any, namespace: str, kind: str) -> None:
    url, ns = redis_servers.info[kind], namespace
    w = Warden(POLICY, backend=url, namespace=ns)
    w.allocate("agent:a", "llm", {"requests": 40}, lease=60)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spend, args=(url, ns, f"agent:b{i}", 40, out)) for i in range(3)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # Three other agents share exactly the 60 not set aside; a still has its 40.
    assert sum(got) == 60
    assert sum(1 for _ in range(41) if w.acquire("agent:a", resource="llm").allowed) == 40
