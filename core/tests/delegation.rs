//! Delegation: sub-budgets for sub-agents.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, remaining, warden};
use ratewarden::{Amount, Cost, DelegateFrom, Request, Scope};
use serde_json::json;

fn policy() -> serde_json::Value {
    json!({"scopes": {
        "tenant": {"limits": [{"name": "t-usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"}]},
        "run": {},
        "agent": {}
    }})
}

fn usd(s: &str) -> Cost {
    Cost::new().with("usd", Amount::parse(s).unwrap())
}

#[test]
fn child_never_exceeds_its_grant_and_unspent_returns() {
    let (w, _c) = warden(policy());
    let parent = Scope::parse("tenant:a/run:1").unwrap();
    let child = Scope::parse("tenant:a/run:1/agent:b").unwrap();
    let d = now(w.delegate(DelegateFrom::Scope(&parent), &child, &usd("3"), None)).unwrap();
    assert!(d.allowed());
    let grant = d.reservation.unwrap().id;
    // The parent sees 3 held.
    let top = Request::parse("tenant:a").unwrap();
    assert_eq!(remaining(&now(w.check(&top)).unwrap(), "t-usd"), 7_000_000);
    // The child spends 1 + 1.5, then 1 more is refused although the tenant has 7 left.
    let spend = |s: &str| Request::new(child.clone()).cost(usd(s));
    assert!(now(w.acquire(&spend("1"))).unwrap().allowed());
    assert!(now(w.acquire(&spend("1.5"))).unwrap().allowed());
    let d = now(w.acquire(&spend("1"))).unwrap();
    assert!(!d.allowed(), "grant exhausted: {d:?}");
    let reason = d.reason.as_deref().unwrap();
    assert!(
        reason.contains("0.5 remain") && reason.contains("delegated grant"),
        "{reason}"
    );
    assert_eq!(remaining(&d, "t-usd"), 500_000, "what the grant has left");
    // Spend counts at the parent as it happens: 2.5 used + 0.5 still held.
    assert_eq!(remaining(&now(w.check(&top)).unwrap(), "t-usd"), 7_000_000);
    assert!(now(w.release(grant)).unwrap());
    assert_eq!(
        remaining(&now(w.check(&top)).unwrap(), "t-usd"),
        7_500_000,
        "unspent 0.5 returned"
    );
    // After close the child spends from the parent's free capacity again.
    assert!(now(w.acquire(&spend("1"))).unwrap().allowed());
}

#[test]
fn expiry_of_the_delegation_returns_the_unspent_part() {
    let (w, clock) = warden(policy());
    let parent = Scope::parse("tenant:a").unwrap();
    let child = Scope::parse("tenant:a/run:9").unwrap();
    now(w.delegate(
        DelegateFrom::Scope(&parent),
        &child,
        &usd("4"),
        Some(Duration::from_secs(60)),
    ))
    .unwrap();
    assert!(
        now(w.acquire(&Request::new(child.clone()).cost(usd("1"))))
            .unwrap()
            .allowed()
    );
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        remaining(&now(w.check(&Request::new(parent))).unwrap(), "t-usd"),
        9_000_000
    );
}

#[test]
fn child_reservations_come_back_to_the_grant() {
    let (w, _c) = warden(policy());
    let parent = Scope::parse("tenant:a").unwrap();
    let child = Scope::parse("tenant:a/run:1").unwrap();
    let grant = now(w.delegate(DelegateFrom::Scope(&parent), &child, &usd("2"), None))
        .unwrap()
        .reservation
        .unwrap()
        .id;
    let r = now(w.reserve(&Request::new(child.clone()).cost(usd("2")), None)).unwrap();
    assert!(r.allowed());
    assert!(
        !now(w.check(&Request::new(child.clone()).cost(usd("0.5"))))
            .unwrap()
            .allowed()
    );
    now(w.commit(r.reservation.unwrap().id, &usd("0.5"))).unwrap();
    assert!(
        now(w.acquire(&Request::new(child.clone()).cost(usd("1.5"))))
            .unwrap()
            .allowed(),
        "1.5 refunded to the grant"
    );
    assert!(
        !now(w.acquire(&Request::new(child).cost(usd("0.01"))))
            .unwrap()
            .allowed()
    );
    assert!(now(w.release(grant)).unwrap());
    assert_eq!(
        remaining(&now(w.check(&Request::new(parent))).unwrap(), "t-usd"),
        8_000_000
    );
}

