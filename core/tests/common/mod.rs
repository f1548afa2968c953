//! Helpers shared by the integration tests.
//!
//! The engine suites (rate, quota, reservations, delegation, priority, flows)
//! run on the embedded engine by default, and unchanged on Redis when
//! `RATEWARDEN_TEST_BACKEND` names one (`redis://…` or `redis+cluster://…`):
//! the warden then uses a fresh namespace and the same manual clock, passed to
//! the scripts in place of the server's `TIME`. `scripts/test-all.sh` runs them
//! both ways, and on a standalone Redis once more with
//! `RATEWARDEN_TEST_SCRIPT=decide` (every decision through `decide.lua`).
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::{Decision, ManualClock, Policy, Warden};

pub mod redis;

/// The Redis to run the engine suites on, if any.
pub fn test_backend() -> Option<String> {
    std::env::var("RATEWARDEN_TEST_BACKEND")
        .ok()
        .filter(|s| !s.is_empty())
}

/// True (and the test should return) when running on Redis: for the few tests
/// that pin the in-process `wait` queue's scheduling by yielding to the executor,
/// which only the embedded engine's instant answers make deterministic. The
/// queue sits above the backend; what it asks the backend is covered by the rest.
pub fn embedded_only() -> bool {
    test_backend().is_some()
}

/// The runtime Redis connections live on (sync tests block on it).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A warden on a manual clock starting 2026-01-15 00:00 UTC.
pub fn warden(policy: serde_json::Value) -> (Warden, ManualClock) {
    warden_at(policy, ManualClock::at_date(2026, 1, 15))
}

pub fn warden_at(policy: serde_json::Value, clock: ManualClock) -> (Warden, ManualClock) {
    let policy = Policy::from_value(&policy).unwrap();
    let Some(url) = test_backend() else {
        return (Warden::with_clock(policy, Arc::new(clock.clone())), clock);
    };
    static N: AtomicU64 = AtomicU64::new(0);
    let ns = format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let shared: Arc<ManualClock> = Arc::new(clock.clone());
    // Connect on another thread: the caller may itself be inside a runtime.
    let backend = std::thread::scope(|s| {
        s.spawn(|| runtime().block_on(RedisBackend::connect(&url, &ns)))
            .join()
            .unwrap()
    })
    .unwrap()
    .with_clock(shared.clone());
    // RATEWARDEN_TEST_SCRIPT=decide: every decision through decide.lua (see
    // RedisBackend::without_rate_script), so both scripts meet the same suites.
    let backend = if std::env::var("RATEWARDEN_TEST_SCRIPT").as_deref() == Ok("decide") {
        backend.without_rate_script()
    } else {
        backend
    };
    (
        Warden::with_backend(policy, Arc::new(backend) as Arc<dyn Backend>, shared),
        clock,
    )
}

/// Runs one warden operation from a synchronous test: on the embedded engine it
/// must complete without waiting; on Redis it is driven to completion.
pub fn now<F: std::future::Future>(f: F) -> F::Output {
    if test_backend().is_some() {
        return runtime().block_on(f);
    }
    ratewarden::backend::poll_ready(f).expect("embedded operation did not complete synchronously")
}

pub fn remaining(d: &Decision, limit: &str) -> i64 {
    d.limits
        .iter()
        .find(|l| l.name() == limit)
        .unwrap_or_else(|| panic!("no limit {limit} in {d:?}"))
        .remaining
}
