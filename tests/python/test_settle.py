"""The settlement rule of ``Warden.guard`` — the same cases as core/tests/settle.rs
and tests/node/settle.test.mjs: a call that ran is always charged (its actual
usage rounded up to the unit, else the estimate) and returns its result; a call
that raised releases its hold and its error propagates unchanged. Every guard
form (sync, async decided at once, async awaited) on memory and on Redis."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, Iterator

import pytest

import ratewarden
from ratewarden import Warden

POLICY = {
    "scopes": {
        "tenant": {
            "limits": [
                {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
                {"name": "calls", "kind": "quota", "limit": 100, "per": "day"},
            ]
        }
    }
}

FORMS = ["sync", "async", "async-wait"]


@pytest.fixture(params=["memory", "redis"])
def warden(request: pytest.FixtureRequest, namespace: str) -> Iterator[Warden]:
    if request.param == "memory":
        w = Warden(POLICY)
    else:
        servers = request.getfixturevalue("redis_servers")
        w = Warden(POLICY, backend=servers.url, namespace=namespace, timeout=10)
    yield w
    w.close()


def left(w: Warden) -> tuple[int, int]:
    d = w.check("tenant:a", cost={"requests": 0})
    by = {l["name"]: l["remaining"] for l in d.limits}
    return by["usd"], by["calls"]


def guarded(w: Warden, form: str, body: Callable[[], Any], actual: Any = None) -> Callable[[], Any]:
    """`body` guarded with a 1 usd estimate, called the way `form` says."""
    opts: Dict[str, Any] = {"cost": {"usd": "1"}, "actual": actual}
    if form == "sync":
        return w.guard("tenant:a", **opts)(lambda: body())

    async def run() -> Any:
        return body()

    g = w.guard("tenant:a", on_limit="wait" if form == "async-wait" else "raise", **opts)(run)
    return lambda: asyncio.run(g())


@pytest.mark.parametrize("form", FORMS)
def test_a_call_that_raises_releases_and_its_error_propagates_unchanged(warden: Warden, form: str) -> None:
    err = KeyError("upstream said no")

    def body() -> Any:
        raise err

    with pytest.raises(KeyError) as e:
        guarded(warden, form, body)()
    assert e.value is err
    assert left(warden) == (10_000_000, 100)


@pytest.mark.parametrize("form", FORMS)
def test_the_actual_is_charged_and_finer_amounts_round_up(warden: Warden, form: str) -> None:
    assert guarded(warden, form, lambda: 1234, actual=lambda r: {"usd": "0.25"})() == 1234
    assert left(warden) == (9_750_000, 99)
    # 1234 tokens at 2.5e-6 usd as a float: 0.003085 usd.
    guarded(warden, form, lambda: 1234, actual=lambda r: {"usd": r * 2.5e-6})()
    assert left(warden)[0] == 9_750_000 - 3_085
    # Finer than the unit's 6 decimals: rounded up, not refused and not dropped.
    guarded(warden, form, lambda: 0, actual=lambda r: {"usd": 0.0030851})()
    assert left(warden)[0] == 9_750_000 - 3_085 - 3_086
    # No actual, or one that returns None: the estimate.
    guarded(warden, form, lambda: 0)()
    guarded(warden, form, lambda: 0, actual=lambda r: None)()
    assert left(warden) == (9_750_000 - 3_085 - 3_086 - 2_000_000, 95)


BAD_ACTUALS = [
    (lambda r: r["usage"], "KeyError"),
    (lambda r: 0.5, "not a mapping"),
    (lambda r: "0.5", "not a mapping"),
    (lambda r: {"gpu-seconds": 5}, "gpu-seconds"),
    (lambda r: {"usd": -1}, "negative"),
    (lambda r: {"usd": float("nan")}, "finite"),
    (lambda r: {"usd": 2**60}, "exceeds"),
]


@pytest.mark.parametrize("form", FORMS)
def test_an_unusable_actual_charges_the_estimate_returns_the_result_and_logs(
    warden: Warden, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    for i, (actual, why) in enumerate(BAD_ACTUALS, start=1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ratewarden"):
            assert guarded(warden, form, lambda: {"answer": 42}, actual=actual)() == {"answer": 42}
        assert left(warden) == (10_000_000 - i * 1_000_000, 100 - i), why
        [record] = [r for r in caplog.records if r.name == "ratewarden"]
        assert "charged the estimate" in record.getMessage() and why in record.getMessage(), record.getMessage()


def test_balances_read_every_limit_without_charging(warden: Warden) -> None:
    r = warden.reserve("tenant:a", cost={"usd": "2.5"})
    assert r.allowed
    for _ in range(3):
        by = {b["name"]: b for b in warden.balances("tenant:a")}
        assert (by["usd"]["remaining"], by["usd"]["held"], by["usd"]["limit"]) == (7_500_000, 2_500_000, 10_000_000)
        assert (by["usd"]["remaining_text"], by["usd"]["held_text"], by["usd"]["owner"]) == ("7.5", "2.5", "tenant:a")
        assert by["usd"]["reset"] is not None and by["usd"]["reset"] > 0
        assert (by["calls"]["remaining"], by["calls"]["held"]) == (99, 1), "the reservation's call, nothing more"
    r.release()
    assert all(b["held"] == 0 for b in asyncio.run(_balances(warden)))
    with pytest.raises(ratewarden.InvalidInput):
        warden.balances("tenant:a", resource="nope")


async def _balances(w: Warden) -> Any:
    return await w.balances_async("tenant:a")
