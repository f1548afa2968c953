//! Priority floors, starvation promotion and `wait` ordering.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{now, warden};
use ratewarden::{Priority, Request, WaitFor};
use serde_json::json;

#[test]
fn background_denied_for_promote_after_is_served_as_standard() {
    let (w, clock) = warden(json!({"scopes": {"user": {"limits": [
        {"name": "q", "kind": "quota", "limit": 10, "per": "day"}
    ]}}}));
    let std = Request::parse("user:1").unwrap();
    let bg = Request::parse("user:1")
        .unwrap()
        .priority(Priority::Background);
    for _ in 0..8 {
        assert!(now(w.acquire(&std)).unwrap().allowed());
    }
    for _ in 0..3 {
        let d = now(w.acquire(&bg)).unwrap();
        assert!(
            !d.allowed(),
            "2 of 10 left is under the 30% background floor"
        );
        assert_eq!(d.priority, Priority::Background);
        clock.advance(Duration::from_secs(120));
    }
    // Denied since t=0, now t=6 min ≥ 5 min: promoted.
    let d = now(w.acquire(&bg)).unwrap();
    assert!(d.allowed(), "{d:?}");
    assert_eq!(d.priority, Priority::Standard);
    // Admission resets the streak.
    assert!(!now(w.acquire(&bg)).unwrap().allowed());
}

#[test]
fn a_gap_longer_than_promote_after_restarts_the_streak() {
    let (w, clock) = warden(
        json!({"defaults": {"promote_after": "1m"}, "scopes": {"user": {"limits": [
            {"name": "q", "kind": "quota", "limit": 10, "per": "day"}
        ]}}}),
    );
    let std = Request::parse("user:1").unwrap();
    let bg = Request::parse("user:1")
        .unwrap()
        .priority(Priority::Background);
    for _ in 0..8 {
        now(w.acquire(&std)).unwrap();
    }
    assert!(!now(w.acquire(&bg)).unwrap().allowed());
    clock.advance(Duration::from_secs(61));
    assert!(
        !now(w.acquire(&bg)).unwrap().allowed(),
        "61 s of silence is not continuous denial"
    );
    clock.advance(Duration::from_secs(60));
    assert!(now(w.acquire(&bg)).unwrap().allowed());
}

