//! Waiters in line across processes (issue 14 §6): on Redis and Redis Cluster,
//! `wait` callers on a shared limit are served in priority order, first come
//! first served within a tier, whichever process they run in — and a dead
//! waiter's place lapses.
//!
//! Each "process" is a warden with its own connection and its own manual
//! clock (the scripts run on the clock they are given), so a test decides who
//! reaches the door first: the adversarial order — the lower tier, or the
//! later arrival, asks first — is the one every test stages.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServers;
use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::calendar::MINUTE_US;
use ratewarden::plan::Waiter;
use ratewarden::{
    Clock, ManualClock, Policy, Priority, Request, Scope, WaitCancel, WaitFor, Warden,
};

/// One shared quota of one request per minute for the team, no floors (the
/// line alone decides who goes first).
fn policy() -> Policy {
    Policy::from_value(&serde_json::json!({
        "scopes": {"team": {"limits": [
            {"name": "calls", "kind": "quota", "limit": 1, "per": "minute"}
        ]}},
        "defaults": {"promote_after": "1h", "floors": {"standard": 0, "background": 0}}
    }))
    .unwrap()
}

/// A "process": its own connection and its own clock, on namespace `ns`.
async fn process(url: &str, ns: &str, clock: &ManualClock) -> Warden {
    process_with(url, ns, clock, policy()).await
}

async fn process_with(url: &str, ns: &str, clock: &ManualClock, policy: Policy) -> Warden {
    let shared = Arc::new(clock.clone());
    let backend = RedisBackend::connect(url, ns)
        .await
        .unwrap()
        .with_clock(shared.clone());
    Warden::with_backend(policy, Arc::new(backend) as Arc<dyn Backend>, shared)
}

fn request(priority: Priority) -> Request {
    Request::new(Scope::parse("team:a").unwrap()).priority(priority)
}

