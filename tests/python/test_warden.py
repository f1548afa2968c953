"""The Python API on the embedded engine: decisions, reservations, the guard
decorator on sync / async functions and methods, threads and asyncio."""

from __future__ import annotations

import asyncio
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict

import pytest

import ratewarden
from ratewarden import BudgetExceeded, ManualClock, RateLimited, Warden


def budget(limit: str = "10", unit: str = "usd") -> Dict[str, Any]:
    return {
        "scopes": {
            "tenant": {"limits": [{"name": "spend", "kind": "budget", "unit": unit, "limit": limit, "per": "day"}]}
        }
    }


def remaining(w: Warden, scope: str, unit: str = "usd") -> int:
    d = w.check(scope, cost={unit: 0})
    return next(l["remaining"] for l in d.limits if l["name"] == "spend")


def test_decisions_are_plain_python_values() -> None:
    clock = ManualClock()
    w = Warden(
        {"scopes": {"user": {"limits": [{"name": "rps", "kind": "rate", "limit": 2, "per": "1s"}]}}}, clock=clock
    )
    assert w.acquire("user:1").allowed
    assert w.acquire("user:1").allowed
    d = w.acquire("user:1")
    assert (d.allowed, d.outcome, d.denied_by, d.denied_kind) == (False, "deny", "rps", "rate")
    assert d.retry_after == pytest.approx(0.5)
    assert d.limits == [
        {
            "name": "rps",
            "kind": "rate",
            "unit": "requests",
            "remaining": 0,
            "remaining_text": "0",
            "amount": 1,
            "reset": 1.0,
            "denied": True,
        }
    ]
    assert d.priority == "standard" and d.degraded is None and d.reservation is None
    assert "rps" in (d.reason or "")
    assert repr(d).startswith('Decision(outcome="deny", retry_after=0.5, denied_by="rps"')
    assert d.to_dict()["limits"] == d.limits
    clock.advance(0.5)
    assert w.acquire("user:1").allowed


def test_reserve_commit_refunds_and_the_context_manager_releases_on_error() -> None:
    w = Warden(budget("10"))
    r = w.reserve("tenant:a", cost={"usd": "4"})
    assert r.allowed and r.id is not None and len(r.id) == 32
    receipt = r.commit({"usd": "1.25"})
    assert receipt["charges"][0]["charged"] == 1_250_000 and not receipt["duplicate"]
    assert w.commit(r.id, {"usd": 9})["duplicate"] is True
    assert remaining(w, "tenant:a") == 8_750_000
    with pytest.raises(ZeroDivisionError), w.reserve("tenant:a", cost={"usd": "8"}) as held:
        assert remaining(w, "tenant:a") == 750_000
        raise ZeroDivisionError("the work failed")
    assert remaining(w, "tenant:a") == 8_750_000, "released on the way out"
    with w.reserve("tenant:a", cost={"usd": "1"}) as held:
        held.commit({"usd": "0.75"})
    assert remaining(w, "tenant:a") == 8_000_000, "committed, not released"
    with pytest.raises(BudgetExceeded) as e, w.reserve("tenant:a", cost={"usd": "9"}):
        raise AssertionError("never entered")
    assert e.value.decision.denied_by == "spend"


def test_guard_on_sync_functions_commits_actual_cost_and_releases_on_exception() -> None:
    w = Warden(budget("1", unit="tokens"))

    @w.guard("tenant:a", cost={"tokens": 400}, actual=lambda result: {"tokens": result})
    def complete(prompt: str, *, temperature: float = 0.0) -> int:
        """Calls a model."""
        if prompt == "boom":
            raise RuntimeError("model failed")
        return len(prompt)

    assert complete.__name__ == "complete" and complete.__doc__ == "Calls a model."
    assert str(inspect.signature(complete)) == str(inspect.signature(complete.__wrapped__))
    with pytest.raises(BudgetExceeded):
        complete("x")  # the 400-token estimate does not fit a budget of 1
    w = Warden(budget("1000", unit="tokens"))

    @w.guard("tenant:a", cost={"tokens": 400}, actual=lambda result: {"tokens": result})
    def model(prompt: str) -> int:
        if prompt == "boom":
            raise RuntimeError("model failed")
        return len(prompt)

    assert model("x" * 100) == 100
    assert remaining(w, "tenant:a", "tokens") == 900, "the actual 100, not the 400 estimate"
    with pytest.raises(RuntimeError):
        model("boom")
    assert remaining(w, "tenant:a", "tokens") == 900, "a failed call is not charged"
    assert model("y" * 500) == 500
    assert model("z") == 1, "the 400 estimate fits the 400 left; 1 is charged"
    with pytest.raises(BudgetExceeded) as e:
        model("z")  # 400 estimated, 399 left
    assert e.value.decision.denied_by == "spend" and "400" in str(e.value)


