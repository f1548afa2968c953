//! Reserve → commit / release / extend, leases and concurrency slots.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, remaining, warden};
use ratewarden::{Amount, Cost, Error, ErrorKind, Request};
use serde_json::json;

fn usd(s: &str) -> Amount {
    Amount::parse(s).unwrap()
}

fn budget_policy(overage: &str) -> serde_json::Value {
    json!({"scopes": {"tenant": {"limits": [
        {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month", "overage": overage}
    ]}}})
}

#[test]
fn commit_refunds_the_unused_estimate() {
    let (w, _c) = warden(budget_policy("charge"));
    let req = Request::parse("tenant:a").unwrap().spend("usd", usd("4"));
    let d = now(w.reserve(&req, None)).unwrap();
    assert!(d.allowed());
    assert_eq!(remaining(&d, "usd"), 6_000_000);
    let id = d.reservation.unwrap().id;
    let r = now(w.commit(id, &Cost::new().with("usd", usd("1.25")))).unwrap();
    assert_eq!(r.charges[0].charged, 1_250_000);
    assert_eq!(r.charges[0].reserved, 4_000_000);
    let d = now(w.check(&Request::parse("tenant:a").unwrap())).unwrap();
    assert_eq!(remaining(&d, "usd"), 8_750_000);
}

#[test]
fn overage_charge_goes_into_debt_and_cap_forgives() {
    let (w, _c) = warden(budget_policy("charge"));
    let id = now(w.reserve(
        &Request::parse("tenant:a").unwrap().spend("usd", usd("9")),
        None,
    ))
    .unwrap()
    .reservation
    .unwrap()
    .id;
    now(w.commit(id, &Cost::new().with("usd", usd("12")))).unwrap();
    let d = now(w.acquire(
        &Request::parse("tenant:a")
            .unwrap()
            .spend("usd", usd("0.01")),
    ))
    .unwrap();
    assert!(!d.allowed(), "12 of 10 spent: in debt");
    assert_eq!(remaining(&d, "usd"), 0);

    let (w, _c) = warden(budget_policy("cap"));
    let id = now(w.reserve(
        &Request::parse("tenant:a").unwrap().spend("usd", usd("9")),
        None,
    ))
    .unwrap()
    .reservation
    .unwrap()
    .id;
    let r = now(w.commit(id, &Cost::new().with("usd", usd("12")))).unwrap();
    assert_eq!(
        (r.charges[0].charged, r.charges[0].uncharged),
        (9_000_000, 3_000_000)
    );
    assert!(
        now(w.acquire(&Request::parse("tenant:a").unwrap().spend("usd", usd("1"))))
            .unwrap()
            .allowed()
    );
}

#[test]
fn commit_and_release_are_idempotent() {
    let (w, _c) = warden(budget_policy("charge"));
    let req = Request::parse("tenant:a").unwrap().spend("usd", usd("2"));
    let id = now(w.reserve(&req, None)).unwrap().reservation.unwrap().id;
    let first = now(w.commit(id, &Cost::new().with("usd", usd("2")))).unwrap();
    let second = now(w.commit(id, &Cost::new().with("usd", usd("5")))).unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(
        second.charges, first.charges,
        "the duplicate reports the first commit, charges nothing"
    );
    let d = now(w.check(&Request::parse("tenant:a").unwrap())).unwrap();
    assert_eq!(remaining(&d, "usd"), 8_000_000);
    let e = now(w.release(id)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ReservationClosed {
                state: "committed",
                ..
            }
        ),
        "{e}"
    );

    let id = now(w.reserve(&req, None)).unwrap().reservation.unwrap().id;
    assert!(now(w.release(id)).unwrap());
    assert!(!now(w.release(id)).unwrap());
    let d = now(w.check(&Request::parse("tenant:a").unwrap())).unwrap();
    assert_eq!(remaining(&d, "usd"), 8_000_000);
    assert_eq!(
        now(w.commit(id, &Cost::new())).unwrap_err().kind(),
        ErrorKind::Conflict
    );
}

