//! GCRA rate limits driven by the manual clock.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, remaining, warden};
use ratewarden::{Outcome, Priority, Request};
use serde_json::json;

fn ten_per_second_burst_five() -> serde_json::Value {
    json!({"scopes": {"user": {"limits": [
        {"name": "rps", "kind": "rate", "limit": 10, "per": "1s", "burst": 5}
    ]}}})
}

#[test]
fn admits_exactly_the_theoretical_sequence() {
    let (w, clock) = warden(ten_per_second_burst_five());
    let req = Request::parse("user:1").unwrap();
    // A full bucket: exactly the burst, then a denial with an exact retry time.
    for i in 0..5 {
        let d = now(w.acquire(&req)).unwrap();
        assert!(d.allowed(), "burst call {i}: {d:?}");
        assert_eq!(remaining(&d, "rps"), 4 - i);
    }
    let d = now(w.acquire(&req)).unwrap();
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.retry_after, Some(Duration::from_millis(100)));
    assert!(
        d.reason.as_deref().unwrap().contains("rps"),
        "{:?}",
        d.reason
    );
    // One emission interval later exactly one more is admitted.
    clock.advance(Duration::from_millis(99));
    assert!(!now(w.acquire(&req)).unwrap().allowed());
    assert_eq!(
        now(w.check(&req)).unwrap().retry_after,
        Some(Duration::from_millis(1))
    );
    clock.advance(Duration::from_millis(1));
    assert!(now(w.acquire(&req)).unwrap().allowed());
    assert!(!now(w.acquire(&req)).unwrap().allowed());
    // Sustained: one per 100 ms over 10 s, never more.
    let mut admitted = 0;
    for _ in 0..1000 {
        clock.advance(Duration::from_millis(10));
        if now(w.acquire(&req)).unwrap().allowed() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 100);
}

#[test]
fn cost_weighted_and_never_satisfiable() {
    let (w, clock) = warden(ten_per_second_burst_five());
    let big = Request::parse("user:1").unwrap().spend("requests", 3);
    assert!(now(w.acquire(&big)).unwrap().allowed());
    let d = now(w.acquire(&big)).unwrap();
    assert!(!d.allowed());
    // 3 units used, 2 left; 3 needed => wait for 1 unit = 100 ms.
    assert_eq!(d.retry_after, Some(Duration::from_millis(100)));
    clock.advance(Duration::from_millis(100));
    assert!(now(w.acquire(&big)).unwrap().allowed());
    let too_big = Request::parse("user:2").unwrap().spend("requests", 6);
    let d = now(w.acquire(&too_big)).unwrap();
    assert!(!d.allowed());
    assert_eq!(d.retry_after, None, "6 > burst 5 can never pass");
    assert!(
        d.reason
            .as_deref()
            .unwrap()
            .contains("more than the 5 this limit can ever give"),
        "{:?}",
        d.reason
    );
}

#[test]
fn check_changes_nothing() {
    let (w, _clock) = warden(ten_per_second_burst_five());
    let req = Request::parse("user:1").unwrap();
    for _ in 0..20 {
        assert!(now(w.check(&req)).unwrap().allowed());
    }
    for _ in 0..5 {
        assert!(now(w.acquire(&req)).unwrap().allowed());
    }
    assert!(!now(w.check(&req)).unwrap().allowed());
}

#[test]
fn background_keeps_off_the_floor_and_critical_goes_to_the_last_unit() {
    let (w, _clock) = warden(json!({"scopes": {"user": {"limits": [
        {"name": "rpm", "kind": "rate", "limit": 10, "per": "1m"}
    ]}}}));
    let bg = Request::parse("user:1")
        .unwrap()
        .priority(Priority::Background);
    let std = Request::parse("user:1").unwrap();
    let crit = Request::parse("user:1")
        .unwrap()
        .priority(Priority::Critical);
    let mut n = 0;
    while now(w.acquire(&bg)).unwrap().allowed() {
        n += 1;
    }
    assert_eq!(n, 7, "background stops at 30% left");
    let d = now(w.acquire(&bg)).unwrap();
    // Retry for background: 1 unit must drain = 6 s.
    assert_eq!(d.retry_after, Some(Duration::from_secs(6)));
    let mut m = 0;
    while now(w.acquire(&std)).unwrap().allowed() {
        m += 1;
    }
    assert_eq!(m, 3, "standard uses the rest (default standard floor 0%)");
    assert!(!now(w.acquire(&crit)).unwrap().allowed());
}

#[test]
fn rates_on_fractional_emission_intervals_stay_exact() {
    // 3 per second: 333_333.33 µs per unit; exactness comes from integer debt scaling.
    let (w, clock) = warden(json!({"scopes": {"user": {"limits": [
        {"name": "r", "kind": "rate", "limit": 3, "per": "1s", "burst": 1}
    ]}}}));
    let req = Request::parse("user:1").unwrap();
    let mut admitted = 0;
    for _ in 0..3_000 {
        if now(w.acquire(&req)).unwrap().allowed() {
            admitted += 1;
        }
        clock.advance(Duration::from_millis(1));
    }
    assert_eq!(admitted, 9, "3 seconds at 3/s");
}