def test_guard_resolves_scope_and_cost_from_the_arguments_and_works_on_methods() -> None:
    w = Warden(budget("1"))

    class Agent:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

        @w.guard(lambda self, usd: f"tenant:{self.tenant}", cost=lambda self, usd: {"usd": usd})
        def spend(self, usd: str) -> str:
            return usd

    a, b = Agent("a"), Agent("b")
    assert a.spend("0.75") == "0.75"
    with pytest.raises(BudgetExceeded):
        a.spend("0.5")
    assert b.spend("0.5") == "0.5", "tenant b has its own budget"
    assert (remaining(w, "tenant:a"), remaining(w, "tenant:b")) == (250_000, 500_000)


def test_guard_refuses_generators_and_bad_options() -> None:
    w = Warden(budget())

    def gen() -> Any:
        yield 1

    async def agen() -> Any:
        yield 1

    for f in (gen, agen):
        with pytest.raises(TypeError, match="generator"):
            w.guard("tenant:a")(f)
    with pytest.raises(ratewarden.InvalidInput, match="on_limit"):
        w.guard("tenant:a", on_limit="sometimes")


def test_guard_on_limit_wait_waits_for_capacity() -> None:
    clock = ManualClock()
    w = Warden(
        {"scopes": {"user": {"limits": [{"name": "slots", "kind": "concurrency", "limit": 1, "lease": "1m"}]}}},
        clock=clock,
    )
    holder = w.reserve("user:1", lease=60)
    assert holder.allowed

    @w.guard("user:1", on_limit="wait", max_wait=300)
    def job() -> str:
        return "ran"

    @w.guard("user:1")
    def impatient() -> str:
        return "ran"

    with pytest.raises(RateLimited) as e:
        impatient()
    assert not isinstance(e.value, BudgetExceeded) and e.value.retry_after == pytest.approx(60)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(job)
        # Whether the waiter is asleep already or not yet: once the holder's lease
        # ends, it gets the slot (woken by the clock, or finding it free).
        clock.advance(61)
        assert waiting.result(timeout=30) == "ran"


def test_32_threads_admit_exactly_the_budget_and_run_guarded_calls_in_parallel() -> None:
    w = Warden(budget("100", unit="tokens"))
    inside = threading.Barrier(8, timeout=30)
    ran = []

    @w.guard("tenant:a", cost={"tokens": 1})
    def work(i: int) -> int:
        if i < 8:
            inside.wait()  # 8 guarded calls inside at once, or this times out
        ran.append(i)
        return i

    def call(i: int) -> bool:
        try:
            work(i)
            return True
        except RateLimited:
            return False

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(call, range(320)))
    assert sum(results) == 100 == len(ran), "exactly the budget"
    assert remaining(w, "tenant:a", "tokens") == 0