#[test]
fn leases_expire_and_return_capacity() {
    let (w, clock) = warden(json!({"scopes": {"tenant": {"limits": [
        {"name": "jobs", "kind": "concurrency", "limit": 2, "lease": "30s"}
    ]}}}));
    let req = Request::parse("tenant:a").unwrap();
    let a = now(w.reserve(&req, None)).unwrap();
    let b = now(w.reserve(&req, Some(Duration::from_secs(60)))).unwrap();
    assert!(a.allowed() && b.allowed());
    let d = now(w.reserve(&req, None)).unwrap();
    assert!(!d.allowed());
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs(30)),
        "best estimate: the first lease expiry"
    );
    // acquire checks a slot but holds none
    assert!(!now(w.acquire(&req)).unwrap().allowed());
    clock.advance(Duration::from_secs(30));
    let c = now(w.reserve(&req, None)).unwrap();
    assert!(c.allowed(), "a's lease expired and returned its slot");
    let e = now(w.commit(a.reservation.unwrap().id, &Cost::new())).unwrap_err();
    assert!(matches!(e, Error::ReservationExpired { .. }), "{e}");
    // extend keeps b alive past its original expiry
    let b_id = b.reservation.unwrap().id;
    now(w.extend(b_id, Duration::from_secs(120))).unwrap();
    // t = 65 s: c (expired at 60 s) is gone; b would have expired at 60 s but was extended.
    clock.advance(Duration::from_secs(35));
    assert!(
        now(w.reserve(&req, None)).unwrap().allowed(),
        "one slot free"
    );
    assert!(
        !now(w.reserve(&req, None)).unwrap().allowed(),
        "b still holds the other slot"
    );
    assert!(now(w.release(b_id)).unwrap());
    assert!(now(w.reserve(&req, None)).unwrap().allowed());
}

#[test]
fn budget_holds_expire_too_and_commit_after_expiry_fails() {
    let (w, clock) = warden(budget_policy("charge"));
    let req = Request::parse("tenant:a").unwrap().spend("usd", usd("10"));
    let d = now(w.reserve(&req, Some(Duration::from_secs(5)))).unwrap();
    assert!(!now(w.reserve(&req, None)).unwrap().allowed());
    clock.advance(Duration::from_secs(5));
    assert!(now(w.check(&req)).unwrap().allowed());
    let e = now(w.extend(d.reservation.unwrap().id, Duration::from_secs(5))).unwrap_err();
    assert!(matches!(e, Error::ReservationExpired { .. }));
}

#[test]
fn rate_limits_take_reservations_of_estimated_tokens() {
    let (w, clock) = warden(json!({"resources": {"openai": {"limits": [
        {"name": "tpm", "kind": "rate", "unit": "tokens", "limit": 1000, "per": "1m"}
    ]}}, "scopes": {"user": {}}}));
    let req = Request::parse("user:1")
        .unwrap()
        .resource("openai")
        .spend("tokens", 800);
    let id = now(w.reserve(&req, None)).unwrap().reservation.unwrap().id;
    assert!(!now(w.check(&req)).unwrap().allowed());
    now(w.commit(id, &Cost::new().with("tokens", 300))).unwrap();
    let d = now(w.check(&req.clone().spend("tokens", 700))).unwrap();
    assert!(d.allowed(), "500 refunded: {d:?}");
    assert_eq!(remaining(&d, "tpm"), 0);
    clock.advance(Duration::from_secs(6));
    let id = now(w.reserve(&req.clone().spend("tokens", 100), None))
        .unwrap()
        .reservation
        .unwrap()
        .id;
    assert!(now(w.release(id)).unwrap());
    assert_eq!(
        remaining(
            &now(w.check(&req.clone().spend("tokens", 0))).unwrap(),
            "tpm"
        ),
        800
    );
}

