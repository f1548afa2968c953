//! End-to-end flows agents use: estimate-then-charge, waiting for a slot,
//! extending a sub-agent's grant.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, remaining, warden};
use ratewarden::{Amount, Cost, DelegateFrom, Priority, Request, Scope, WaitFor};
use serde_json::json;

#[test]
fn reserve_tokens_then_commit_the_dollar_cost_that_was_not_estimated() {
    // An LLM call reserves its token estimate; the bill in usd is only known after.
    let (w, _c) = warden(json!({
        "scopes": {"tenant": {"limits": [{"name": "usd", "kind": "budget", "unit": "usd", "limit": "1", "per": "month"}]}},
        "resources": {"llm": {"limits": [{"name": "tpm", "kind": "rate", "unit": "tokens", "limit": 10000, "per": "1m"}]}}
    }));
    let call = Request::parse("tenant:a")
        .unwrap()
        .resource("llm")
        .spend("tokens", 2000);
    let d = now(w.reserve(&call, None)).unwrap();
    assert_eq!(
        d.limits.len(),
        2,
        "the usd budget is part of the reservation even at 0"
    );
    let r = d.reservation.unwrap().id;
    let receipt = now(w.commit(
        r,
        &Cost::new()
            .with("tokens", 1500)
            .with("usd", Amount::parse("0.35").unwrap()),
    ))
    .unwrap();
    let usd = receipt.charges.iter().find(|c| c.name() == "usd").unwrap();
    assert_eq!((usd.reserved, usd.charged), (0, 350_000));
    let d = now(w.check(
        &Request::parse("tenant:a")
            .unwrap()
            .resource("llm")
            .spend("tokens", 0),
    ))
    .unwrap();
    assert_eq!(remaining(&d, "usd"), 650_000);
    assert_eq!(
        remaining(&d, "tpm"),
        8_500,
        "500 of the 2000-token estimate refunded"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn wait_for_a_concurrency_slot_reserves_it_when_the_holder_releases() {
    if common::embedded_only() {
        return;
    }
    let (w, clock) = warden(json!({"scopes": {"tenant": {"limits": [
        {"name": "jobs", "kind": "concurrency", "limit": 1, "lease": "1m"}
    ]}}}));
    let job = Request::parse("tenant:a").unwrap();
    let holder = w.reserve(&job, None).await.unwrap().reservation.unwrap().id;
    let (w2, j2) = (w.clone(), job.clone());
    let waiter = tokio::spawn(async move {
        w2.wait(&j2, WaitFor::Reserve(None), Duration::from_secs(300))
            .await
            .unwrap()
    });
    settle().await;
    assert!(!waiter.is_finished(), "the slot is taken");
    // The holder finishes early: the waiter's best estimate was the lease expiry (60 s),
    // but a release in this process wakes it at once — no time passes.
    let _ = &clock;
    assert!(w.release(holder).await.unwrap());
    settle().await;
    assert!(
        waiter.is_finished(),
        "woken by the release, not by the lease expiry"
    );
    let d = waiter.await.unwrap();
    assert!(d.allowed());
    assert!(d.reservation.is_some(), "wait(Reserve) holds the slot");
    assert!(!w.check(&job).await.unwrap().allowed(), "and it is held");
}

#[test]
fn extending_a_delegation_keeps_the_grant_and_check_does_not_touch_starvation() {
    let (w, clock) = warden(json!({
        "defaults": {"promote_after": "1m"},
        "scopes": {
            "tenant": {"limits": [{"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
                                   {"name": "q", "kind": "quota", "limit": 10, "per": "day"}]},
            "run": {}
        }
    }));
    let parent = Scope::parse("tenant:a").unwrap();
    let child = Scope::parse("tenant:a/run:1").unwrap();
    let g = now(w.delegate(
        DelegateFrom::Scope(&parent),
        &child,
        &Cost::new().with("usd", 4),
        Some(Duration::from_secs(30)),
    ))
    .unwrap();
    let id = g.reservation.unwrap().id;
    clock.advance(Duration::from_secs(20));
    now(w.extend(id, Duration::from_secs(60))).unwrap();
    clock.advance(Duration::from_secs(20)); // past the original 30 s lease
    let spend = Request::new(child.clone())
        .spend("usd", 3)
        .spend("requests", 0);
    assert!(
        now(w.acquire(&spend)).unwrap().allowed(),
        "the extended grant is still live"
    );
    assert!(
        !now(w.acquire(&spend)).unwrap().allowed(),
        "and still caps the child at 4"
    );

    // Dry runs never start or extend a background starvation streak.
    for _ in 0..8 {
        now(w.acquire(&Request::parse("tenant:b").unwrap())).unwrap();
    }
    let bg = Request::parse("tenant:b")
        .unwrap()
        .priority(Priority::Background);
    for _ in 0..3 {
        assert!(!now(w.check(&bg)).unwrap().allowed());
        clock.advance(Duration::from_secs(40));
    }
    assert_eq!(
        now(w.acquire(&bg)).unwrap().priority,
        Priority::Background,
        "checks are not denials"
    );
}

async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn a_denial_reports_the_true_state_of_the_limits_that_did_not_deny() {
    let (w, _c) = common::warden(serde_json::json!({
        "scopes": {"ip": {"limits": [{"name": "per-ip", "kind": "rate", "limit": 2, "per": "1m"}]}},
        "resources": {"llm": {"limits": [
            {"name": "llm-usd", "kind": "budget", "unit": "usd", "limit": "1", "per": "day"}
        ]}}
    }));
    let req = ratewarden::Request::parse("ip:1")
        .unwrap()
        .resource("llm")
        .spend("usd", ratewarden::Amount::parse("0.25").unwrap());
    for left in [750_000, 500_000] {
        let d = common::now(w.acquire(&req)).unwrap();
        assert!(d.allowed());
        assert_eq!(common::remaining(&d, "llm-usd"), left);
    }
    // The rate denies; the budget was not charged and says so (not 250000).
    let d = common::now(w.acquire(&req)).unwrap();
    assert!(!d.allowed());
    assert_eq!(d.denied_by().unwrap().name(), "per-ip");
    assert_eq!(common::remaining(&d, "llm-usd"), 500_000);
    assert_eq!(common::remaining(&d, "per-ip"), 0);
    let again = common::now(w.check(&req)).unwrap();
    assert_eq!(common::remaining(&again, "llm-usd"), 500_000);
}
