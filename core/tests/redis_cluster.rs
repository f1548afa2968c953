//! The Redis backend on a real 3-master Redis Cluster: requests whose limits
//! span slots (a tenant's own limits plus shared pools elsewhere) are exact
//! under concurrency, compensate every hold when a step is refused, times out
//! or is cancelled, and cost a known number of round trips.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{RedisServers, cli};
use ratewarden::backend::{Backend, KeyState, RedisBackend};
use ratewarden::{Degraded, Policy, Request, SystemClock, Warden};
use serde_json::json;

fn policy() -> serde_json::Value {
    json!({
        "scopes": {"tenant": {"limits": [
            {"name": "t-req", "kind": "quota", "limit": 40, "per": "day"},
            {"name": "t-tokens", "kind": "budget", "unit": "tokens", "limit": 100000}
        ]}},
        "resources": {"llm": {"limits": [
            {"name": "llm-req", "kind": "quota", "limit": 300, "per": "day"}
        ]}}
    })
}

/// A warden on `backend` that denies (degraded) while it fails.
fn warden(backend: RedisBackend) -> Warden {
    let backend = ratewarden::backend::Fallback::new(
        backend,
        ratewarden::backend::OnBackendError::Deny,
        Arc::new(SystemClock),
    )
    .unwrap();
    Warden::with_backend(
        Policy::from_value(&policy()).unwrap(),
        Arc::new(backend) as Arc<dyn Backend>,
        Arc::new(SystemClock),
    )
}