#[test]
fn reservations_are_all_or_nothing_across_limits() {
    let (w, _c) = warden(json!({
        "scopes": {
            "tenant": {"limits": [{"name": "t-usd", "kind": "budget", "unit": "usd", "limit": "5", "per": "month"}]},
            "user": {"limits": [{"name": "u-usd", "kind": "budget", "unit": "usd", "limit": "2", "per": "day"}]}
        },
        "resources": {"video": {"limits": [{"name": "video-usd", "kind": "budget", "unit": "usd", "limit": "3", "per": "month", "scope": "tenant"}]}}
    }));
    let spend = |user: &str, amount: &str| {
        Request::parse(&format!("tenant:a/user:{user}"))
            .unwrap()
            .resource("video")
            .spend("usd", usd(amount))
    };
    assert!(now(w.acquire(&spend("1", "2"))).unwrap().allowed());
    let d = now(w.acquire(&spend("2", "1.5"))).unwrap();
    assert!(!d.allowed(), "video cap per tenant: 2 + 1.5 > 3");
    assert_eq!(d.denied_by().unwrap().name(), "video-usd");
    // Nothing was charged by the denied request: user 2 still has its full 2 usd.
    let d = now(w.check(&Request::parse("tenant:a/user:2").unwrap())).unwrap();
    assert_eq!(remaining(&d, "u-usd"), 2_000_000);
    assert_eq!(remaining(&d, "t-usd"), 3_000_000);
}

#[test]
fn caps_turn_allow_into_allow_with_caps() {
    let (w, _c) = warden(json!({"scopes": {"user": {"limits": [
        {"name": "tokens-day", "kind": "quota", "unit": "tokens", "limit": 1000, "per": "day",
         "caps": [{"when_remaining_below": "20%", "max_tokens": 256, "model": "gpt-4o-mini"}]}
    ]}}}));
    let req = Request::parse("user:1").unwrap().spend("tokens", 700);
    assert_eq!(
        now(w.acquire(&req)).unwrap().outcome,
        ratewarden::Outcome::Allow
    );
    let d = now(w.acquire(&req.clone().spend("tokens", 150))).unwrap();
    assert_eq!(d.outcome, ratewarden::Outcome::AllowWithCaps);
    assert_eq!(d.caps.max_tokens, Some(256));
    assert_eq!(d.caps.model.as_deref(), Some("gpt-4o-mini"));
}

#[test]
fn receipts_list_charges_in_plan_order() {
    // Scope limits by depth, then the resource's (a pool: on a Redis Cluster,
    // another slot, so the commit merges two records).
    let (w, _c) = warden(json!({
        "scopes": {
            "user": {"limits": [{"name": "u-tok", "kind": "budget", "unit": "tokens", "limit": 1000}]},
            "tenant": {"limits": [{"name": "t-tok", "kind": "budget", "unit": "tokens", "limit": 1000}]}
        },
        "resources": {"llm": {"limits": [
            {"name": "pool-tok", "kind": "quota", "unit": "tokens", "limit": 5000, "per": "day"},
            {"name": "per-tenant", "kind": "budget", "unit": "tokens", "limit": 900, "scope": "tenant"}
        ]}}
    }));
    let req = Request::parse("tenant:a/user:1")
        .unwrap()
        .resource("llm")
        .spend("tokens", 10);
    let id = now(w.reserve(&req, None)).unwrap().reservation.unwrap().id;
    let receipt = now(w.commit(id, &Cost::new().with("tokens", 7))).unwrap();
    let names: Vec<&str> = receipt.charges.iter().map(|c| c.name()).collect();
    assert_eq!(names, ["t-tok", "u-tok", "pool-tok", "per-tenant"]);
    assert!(receipt.charges.iter().all(|c| c.charged == 7));
}

