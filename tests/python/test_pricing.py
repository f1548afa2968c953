"""Pricing from Python: cost / estimate from the policy's price tables, the
shared bill vectors, reservations and guarded calls by usage (sync and async)
charged in dollars and tokens at once, and bad usage refused by name."""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict

import pytest

import ratewarden
from ratewarden import Warden

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "pricing" / "bills.json").read_text())

POLICY: Dict[str, Any] = {
    "scopes": {
        "tenant": {
            "limits": [
                {"name": "usd", "kind": "budget", "unit": "usd", "limit": "1.00", "per": "month"},
                {"name": "tpm", "kind": "quota", "unit": "tokens", "limit": 1000000, "per": "minute"},
            ]
        }
    },
    "resources": {
        "openai:gpt-4o": {"pricing": {"input": 2.50, "cached_input": 1.25, "output": 10.00}},
        "plain": {},
    },
}


def _clock_at(day: str) -> ratewarden.ManualClock:
    from datetime import datetime, timezone

    start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp()
    return ratewarden.ManualClock(start)


def test_the_bill_vectors_price_exactly() -> None:
    policy = {"resources": {name: {"pricing": p} for name, p in VECTORS["prices"].items()}}
    for case in VECTORS["cases"]:
        w = Warden(policy, clock=_clock_at(case["at"]))
        usage = {k: v for k, v in case["usage"].items()}
        price = w.estimate if case["estimate"] else w.cost
        if "usd" in case:
            got = price(case["resource"], usage)
            assert got["amount_text"] == case["usd"], case
            assert got["amount"] == int(Decimal(case["usd"]) * 1_000_000), case
            assert got["unit"] == "usd" and got["decimals"] == 6
        else:
            with pytest.raises(ratewarden.InvalidInput):
                price(case["resource"], usage)


def test_cost_says_what_a_decision_charges() -> None:
    w = Warden(POLICY)
    got = w.cost("openai:gpt-4o", {"input_tokens": 1200, "output_tokens": 95, "max_output_tokens": 800})
    assert got["amount"] == 3950 and got["amount_text"] == "0.00395"
    assert got["cost"] == {"usd": "0.00395", "tokens": 1295}
    est = w.estimate("openai:gpt-4o", {"input_tokens": 1200, "max_output_tokens": 800})
    assert est["cost"] == {"usd": "0.011", "tokens": 2000}
    # The cost dict is a cost: acquiring it charges the same as the usage.
    d = w.acquire("tenant:a", resource="openai:gpt-4o", cost=est["cost"])
    assert {l["name"]: l["remaining"] for l in d.limits} == {"usd": 989_000, "tpm": 998_000}


def test_a_reservation_by_usage_commits_at_the_actual_usage() -> None:
    w = Warden(POLICY)
    with w.reserve("tenant:a", resource="openai:gpt-4o", usage={"input_tokens": 1200, "max_output_tokens": 800}) as r:
        assert {l["name"]: l["remaining"] for l in r.limits} == {"usd": 989_000, "tpm": 998_000}
        receipt = r.commit(usage={"input_tokens": 1200, "output_tokens": 95})
    charged = {c["name"]: c["charged"] for c in receipt["charges"]}
    assert charged == {"usd": 3950, "tpm": 1295}
    left = {b["name"]: b["remaining"] for b in w.balances("tenant:a")}
    assert left == {"usd": 1_000_000 - 3950, "tpm": 1_000_000 - 1295}


def test_async_reserve_and_commit_by_usage() -> None:
    async def main() -> Dict[str, int]:
        w = Warden(POLICY)
        async with w.reserve_async(
            "tenant:a", resource="openai:gpt-4o", usage={"input_tokens": 1000, "max_output_tokens": 1000}
        ) as r:
            receipt = await r.commit_async(usage={"input_tokens": 1000, "output_tokens": 10})
        return {c["name"]: c["charged"] for c in receipt["charges"]}

    assert asyncio.run(main()) == {"usd": 2600, "tpm": 1010}