/// Yields until `ready` holds (a real event: a waiter reached its sleep, so
/// its place is in Redis, or it finished). Bounded, never a timing assertion.
async fn until(what: &str, ready: impl Fn() -> bool) {
    let reached = tokio::time::timeout(Duration::from_secs(20), async {
        while !ready() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(reached.is_ok(), "never happened: {what}");
}

/// Until `clock` has `n` sleeping waiters.
async fn sleepers(clock: &ManualClock, n: usize) {
    until("the waiters sleep", || clock.sleepers() >= n).await;
}

/// Spends the minute's one call, then returns the start of the next minute.
async fn spend_the_minute(w: &Warden, clock: &ManualClock) -> i64 {
    let d = w.acquire(&request(Priority::Critical)).await.unwrap();
    assert!(d.allowed());
    (clock.now() / MINUTE_US + 1) * MINUTE_US
}

fn wait(w: &Warden, priority: Priority) -> tokio::task::JoinHandle<ratewarden::Decision> {
    let w = w.clone();
    tokio::spawn(async move {
        w.wait(
            &request(priority),
            WaitFor::Acquire,
            Duration::from_secs(600),
        )
        .await
        .unwrap()
    })
}

async fn on_each_backend<F, Fut>(test: F)
where
    F: Fn(String, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let servers = RedisServers::start(true);
    test(servers.url().to_owned(), "line-s".into()).await;
    test(servers.cluster_url().to_owned(), "line-c".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_waiter_on_one_node_goes_before_a_background_waiter_first_at_the_door() {
    on_each_backend(|url, ns| async move {
        let (ca, cb) = (
            ManualClock::at_date(2026, 1, 15),
            ManualClock::at_date(2026, 1, 15),
        );
        let (a, b) = (process(&url, &ns, &ca).await, process(&url, &ns, &cb).await);
        let reset = spend_the_minute(&a, &ca).await;
        // Background waits on B, then critical on A: both denied, both in line.
        let background = wait(&b, Priority::Background);
        sleepers(&cb, 1).await;
        let critical = wait(&a, Priority::Critical);
        sleepers(&ca, 1).await;
        // B reaches the new minute first: the quota is free, but the critical
        // waiter ahead needs it, so B is refused and looks again shortly.
        cb.set(reset);
        sleepers(&cb, 1).await;
        assert!(!background.is_finished());
        let b_retry = cb.next_deadline().unwrap();
        assert!(
            b_retry > reset && b_retry <= reset + 20_000,
            "polls soon: {b_retry}"
        );
        // A arrives and gets the call.
        ca.set(reset);
        let got = critical.await.unwrap();
        assert!(got.allowed(), "{got:?}");
        // B's next look finds the minute spent: it waits for the next one.
        cb.set(b_retry);
        sleepers(&cb, 1).await;
        assert_eq!(cb.next_deadline(), Some(reset + MINUTE_US));
        cb.set(reset + MINUTE_US);
        let got = background.await.unwrap();
        assert!(got.allowed(), "{got:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_a_tier_the_earlier_waiter_goes_first_whoever_asks_first() {
    on_each_backend(|url, ns| async move {
        let (ca, cb) = (
            ManualClock::at_date(2026, 1, 15),
            ManualClock::at_date(2026, 1, 15),
        );
        let (a, b) = (process(&url, &ns, &ca).await, process(&url, &ns, &cb).await);
        let reset = spend_the_minute(&a, &ca).await;
        let first = wait(&a, Priority::Standard);
        sleepers(&ca, 1).await;
        // A later arrival at the same tier: its place is behind A's.
        cb.advance(Duration::from_millis(5));
        let second = wait(&b, Priority::Standard);
        sleepers(&cb, 1).await;
        cb.set(reset);
        sleepers(&cb, 1).await;
        assert!(!second.is_finished(), "the later waiter must not pass");
        ca.set(reset);
        assert!(first.await.unwrap().allowed());
        cb.set(reset + MINUTE_US);
        assert!(second.await.unwrap().allowed());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_waiters_place_lapses_and_a_waiter_that_gives_up_leaves_at_once() {
    on_each_backend(|url, ns| async move {
        let (ca, cb) = (
            ManualClock::at_date(2026, 1, 15),
            ManualClock::at_date(2026, 1, 15),
        );
        let (a, b) = (process(&url, &ns, &ca).await, process(&url, &ns, &cb).await);
        let reset = spend_the_minute(&a, &ca).await;
        // A critical waiter that dies in line (its task aborted: no goodbye).
        let dead = wait(&a, Priority::Critical);
        sleepers(&ca, 1).await;
        dead.abort();
        assert!(dead.await.unwrap_err().is_cancelled());
        let background = wait(&b, Priority::Background);
        sleepers(&cb, 1).await;
        // At the reset the dead place still stands: B is refused...
        cb.set(reset);
        sleepers(&cb, 1).await;
        assert!(!background.is_finished());
        // ...until it lapses, its retry time plus the grace later.
        while !background.is_finished() {
            let next = cb.next_deadline().unwrap();
            assert!(
                next <= reset + Waiter::GRACE + 20_000,
                "B still refused at {next} (reset {reset})"
            );
            cb.set(next);
            sleepers_or_done(&cb, &background).await;
        }
        let got = background.await.unwrap();
        assert!(got.allowed(), "{got:?}");

        // A waiter that is cancelled leaves its place at once. (Both clocks
        // at one time again: processes share the server's clock.)
        ca.set(cb.now());
        let reset = reset + MINUTE_US;
        let cancel = Arc::new(WaitCancel::default());
        let (a2, c2) = (a.clone(), cancel.clone());
        let quitter = tokio::spawn(async move {
            a2.wait_cancellable(
                &request(Priority::Critical),
                WaitFor::Acquire,
                Duration::from_secs(600),
                &c2,
            )
            .await
            .unwrap()
        });
        sleepers(&ca, 1).await;
        let background = wait(&b, Priority::Background);
        sleepers(&cb, 1).await;
        cancel.cancel();
        let gave_up = quitter.await.unwrap();
        assert_eq!(gave_up.reason.as_deref(), Some("cancelled"));
        // Had it not left, its place would stand until the reset plus the grace.
        cb.set(reset);
        sleepers_or_done(&cb, &background).await;
        assert!(background.is_finished(), "admitted at the reset itself");
        assert!(background.await.unwrap().allowed());
    })
    .await;
}

/// Until the waiter behind `task` sleeps again or finished.
async fn sleepers_or_done<T>(clock: &ManualClock, task: &tokio::task::JoinHandle<T>) {
    until("the waiter sleeps or finishes", || {
        task.is_finished() || clock.sleepers() >= 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_closed_in_another_process_wakes_its_waiters_at_once() {
    on_each_backend(|url, ns| async move {
        let ns = format!("{ns}-pubsub");
        // Waiters on a half-open breaker look again after `pace` (an hour
        // here) unless the close published by another process wakes them.
        let policy = || {
            Policy::from_value(&serde_json::json!({
                "scopes": {"agent": {}},
                "resources": {"openai": {"upstream": {
                    "pace": "1h",
                    "breaker": {"open_for": "1s", "probe_lease": "1h"}
                }}}
            }))
            .unwrap()
        };
        let clock = ManualClock::at_date(2026, 1, 15);
        let a = process_with(&url, &ns, &clock, policy()).await;
        let b = process_with(&url, &ns, &clock, policy()).await;
        let ask = |p: Priority| {
            Request::parse("agent:x")
                .unwrap()
                .resource("openai")
                .priority(p)
        };
        a.report("openai", 429, &[("retry-after", "1")])
            .await
            .unwrap();
        clock.advance(Duration::from_secs(2));
        let probe = a.acquire(&ask(Priority::Critical)).await.unwrap();
        assert!(probe.light.unwrap().probe, "{probe:?}");
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            b2.wait(
                &ask(Priority::Standard),
                WaitFor::Acquire,
                Duration::from_secs(7200),
            )
            .await
            .unwrap()
        });
        sleepers(&clock, 1).await;
        // The probe succeeds in A: the breaker closes, the transition is
        // published, B's waiter looks again with no clock moving.
        a.report("openai", 200, &[]).await.unwrap();
        until("the waiter is woken by the published close", || {
            waiter.is_finished()
        })
        .await;
        let got = waiter.await.unwrap();
        assert!(got.allowed(), "{got:?}");
    })
    .await;
}
