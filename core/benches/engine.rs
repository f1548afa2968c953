//! Decision cost of the embedded engine, side by side with `governor` (the
//! reference Rust rate limiter) on the same workload. Every call is admitted
//! (the write path): a million per hour per key, far above what a run reaches,
//! yet slow enough that keys stay live between hits (a limit that refills in
//! nanoseconds would make every key idle, swept and re-created each time).
//!
//! cargo bench -p ratewarden --bench engine
#![allow(clippy::disallowed_methods)] // benchmarks time themselves with Instant

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use governor::{Quota, RateLimiter};
use ratewarden::{Amount, Policy, Request, Warden};
use serde_json::json;

const KEYS: usize = 10_000;

/// Completes an embedded-engine future on this thread (it never waits).
fn now<F: std::future::Future>(f: F) -> F::Output {
    ratewarden::backend::poll_ready(f).expect("embedded operations complete at once")
}

/// One hot key: a limit that is never reached in a run (10^9/s).
fn hot_warden() -> Warden {
    warden_with(json!({"name": "rps", "kind": "rate", "limit": 1_000_000_000u64, "per": "1s"}))
}

/// Many keys, each hit every few milliseconds: 10^6/h keeps them live and admitted.
fn many_keys_warden() -> Warden {
    warden_with(json!({"name": "rph", "kind": "rate", "limit": 1_000_000u64, "per": "1h"}))
}

fn warden_with(limit: serde_json::Value) -> Warden {
    let policy =
        Policy::from_value(&json!({"scopes": {"user": {"limits": [limit]}}})).expect("policy");
    Warden::new(policy)
}

fn hot_quota() -> Quota {
    Quota::per_second(NonZeroU32::new(1_000_000_000).expect("non-zero"))
}

fn many_keys_quota() -> Quota {
    Quota::per_hour(NonZeroU32::new(1_000_000).expect("non-zero"))
}

fn rate_one_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("a_one_rate_limit_one_key");
    let w = hot_warden();
    let req = Request::parse("user:42").expect("scope");
    g.bench_function("ratewarden acquire", |b| {
        b.iter(|| now(w.acquire(black_box(&req))).expect("ok").allowed())
    });
    g.bench_function("ratewarden check", |b| {
        b.iter(|| now(w.check(black_box(&req))).expect("ok").allowed())
    });
    let direct = RateLimiter::direct(hot_quota());
    g.bench_function("governor direct check", |b| {
        b.iter(|| black_box(&direct).check().is_ok())
    });
    let keyed = RateLimiter::<String, _, _>::keyed(hot_quota());
    let key = "user:42".to_owned();
    g.bench_function("governor keyed check_key (String)", |b| {
        b.iter(|| keyed.check_key(black_box(&key)).is_ok())
    });
    g.finish();
}

fn rate_many_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("a_one_rate_limit_10k_keys");
    let w = many_keys_warden();
    let reqs: Vec<Request> = (0..KEYS)
        .map(|i| Request::parse(&format!("user:{i}")).expect("scope"))
        .collect();
    let mut i = 0;
    g.bench_function("ratewarden acquire", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            now(w.acquire(black_box(&reqs[i]))).expect("ok").allowed()
        });
    });
    let keyed_u64 = RateLimiter::<u64, _, _>::keyed(many_keys_quota());
    let mut k = 0u64;
    g.bench_function("governor keyed check_key (u64)", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS as u64;
            keyed_u64.check_key(black_box(&k)).is_ok()
        });
    });
    let keyed_s = RateLimiter::<String, _, _>::keyed(many_keys_quota());
    let keys: Vec<String> = (0..KEYS).map(|i| format!("user:{i}")).collect();
    let mut j = 0;
    g.bench_function("governor keyed check_key (String)", |b| {
        b.iter(|| {
            j = (j + 1) % KEYS;
            keyed_s.check_key(black_box(&keys[j])).is_ok()
        });
    });
    g.finish();
}

