//! Lost replies, dropped connections and slow nodes on real Redis servers:
//! nothing is charged twice, no outcome is misreported, one slow node degrades
//! only its own slots, and settles are never refused for a recent timeout.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{RedisServers, cli};
use ratewarden::backend::{Backend, Fallback, OnBackendError, RedisBackend};
use ratewarden::{Amount, Cost, Degraded, Policy, Request, SystemClock, Warden};
use serde_json::json;

fn policy() -> serde_json::Value {
    json!({"scopes": {"tenant": {"limits": [
        {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
        {"name": "calls", "kind": "quota", "limit": 1000, "per": "day"}
    ]}}})
}

fn warden(backend: RedisBackend) -> Warden {
    let backend = Fallback::new(backend, OnBackendError::Deny, Arc::new(SystemClock)).unwrap();
    Warden::with_backend(
        Policy::from_value(&policy()).unwrap(),
        Arc::new(backend) as Arc<dyn Backend>,
        Arc::new(SystemClock),
    )
}

fn usd(tenant: &str, amount: &str) -> Request {
    Request::parse(&format!("tenant:{tenant}"))
        .unwrap()
        .spend("usd", Amount::parse(amount).unwrap())
}

/// `(usd left in base units, calls left)` of a tenant, read without charging.
async fn left(w: &Warden, tenant: &str) -> (i64, i64) {
    let d = w
        .check(&usd(tenant, "0").spend("requests", 0))
        .await
        .unwrap();
    assert!(d.degraded.is_none(), "{d:?}");
    let get = |n: &str| d.limits.iter().find(|l| l.name() == n).unwrap().remaining;
    (get("usd"), get("calls"))
}

#[tokio::test(flavor = "current_thread")]
async fn a_lost_answer_is_unconfirmed_and_asking_again_charges_once() {
    let servers = RedisServers::start(false);
    let clock = ratewarden::ManualClock::at_date(2026, 3, 2);
    let backend = RedisBackend::connect(servers.url(), "lost")
        .await
        .unwrap()
        .timeout(Duration::from_millis(100))
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    let w = warden(backend);
    assert_eq!(left(&w, "a").await, (10_000_000, 1000));

    // The server takes the script but answers after the caller gave up.
    assert_eq!(
        cli(servers.port(), &["CLIENT", "PAUSE", "10000", "WRITE"]),
        "OK"
    );
    let d = w.acquire(&usd("a", "1.00")).await.unwrap();
    assert_eq!(d.degraded, Some(Degraded::Deny), "{d:?}");
    let op = d
        .unconfirmed
        .expect("a decision whose answer was lost says so");
    assert_eq!(cli(servers.port(), &["CLIENT", "UNPAUSE"]), "OK");
    // Past the second in which a timed-out slot is not asked again.
    clock.advance(Duration::from_secs(1));

    // It was applied once the server went on; the caller cannot know that
    // from the degraded answer, but asking again with its id tells.
    let again = w.acquire(&usd("a", "1.00").operation(op)).await.unwrap();
    assert!(again.allowed() && again.degraded.is_none(), "{again:?}");
    assert_eq!(again.unconfirmed, None);
    assert_eq!(left(&w, "a").await, (9_000_000, 999), "charged once");
    let third = w.acquire(&usd("a", "1.00").operation(op)).await.unwrap();
    assert_eq!(third, again, "the same answer, every time");
    assert_eq!(left(&w, "a").await, (9_000_000, 999));

    // A decision that never reached the server is decided afresh under its id.
    let fresh = ratewarden::OperationId::random();
    let d = w.acquire(&usd("a", "2.00").operation(fresh)).await.unwrap();
    assert!(d.allowed());
    assert_eq!(left(&w, "a").await, (7_000_000, 998));
}

#[tokio::test(flavor = "current_thread")]
async fn a_killed_idle_connection_costs_no_decision_and_no_double_charge() {
    let servers = RedisServers::start(false);
    let w = warden(RedisBackend::connect(servers.url(), "idle").await.unwrap());
    assert!(w.acquire(&usd("a", "1")).await.unwrap().allowed());
    let r = w
        .reserve(&usd("a", "2"), None)
        .await
        .unwrap()
        .reservation
        .unwrap();
    for round in 0..3 {
        // A server `timeout`, a proxy or an operator closes every client.
        let killed: u32 = cli(servers.port(), &["CLIENT", "KILL", "TYPE", "normal"])
            .parse()
            .unwrap();
        assert!(killed >= 1, "our connection was there to kill");
        let d = match round {
            0 => w.acquire(&usd("a", "1")).await.unwrap(),
            1 => w.check(&usd("a", "1")).await.unwrap(),
            _ => {
                let receipt = w.commit(r.id, &Cost::new()).await.unwrap();
                assert!(!receipt.duplicate);
                w.check(&usd("a", "0")).await.unwrap()
            }
        };
        assert!(d.allowed() && d.degraded.is_none(), "round {round}: {d:?}");
    }
    // 1 + 1 acquired, 2 reserved then committed: exactly 4, nothing twice.
    assert_eq!(left(&w, "a").await, (6_000_000, 997));
}

/// Two tenants whose keys live on different masters, with those masters' ports.
fn tenants_on_two_nodes(ports: &[u16], ns: &str) -> [(String, u16); 2] {
    let owner = |key: &str| {
        *ports
            .iter()
            .find(|p| matches!(cli(**p, &["EXISTS", key]).as_str(), "0" | "1"))
            .unwrap()
    };
    let home = |t: &str| owner(&format!("{ns}:{{tenant:{t}}}:x"));
    let a = ("t0".to_owned(), home("t0"));
    let b = (1..)
        .map(|i| format!("t{i}"))
        .find_map(|t| {
            let p = home(&t);
            (p != a.1).then_some((t, p))
        })
        .unwrap();
    [a, b]
}

#[tokio::test(flavor = "current_thread")]
async fn a_slow_cluster_node_degrades_only_its_own_slots_and_settles_still_go_through() {
    let servers = RedisServers::start(true);
    let ports: Vec<u16> = servers
        .cluster_nodes()
        .iter()
        .map(|n| n.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    let [(slow, slow_port), (fine, _)] = tenants_on_two_nodes(&ports, "slow");
    // The test clock decides how long a timed-out node is skipped: it stays
    // skipped until the clock moves, however slow this machine is.
    let clock = ratewarden::ManualClock::at_date(2026, 3, 2);
    let backend = RedisBackend::connect(servers.cluster_url(), "slow")
        .await
        .unwrap()
        .timeout(Duration::from_millis(150))
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    let w = warden(backend);
    let held = w
        .reserve(&usd(&slow, "1"), None)
        .await
        .unwrap()
        .reservation
        .unwrap();
    assert!(w.acquire(&usd(&fine, "1")).await.unwrap().allowed());

    // A tenant on the same master as `slow`, on another slot.
    let neighbour = (0..)
        .map(|i| format!("n{i}"))
        .find(|t| {
            let key = format!("slow:{{tenant:{t}}}:x");
            cli(slow_port, &["CLUSTER", "KEYSLOT", &key])
                != cli(
                    slow_port,
                    &["CLUSTER", "KEYSLOT", &format!("slow:{{tenant:{slow}}}:x")],
                )
                && matches!(cli(slow_port, &["EXISTS", &key]).as_str(), "0" | "1")
        })
        .unwrap();
    assert_eq!(cli(slow_port, &["CLIENT", "PAUSE", "10000", "ALL"]), "OK");
    let d = w.acquire(&usd(&slow, "1")).await.unwrap();
    assert_eq!(d.degraded, Some(Degraded::Deny), "{d:?}");
    // The other master answers as ever, right after the timeout.
    for _ in 0..5 {
        let d = w.acquire(&usd(&fine, "1")).await.unwrap();
        assert!(d.allowed() && d.degraded.is_none(), "{d:?}");
    }
    // The slow node is skipped for a moment, for every slot it serves: no
    // second wait, neither for this tenant nor for another on that node.
    let neighbour = &neighbour;

    for tenant in [&slow, neighbour] {
        let d = w.acquire(&usd(tenant, "1")).await.unwrap();
        assert!(
            d.reason.as_deref().unwrap().contains("not asked again yet"),
            "{tenant}: {d:?}"
        );
    }
    assert_eq!(cli(slow_port, &["CLIENT", "UNPAUSE"]), "OK");
    // A commit right after the node recovers is sent, not refused by the pause.
    let receipt = w.commit(held.id, &Cost::new()).await.unwrap();
    assert_eq!(receipt.charges.len(), 2);
    assert_eq!(left(&w, &fine).await, (4_000_000, 994));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_kill_storm_misreports_nothing() {
    let servers = RedisServers::start(false);
    let clock = ratewarden::ManualClock::at_date(2026, 3, 2);
    let backend = RedisBackend::connect(servers.url(), "storm")
        .await
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    let w = warden(backend);
    let port = servers.port();
    // Fault injection: every normal client killed, 60 times, a few ms apart.
    let killer = std::thread::spawn(move || {
        for _ in 0..60 {
            cli(port, &["CLIENT", "KILL", "TYPE", "normal"]);
            std::thread::sleep(Duration::from_millis(3));
        }
    });
    let mut tasks = Vec::new();
    for t in 0..8 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let (mut admitted, mut unconfirmed, mut refused) = (0_i64, Vec::new(), 0_i64);
            for _ in 0..150 {
                let d = w.acquire(&usd(&format!("s{}", t % 2), "0")).await.unwrap();
                match (d.allowed(), d.degraded, d.unconfirmed) {
                    (true, None, None) => admitted += 1,
                    (false, Some(Degraded::Deny), Some(op)) => unconfirmed.push(op),
                    (false, Some(Degraded::Deny), None) => refused += 1,
                    other => panic!("unexpected {other:?}: {d:?}"),
                }
            }
            (t % 2, admitted, unconfirmed, refused)
        }));
    }
    let mut admitted = [0_i64; 2];
    let mut lost = [Vec::new(), Vec::new()];
    for t in tasks {
        let (tenant, a, u, _) = t.await.unwrap();
        admitted[tenant] += a;
        lost[tenant].extend(u);
    }
    killer.join().unwrap();
    // Past the second in which a slot that timed out is not asked again.
    clock.advance(Duration::from_secs(2));
    for tenant in 0..2 {
        // Each lost answer, asked again under its id: applied once, or now.
        for op in &lost[tenant] {
            let d = w
                .acquire(&usd(&format!("s{tenant}"), "0").operation(*op))
                .await
                .unwrap();
            assert!(d.allowed() && d.degraded.is_none(), "{d:?}");
            admitted[tenant] += 1;
        }
        let (_, calls_left) = left(&w, &format!("s{tenant}")).await;
        assert_eq!(
            1000 - calls_left,
            admitted[tenant],
            "every charge is one its caller was told of (tenant {tenant}, {} answers lost)",
            lost[tenant].len()
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn operation_memory_is_one_key_per_admitted_decision_and_can_be_turned_off() {
    let servers = RedisServers::start(false);
    let port = servers.port();
    let on = warden(RedisBackend::connect(servers.url(), "on").await.unwrap());
    let off = warden(
        RedisBackend::connect(servers.url(), "off")
            .await
            .unwrap()
            .remember_operations(false),
    );
    let ops = |ns: &str| {
        cli(port, &["KEYS", &format!("{ns}:*:op:*")])
            .lines()
            .count()
    };
    for _ in 0..5 {
        assert!(on.acquire(&usd("a", "1")).await.unwrap().allowed());
        assert!(off.acquire(&usd("a", "1")).await.unwrap().allowed());
    }
    assert!(!on.acquire(&usd("a", "100")).await.unwrap().allowed());
    assert_eq!(
        (ops("on"), ops("off")),
        (5, 0),
        "denials are not remembered"
    );
    // A caller's own id is remembered either way.
    let op = ratewarden::OperationId::random();
    assert!(
        off.acquire(&usd("a", "1").operation(op))
            .await
            .unwrap()
            .allowed()
    );
    assert_eq!(ops("off"), 1);
    // Without the memory a killed connection is not retried: degraded, no id.
    cli(port, &["CLIENT", "KILL", "TYPE", "normal"]);
    let d = off.acquire(&usd("a", "1")).await.unwrap();
    assert_eq!(
        (d.degraded, d.unconfirmed),
        (Some(Degraded::Deny), None),
        "{d:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_settlement_whose_answer_is_lost_is_unconfirmed_and_lands_once() {
    use ratewarden::settle::{Charged, Settled};
    use ratewarden::{CallOutcome, Usage};
    let servers = RedisServers::start(false);
    let clock = ratewarden::ManualClock::at_date(2026, 3, 2);
    let backend = RedisBackend::connect(servers.url(), "settle")
        .await
        .unwrap()
        .timeout(Duration::from_millis(100))
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    let w = warden(backend);
    let d = w.reserve(&usd("a", "2.00"), None).await.unwrap();
    let id = d.reservation.unwrap().id;
    assert_eq!(left(&w, "a").await, (8_000_000, 999));

    // The commit reaches the server but its answer comes after the caller gave up.
    assert_eq!(
        cli(servers.port(), &["CLIENT", "PAUSE", "10000", "WRITE"]),
        "OK"
    );
    let actual = Cost::new().with("usd", Amount::parse("0.5").unwrap());
    let s = w.finish(id, CallOutcome::Ran(Usage::Actual(actual))).await;
    assert!(matches!(s.settled, Settled::Unconfirmed(_)), "{s:?}");
    assert_eq!(s.charged, Charged::Actual, "what it asked to charge");
    assert!(s.problem().unwrap().contains("not confirmed"), "{s:?}");
    assert_eq!(cli(servers.port(), &["CLIENT", "UNPAUSE"]), "OK");
    clock.advance(Duration::from_secs(1));
    // Whether it landed or not, settling again with the same usage charges
    // the actual exactly once (a commit is idempotent by reservation id).
    let before = left(&w, "a").await;
    assert!(
        before == (8_000_000, 999) || before == (9_500_000, 999),
        "{before:?}"
    );
    let actual = Cost::new().with("usd", Amount::parse("0.5").unwrap());
    let again = w.finish(id, CallOutcome::Ran(Usage::Actual(actual))).await;
    match again.settled {
        Settled::Committed(r) => assert_eq!(r.duplicate, before.0 == 9_500_000, "{r:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(left(&w, "a").await, (9_500_000, 999));
}
