"""Every public entry point rejects bad input with a specific exception whose
message names what was wrong, and changes nothing."""

from __future__ import annotations

from typing import Any, Dict

import pytest

import ratewarden
from ratewarden import InvalidInput, PolicyError, ReservationConflict, ReservationNotFound, Warden

POLICY: Dict[str, Any] = {
    "scopes": {
        "tenant": {
            "limits": [
                {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
                {"name": "q", "kind": "quota", "limit": 5, "per": "day"},
            ]
        }
    },
    "resources": {"llm": {"limits": [{"name": "tpm", "kind": "rate", "unit": "tokens", "limit": 1000, "per": "1m"}]}},
}


@pytest.fixture
def w() -> Warden:
    return Warden(POLICY)


def state(w: Warden) -> Any:
    return [
        (l["name"], l["remaining"])
        for l in w.check("tenant:a", resource="llm", cost={"usd": 0, "tokens": 0, "requests": 0}).limits
    ]


CASES: Dict[str, Any] = {
    "scope without kind": (lambda w: w.acquire("acme"), InvalidInput, "acme"),
    "unknown scope kind": (lambda w: w.acquire("tenent:a"), InvalidInput, "tenent"),
    "unknown resource": (lambda w: w.acquire("tenant:a", resource="llmm"), InvalidInput, "llmm"),
    "unknown unit": (lambda w: w.acquire("tenant:a", cost={"eur": 1}), InvalidInput, "eur"),
    "text amount": (lambda w: w.acquire("tenant:a", cost={"usd": "ten"}), InvalidInput, 'cost["usd"]'),
    "bool amount": (lambda w: w.acquire("tenant:a", cost={"usd": True}), InvalidInput, "bool"),
    "list amount": (lambda w: w.acquire("tenant:a", cost={"usd": [1]}), InvalidInput, "list"),
    "negative amount": (lambda w: w.acquire("tenant:a", cost={"usd": -1}), InvalidInput, "usd"),
    "nan amount": (lambda w: w.acquire("tenant:a", cost={"usd": float("nan")}), InvalidInput, "usd"),
    "too many decimals": (lambda w: w.acquire("tenant:a", cost={"usd": "0.0000001"}), InvalidInput, "usd"),
    "amount beyond 2^53": (
        lambda w: w.acquire("tenant:a", cost={"tokens": 2**60}, resource="llm"),
        InvalidInput,
        "tokens",
    ),
    "cost not a mapping": (lambda w: w.acquire("tenant:a", cost=[("usd", 1)]), InvalidInput, "cost"),
    "unknown priority": (lambda w: w.acquire("tenant:a", priority="urgent"), InvalidInput, "urgent"),
    "negative lease": (lambda w: w.reserve("tenant:a", lease=-1), InvalidInput, "lease"),
    "nan lease": (lambda w: w.reserve("tenant:a", lease=float("nan")), InvalidInput, "lease"),
    "malformed reservation id": (lambda w: w.release("abc"), InvalidInput, "abc"),
    "unknown reservation": (lambda w: w.commit("0" * 31 + "1"), ReservationNotFound, "0" * 31 + "1"),
    "delegate from two sources": (
        lambda w: w.delegate("tenant:a/run:1", {"usd": 1}, from_scope="tenant:a", from_reservation="0" * 32),
        InvalidInput,
        "exactly one",
    ),
    "delegate to a non-descendant": (
        lambda w: w.delegate("tenant:b", {"usd": 1}, from_scope="tenant:a"),
        InvalidInput,
        "tenant:b",
    ),
    "negative max_wait": (lambda w: w.wait("tenant:a", max_wait=-1), InvalidInput, "max_wait"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_a_named_error_and_changes_nothing(w: Warden, case: str) -> None:
    call, exc, mention = CASES[case]
    before = state(w)
    with pytest.raises(exc) as e:
        call(w)
    assert mention in str(e.value), f"{case}: {e.value}"
    assert isinstance(e.value, ratewarden.WardenError)
    assert state(w) == before


def test_ended_reservations_conflict(w: Warden) -> None:
    r = w.reserve("tenant:a", cost={"usd": 1})
    r.commit()
    with pytest.raises(ReservationConflict, match="committed"):
        w.release(r.id)
    with pytest.raises(ReservationConflict):
        w.extend(r.id, 10)


@pytest.mark.parametrize(
    "policy,mention",
    [
        (
            {"scopes": {"tenant": {"limits": [{"name": "x", "kind": "quota", "limit": 1, "per": "fortnight"}]}}},
            "scopes.tenant.limits[0]",
        ),
        ({"scopes": {"tenant": {"limits": [{"name": "x", "kind": "rate", "limit": -1, "per": "1s"}]}}}, "limit"),
        ({"scopes": 7}, "scopes"),
        (
            {"scopes": {"tenant": {"limits": [{"name": "x", "kind": "quota", "limit": 1, "per": "day", "extra": 1}]}}},
            "extra",
        ),
    ],
)
def test_invalid_policies_name_the_path(policy: Dict[str, Any], mention: str) -> None:
    with pytest.raises(PolicyError) as e:
        Warden(policy)
    assert mention in str(e.value)


def test_bad_construction_arguments() -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml"):
        Warden("/nonexistent/nope.yaml")
    with pytest.raises(InvalidInput, match="policy"):
        Warden(42)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="JSON"):
        Warden({"scopes": {1j: {}}})
    with pytest.raises(InvalidInput, match="local_share"):
        Warden(POLICY, backend="redis://127.0.0.1:1", on_backend_error="local", local_share=0)
    with pytest.raises(InvalidInput, match="redis url"):
        Warden(POLICY, backend="http://example.com")
    with pytest.raises(InvalidInput, match="start"):
        ratewarden.ManualClock(float("inf"))


def test_negative_zero_is_zero_and_amount_errors_never_name_an_empty_unit(w: Warden) -> None:
    for zero in (-0.0, "-0", "-0.00"):
        assert w.acquire("tenant:a", cost={"usd": zero}).allowed
    for bad in ("x", float("nan"), float("inf"), -0.5):
        with pytest.raises(InvalidInput) as e:
            w.acquire("tenant:a", cost={"usd": bad})
        assert "unit ``" not in str(e.value)
        assert 'cost["usd"]' in str(e.value) or "unit `usd`" in str(e.value)


WRONG_TYPES: Dict[str, Any] = {
    "scope=None": (lambda w: w.acquire(None), "scope"),
    "resource=5": (lambda w: w.acquire("tenant:a", resource=5), "resource"),
    "priority=0": (lambda w: w.acquire("tenant:a", priority=0), "priority"),
    "lease='10'": (lambda w: w.reserve("tenant:a", lease="10"), None),
    "commit(None)": (lambda w: w.commit(None), "reservation"),
    "release(5)": (lambda w: w.release(5), "reservation"),
    "extend lease as text": (lambda w: w.extend("0" * 32, "x"), None),
    "max_wait as text": (lambda w: w.wait("tenant:a", max_wait="x"), None),
    "async scope=None": (lambda w: w.acquire_async(None), "scope"),
    "lone surrogate": (lambda w: w.acquire("tenant:\ud800"), "scope"),
    "backend=123": (lambda w: Warden(POLICY, backend=123), "backend"),
    "clock='x'": (lambda w: Warden(POLICY, clock="x"), None),
    "local_share=-1": (lambda w: Warden(POLICY, local_share=-1), "local_share"),
    "guard(scope=None)": (lambda w: w.guard(None)(lambda: 1), "scope"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_wrong_types_are_invalid_input_naming_the_argument(w: Warden, case: str) -> None:
    call, argument = WRONG_TYPES[case]
    before = state(w)
    with pytest.raises(InvalidInput) as e:
        call(w)
    assert isinstance(e.value, (TypeError, ValueError))
    assert e.value.kind == "invalid_input", case
    if argument is not None:
        assert e.value.argument == argument and argument in str(e.value), f"{case}: {e.value!r}"
    assert state(w) == before


def test_errors_carry_data_and_an_expired_reservation_is_not_an_unknown_one() -> None:
    clock = ratewarden.ManualClock()
    w = Warden(POLICY, clock=clock)
    r = w.reserve("tenant:a", cost={"usd": 1}, lease=1)
    clock.advance(2)
    with pytest.raises(ratewarden.ReservationExpired) as expired:
        r.commit()
    assert isinstance(expired.value, ReservationNotFound), "still a not-found, for old handlers"
    assert (expired.value.kind, expired.value.code, expired.value.reservation) == (
        "not_found",
        "reservation_expired",
        r.id,
    )
    with pytest.raises(ReservationNotFound) as unknown:
        w.commit("0" * 31 + "1")
    assert not isinstance(unknown.value, ratewarden.ReservationExpired)
    assert (unknown.value.code, unknown.value.reservation) == ("reservation_not_found", "0" * 31 + "1")

    with pytest.raises(PolicyError) as p:
        Warden({"scopes": {"tenant": {"limits": [{"name": "x", "kind": "quota", "limit": 1, "per": "fortnight"}]}}})
    assert p.value.kind == "policy" and p.value.path == "scopes.tenant.limits[0].per", p.value.path
    with pytest.raises(InvalidInput) as u:
        w.acquire("tenant:a", cost={"eur": 1})
    assert (u.value.code, u.value.argument) == ("unknown", "unit")
    with pytest.raises(InvalidInput) as a:
        w.acquire("tenant:a", cost={"usd": "0.0000001"})
    assert (a.value.code, a.value.unit) == ("invalid_amount", "usd")
    r = w.reserve("tenant:a", cost={"usd": 1})
    r.commit()
    with pytest.raises(ReservationConflict) as c:
        w.release(r.id)
    assert (c.value.kind, c.value.code, c.value.reservation) == ("conflict", "reservation_closed", r.id)
    with pytest.raises(ratewarden.BudgetExceeded) as d:
        w.guard("tenant:a", cost={"usd": 100})(lambda: 1)()
    assert (d.value.kind, d.value.code) == ("denied", "budget_exceeded") and d.value.decision.denied_by == "usd"