fn seven_limits(c: &mut Criterion) {
    let mut g = c.benchmark_group("b_seven_limits_one_request");
    let policy = Policy::from_value(&json!({
        "scopes": {
            "tenant": {"limits": [
                {"name": "t-usd", "kind": "budget", "unit": "usd", "limit": "1000000000", "per": "month"},
                {"name": "t-rph", "kind": "rate", "limit": 1_000_000u64, "per": "1h"}
            ]},
            "user": {"limits": [
                {"name": "u-usd", "kind": "budget", "unit": "usd", "limit": "1000000000", "per": "day"},
                {"name": "u-rph", "kind": "rate", "limit": 1_000_000u64, "per": "1h"}
            ]},
            "run": {"limits": [{"name": "r-usd", "kind": "budget", "unit": "usd", "limit": "1000000000"}]}
        },
        "resources": {"openai": {"limits": [{"name": "tpm", "kind": "rate", "unit": "tokens", "limit": 1_000_000_000_000u64, "per": "1m"}]}},
        "actions": {"llm.completion": {"limits": [{"name": "calls", "kind": "quota", "limit": 1_000_000_000u64, "per": "day", "scope": "tenant"}]}}
    }))
    .expect("policy");
    let w = Warden::new(policy);
    let reqs: Vec<Request> = (0..KEYS)
        .map(|i| {
            Request::parse(&format!("tenant:t{}/user:{i}/run:r{i}", i % 100))
                .expect("scope")
                .resource("openai")
                .action("llm.completion")
                .spend("tokens", 800)
                .spend("usd", Amount::parse("0.0125").expect("amount"))
        })
        .collect();
    assert_eq!(now(w.acquire(&reqs[0])).expect("ok").limits.len(), 7);
    let mut i = 0;
    g.bench_function("ratewarden acquire (7 limits, 10k scopes)", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            now(w.acquire(black_box(&reqs[i]))).expect("ok").allowed()
        });
    });
    g.bench_function("ratewarden check (7 limits)", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            now(w.check(black_box(&reqs[i]))).expect("ok").allowed()
        });
    });
    g.bench_function("ratewarden reserve + commit (7 limits)", |b| {
        let actual = ratewarden::Cost::new().with("tokens", 700);
        b.iter(|| {
            i = (i + 1) % KEYS;
            let d = now(w.reserve(black_box(&reqs[i]), None)).expect("ok");
            let id = d.reservation.expect("reserved").id;
            now(w.commit(id, &actual)).expect("ok").charges.len()
        });
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    // Two threads (this machine's cores) hammering one budget key.
    let mut g = c.benchmark_group("contended_two_threads_one_key");
    let w = Arc::new(hot_warden());
    let req = Request::parse("user:1").expect("scope");
    g.bench_function("ratewarden acquire x2 threads (per op)", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let (w, req) = (Arc::clone(&w), req.clone());
                    s.spawn(move || {
                        for _ in 0..iters / 2 {
                            black_box(now(w.acquire(&req)).expect("ok").allowed());
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    let keyed = Arc::new(RateLimiter::<String, _, _>::keyed(hot_quota()));
    g.bench_function("governor keyed x2 threads (per op)", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let keyed = Arc::clone(&keyed);
                    s.spawn(move || {
                        let key = "user:1".to_owned();
                        for _ in 0..iters / 2 {
                            black_box(keyed.check_key(&key).is_ok());
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    g.finish();
}

/// Issue 14's targets: `observe` per response ≤ 2 µs; a decision with
/// coordination enabled costs ≤ 20% more than without. The same resource
/// and rate limit with and without `upstream:`, interleaved in one group.
fn coordination(c: &mut Criterion) {
    let mut g = c.benchmark_group("e_coordination");
    let make = |upstream: bool| {
        let mut resource = json!({"limits": [
            {"name": "rps", "kind": "rate", "limit": 1_000_000_000u64, "per": "1s"}
        ]});
        if upstream {
            resource["upstream"] = json!({});
        }
        Warden::new(
            Policy::from_value(&json!({"scopes": {"user": {}}, "resources": {"llm": resource}}))
                .expect("policy"),
        )
    };
    let (plain, coordinated) = (make(false), make(true));
    // Plenty left, far from its reset: green, every decision counted.
    let headers = [
        ("x-ratelimit-limit-requests", "1000000000"),
        ("x-ratelimit-remaining-requests", "999999999"),
        ("x-ratelimit-reset-requests", "6m0s"),
        ("x-ratelimit-limit-tokens", "1000000000"),
        ("x-ratelimit-remaining-tokens", "999999999"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    ];
    now(coordinated.observe("llm", &headers)).expect("observe");
    let req = Request::parse("user:42").expect("scope").resource("llm");
    g.bench_function("acquire, resource without upstream", |b| {
        b.iter(|| now(plain.acquire(black_box(&req))).expect("ok").allowed())
    });
    g.bench_function("acquire, coordinated resource (green)", |b| {
        b.iter(|| {
            now(coordinated.acquire(black_box(&req)))
                .expect("ok")
                .allowed()
        })
    });
    g.bench_function("observe (OpenAI headers, 2 dimensions)", |b| {
        b.iter(|| {
            now(coordinated.observe("llm", black_box(&headers)))
                .expect("ok")
                .zone
        })
    });
    g.bench_function("report 200 (same headers)", |b| {
        b.iter(|| {
            now(coordinated.report("llm", 200, black_box(&headers)))
                .expect("ok")
                .zone
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    rate_one_key,
    rate_many_keys,
    seven_limits,
    contended,
    coordination
);
criterion_main!(benches);
