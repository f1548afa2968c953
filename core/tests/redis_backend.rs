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
            let d = w.acquire(&req).await.unwrap();
            if d.degraded.is_none() {
                assert!(d.allowed());
                ok += 1;
            } else {
                // The call in flight when the connection dropped: denied (fail closed), marked.
                assert_eq!(d.degraded, Some(ratewarden::Degraded::Deny), "{d:?}");
                assert!(!d.allowed());
                failed += 1;
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
    let mut d = w.check(&probe).await.unwrap();
    if d.degraded.is_some() {
        d = w.check(&probe).await.unwrap();
    }
    let used = 1000 - d.limits[0].remaining;
    assert!(
        ok >= 40,
        "the backend recovers after each drop ({ok} ok, {failed} failed)"
    );
    // No retries: a call either charged once or failed (degraded deny); a failure
    // whose reply was lost may have charged once, never twice.
    assert!(
        used >= ok && used <= ok + failed,
        "used {used}, ok {ok}, failed {failed}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn when_redis_goes_down_each_mode_holds_and_redis_resumes_when_back() {
    use ratewarden::Degraded;
    use ratewarden::backend::OnBackendError;
    let servers = RedisServers::start(false);
    let (url, port) = (servers.url().to_owned(), servers.port());
    let policy = json!({"scopes": {"tenant": {"limits": [{"name": "q", "kind": "quota", "limit": 10, "per": "day"}]}}});
    let make = |mode: OnBackendError, ns: &'static str| {
        let (url, policy) = (url.clone(), policy.clone());
        async move {
            let b = RedisBackend::connect(&url, ns).await.unwrap();
            let b = ratewarden::backend::Fallback::new(b, mode, Arc::new(SystemClock)).unwrap();
            Warden::with_backend(
                Policy::from_value(&policy).unwrap(),
                Arc::new(b) as Arc<dyn Backend>,
                Arc::new(SystemClock),
            )
        }
    };
    let deny = make(OnBackendError::Deny, "deny").await;
    let allow = make(OnBackendError::Allow, "allow").await;
    let local = make(OnBackendError::Local { share: 2 }, "local").await;
    let req = Request::parse("tenant:a").unwrap();
    let mut events = local.subscribe();
    for w in [&deny, &allow, &local] {
        let d = w.acquire(&req).await.unwrap();
        assert!(
            d.allowed() && d.degraded.is_none(),
            "healthy: decided by Redis"
        );
    }

    drop(servers); // the server process is gone; the port is free again

    let d = deny.acquire(&req).await.unwrap();
    assert!(!d.allowed());
    assert_eq!(d.degraded, Some(Degraded::Deny));
    assert!(
        d.reason
            .as_deref()
            .unwrap()
            .contains("on_backend_error = deny"),
        "{d:?}"
    );

    let d = allow.acquire(&req).await.unwrap();
    assert!(d.allowed());
    assert_eq!(d.degraded, Some(Degraded::Allow));
    let r = allow
        .reserve(&req, None)
        .await
        .unwrap()
        .reservation
        .unwrap();
    assert!(
        !allow.commit(r.id, &Cost::new()).await.unwrap().duplicate,
        "settled where it was made"
    );

    // Local with share 2: this node may use half of the quota of 10 on its own.
    let mut admitted = 0;
    for _ in 0..10 {
        let d = local.acquire(&req).await.unwrap();
        assert_eq!(d.degraded, Some(Degraded::Local));
        admitted += u32::from(d.allowed());
    }
    assert_eq!(admitted, 5);
    let held = local
        .reserve(&Request::parse("tenant:b").unwrap(), None)
        .await
        .unwrap()
        .reservation
        .unwrap();
    // One outage event, then one event per degraded decision (10 acquires, 1 reserve).
    use ratewarden::Event;
    use tokio::sync::broadcast::error::TryRecvError;
    let first = events.try_recv().unwrap();
    assert!(
        matches!(&first, Event::BackendUnavailable { reason, .. } if reason.contains("local")),
        "{first:?}"
    );
    for i in 0..11 {
        match events.try_recv().unwrap() {
            Event::DegradedDecision {
                mode: Degraded::Local,
                scope,
                outcome,
                ..
            } => {
                assert_eq!(scope, if i < 10 { "tenant:a" } else { "tenant:b" });
                assert_eq!(outcome == ratewarden::Outcome::Deny, (5..10).contains(&i));
            }
            other => panic!("event {i}: {other:?}"),
        }
    }
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));

    // Redis comes back on the same port (empty: no persistence in tests).
    let _server = Server::on(port, "restart");
    // Each backend asks Redis again on its next decision (or, after a timeout, a
    // moment later); waiting on an external process and reconnect backoff, bounded.
    for (name, w) in [("deny", &deny), ("local", &local)] {
        let mut back = None;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let d = w.acquire(&req).await.unwrap();
            if d.degraded.is_none() {
                back = Some(d);
                break;
            }
        }
        let d =
            back.unwrap_or_else(|| panic!("{name}: decisions go back to Redis once it answers"));
        assert!(d.allowed(), "{name}: {d:?}");
    }
    // The recovery is reported once, after whatever degraded decisions the
    // reconnection took.
    let mut recovered = 0;
    while let Ok(e) = events.try_recv() {
        match e {
            Event::DegradedDecision { .. } => assert_eq!(recovered, 0, "degraded after recovery"),
            Event::BackendRecovered { after, .. } => {
                assert!(after > std::time::Duration::ZERO);
                recovered += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(recovered, 1);
    // A reservation made while degraded is still settled locally.
    assert!(local.release(held.id).await.unwrap());
}

/// A bare `redis-server` on a given port (empty, no persistence), killed on drop.
struct Server(std::process::Child, std::path::PathBuf);

impl Server {
    fn on(port: u16, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rw-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self(child, dir)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_process_started_while_redis_is_down_degrades_then_uses_redis() {
    use ratewarden::Degraded;
    let servers = RedisServers::start(false);
    let (url, port) = (servers.url().to_owned(), servers.port());
    drop(servers); // nothing listens on the port now
    let e = RedisBackend::connect(&url, "lazy").await.unwrap_err();
    assert!(e.to_string().contains("cannot connect"), "{e}");
    let backend = ratewarden::backend::Fallback::new(
        RedisBackend::connect_lazy(&url, "lazy").unwrap(),
        ratewarden::backend::OnBackendError::Deny,
        Arc::new(SystemClock),
    )
    .unwrap();
    let w = Warden::with_backend(
        Policy::from_value(&json!({"scopes": {"tenant": {"limits": [
            {"name": "q", "kind": "quota", "limit": 3, "per": "day"}
        ]}}}))
        .unwrap(),
        Arc::new(backend) as Arc<dyn Backend>,
        Arc::new(SystemClock),
    );
    let req = Request::parse("tenant:a").unwrap();
    let d = w.acquire(&req).await.unwrap();
    assert_eq!(d.degraded, Some(Degraded::Deny), "{d:?}");
    let _server = Server::on(port, "lazy");
    // Waiting on an external process and the reconnect backoff, bounded.
    let mut admitted = 0;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let d = w.acquire(&req).await.unwrap();
        if d.degraded.is_none() {
            assert!(d.allowed());
            admitted = 1;
            break;
        }
    }
    assert_eq!(admitted, 1, "decisions go to Redis once it answers");
    assert!(w.acquire(&req).await.unwrap().allowed());
    assert!(w.acquire(&req).await.unwrap().allowed());
    let d = w.acquire(&req).await.unwrap();
    assert!(
        !d.allowed() && d.degraded.is_none(),
        "the quota of 3, kept by Redis"
    );
}