#[test]
fn delegating_from_a_reservation_carves_its_hold() {
    let (w, _c) = warden(policy());
    let run = Scope::parse("tenant:a/run:1").unwrap();
    let agent = Scope::parse("tenant:a/run:1/agent:x").unwrap();
    let r = now(w.reserve(&Request::new(run.clone()).cost(usd("5")), None))
        .unwrap()
        .reservation
        .unwrap()
        .id;
    let d = now(w.delegate(DelegateFrom::Reservation(r), &agent, &usd("6"), None)).unwrap();
    assert!(!d.allowed(), "cannot carve more than the reservation holds");
    let d = now(w.delegate(DelegateFrom::Reservation(r), &agent, &usd("2"), None)).unwrap();
    assert!(d.allowed());
    let tenant = Request::parse("tenant:a").unwrap();
    assert_eq!(
        remaining(&now(w.check(&tenant)).unwrap(), "t-usd"),
        5_000_000,
        "still 5 held in all"
    );
    assert!(
        now(w.acquire(&Request::new(agent.clone()).cost(usd("2"))))
            .unwrap()
            .allowed()
    );
    assert!(
        !now(w.acquire(&Request::new(agent).cost(usd("0.01"))))
            .unwrap()
            .allowed()
    );
    // The parent commits its own 1 usd; the child's 2 were charged as spent.
    now(w.commit(r, &usd("1"))).unwrap();
    assert_eq!(
        remaining(&now(w.check(&tenant)).unwrap(), "t-usd"),
        7_000_000
    );
}

#[test]
fn delegation_input_is_validated() {
    let (w, _c) = warden(policy());
    let a = Scope::parse("tenant:a").unwrap();
    let other = Scope::parse("tenant:b/run:1").unwrap();
    assert!(now(w.delegate(DelegateFrom::Scope(&a), &other, &usd("1"), None)).is_err());
    assert!(now(w.delegate(DelegateFrom::Scope(&a), &a, &usd("1"), None)).is_err());
    let child = Scope::parse("tenant:a/run:1").unwrap();
    assert!(
        now(w.delegate(
            DelegateFrom::Scope(&a),
            &child,
            &Cost::new().with("tokens", 5),
            None
        ))
        .is_err(),
        "no limit counts tokens"
    );
    now(w.delegate(DelegateFrom::Scope(&a), &child, &usd("1"), None)).unwrap();
    assert!(
        now(w.delegate(DelegateFrom::Scope(&a), &child, &usd("1"), None)).is_err(),
        "one open delegation per child"
    );
    assert_eq!(
        remaining(&now(w.check(&Request::new(a))).unwrap(), "t-usd"),
        9_000_000
    );
}

#[test]
fn refusals_read_the_same_on_every_backend() {
    let (w, clock) = warden(policy());
    let reserve = |scope: &str| {
        now(w.reserve(&Request::parse(scope).unwrap().cost(usd("1")), None))
            .unwrap()
            .reservation
            .unwrap()
            .id
    };
    // A live reservation of tenant a, carved into tenant b's tree (on a
    // Redis Cluster: another slot).
    let live = reserve("tenant:a/run:1");
    let elsewhere = Scope::parse("tenant:b/run:1/agent:x").unwrap();
    let e = now(w.delegate(
        DelegateFrom::Reservation(live),
        &elsewhere,
        &usd("0.5"),
        None,
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid delegation: child scope `tenant:b/run:1/agent:x` is not under the reservation's scope `tenant:a/run:1`"
    );
    // Settled reservations, into the same tree and into another one.
    let committed = reserve("tenant:a/run:2");
    now(w.commit(committed, &Cost::new())).unwrap();
    let released = reserve("tenant:a/run:3");
    now(w.release(released)).unwrap();
    for child in ["tenant:a/run:2/agent:y", "tenant:b/run:1/agent:y"] {
        let child = Scope::parse(child).unwrap();
        for (id, state) in [(committed, "committed"), (released, "released")] {
            let e = now(w.delegate(DelegateFrom::Reservation(id), &child, &usd("0.5"), None))
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("reservation {id} was already {state}")
            );
        }
    }
    // A reservation whose lease ran out (still remembered), into either tree.
    let lapsed = now(w.reserve(
        &Request::parse("tenant:a/run:4").unwrap().cost(usd("1")),
        Some(Duration::from_secs(1)),
    ))
    .unwrap()
    .reservation
    .unwrap()
    .id;
    clock.advance(Duration::from_secs(2));
    for child in ["tenant:a/run:4/agent:z", "tenant:b/run:1/agent:z"] {
        let child = Scope::parse(child).unwrap();
        let e = now(w.delegate(DelegateFrom::Reservation(lapsed), &child, &usd("0.5"), None))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "reservation {lapsed} expired before this call; its capacity was already returned"
            )
        );
    }
    let unknown = ratewarden::ReservationId::random();
    let e = now(w.delegate(
        DelegateFrom::Reservation(unknown),
        &elsewhere,
        &usd("0.5"),
        None,
    ))
    .unwrap_err();
    assert_eq!(e.to_string(), format!("reservation {unknown} not found"));
}