fn ports(servers: &RedisServers) -> Vec<u16> {
    servers
        .cluster_nodes()
        .iter()
        .map(|n| n.rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

/// The master that owns `key` (the others answer with a redirection).
fn owner(ports: &[u16], key: &str) -> u16 {
    *ports
        .iter()
        .find(|p| matches!(cli(**p, &["EXISTS", key]).as_str(), "0" | "1"))
        .unwrap()
}

fn evalsha_calls(ports: &[u16]) -> u64 {
    ports
        .iter()
        .map(|p| {
            let stats = cli(*p, &["INFO", "commandstats"]);
            stats
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .map_or(0, |v| v.split(',').next().unwrap().parse().unwrap())
        })
        .sum()
}

fn used(states: &[KeyState], key: &str) -> (i64, usize) {
    states.iter().find(|s| s.key == key).map_or((0, 0), |s| {
        let u = s
            .fields
            .iter()
            .find(|(f, _)| f == "u")
            .map_or(0, |(_, v)| v.parse().unwrap());
        (u, s.holds.len())
    })
}

fn llm(tenant: &str) -> Request {
    Request::parse(&format!("tenant:{tenant}"))
        .unwrap()
        .resource("llm")
        .spend("tokens", 10)
}

/// A tenant whose limits live on another master than the `llm-req` pool.
fn tenant_off_pool(ports: &[u16], ns: &str) -> (String, u16, u16) {
    let pool = owner(ports, &format!("{ns}:{{@#llm-req}}:@#llm-req"));
    (0..)
        .map(|i| format!("t{i}"))
        .find_map(|t| {
            let home = owner(ports, &format!("{ns}:{{tenant:{t}}}:x"));
            (home != pool).then_some((t, home, pool))
        })
        .unwrap()
}

/// A fresh cluster, its master ports, a tenant off the pool's master, and a
/// warden on namespace `ns`.
async fn cluster_with_tenant_off_pool(ns: &str) -> (RedisServers, Vec<u16>, String, Warden) {
    let servers = RedisServers::start(true);
    let ports = ports(&servers);
    let (tenant, _, _) = tenant_off_pool(&ports, ns);
    let w = warden(
        RedisBackend::connect(servers.cluster_url(), ns)
            .await
            .unwrap(),
    );
    (servers, ports, tenant, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spanning_slots_are_exact_under_concurrency_and_leave_no_holds() {
    let servers = RedisServers::start(true);
    let backend = RedisBackend::connect(servers.cluster_url(), "exact")
        .await
        .unwrap();
    let w = warden(backend.clone());
    // 8 tenants × 40 = 320 tenant admissions against a 300 pool: both bind.
    let mut tasks = Vec::new();
    for t in 0..64 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0;
            for _ in 0..8 {
                if w.acquire(&llm(&format!("t{}", t % 8)))
                    .await
                    .unwrap()
                    .allowed()
                {
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 300, "exactly the pool");
    let states = backend.inspect(None).await.unwrap();
    assert_eq!(used(&states, "@#llm-req"), (300, 0));
    let mut tenants = 0;
    for t in 0..8 {
        let (u, holds) = used(&states, &format!("tenant:t{t}#t-req"));
        assert!(u <= 40, "tenant t{t} used {u}");
        assert_eq!(holds, 0, "no hold left behind on tenant t{t}");
        tenants += u;
    }
    assert_eq!(
        tenants, 300,
        "every admission charged its tenant once, every refusal nothing"
    );
    assert!(
        !states.iter().any(|s| s.what == "reservation" && s.fields.iter().any(|(f, v)| f == "st" && v == "a")),
        "every step reservation was committed or released"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn round_trips_one_for_a_slot_three_across_slots() {
    let (_servers, ports, tenant, w) = cluster_with_tenant_off_pool("rt").await;
    let own = Request::parse(&format!("tenant:{tenant}")).unwrap();
    w.check(&own).await.unwrap(); // connections and scripts warm
    // Every script loaded on every node before counting.
    assert!(w.acquire(&llm(&tenant)).await.unwrap().allowed());
    let r = w
        .reserve(&llm(&tenant), None)
        .await
        .unwrap()
        .reservation
        .unwrap();
    w.release(r.id).await.unwrap();
    let before = evalsha_calls(&ports);
    assert!(w.acquire(&own).await.unwrap().allowed());
    assert_eq!(evalsha_calls(&ports) - before, 1, "one slot: one EVALSHA");
    let before = evalsha_calls(&ports);
    assert!(w.acquire(&llm(&tenant)).await.unwrap().allowed());
    assert_eq!(
        evalsha_calls(&ports) - before,
        4,
        "hold home, hold pool, commit both: three round trips"
    );
    let before = evalsha_calls(&ports);
    let r = w
        .reserve(&llm(&tenant), None)
        .await
        .unwrap()
        .reservation
        .unwrap();
    assert_eq!(
        evalsha_calls(&ports) - before,
        2,
        "reserve: two round trips"
    );
    let before = evalsha_calls(&ports);
    let receipt = w.commit(r.id, &ratewarden::Cost::new()).await.unwrap();
    assert_eq!(
        evalsha_calls(&ports) - before,
        2,
        "commit: the record, then its link"
    );
    let names: Vec<&str> = receipt.charges.iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        ["t-req", "t-tokens", "llm-req"],
        "one receipt for every slot"
    );
}

/// A cluster after one admitted `llm` request by a tenant whose own limits live
/// on another master than the `llm-req` pool, with that pool's master now
/// refusing writes (`CLIENT PAUSE … WRITE`) until `unpause`.
struct PausedPool {
    _servers: RedisServers,
    backend: RedisBackend,
    w: Warden,
    tenant: String,
    scope: ratewarden::Scope,
    pool_port: u16,
}

impl PausedPool {
    async fn start(ns: &str, timeout: Duration) -> Self {
        let servers = RedisServers::start(true);
        let (tenant, _, pool_port) = tenant_off_pool(&ports(&servers), ns);
        let backend = RedisBackend::connect(servers.cluster_url(), ns)
            .await
            .unwrap()
            .timeout(timeout)
            .unwrap();
        let w = warden(backend.clone());
        assert!(w.acquire(&llm(&tenant)).await.unwrap().allowed());
        assert_eq!(cli(pool_port, &["CLIENT", "PAUSE", "3000", "WRITE"]), "OK");
        let scope = ratewarden::Scope::parse(&format!("tenant:{tenant}")).unwrap();
        Self {
            _servers: servers,
            backend,
            w,
            tenant,
            scope,
            pool_port,
        }
    }

    /// `(used, holds)` of the tenant's quota.
    async fn tenant_quota(&self) -> (i64, usize) {
        let states = self.backend.inspect(Some(&self.scope)).await.unwrap();
        used(&states, &format!("tenant:{}#t-req", self.tenant))
    }

    /// Lets the pool's master go on, then reads the pool through the same
    /// connection (so behind whatever was queued on it).
    async fn unpause_and_read_pool(&self) -> (i64, usize) {
        assert_eq!(cli(self.pool_port, &["CLIENT", "UNPAUSE"]), "OK");
        used(&self.backend.inspect(None).await.unwrap(), "@#llm-req")
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_pool_node_that_stops_answering_gets_every_hold_handed_back() {
    let p = PausedPool::start("pause", Duration::from_millis(200)).await;
    let d = p.w.acquire(&llm(&p.tenant)).await.unwrap();
    assert_eq!(d.degraded, Some(Degraded::Deny), "{d:?}");
    // The tenant's hold from step 1 was released before the decision returned.
    assert_eq!(p.tenant_quota().await, (1, 0));
    // The pool's queued hold and its release ran in order once unpaused.
    assert_eq!(
        p.unpause_and_read_pool().await,
        (1, 0),
        "only the first request counts"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_request_hands_back_its_first_step_at_once() {
    let p = PausedPool::start("cancel", Duration::from_secs(10)).await;
    {
        let req = llm(&p.tenant);
        let acquire = p.w.acquire(&req);
        tokio::pin!(acquire);
        // Drive the request until its first step holds the tenant's quota.
        for i in 0.. {
            assert!(i < 1000, "the first step never held the tenant's quota");
            tokio::select! {
                r = &mut acquire => panic!("finished while the pool is paused: {r:?}"),
                () = tokio::task::yield_now() => {}
            }
            if p.tenant_quota().await.1 == 1 {
                break;
            }
        }
    } // dropped here: the caller gave up
    let mut released = false;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
        if p.tenant_quota().await == (1, 0) {
            released = true;
            break;
        }
    }
    assert!(
        released,
        "the cancelled request's tenant hold came back without waiting for its lease"
    );
    assert_eq!(p.unpause_and_read_pool().await, (1, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn script_flush_on_every_node_mid_run_is_transparent() {
    let (_servers, ports, tenant, w) = cluster_with_tenant_off_pool("flush").await;
    assert!(w.acquire(&llm(&tenant)).await.unwrap().allowed());
    let r = w
        .reserve(&llm(&tenant), None)
        .await
        .unwrap()
        .reservation
        .unwrap();
    for p in &ports {
        assert_eq!(cli(*p, &["SCRIPT", "FLUSH"]), "OK");
    }
    assert!(w.acquire(&llm(&tenant)).await.unwrap().allowed());
    let receipt = w.commit(r.id, &ratewarden::Cost::new()).await.unwrap();
    assert_eq!(receipt.charges.len(), 3, "{receipt:?}");
    let d = w.check(&llm(&tenant).spend("requests", 0)).await.unwrap();
    let left = |name: &str| {
        d.limits
            .iter()
            .find(|l| l.name() == name)
            .unwrap()
            .remaining
    };
    assert_eq!(
        (left("t-req"), left("llm-req")),
        (37, 297),
        "three charged, once each"
    );
}
