//! The Redis backend under concurrency and script-cache loss, on a real server.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use common::redis::{RedisServers, cli};
use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::{Cost, Policy, Request, SystemClock, Warden};
use serde_json::json;

async fn warden(url: &str, ns: &str, policy: serde_json::Value) -> Warden {
    let backend = RedisBackend::connect(url, ns).await.unwrap();
    Warden::with_backend(
        Policy::from_value(&policy).unwrap(),
        Arc::new(backend) as Arc<dyn Backend>,
        Arc::new(SystemClock),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_admit_exactly_the_limit_over_one_connection() {
    let servers = RedisServers::start(false);
    let w = warden(
        servers.url(),
        "conc",
        json!({"scopes": {
            "tenant": {"limits": [
                {"name": "budget", "kind": "budget", "unit": "tokens", "limit": 500},
                {"name": "quota", "kind": "quota", "limit": 100000, "per": "day"}
            ]},
            "user": {"limits": [{"name": "slots", "kind": "concurrency", "limit": 3, "lease": "1m"}]}
        }}),
    )
    .await;
    let spent = Arc::new(AtomicI64::new(0));
    let in_flight = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for t in 0..64 {
        let (w, spent, in_flight, peak) = (
            w.clone(),
            Arc::clone(&spent),
            Arc::clone(&in_flight),
            Arc::clone(&peak),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let req = Request::parse("tenant:acme/user:shared")
                    .unwrap()
                    .spend("tokens", 1 + (t + i) % 3);
                let d = w.reserve(&req, None).await.unwrap();
                if let Some(r) = d.reservation {
                    let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    let tokens = d
                        .limits
                        .iter()
                        .find(|l| l.name() == "budget")
                        .unwrap()
                        .amount;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let rc = w
                        .commit(r.id, &Cost::new().with("tokens", tokens))
                        .await
                        .unwrap();
                    spent.fetch_add(
                        rc.charges
                            .iter()
                            .find(|c| c.name() == "budget")
                            .unwrap()
                            .charged,
                        Ordering::Relaxed,
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(peak.load(Ordering::SeqCst) <= 3);
    let d = w
        .check(
            &Request::parse("tenant:acme/user:shared")
                .unwrap()
                .spend("tokens", 0)
                .spend("requests", 0),
        )
        .await
        .unwrap();
    let left = d
        .limits
        .iter()
        .find(|l| l.name() == "budget")
        .unwrap()
        .remaining;
    assert_eq!(
        500 - left,
        spent.load(Ordering::Relaxed),
        "the books on the server match what was granted"
    );
    assert!(
        d.limits
            .iter()
            .find(|l| l.name() == "slots")
            .unwrap()
            .remaining
            == 3,
        "every slot came back"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn script_flush_mid_run_is_transparent() {
    let servers = RedisServers::start(false);
    let w = warden(
        servers.url(),
        "flush",
        json!({"scopes": {"user": {"limits": [
            {"name": "q", "kind": "quota", "limit": 5, "per": "day"}
        ]}}}),
    )
    .await;
    let req = Request::parse("user:1").unwrap();
    assert!(w.acquire(&req).await.unwrap().allowed());
    let r = w.reserve(&req, None).await.unwrap().reservation.unwrap();
    assert_eq!(cli(servers.port(), &["SCRIPT", "FLUSH"]), "OK");
    // Both scripts are gone from the server; the next calls reload them.
    assert!(w.acquire(&req).await.unwrap().allowed());
    assert!(!w.commit(r.id, &Cost::new()).await.unwrap().duplicate);
    let d = w.check(&req).await.unwrap();
    assert_eq!(
        d.limits[0].remaining, 1,
        "3 used, 1 would be taken by this check, nothing double-charged"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn dropped_connections_reconnect_and_never_double_charge() {
    let servers = RedisServers::start(false);
    let w = warden(
        servers.url(),
        "kill",
        json!({"scopes": {"user": {"limits": [
            {"name": "q", "kind": "quota", "limit": 1000, "per": "day"}
        ]}}}),
    )
    .await;
    let req = Request::parse("user:1").unwrap();
    let (mut ok, mut failed) = (0i64, 0i64);
    for round in 0..5 {
        for _ in 0..10 {
            match w.acquire(&req).await {
                Ok(d) => {
                    assert!(d.allowed());
                    ok += 1;
                }
                Err(e) => {
                    assert_eq!(e.kind(), ratewarden::ErrorKind::Backend, "{e}");
                    failed += 1;
                }
            }
        }
        // Drop every client connection; the next calls must reconnect by themselves.
        let killed = cli(servers.port(), &["CLIENT", "KILL", "TYPE", "normal"]);
        assert!(
            killed.parse::<i64>().unwrap() >= 1,
            "round {round}: killed {killed}"
        );
    }
    // The first call after a drop fails; the connection is back for the next one.
    let probe = req.clone().spend("requests", 0);
    let d = match w.check(&probe).await {
        Ok(d) => d,
        Err(_) => w.check(&probe).await.unwrap(),
    };
    let used = 1000 - d.limits[0].remaining;
    assert!(
        ok >= 40,
        "the backend recovers after each drop ({ok} ok, {failed} failed)"
    );
    // No retries: a call either charged once or failed; a failure whose reply was lost
    // may have charged once, never twice.
    assert!(
        used >= ok && used <= ok + failed,
        "used {used}, ok {ok}, failed {failed}"
    );
}
