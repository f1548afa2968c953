//! Many threads hammering one budget, one quota and one concurrency limit
//! admit exactly the limit.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::thread;

use common::{now, remaining, warden};
use ratewarden::{Cost, Request};
use serde_json::json;

const THREADS: usize = 8;
const OPS: usize = 4_000;

#[test]
fn mixed_acquire_reserve_commit_release_spend_exactly_the_budget() {
    let (w, _clock) = warden(json!({
        "scopes": {
            "tenant": {"limits": [
                {"name": "budget", "kind": "budget", "unit": "tokens", "limit": 5000, "per": "month"},
                {"name": "quota", "kind": "quota", "limit": 20000, "per": "day"}
            ]},
            "user": {"limits": [{"name": "per-user", "kind": "quota", "limit": 100000, "per": "day"}]}
        }
    }));
    let spent = Arc::new(AtomicI64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (w, spent) = (w.clone(), Arc::clone(&spent));
            thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t as u64);
                for i in 0..OPS {
                    let req = Request::parse(&format!("tenant:acme/user:{}", i % 13))
                        .unwrap()
                        .spend("tokens", 1 + rng.i64(0..3));
                    match rng.u8(0..3) {
                        0 => {
                            let d = now(w.acquire(&req)).unwrap();
                            if d.allowed() {
                                spent.fetch_add(
                                    req.cost.get("tokens").map(|_| d.limits[0].amount).unwrap(),
                                    Ordering::Relaxed,
                                );
                            }
                        }
                        1 => {
                            let d = now(w.reserve(&req, None)).unwrap();
                            if let Some(r) = d.reservation {
                                let actual = rng.i64(0..=d.limits[0].amount);
                                let rc = now(w.commit(r.id, &Cost::new().with("tokens", actual)))
                                    .unwrap();
                                spent.fetch_add(rc.charges[0].charged, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            let d = now(w.reserve(&req, None)).unwrap();
                            if let Some(r) = d.reservation {
                                assert!(now(w.release(r.id)).unwrap());
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let d = now(w.check(
        &Request::parse("tenant:acme/user:0")
            .unwrap()
            .spend("tokens", 0),
    ))
    .unwrap();
    let spent = spent.load(Ordering::Relaxed);
    // A leaked hold would make the budget's books show more spent than callers were granted.
    assert_eq!(
        5000 - remaining(&d, "budget"),
        spent,
        "the budget's books match what callers were granted"
    );
    assert_eq!(spent, 5000, "32k attempts exhaust the budget exactly");
}

#[test]
fn quota_admits_exactly_the_limit() {
    let (w, _clock) = warden(json!({"scopes": {"tenant": {"limits": [
        {"name": "q", "kind": "quota", "limit": 10007, "per": "day"}
    ]}, "user": {}}}));
    let admitted = Arc::new(AtomicI64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (w, admitted) = (w.clone(), Arc::clone(&admitted));
            thread::spawn(move || {
                for i in 0..OPS {
                    let req = Request::parse(&format!("tenant:t/user:{}", (i + t) % 97)).unwrap();
                    if now(w.acquire(&req)).unwrap().allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 10007);
}

#[test]
fn concurrency_never_exceeds_its_slots() {
    let (w, _clock) = warden(json!({"scopes": {"tenant": {"limits": [
        {"name": "slots", "kind": "concurrency", "limit": 3}
    ]}}}));
    let in_flight = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let admitted = Arc::new(AtomicI64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (w, in_flight, peak, admitted) = (
                w.clone(),
                Arc::clone(&in_flight),
                Arc::clone(&peak),
                Arc::clone(&admitted),
            );
            thread::spawn(move || {
                let req = Request::parse("tenant:t").unwrap();
                for _ in 0..OPS {
                    let d = now(w.reserve(&req, None)).unwrap();
                    if let Some(r) = d.reservation {
                        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        admitted.fetch_add(1, Ordering::Relaxed);
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        now(w.release(r.id)).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        peak.load(Ordering::SeqCst) <= 3,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert!(admitted.load(Ordering::Relaxed) > 0);
    let d = now(w.check(&Request::parse("tenant:t").unwrap().spend("requests", 0))).unwrap();
    assert_eq!(remaining(&d, "slots"), 3, "every slot came back");
}

#[test]
fn rate_admits_exactly_its_burst_across_threads() {
    // Frozen clock: nothing refills, so exactly the burst may pass, whoever asks.
    let (w, _clock) = warden(json!({"scopes": {"user": {"limits": [
        {"name": "r", "kind": "rate", "limit": 100, "per": "1h", "burst": 997}
    ]}}}));
    let admitted = Arc::new(AtomicI64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (w, admitted) = (w.clone(), Arc::clone(&admitted));
            thread::spawn(move || {
                let req = Request::parse("user:shared").unwrap();
                let heavy = req.clone().spend("requests", 3);
                for i in 0..OPS {
                    let r = if (i + t) % 4 == 0 { &heavy } else { &req };
                    let d = now(w.acquire(r)).unwrap();
                    if d.allowed() {
                        admitted.fetch_add(d.limits[0].amount, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // 997 is not a multiple of 3: the single-request callers must fill the last units.
    assert_eq!(admitted.load(Ordering::Relaxed), 997);
}
