//! Memory per idle key: 1M distinct scopes each take one decision on a rate
//! limit; bytes still allocated afterwards (requests dropped) divided by 1M.
//! Printed, not timed.
//!
//! cargo bench -p ratewarden --bench memory

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use ratewarden::{Policy, Request, Warden};
use serde_json::json;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

#[allow(unsafe_code)]
// SAFETY: forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Completes an embedded-engine future on this thread (it never waits).
fn now<F: std::future::Future>(f: F) -> F::Output {
    ratewarden::backend::poll_ready(f).expect("embedded operations complete at once")
}

fn measure(name: &str, policy: serde_json::Value, scope: impl Fn(usize) -> String, n: usize) {
    let w = Warden::new(Policy::from_value(&policy).expect("policy"));
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..n {
        let req = Request::parse(&scope(i)).expect("scope");
        assert!(now(w.acquire(&req)).expect("ok").allowed());
    }
    let after = LIVE.load(Ordering::Relaxed);
    let per_key = (after - before) as f64 / n as f64;
    println!(
        "{name}: {n} keys, {:.1} MiB live, {per_key:.0} bytes per key (key text {} bytes)",
        (after - before) as f64 / (1 << 20) as f64,
        scope(n / 2).len()
    );
}

fn main() {
    let n = 1_000_000;
    measure(
        "rate limit per user (10/hour: keys stay live for minutes)",
        json!({"scopes": {"user": {"limits": [{"name": "rph", "kind": "rate", "limit": 10, "per": "1h"}]}}}),
        |i| format!("user:{i}"),
        n,
    );
    measure(
        "quota per user (daily)",
        json!({"scopes": {"user": {"limits": [{"name": "day", "kind": "quota", "limit": 1000, "per": "day"}]}}}),
        |i| format!("user:{i}"),
        n,
    );
}