#[tokio::test(flavor = "current_thread")]
async fn waiters_are_served_in_priority_order() {
    if common::embedded_only() {
        return;
    }
    let (w, clock) = warden(json!({
        "defaults": {"floors": {"standard": 0, "background": 0}},
        "scopes": {"user": {"limits": [{"name": "r", "kind": "rate", "limit": 1, "per": "1s"}]}}
    }));
    let req = |p| Request::parse("user:1").unwrap().priority(p);
    assert!(w.acquire(&req(Priority::Standard)).await.unwrap().allowed());
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for p in [
        Priority::Background,
        Priority::Standard,
        Priority::Critical,
        Priority::Standard,
    ] {
        let (w, order) = (w.clone(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let d = w
                .wait(&req(p), WaitFor::Acquire, Duration::from_secs(60))
                .await
                .unwrap();
            assert!(d.allowed());
            order.lock().unwrap().push(p);
        }));
        settle().await;
    }
    for step in 1..=4 {
        clock.advance(Duration::from_secs(1));
        settle().await;
        assert_eq!(
            order.lock().unwrap().len(),
            step,
            "exactly one waiter per freed unit"
        );
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        vec![
            Priority::Critical,
            Priority::Standard,
            Priority::Standard,
            Priority::Background
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn wait_gives_up_after_max_wait_and_cancellation_leaves_the_queue() {
    if common::embedded_only() {
        return;
    }
    let (w, clock) = warden(json!({"scopes": {"user": {"limits": [
        {"name": "r", "kind": "rate", "limit": 1, "per": "10s"}
    ]}}}));
    let req = Request::parse("user:1").unwrap();
    assert!(w.acquire(&req).await.unwrap().allowed());
    let w2 = w.clone();
    let r2 = req.clone();
    let waiter = tokio::spawn(async move {
        w2.wait(&r2, WaitFor::Acquire, Duration::from_secs(3))
            .await
            .unwrap()
    });
    settle().await;
    clock.advance(Duration::from_secs(3));
    settle().await;
    let d = waiter.await.unwrap();
    assert!(!d.allowed());
    assert_eq!(d.retry_after, Some(Duration::from_secs(7)));
    // A cancelled waiter must not block the next one.
    let w3 = w.clone();
    let r3 = req.clone();
    let cancelled = tokio::spawn(async move {
        w3.wait(&r3, WaitFor::Acquire, Duration::from_secs(60))
            .await
    });
    settle().await;
    cancelled.abort();
    settle().await;
    let w4 = w.clone();
    let next = tokio::spawn(async move {
        w4.wait(&req, WaitFor::Acquire, Duration::from_secs(60))
            .await
            .unwrap()
    });
    settle().await;
    clock.advance(Duration::from_secs(7));
    settle().await;
    assert!(next.await.unwrap().allowed());
}

#[tokio::test(flavor = "current_thread")]
async fn wait_returns_at_once_when_it_can_never_succeed() {
    if common::embedded_only() {
        return;
    }
    let (w, _clock) = warden(json!({"scopes": {"user": {"limits": [
        {"name": "r", "kind": "rate", "limit": 5, "per": "1s"}
    ]}}}));
    let d = w
        .wait(
            &Request::parse("user:1").unwrap().spend("requests", 6),
            WaitFor::Acquire,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(!d.allowed());
    assert_eq!(d.retry_after, None);
}

/// Lets every ready task run until none is (current-thread runtime: deterministic).
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_queued_waiter_that_times_out_is_denied_and_consumes_nothing() {
    if common::embedded_only() {
        return;
    }
    // Regression: a waiter behind a higher tier reaching max_wait used to return the
    // dry-run `check` result, which could say "allow" without charging anything.
    let (w, clock) = warden(json!({
        "defaults": {"floors": {"standard": 0, "background": 0}},
        "scopes": {"user": {"limits": [{"name": "r", "kind": "rate", "limit": 1, "per": "10s"}]}}
    }));
    let req = |p| Request::parse("user:1").unwrap().priority(p);
    assert!(w.acquire(&req(Priority::Standard)).await.unwrap().allowed());
    // B (background) queues first with a 10 s budget; A (critical) queues behind it in
    // time but ahead of it in priority. Both wake at t = 10 s, B first.
    let wb = w.clone();
    let b = tokio::spawn(async move {
        wb.wait(
            &req(Priority::Background),
            WaitFor::Acquire,
            Duration::from_secs(10),
        )
        .await
        .unwrap()
    });
    settle().await;
    let wa = w.clone();
    let a = tokio::spawn(async move {
        wa.wait(
            &req(Priority::Critical),
            WaitFor::Acquire,
            Duration::from_secs(60),
        )
        .await
        .unwrap()
    });
    settle().await;
    clock.advance(Duration::from_secs(10));
    settle().await;
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(a.allowed(), "{a:?}");
    assert!(!b.allowed(), "{b:?}");
    assert!(b.reservation.is_none());
    // Exactly one unit was consumed at t = 10 s: the next is 10 s away.
    let d = w.check(&req(Priority::Critical)).await.unwrap();
    assert_eq!(d.retry_after, Some(Duration::from_secs(10)));
}

#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_wait_stops_where_it_waits_and_holds_nothing() {
    use ratewarden::WaitCancel;
    if common::embedded_only() {
        return;
    }
    let (w, _clock) = warden(json!({"scopes": {"user": {"limits": [
        {"name": "slots", "kind": "concurrency", "limit": 1}
    ]}}}));
    let req = Request::parse("user:1").unwrap();
    let held = w.reserve(&req, None).await.unwrap();
    assert!(held.allowed());
    let cancel = Arc::new(WaitCancel::default());
    // One waiting on the backend's retry time, one queued behind it.
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let (w, r, c) = (w.clone(), req.clone(), Arc::clone(&cancel));
        waiters.push(tokio::spawn(async move {
            w.wait_cancellable(&r, WaitFor::Reserve(None), Duration::from_secs(600), &c)
                .await
                .unwrap()
        }));
        settle().await;
    }
    cancel.cancel();
    assert!(cancel.is_cancelled());
    for waiter in waiters {
        let d = waiter.await.unwrap();
        assert!(!d.allowed(), "{d:?}");
        assert!(d.reservation.is_none());
        assert_eq!(d.reason.as_deref(), Some("cancelled"));
    }
    // Nothing was taken meanwhile: the slot frees for the next caller at once.
    w.release(held.reservation.unwrap().id).await.unwrap();
    assert!(w.reserve(&req, None).await.unwrap().allowed());
}