def test_a_guard_by_usage_charges_the_priced_actual(caplog: pytest.LogCaptureFixture) -> None:
    w = Warden(POLICY)

    @w.guard(
        "tenant:a",
        resource="openai:gpt-4o",
        usage=lambda prompt, max_tokens: {"input_tokens": len(prompt), "max_output_tokens": max_tokens},
        actual=lambda reply: {"input_tokens": reply["in"], "output_tokens": reply["out"]},
    )
    def complete(prompt: str, max_tokens: int) -> Dict[str, int]:
        return {"in": len(prompt), "out": 7}

    @w.guard(
        "tenant:a",
        resource="openai:gpt-4o",
        usage={"input_tokens": 100, "max_output_tokens": 100},
        actual=lambda reply: {"input_tokens": 100, "output_tokens": reply},
    )
    async def complete_async(out: int) -> int:
        return out

    assert complete("x" * 1000, 500) == {"in": 1000, "out": 7}
    left = {b["name"]: b["remaining"] for b in w.balances("tenant:a")}
    assert left == {"usd": 1_000_000 - 2_570, "tpm": 1_000_000 - 1_007}
    assert asyncio.run(complete_async(3)) == 3
    left = {b["name"]: b["remaining"] for b in w.balances("tenant:a")}
    assert left == {"usd": 1_000_000 - 2_570 - 280, "tpm": 1_000_000 - 1_007 - 103}
    # A reported usage that cannot be priced: the estimate is charged, and logged.
    with caplog.at_level(logging.WARNING, logger="ratewarden"):
        assert asyncio.run(complete_async(-1)) == -1
    assert "output_tokens" in caplog.text
    left = {b["name"]: b["remaining"] for b in w.balances("tenant:a")}
    assert left["usd"] == 1_000_000 - 2_570 - 280 - 1_250


def test_bad_usage_is_refused_by_name_and_changes_nothing() -> None:
    w = Warden(POLICY)
    cases = [
        ({"input_tokens": 1.5}, "input_tokens"),
        ({"input_tokens": -1}, "input_tokens"),
        ({"inptu_tokens": 1}, "unknown field `inptu_tokens`"),
        ({"input_tokens": 2**70}, "input_tokens"),
        ({"input_tokens": 5, "cached_input_tokens": 6}, "cached_input_tokens"),
        ({"seconds": "0.0005"}, "seconds"),
        ({"input_tokens": True}, "bool"),
        ("lots", "invalid usage"),
    ]
    for usage, says in cases:
        with pytest.raises(ratewarden.InvalidInput, match=says):
            w.acquire("tenant:a", resource="openai:gpt-4o", usage=usage)  # type: ignore[arg-type]
        with pytest.raises(ratewarden.InvalidInput, match=says):
            w.cost("openai:gpt-4o", usage)  # type: ignore[arg-type]
    with pytest.raises(ratewarden.InvalidInput, match="has no `pricing:`"):
        w.reserve("tenant:a", resource="plain", usage={"input_tokens": 1})
    with pytest.raises(ratewarden.InvalidInput, match="needs a resource"):
        w.acquire("tenant:a", usage={"input_tokens": 1})
    r = w.reserve("tenant:a", resource="openai:gpt-4o", cost={"usd": "0.01"})
    with pytest.raises(ratewarden.InvalidInput, match="resource"):
        w.commit(r.id, usage={"input_tokens": 1})  # type: ignore[arg-type]
    with pytest.raises(ratewarden.InvalidInput, match="not both"):
        w.commit(r.id, {"usd": "0.01"}, usage={"input_tokens": 1}, resource="openai:gpt-4o")
    r.release()
    left = {b["name"]: b["remaining"] for b in w.balances("tenant:a")}
    assert left == {"usd": 1_000_000, "tpm": 1_000_000}


@pytest.mark.parametrize("kind", ["url", "cluster_url"])
def test_usage_is_priced_the_same_on_redis(redis_servers: Any, namespace: str, kind: str) -> None:
    w = Warden(POLICY, backend=getattr(redis_servers, kind), namespace=namespace)
    r = w.reserve("tenant:a", resource="openai:gpt-4o", usage={"input_tokens": 1200, "max_output_tokens": 800})
    assert {l["name"]: l["remaining"] for l in r.limits} == {"usd": 989_000, "tpm": 998_000}
    receipt = r.commit(usage={"input_tokens": 1200, "output_tokens": 95})
    assert {c["name"]: c["charged"] for c in receipt["charges"]} == {"usd": 3950, "tpm": 1295}