#[test]
fn an_operation_id_is_decided_once() {
    let (w, _c) = warden(budget_policy("charge"));
    let req = |n: &str| Request::parse("tenant:a").unwrap().spend("usd", usd(n));
    let op = ratewarden::OperationId::random();
    let first = now(w.acquire(&req("4").operation(op))).unwrap();
    assert!(first.allowed());
    // The same id again: the first answer, nothing charged.
    for _ in 0..2 {
        let again = now(w.acquire(&req("4").operation(op))).unwrap();
        assert_eq!(again, first);
    }
    // The same id with another request is refused and changes nothing.
    for other in [req("6"), req("4").priority(ratewarden::Priority::Critical)] {
        let e = now(w.acquire(&other.operation(op))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(
            e.to_string()
                .contains("already answered a different request"),
            "{e}"
        );
    }
    let e = now(w.reserve(&req("4").operation(op), None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    // Ids are scoped to the scope tree, like idempotency keys per tenant.
    let b = Request::parse("tenant:b").unwrap().spend("usd", usd("4"));
    assert!(now(w.acquire(&b.clone().operation(op))).unwrap().allowed());
    assert_eq!(
        now(w.acquire(&b.operation(op))).unwrap().limits[0].remaining,
        6_000_000
    );
    let left = |w: &ratewarden::Warden| {
        let d = now(w.check(&req("0").spend("requests", 0))).unwrap();
        d.limits[0].remaining
    };
    assert_eq!(left(&w), 6_000_000);
    // A reserve under an id names the same reservation when repeated.
    let op = ratewarden::OperationId::random();
    let r1 = now(w.reserve(&req("1").operation(op), None)).unwrap();
    let r2 = now(w.reserve(&req("1").operation(op), None)).unwrap();
    assert_eq!(r1.reservation, r2.reservation);
    assert_eq!(left(&w), 5_000_000);
    // A denial changed nothing and is decided afresh: once room is made,
    // the same id is admitted.
    let op = ratewarden::OperationId::random();
    assert!(!now(w.acquire(&req("6").operation(op))).unwrap().allowed());
    now(w.release(r1.reservation.unwrap().id)).unwrap();
    assert!(now(w.acquire(&req("6").operation(op))).unwrap().allowed());
    assert_eq!(left(&w), 0);
}

#[test]
fn admit_holds_a_concurrency_slot_until_finished_and_acquire_holds_none() {
    use ratewarden::{CallOutcome, Usage};
    let (w, _c) = warden(json!({"scopes": {"ip": {"limits": [
        {"name": "one-at-a-time", "kind": "concurrency", "limit": 1},
        {"name": "per-minute", "kind": "rate", "limit": 10, "per": "1m"}
    ]}}}));
    let req = Request::parse("ip:1").unwrap();
    // acquire only checks the slot: three in a row pass, none holds it.
    for _ in 0..3 {
        let d = now(w.acquire(&req)).unwrap();
        assert!(d.allowed() && d.reservation.is_none(), "{d:?}");
    }
    let first = now(w.admit(&req)).unwrap();
    assert!(first.allowed(), "{first:?}");
    let id = first.reservation.as_ref().expect("a held slot").id;
    assert_eq!(remaining(&first, "one-at-a-time"), 0);
    assert_eq!(remaining(&first, "per-minute"), 6);
    let second = now(w.admit(&req)).unwrap();
    assert!(!second.allowed(), "the slot is taken: {second:?}");
    assert_eq!(second.denied_by().unwrap().name(), "one-at-a-time");
    let s = now(w.finish(id, CallOutcome::Ran(Usage::Estimate)));
    assert!(s.confirmed() && s.problem().is_none(), "{s:?}");
    let third = now(w.admit(&req)).unwrap();
    assert!(third.allowed(), "freed: {third:?}");
    assert_eq!(
        remaining(&third, "per-minute"),
        5,
        "the finished one stays charged"
    );

    // Without a concurrency limit, admit is acquire: nothing to end.
    let (w, _c) = warden(json!({"scopes": {"ip": {"limits": [
        {"name": "per-minute", "kind": "rate", "limit": 10, "per": "1m"}
    ]}}}));
    let d = now(w.admit(&req)).unwrap();
    assert!(d.allowed() && d.reservation.is_none());
}

#[test]
fn balances_read_every_limit_without_charging_anything() {
    use ratewarden::Scope;
    let (w, _c) = warden(json!({
        "scopes": {"tenant": {"limits": [
            {"name": "rpm", "kind": "rate", "limit": 10, "per": "1m"},
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
            {"name": "lifetime", "kind": "budget", "unit": "tokens", "limit": 1000},
            {"name": "slots", "kind": "concurrency", "limit": 2}
        ]}},
        "resources": {"llm": {"limits": [
            {"name": "llm-tpm", "kind": "rate", "unit": "tokens", "limit": 5000, "per": "1m"}
        ]}}
    }));
    let tenant = Scope::parse("tenant:acme").unwrap();
    let req = Request::parse("tenant:acme")
        .unwrap()
        .spend("usd", usd("2.5"))
        .spend("tokens", 100);
    let held = now(w.reserve(&req, None)).unwrap();
    assert!(held.allowed());
    now(w.acquire(&Request::parse("tenant:acme").unwrap())).unwrap();
    for _ in 0..3 {
        let b = now(w.balances(&tenant, None)).unwrap();
        let by = |n: &str| b.iter().find(|x| x.name == n).unwrap().clone();
        assert_eq!(b.len(), 4, "{b:?}");
        let rpm = by("rpm");
        assert_eq!(
            (rpm.limit, rpm.remaining, rpm.held),
            (10, 8, 0),
            "two requests so far, none more"
        );
        assert!(rpm.reset.is_some());
        let usd = by("usd");
        assert_eq!(
            (usd.limit, usd.remaining, usd.held),
            (10_000_000, 7_500_000, 2_500_000)
        );
        assert_eq!(
            (usd.unit.as_str(), usd.decimals, usd.owner.as_deref()),
            ("usd", 6, Some("tenant:acme"))
        );
        assert!(usd.reset.is_some(), "a monthly budget resets");
        let life = by("lifetime");
        assert_eq!(
            (life.remaining, life.held, life.reset),
            (900, 100, None),
            "never resets"
        );
        let slots = by("slots");
        assert_eq!(
            (slots.kind, slots.remaining, slots.held, slots.reset),
            ("concurrency", 1, 1, None)
        );
    }
    // With the resource: its pool too, owned by nobody.
    let b = now(w.balances(&tenant, Some("llm"))).unwrap();
    let pool = b.iter().find(|x| x.name == "llm-tpm").unwrap();
    assert_eq!(
        (pool.owner.as_deref(), pool.remaining, pool.held),
        (None, 5000, 0)
    );
    now(w.release(held.reservation.unwrap().id)).unwrap();
    let b = now(w.balances(&tenant, None)).unwrap();
    assert!(b.iter().all(|x| x.held == 0), "{b:?}");
    assert!(now(w.balances(&tenant, Some("nope"))).is_err());
    assert!(now(w.balances(&Scope::parse("team:x").unwrap(), None)).is_err());
}

/// A $10 budget with `rule` (and `extra` fields), a $2 reservation held by
/// someone else, $3 spent: $5 free. Reserves $1 and commits `actual`; answers
/// the commit's charge or error and the budget's free amount after.
fn overage_case(
    rule: &str,
    extra: serde_json::Value,
    actual: &str,
) -> (Result<(i64, i64), Error>, i64) {
    let mut limit = json!({"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month", "overage": rule});
    for (k, v) in extra.as_object().unwrap() {
        limit[k] = v.clone();
    }
    let (w, _c) = warden(json!({"scopes": {"tenant": {"limits": [limit]}}}));
    let ask = |amount: &str| {
        Request::parse("tenant:a")
            .unwrap()
            .spend("usd", usd(amount))
    };
    assert!(now(w.acquire(&ask("3"))).unwrap().allowed());
    let other = now(w.reserve(&ask("2"), None)).unwrap();
    assert!(other.allowed());
    let d = now(w.reserve(&ask("1"), None)).unwrap();
    assert_eq!(remaining(&d, "usd"), 4_000_000);
    let id = d.reservation.unwrap().id;
    let got = now(w.commit(id, &Cost::new().with("usd", usd(actual))))
        .map(|r| (r.charges[0].charged, r.charges[0].uncharged));
    let after = remaining(&now(w.check(&ask("0"))).unwrap(), "usd");
    (got, after)
}

#[test]
fn the_overage_matrix() {
    // Within the reservation every rule charges the actual and refunds the rest.
    for rule in ["charge", "cap", "reject", "allow_if_available"] {
        let (got, after) = overage_case(rule, json!({}), "0.5");
        assert_eq!(got.unwrap(), (500_000, 0), "{rule}");
        assert_eq!(after, 4_500_000, "{rule}");
    }
    let (got, _) = overage_case("allow_with_overdraft", json!({"overdraft": "1"}), "0.5");
    assert_eq!(got.unwrap(), (500_000, 0));
    // $1 reserved, $7 used; $5 was free besides the other holder's $2.
    let (got, after) = overage_case("charge", json!({}), "7");
    assert_eq!(got.unwrap(), (7_000_000, 0));
    assert_eq!(after, 0, "charge: into debt");
    let (got, after) = overage_case("cap", json!({}), "7");
    assert_eq!(got.unwrap(), (1_000_000, 6_000_000));
    assert_eq!(after, 4_000_000);
    let (got, after) = overage_case("allow_if_available", json!({}), "7");
    assert_eq!(
        got.unwrap(),
        (5_000_000, 2_000_000),
        "as far as there is room, beside the other hold"
    );
    assert_eq!(after, 0);
    let (got, after) = overage_case("allow_if_available", json!({}), "4.5");
    assert_eq!(got.unwrap(), (4_500_000, 0));
    assert_eq!(after, 500_000);
    let (got, after) = overage_case("allow_with_overdraft", json!({"overdraft": "1.5"}), "7");
    assert_eq!(
        got.unwrap(),
        (6_500_000, 500_000),
        "into debt up to the overdraft"
    );
    assert_eq!(after, 0);
    let (got, _) = overage_case("allow_with_overdraft", json!({"overdraft": "5"}), "7");
    assert_eq!(got.unwrap(), (7_000_000, 0));
    // reject: refused, nothing charged, the reservation still live.
    let (got, after) = overage_case("reject", json!({}), "1.01");
    let e = got.unwrap_err();
    assert_eq!(
        (e.kind(), e.code()),
        (ErrorKind::Conflict, "overage_rejected")
    );
    assert!(
        e.to_string()
            .contains("the actual 1.01 usd exceeds the 1 reserved"),
        "{e}"
    );
    assert_eq!(after, 4_000_000, "still held");
}

#[test]
fn a_rejected_commit_leaves_the_reservation_to_commit_within_it_or_release() {
    let (w, _c) = warden(budget_policy("reject"));
    let ask = Request::parse("tenant:a").unwrap().spend("usd", usd("1"));
    let id = now(w.reserve(&ask, None)).unwrap().reservation.unwrap().id;
    assert!(now(w.commit(id, &Cost::new().with("usd", usd("2")))).is_err());
    let r = now(w.commit(id, &Cost::new().with("usd", usd("1")))).unwrap();
    assert_eq!(r.charges[0].charged, 1_000_000);
    // A governed call whose actual is refused is charged its estimate, and says so.
    let id = now(w.reserve(&ask, None)).unwrap().reservation.unwrap().id;
    let s = now(w.finish(
        id,
        ratewarden::CallOutcome::Ran(ratewarden::Usage::Actual(Cost::new().with("usd", usd("3")))),
    ));
    assert_eq!(s.charged, ratewarden::settle::Charged::Estimate);
    assert!(
        s.problem().unwrap().contains("overage rule is `reject`"),
        "{s:?}"
    );
    let d = now(w.check(&Request::parse("tenant:a").unwrap())).unwrap();
    assert_eq!(remaining(&d, "usd"), 8_000_000);
}

#[test]
fn overage_rules_the_policy_cannot_hold_name_where() {
    let bad = |limit: serde_json::Value, says: &str| {
        let p = json!({"scopes": {"tenant": {"limits": [limit]}}});
        let e = ratewarden::Policy::from_value(&p).unwrap_err().to_string();
        assert!(
            e.contains(says) && e.contains("limits[0]"),
            "{e} should say {says}"
        );
    };
    bad(
        json!({"name": "r", "kind": "rate", "limit": 1, "per": "1s", "overage": "allow_if_available"}),
        "applies to quotas and budgets",
    );
    bad(
        json!({"name": "b", "kind": "budget", "unit": "usd", "limit": 1, "overage": "allow_with_overdraft"}),
        "needs `overdraft`",
    );
    bad(
        json!({"name": "b", "kind": "budget", "unit": "usd", "limit": 1, "overdraft": 1}),
        "goes with `overage: allow_with_overdraft`",
    );
    bad(
        json!({"name": "b", "kind": "budget", "unit": "usd", "limit": 1, "overage": "allow_with_overdraft", "overdraft": "-1"}),
        "negative",
    );
    let e =
        ratewarden::Policy::from_value(&json!({"defaults": {"overage": "allow_with_overdraft"}}))
            .unwrap_err()
            .to_string();
    assert!(e.contains("defaults.overage"), "{e}");
    // The default `allow_if_available` leaves rate limits as they were.
    ratewarden::Policy::from_value(&json!({"defaults": {"overage": "allow_if_available"},
        "scopes": {"t": {"limits": [{"name": "r", "kind": "rate", "limit": 1, "per": "1s"}]}}}))
    .unwrap();
}

#[test]
fn a_reject_anywhere_in_the_request_refuses_the_whole_commit() {
    // The tenant's budget charges any overage; the shared model budget (its
    // own slot on a cluster) rejects it: the commit changes neither.
    let (w, _c) = warden(json!({
        "scopes": {"tenant": {"limits": [
            {"name": "tenant-usd", "kind": "budget", "unit": "usd", "limit": "10"}
        ]}},
        "resources": {"llm": {"limits": [
            {"name": "llm-usd", "kind": "budget", "unit": "usd", "limit": "100", "overage": "reject"}
        ]}}
    }));
    let ask = Request::parse("tenant:a")
        .unwrap()
        .resource("llm")
        .spend("usd", usd("1"));
    let id = now(w.reserve(&ask, None)).unwrap().reservation.unwrap().id;
    let e = now(w.commit(id, &Cost::new().with("usd", usd("1.5")))).unwrap_err();
    assert_eq!(e.code(), "overage_rejected", "{e}");
    let d = now(w.check(&Request::parse("tenant:a").unwrap().resource("llm"))).unwrap();
    assert_eq!(remaining(&d, "tenant-usd"), 9_000_000);
    assert_eq!(remaining(&d, "llm-usd"), 99_000_000);
    let r = now(w.commit(id, &Cost::new().with("usd", usd("0.5")))).unwrap();
    assert_eq!(
        r.charges.iter().map(|c| c.charged).collect::<Vec<_>>(),
        [500_000, 500_000]
    );
    let d = now(w.check(&Request::parse("tenant:a").unwrap().resource("llm"))).unwrap();
    assert_eq!(remaining(&d, "tenant-usd"), 9_500_000);
    assert_eq!(remaining(&d, "llm-usd"), 99_500_000);
}