def test_gather_of_1000_guarded_coroutines_is_exact() -> None:
    w2 = Warden(budget("500", unit="tokens"))

    @w2.guard("tenant:a", cost={"tokens": 1})
    async def tool2(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def main2() -> list:
        return await asyncio.gather(*(tool2(i) for i in range(1000)), return_exceptions=True)

    results = asyncio.run(main2())
    assert sum(isinstance(r, int) for r in results) == 500
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 500
    assert remaining(w2, "tenant:a", "tokens") == 0


def test_async_forms_complete_without_suspending_on_the_embedded_engine() -> None:
    w = Warden(budget("10"))

    async def main() -> None:
        fut = w.acquire_async("tenant:a", cost={"usd": 1})
        # Already complete: driving it by hand finishes on the first step.
        it = fut.__await__()
        with pytest.raises(StopIteration) as done:
            next(it)
        assert done.value.value.allowed
        r = await w.reserve_async("tenant:a", cost={"usd": 2})
        assert (await r.commit_async({"usd": 1}))["charges"][0]["charged"] == 1_000_000
        async with w.reserve_async("tenant:a", cost={"usd": 3}) as held:
            assert held.allowed
        assert (await w.check_async("tenant:a", cost={"usd": 0})).limits[0]["remaining"] == 8_000_000
        d = await w.delegate_async("tenant:a/run:1", {"usd": 2}, from_scope="tenant:a")
        assert d.allowed and await w.release_async(d.reservation) is True
        d = await w.wait_async("tenant:a", cost={"usd": 1}, max_wait=1)
        assert d.allowed

    asyncio.run(main())


def test_policy_files_and_errors_name_the_problem(tmp_path: Any) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text("scopes:\n  tenant:\n    limits:\n      - {name: q, kind: quota, limit: 2, per: day}\n")
    with Warden.from_file(p) as w:
        assert w.acquire("tenant:x").allowed and w.backend == "memory"
    p.write_text("scopes:\n  tenant:\n    limits:\n      - {name: q, kind: quota, limit: 2, per: fortnight}\n")
    with pytest.raises(ratewarden.PolicyError) as e:
        Warden.from_file(p)
    assert "policy.yaml" in str(e.value) and "scopes.tenant.limits[0]" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_scope_helper_escapes_ids_and_names_bad_kinds() -> None:
    assert ratewarden.scope(tenant="acme", user="a/b:c") == "tenant:acme/user:a%2Fb%3Ac"
    assert ratewarden.scope(("ip", "::1")) == "ip:%3A%3A1"
    with pytest.raises(ratewarden.InvalidInput, match="Tenant"):
        ratewarden.scope(Tenant="acme")
    with pytest.raises(ratewarden.InvalidInput, match="no segments"):
        ratewarden.scope()


def test_decision_headers_and_denial_body_come_from_the_core() -> None:
    w = Warden(
        {
            "scopes": {
                "ip": {"limits": [{"name": "per-ip", "kind": "rate", "unit": "requests", "limit": 1, "per": "1s"}]}
            }
        },
        clock=ManualClock(),
    )
    ok = w.acquire("ip:1")
    assert ok.headers() == [("RateLimit-Policy", '"per-ip";q=1;w=1'), ("RateLimit", '"per-ip";r=0;t=1')]
    assert ok.headers(raw=True) == [(b"ratelimit-policy", b'"per-ip";q=1;w=1'), (b"ratelimit", b'"per-ip";r=0;t=1')]
    assert ok.headers("off") == []
    denied = w.acquire("ip:1")
    assert ("Retry-After", "1") in denied.headers("draft-7")
    assert denied.headers("off") == [("Retry-After", "1")]
    assert '"error":"rate_limited"' in denied.denial_body()
    with pytest.raises(ratewarden.InvalidInput, match="draft-9"):
        ok.headers("draft-9")


def test_an_operation_id_is_decided_once() -> None:
    w = Warden(budget("10"), clock=ManualClock())
    op = "0123456789abcdef0123456789abcdef"
    first = w.acquire("tenant:a", cost={"usd": "4"}, operation=op)
    again = w.acquire("tenant:a", cost={"usd": "4"}, operation=op)
    assert first.allowed and again.allowed and first.unconfirmed is None
    assert remaining(w, "tenant:a") == 6_000_000, "charged once"
    r1 = w.reserve("tenant:a", cost={"usd": "1"}, operation="1" * 32)
    r2 = w.reserve("tenant:a", cost={"usd": "1"}, operation="1" * 32)
    assert r1.reservation == r2.reservation and remaining(w, "tenant:a") == 5_000_000
    with pytest.raises(ratewarden.InvalidInput, match="already answered a different request"):
        w.acquire("tenant:a", cost={"usd": "5"}, operation=op)
    with pytest.raises(ratewarden.InvalidInput, match="operation id"):
        w.acquire("tenant:a", operation="not-hex")


def test_reservation_fields_are_typed_properties_of_its_decision() -> None:
    import typing

    w = Warden(budget("10"), clock=ManualClock())
    r = w.reserve("tenant:a", cost={"usd": "1"})
    names = ["allowed", "outcome", "caps", "retry_after", "limits", "reason", "reservation", "expires_at"]
    names += ["priority", "degraded", "unconfirmed", "denied_by", "denied_kind"]
    for name in names:
        prop = getattr(ratewarden.Reservation, name)
        assert isinstance(prop, property), name
        assert typing.get_type_hints(prop.fget)["return"] is not Any, name
        assert getattr(r, name) == getattr(r.decision, name), name
    with pytest.raises(AttributeError):
        r.no_such_field  # noqa: B018
    r.release()


def test_waiting_on_the_embedded_engine_with_the_system_clock() -> None:
    """A wait that must sleep on the embedded engine with the real clock (it
    used to panic: a timer made outside the runtime). 20/s: one wait of ~50 ms."""
    w = Warden({"scopes": {"t": {"limits": [{"name": "r", "kind": "rate", "limit": 20, "per": "1s"}]}}})

    def spend() -> None:
        while w.acquire("t:1").allowed:
            pass

    spend()
    assert w.wait("t:1", max_wait=5).allowed
    spend()
    assert w.wait("t:1", max_wait=5, reserve=True).allowed
    spend()

    @w.guard("t:1", on_limit="wait", max_wait=5)
    def sync_tool() -> int:
        return 1

    assert sync_tool() == 1
    spend()

    @w.guard("t:1", on_limit="wait", max_wait=5)
    async def async_tool() -> int:
        return 2

    async def main() -> None:
        assert (await w.wait_async("t:1", max_wait=5)).allowed
        spend()
        assert await async_tool() == 2

    asyncio.run(main())


def test_retry_delay_bands_never_overlap_across_tiers() -> None:
    draws = {
        p: [ratewarden.retry_delay(3, p, retry_after=20) for _ in range(2000)]
        for p in ("critical", "standard", "background")
    }
    assert min(draws["critical"]) >= 20 and max(draws["critical"]) < 20.5
    assert max(draws["critical"]) < min(draws["standard"]) and max(draws["standard"]) < 23.5
    assert max(draws["standard"]) < min(draws["background"]) and max(draws["background"]) < 29.5
    # No Retry-After: 0.5 s doubling per attempt (attempt 3: 2 s), capped at 60 s.
    assert 2.0 <= ratewarden.retry_delay(3, "critical") < 2.5
    assert 60.0 <= ratewarden.retry_delay(40, "critical") < 60.5
    for bad in (
        lambda: ratewarden.retry_delay(1, "urgent"),
        lambda: ratewarden.retry_delay(-1),
        lambda: ratewarden.retry_delay(1, retry_after=-2),
    ):
        with pytest.raises(ratewarden.InvalidInput):
            bad()