def test_a_reservation_the_budget_cannot_cover_is_shrunk_with_caps() -> None:
    policy = json.loads(json.dumps(POLICY))
    policy["resources"]["openai:gpt-4o"]["shrink"] = {"min_output_tokens": 100}
    w = Warden(policy)
    assert w.acquire("tenant:a", cost={"usd": "0.995"}).allowed
    # $0.005 left: 1 000 input tokens ($0.0025) and 250 of the 1 000 output tokens.
    with w.reserve("tenant:a", resource="openai:gpt-4o", usage={"input_tokens": 1000, "max_output_tokens": 1000}) as r:
        assert r.outcome == "allow_with_caps"
        assert r.caps["max_tokens"] == 250
        r.commit(usage={"input_tokens": 1000, "output_tokens": 250})
    left = {b["name"]: b["remaining"] for b in w.balances("tenant:a")}
    assert left == {"usd": 0, "tpm": 1_000_000 - 1_250}
    # Nothing is left to shrink to: denied, raising from the context manager.
    denied = w.reserve("tenant:a", resource="openai:gpt-4o", usage={"input_tokens": 1, "max_output_tokens": 10})
    assert not denied.allowed
    with pytest.raises(ratewarden.BudgetExceeded), denied:
        pass


def test_a_shrunk_guarded_call_reads_its_caps_and_a_fallback_is_priced_on_its_model() -> None:
    policy = json.loads(json.dumps(POLICY))
    policy["resources"]["openai:gpt-4o"]["shrink"] = {"min_output_tokens": 100, "fallback": ["openai:gpt-4o-mini"]}
    policy["resources"]["openai:gpt-4o-mini"] = {"pricing": {"input": "0.15", "output": "0.60"}}
    w = Warden(policy)
    assert w.acquire("tenant:a", cost={"usd": "0.995"}).allowed
    seen = []

    @w.guard("tenant:b", resource="openai:gpt-4o", usage={"input_tokens": 10, "max_output_tokens": 10})
    def inner() -> None:
        seen.append(("inner", ratewarden.current_caps()))

    @w.guard(
        "tenant:a",
        resource="openai:gpt-4o",
        usage={"input_tokens": 1000, "max_output_tokens": 1000},
        actual=lambda out: {"input_tokens": 1000, "output_tokens": out},
    )
    def complete(out: int) -> int:
        seen.append(("outer", ratewarden.current_caps()))
        inner()  # a guarded call allowed as asked sees no caps
        return out

    # $0.005 left: 250 of the 1 000 output tokens fit.
    assert complete(250) == 250
    assert seen == [("outer", {"max_tokens": 250}), ("inner", {})]
    assert ratewarden.current_caps() == {}
    # Nothing left on gpt-4o: the call falls back to gpt-4o-mini and is
    # charged there — 1 000 in + 400 out is $0.00039, not gpt-4o's $0.0065.
    assert w.top_up("tenant:a", "usd", "0.001")["credited_text"] == "0.001"
    seen.clear()

    @w.guard(
        "tenant:a",
        resource="openai:gpt-4o",
        usage={"input_tokens": 1000, "max_output_tokens": 1000},
        actual=lambda out: {"input_tokens": 1000, "output_tokens": out},
    )
    async def complete_async(out: int) -> int:
        seen.append(("async", ratewarden.current_caps()))
        await asyncio.sleep(0)
        seen.append(("async after await", ratewarden.current_caps()))
        return out

    assert asyncio.run(complete_async(400)) == 400
    assert seen == [("async", {"model": "openai:gpt-4o-mini"}), ("async after await", {"model": "openai:gpt-4o-mini"})]
    left = {b["name"]: b["remaining"] for b in w.balances("tenant:a")}
    assert left["usd"] == 1_000 - 390

    # Once caps were seen in the process, a sync guarded call without caps
    # (returning or raising) still runs as before, and leaves none behind.
    @w.guard("tenant:c", cost={"requests": 1})
    def plain(fail: bool) -> Dict[str, Any]:
        if fail:
            raise KeyError("no")
        return ratewarden.current_caps()

    assert plain(False) == {}
    with pytest.raises(KeyError):
        plain(True)
    assert ratewarden.current_caps() == {}
