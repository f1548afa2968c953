"""``Warden.reload``: a new policy (a dict or a file) put in force in a running
warden — prices and limits change for the next decision, what was counted
carries over, a reservation made before commits under the limits it held, an
edit the counters cannot survive is refused and changes nothing, and a
``policy.reloaded`` event says what changed. Embedded and on Redis."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any, Dict

import pytest

import ratewarden
from ratewarden import PolicyError, Warden


def policy(usd: str = "10", input_price: float = 2.50) -> Dict[str, Any]:
    return {
        "scopes": {
            "tenant": {
                "limits": [
                    {"name": "usd", "kind": "budget", "unit": "usd", "limit": usd, "per": "month"},
                    {"name": "rpm", "kind": "rate", "limit": 10, "per": "1m"},
                ]
            }
        },
        "resources": {"m": {"pricing": {"input": input_price, "output": 10.00}}},
    }


def left(d: Any) -> Dict[str, Any]:
    return {lim["name"]: lim["remaining"] for lim in d.limits}


def test_new_prices_and_sizes_apply_to_the_next_decision_and_the_spend_stays(tmp_path: Path) -> None:
    w = Warden(policy())
    usage = {"input_tokens": 1_000_000, "max_output_tokens": 100_000}
    assert w.estimate("m", usage)["amount_text"] == "3.5"
    assert w.acquire("tenant:a", cost={"usd": "5"}).allowed
    file = tmp_path / "v2.json"
    file.write_text(json.dumps(policy(usd="20", input_price=5.00)))
    changes = w.reload(file)
    assert changes == {"added": [], "removed": [], "changed": ["usd"], "repriced": ["m"]}
    assert w.estimate("m", usage)["amount_text"] == "6"
    d = w.reserve("tenant:a", resource="m", usage=usage)
    assert d.allowed
    # $5 spent stays spent of the new $20; the reservation holds $6.
    assert left(d)["usd"] == 9_000_000
    d.release()
    assert w.check("tenant:a", cost={"usd": "15"}).allowed
    assert not w.check("tenant:a", cost={"usd": "15.000001"}).allowed


def test_a_reservation_made_before_commits_under_the_limits_it_held() -> None:
    two = {
        "scopes": {
            "tenant": {
                "limits": [
                    {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
                    {"name": "tokens", "kind": "budget", "unit": "tokens", "limit": 1000, "per": "month"},
                ]
            }
        }
    }
    w = Warden(two)
    r = w.reserve("tenant:a", cost={"usd": "2", "tokens": 100})
    one = {"scopes": {"tenant": {"limits": [two["scopes"]["tenant"]["limits"][0]]}}}
    assert w.reload(one)["removed"] == ["tokens"]
    receipt = r.commit({"usd": "1", "tokens": 60})
    assert {c["name"]: c["charged"] for c in receipt["charges"]} == {"usd": 1_000_000, "tokens": 60}
    assert [lim["name"] for lim in w.check("tenant:a").limits] == ["usd"]


def test_a_refused_reload_names_what_and_changes_nothing() -> None:
    w = Warden(policy())
    assert w.acquire("tenant:a", cost={"usd": "3"}).allowed
    bad = policy()
    bad["scopes"]["tenant"]["limits"][1] = {"name": "rpm", "kind": "quota", "limit": 10, "per": "minute"}
    with pytest.raises(PolicyError, match=r"limit `rpm`.*cannot turn a rate limit into a quota limit"):
        w.reload(bad)
    decimals = policy()
    decimals["units"] = {"usd": {"decimals": 2}}
    with pytest.raises(PolicyError, match=r"units\.usd.*from 6 to 2 decimals"):
        w.reload(decimals)
    with pytest.raises(PolicyError, match=r"limit"):
        w.reload({"scopes": {"tenant": {"limits": [{"name": "x", "kind": "rate"}]}}})
    with pytest.raises(ratewarden.InvalidInput, match="expected a dict or a file path"):
        w.reload(42)  # type: ignore[arg-type]
    # Still the first policy, $3 spent of $10.
    assert left(w.check("tenant:a", cost={"usd": "7"}))["usd"] == 0
    assert not w.check("tenant:a", cost={"usd": "7.000001"}).allowed


def test_a_reload_is_an_event_naming_what_changed() -> None:
    w = Warden(policy())
    got: queue.Queue[Dict[str, Any]] = queue.Queue()
    with w.on_event(got.put, events="policy."):
        w.reload(policy(usd="20"))
        event = got.get(timeout=10)
    assert event["type"] == "policy.reloaded"
    assert event["data"] == {"source": "<dict>", "added": [], "removed": [], "changed": ["usd"], "repriced": []}


@pytest.mark.parametrize("where", ["url", "cluster_url"])
def test_on_redis_the_reloaded_warden_decides_on_the_shared_counters(
    redis_servers: Any, namespace: str, where: str
) -> None:
    url = getattr(redis_servers, where)
    a = Warden(policy(), backend=url, namespace=namespace)
    b = Warden(policy(), backend=url, namespace=namespace)
    assert a.acquire("tenant:a", cost={"usd": "6"}).allowed
    # b (another process's warden) raises the budget; a keeps its own policy.
    assert b.reload(policy(usd="12"))["changed"] == ["usd"]
    assert b.check("tenant:a", cost={"usd": "6"}).allowed
    assert not a.check("tenant:a", cost={"usd": "4.000001"}).allowed
    assert left(b.acquire("tenant:a", cost={"usd": "6"}))["usd"] == 0
    assert not b.check("tenant:a", cost={"usd": "0.000001"}).allowed
