//! Bounded memory: idle keys and ended reservations are dropped.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::now;
use ratewarden::backend::Backend;
use ratewarden::{ManualClock, MemoryBackend, Policy, Request, Warden};
use serde_json::json;

#[test]
fn idle_keys_and_old_reservations_are_swept() {
    let clock = ManualClock::at_date(2026, 1, 15);
    let policy = Policy::from_value(&json!({"scopes": {"user": {"limits": [
        {"name": "rps", "kind": "rate", "limit": 10, "per": "1s"},
        {"name": "daily", "kind": "quota", "limit": 100, "per": "day"}
    ]}}}))
    .unwrap();
    let backend = Arc::new(MemoryBackend::new(Arc::new(clock.clone())));
    let w = Warden::with_backend(
        policy,
        Arc::clone(&backend) as Arc<dyn Backend>,
        Arc::new(clock.clone()),
    );
    for i in 0..20_000 {
        let req = Request::parse(&format!("user:{i}")).unwrap();
        if i % 2 == 0 {
            assert!(now(w.acquire(&req)).unwrap().allowed());
        } else {
            let r = now(w.reserve(&req, Some(Duration::from_secs(5))))
                .unwrap()
                .reservation
                .unwrap();
            now(w.release(r.id)).unwrap();
        }
    }
    let full = backend.stats();
    assert!(full.keys >= 20_000, "{full:?}");
    assert_eq!(full.reservations, 10_000);
    // A rate key is idle once its bucket refilled, a quota key once its day ended;
    // sweeps run as operations arrive, and purge_idle() forces one.
    clock.advance(Duration::from_secs(2));
    now(w.acquire(&Request::parse("user:x").unwrap())).unwrap();
    let half = backend.stats();
    assert!(half.keys < full.keys, "rate keys swept: {half:?}");
    clock.advance(Duration::from_secs(86_400 + 11 * 60));
    backend.purge_idle();
    let empty = backend.stats();
    assert_eq!(empty.keys, 0, "{empty:?}");
    assert_eq!(empty.reservations, 0, "{empty:?}");
}

#[test]
fn operations_complete_synchronously_on_the_embedded_engine() {
    // Bindings rely on this: an embedded decision needs no executor hop.
    let clock = ManualClock::at_date(2026, 1, 15);
    let policy = Policy::from_value(&json!({"scopes": {"user": {}}})).unwrap();
    let w = Warden::with_clock(policy, Arc::new(clock));
    let d = now(w.acquire(&Request::parse("user:1").unwrap())).unwrap();
    assert!(d.allowed() && d.limits.is_empty());
}

#[test]
fn memory_comes_back_after_a_burst_of_keys_expires() {
    let clock = ManualClock::at_date(2026, 1, 15);
    let policy = Policy::from_value(&json!({"scopes": {"user": {"limits": [
        {"name": "rps", "kind": "rate", "limit": 10, "per": "1s"}
    ]}}}))
    .unwrap();
    let w = Warden::with_clock(policy, Arc::new(clock.clone()));
    let live = |w: &Warden| {
        for i in 0..1_000 {
            now(w.acquire(&Request::parse(&format!("user:live{i}")).unwrap())).unwrap();
        }
    };
    live(&w);
    let base = w.stats().unwrap();
    for i in 0..200_000 {
        now(w.acquire(&Request::parse(&format!("user:burst{i}")).unwrap())).unwrap();
    }
    let burst = w.stats().unwrap();
    assert!(burst.keys >= 201_000, "{burst:?}");
    assert!(burst.capacity >= burst.keys, "{burst:?}");
    // The burst goes idle; only the live keys keep being used.
    clock.advance(Duration::from_secs(2));
    live(&w);
    let after = w.stats().unwrap();
    assert_eq!(after.keys, 1_000, "{after:?}");
    assert!(
        after.capacity <= base.capacity.max(after.keys) * 8,
        "tables shrank back: {base:?} → {burst:?} → {after:?}"
    );
}

#[test]
fn ended_reservations_go_without_reservation_traffic() {
    let clock = ManualClock::at_date(2026, 1, 15);
    let policy = Policy::from_value(&json!({"scopes": {"user": {"limits": [
        {"name": "b", "kind": "budget", "unit": "tokens", "limit": 100}
    ]}}}))
    .unwrap();
    let w = Warden::with_clock(policy, Arc::new(clock.clone()));
    let op = ratewarden::OperationId::random();
    now(w.acquire(&Request::parse("user:op").unwrap().operation(op))).unwrap();
    for i in 0..10_000 {
        let req = Request::parse(&format!("user:{i}"))
            .unwrap()
            .spend("tokens", 1);
        let r = now(w.reserve(&req, None)).unwrap().reservation.unwrap();
        now(w.release(r.id)).unwrap();
    }
    let full = w.stats().unwrap();
    assert_eq!((full.reservations, full.operations), (10_000, 1));
    // Past the lease, the remembered window and the operation memory, with
    // nothing but acquires arriving.
    clock.advance(Duration::from_secs(3_600));
    now(w.acquire(&Request::parse("user:z").unwrap())).unwrap();
    let after = w.stats().unwrap();
    assert_eq!((after.reservations, after.operations), (0, 0), "{after:?}");
}
