//! Helpers shared by the integration tests.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::sync::Arc;

use ratewarden::{Decision, ManualClock, Policy, Warden};

pub mod redis;

/// A warden over the embedded engine on a manual clock starting 2026-01-15 00:00 UTC.
pub fn warden(policy: serde_json::Value) -> (Warden, ManualClock) {
    warden_at(policy, ManualClock::at_date(2026, 1, 15))
}

pub fn warden_at(policy: serde_json::Value, clock: ManualClock) -> (Warden, ManualClock) {
    let policy = Policy::from_value(&policy).unwrap();
    (Warden::with_clock(policy, Arc::new(clock.clone())), clock)
}

/// Runs a future that must complete without waiting (embedded engine).
pub fn now<F: std::future::Future>(f: F) -> F::Output {
    ratewarden::backend::poll_ready(f).expect("embedded operation did not complete synchronously")
}

pub fn remaining(d: &Decision, limit: &str) -> i64 {
    d.limits
        .iter()
        .find(|l| l.name() == limit)
        .unwrap_or_else(|| panic!("no limit {limit} in {d:?}"))
        .remaining
}
