"""Overage rules at commit from Python: reject raises ReservationConflict and
keeps the reservation, allow_if_available and allow_with_overdraft charge as
far as they allow, and a guarded call whose actual a reject limit refuses is
charged its estimate, with a warning."""

from __future__ import annotations

import logging
from typing import Any, Dict

import pytest

import ratewarden
from ratewarden import Warden


def _warden(rule: str, **extra: Any) -> Warden:
    limit: Dict[str, Any] = {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "overage": rule, **extra}
    return Warden({"scopes": {"tenant": {"limits": [limit]}}})


def _charged(receipt: Dict[str, Any]) -> tuple:
    c = receipt["charges"][0]
    return c["charged"], c["uncharged"]


def test_reject_refuses_and_keeps_the_reservation_live() -> None:
    w = _warden("reject")
    with w.reserve("tenant:a", cost={"usd": "1"}) as r:
        with pytest.raises(ratewarden.ReservationConflict, match="overage rule is `reject`") as e:
            r.commit({"usd": "1.5"})
        assert e.value.code == "overage_rejected" and e.value.unit == "usd"
        assert _charged(r.commit({"usd": "0.75"})) == (750_000, 0)
    assert w.balances("tenant:a")[0]["remaining"] == 9_250_000


def test_allow_if_available_and_overdraft_charge_as_far_as_they_allow() -> None:
    w = _warden("allow_if_available")
    w.acquire("tenant:a", cost={"usd": "8"})
    r = w.reserve("tenant:a", cost={"usd": "1"})
    assert _charged(r.commit({"usd": "5"})) == (2_000_000, 3_000_000)
    w = _warden("allow_with_overdraft", overdraft="2.5")
    w.acquire("tenant:a", cost={"usd": "8"})
    r = w.reserve("tenant:a", cost={"usd": "1"})
    assert _charged(r.commit({"usd": "5"})) == (4_500_000, 500_000)
    # In debt: nothing more passes until the budget is topped up (reset).
    assert not w.acquire("tenant:a", cost={"usd": "0.01"}).allowed


def test_a_guarded_call_refused_by_reject_is_charged_its_estimate(caplog: pytest.LogCaptureFixture) -> None:
    w = _warden("reject")

    @w.guard("tenant:a", cost={"usd": "1"}, actual=lambda used: {"usd": used})
    def call(used: str) -> str:
        return used

    with caplog.at_level(logging.WARNING, logger="ratewarden"):
        assert call("3") == "3"
    assert "overage rule is `reject`; charged the estimate" in caplog.text
    assert w.balances("tenant:a")[0]["remaining"] == 9_000_000


def test_bad_overage_rules_name_where() -> None:
    with pytest.raises(ratewarden.PolicyError, match=r"limits\[0\]\.overdraft"):
        _warden("allow_with_overdraft")
    with pytest.raises(ratewarden.PolicyError, match="overage"):
        _warden("sometimes")


@pytest.mark.parametrize("where", ["memory", "redis", "cluster"])
def test_a_limit_in_debt_admits_again_once_topped_up(where: str, request: pytest.FixtureRequest) -> None:
    options: Dict[str, Any] = {}
    if where != "memory":
        servers = request.getfixturevalue("redis_servers")
        url = servers.url if where == "redis" else servers.cluster_url
        options = {"backend": url, "namespace": f"py-topup-{where}"}
    policy = {"scopes": {"tenant": {"limits": [{"name": "credits", "kind": "budget", "unit": "usd", "limit": "10"}]}}}
    w = Warden(policy, **options)
    with w.reserve("tenant:a", cost={"usd": "5"}) as r:
        receipt = r.commit({"usd": "12"})
    assert receipt["charges"][0]["debt"] == 2_000_000
    assert not w.acquire("tenant:a", cost={"usd": "0.01"}).allowed
    t = w.top_up("tenant:a", "credits", "3")
    assert (t["credited_text"], t["spent_text"], t["unit"]) == ("3", "9", "usd")
    assert w.acquire("tenant:a", cost={"usd": "1"}).allowed
    with pytest.raises(ratewarden.InvalidInput, match="is not a limit that requests by tenant:a touch"):
        w.top_up("tenant:a", "nope", 1)
    with pytest.raises(ratewarden.InvalidInput, match="amount"):
        w.top_up("tenant:a", "credits", [1])  # type: ignore[arg-type]
