//! Soft allocations of a shared pool (issue 14 §3): `allocate`, `heartbeat`,
//! donation of an idle agent's share, critical overdraw, background below
//! its floor, renewal per window. Runs on the embedded engine and, with
//! `RATEWARDEN_TEST_BACKEND`, unchanged on Redis and Redis Cluster.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, remaining, warden};
use ratewarden::{Clock, Cost, ErrorKind, Priority, Request, Scope};
use serde_json::json;

/// A shared pool of 100 calls per minute on the `llm` resource, no floors
/// unless asked.
fn policy(floors: serde_json::Value) -> serde_json::Value {
    json!({
        "defaults": {"floors": floors},
        "scopes": {"agent": {"limits": []}, "task": {"limits": []}},
        "resources": {"llm": {"limits": [
            {"name": "pool", "kind": "quota", "limit": 100, "per": "minute"}
        ]}}
    })
}

fn no_floors() -> serde_json::Value {
    json!({"standard": 0, "background": 0})
}

fn agent(a: &str) -> Scope {
    Scope::parse(a).unwrap()
}

fn calls(n: i64) -> Cost {
    Cost::new().with("requests", n)
}

fn ask(who: &str, n: i64, p: Priority) -> Request {
    Request::parse(who)
        .unwrap()
        .resource("llm")
        .cost(calls(n))
        .priority(p)
}

fn admitted(w: &ratewarden::Warden, who: &str, n: i64, p: Priority) -> bool {
    now(w.acquire(&ask(who, n, p))).unwrap().allowed()
}

const LEASE: Duration = Duration::from_secs(10);

#[test]
fn an_allocation_is_kept_for_its_owner_and_critical_callers_may_overdraw() {
    let (w, clock) = warden(policy(no_floors()));
    // Start of a minute, so the test's steps stay in one window.
    clock.set((clock.now() / 60_000_000 + 1) * 60_000_000);
    let lease = Duration::from_secs(120);
    let a = now(w.allocate(&agent("agent:a"), "llm", &calls(30), lease)).unwrap();
    assert_eq!(a.pools, [("pool".to_owned(), 30)]);
    // Another standard agent sees 70, not 100.
    let d = now(w.acquire(&ask("agent:b", 71, Priority::Standard))).unwrap();
    assert!(!d.allowed());
    assert_eq!(remaining(&d, "pool"), 70, "{d:?}");
    assert!(admitted(&w, "agent:b", 60, Priority::Standard));
    // The owner (and a scope under it) draws on its own share first.
    assert!(admitted(&w, "agent:a/task:1", 25, Priority::Standard));
    // 10 free and 5 of a's share left: b gets the 10, not the 5.
    assert!(!admitted(&w, "agent:b", 11, Priority::Standard));
    assert!(admitted(&w, "agent:b", 10, Priority::Standard));
    assert!(!admitted(&w, "agent:b", 1, Priority::Background));
    // Critical overdraws a's last 5; the pool never passes its limit.
    assert!(admitted(&w, "agent:c", 5, Priority::Critical));
    assert!(!admitted(&w, "agent:a", 1, Priority::Critical));
    // A new window renews the share.
    clock.advance(Duration::from_secs(60));
    assert_eq!(now(w.heartbeat(&agent("agent:a"))).unwrap(), 1);
    assert!(!admitted(&w, "agent:b", 71, Priority::Standard));
    assert!(admitted(&w, "agent:a", 30, Priority::Standard));
}

#[test]
fn an_idle_agents_share_is_donated_to_standard_callers_then_freed_when_dead() {
    let (w, clock) = warden(policy(no_floors()));
    clock.set((clock.now() / 60_000_000 + 1) * 60_000_000);
    now(w.allocate(&agent("agent:a"), "llm", &calls(40), LEASE)).unwrap();
    assert!(admitted(&w, "agent:b", 60, Priority::Standard));
    // Active: nothing for b or a background caller.
    assert!(!admitted(&w, "agent:b", 1, Priority::Standard));
    // Heartbeats keep it active past its first lease.
    clock.advance(Duration::from_secs(8));
    assert_eq!(now(w.heartbeat(&agent("agent:a"))).unwrap(), 1);
    clock.advance(Duration::from_secs(8));
    assert!(!admitted(&w, "agent:b", 1, Priority::Standard));
    // No heartbeat for a lease: idle — standard callers draw on the
    // donation, background ones still may not.
    clock.advance(Duration::from_secs(3));
    assert!(!admitted(&w, "agent:c", 1, Priority::Background));
    assert!(admitted(&w, "agent:b", 15, Priority::Standard));
    // The owner comes back: active again with what is left (25).
    assert_eq!(now(w.heartbeat(&agent("agent:a"))).unwrap(), 1);
    assert!(!admitted(&w, "agent:b", 1, Priority::Standard));
    assert!(!admitted(&w, "agent:a", 26, Priority::Standard));
    assert!(admitted(&w, "agent:a", 5, Priority::Standard));
    // Two leases without a heartbeat: dead — free for everyone.
    clock.advance(Duration::from_secs(21));
    assert!(admitted(&w, "agent:c", 20, Priority::Background));
    assert_eq!(now(w.heartbeat(&agent("agent:a"))).unwrap(), 0);
}

#[test]
fn background_yields_below_its_floor_even_from_its_own_share() {
    let (w, clock) = warden(policy(json!({"standard": 0, "background": "30%"})));
    clock.set((clock.now() / 60_000_000 + 1) * 60_000_000);
    now(w.allocate(&agent("agent:a"), "llm", &calls(20), LEASE)).unwrap();
    assert!(admitted(&w, "agent:b", 60, Priority::Standard));
    // 40 left, 20 of them a's: background a may use its share only down to
    // the 30 % floor (70 usable - 60 used = 10).
    assert!(!admitted(&w, "agent:a", 11, Priority::Background));
    assert!(admitted(&w, "agent:a", 10, Priority::Background));
    assert!(admitted(&w, "agent:a", 10, Priority::Standard));
}

#[test]
fn allocations_are_validated_and_never_oversubscribe_the_pool() {
    let (w, _clock) = warden(policy(no_floors()));
    now(w.allocate(&agent("agent:a"), "llm", &calls(60), LEASE)).unwrap();
    let e = now(w.allocate(&agent("agent:b"), "llm", &calls(41), LEASE)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("40 of 100 left to allocate"), "{e}");
    // Resizing one's own share counts only the others.
    now(w.allocate(&agent("agent:a"), "llm", &calls(100), LEASE)).unwrap();
    now(w.allocate(&agent("agent:a"), "llm", &calls(50), LEASE)).unwrap();
    now(w.allocate(&agent("agent:b"), "llm", &calls(50), LEASE)).unwrap();
    let bad = |a: &str, r: &str, c: Cost, lease: Duration, want: &str| {
        let e = now(w.allocate(&agent(a), r, &c, lease))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e} should say {want}");
    };
    bad("agent:c", "llm", calls(1), Duration::ZERO, "lease");
    bad(
        "agent:c",
        "llm",
        calls(1),
        Duration::from_secs(86_401),
        "at most a day",
    );
    bad("agent:c", "llm", calls(0), LEASE, "every amount positive");
    bad("agent:c", "llm", calls(-1), LEASE, "");
    bad("agent:c", "nope", calls(1), LEASE, "nope");
    let tokens = Cost::new().with("tokens", 5);
    bad("agent:c", "llm", tokens, LEASE, "no shared quota or budget");
    bad("user:c", "llm", calls(1), LEASE, "user");
    // Giving it up frees it at once.
    assert!(now(w.deallocate(&agent("agent:b"), "llm")).unwrap());
    assert!(!now(w.deallocate(&agent("agent:b"), "llm")).unwrap());
    now(w.allocate(&agent("agent:c"), "llm", &calls(50), LEASE)).unwrap();
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Step {
    Allocate {
        agent: usize,
        amount: i64,
        lease_s: u64,
    },
    Beat {
        agent: usize,
    },
    Drop {
        agent: usize,
    },
    Acquire {
        agent: usize,
        amount: i64,
        priority: Priority,
        reserve: bool,
    },
    Advance {
        ms: u64,
    },
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let priority = prop_oneof![
        Just(Priority::Critical),
        Just(Priority::Standard),
        Just(Priority::Background)
    ];
    prop_oneof![
        (0..3usize, 1..=100i64, 1..30u64).prop_map(|(agent, amount, lease_s)| Step::Allocate {
            agent,
            amount,
            lease_s
        }),
        (0..3usize).prop_map(|agent| Step::Beat { agent }),
        (0..3usize).prop_map(|agent| Step::Drop { agent }),
        (0..4usize, 0..=60i64, priority, any::<bool>()).prop_map(
            |(agent, amount, priority, reserve)| Step::Acquire {
                agent,
                amount,
                priority,
                reserve
            }
        ),
        (0..45_000u64).prop_map(|ms| Step::Advance { ms }),
    ]
}

const AGENTS: [&str; 4] = ["agent:a", "agent:b", "agent:c", "agent:d"];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Every backend decides as the rules in `pool.rs` on a model of the
    /// pool (a per-minute counter, the allocations, a 30 % background floor),
    /// over random allocations, heartbeats, drops, acquires and reserves of
    /// every tier, and time; and the pool never admits past its limit.
    #[test]
    fn every_backend_follows_the_pool_rules(steps in proptest::collection::vec(step(), 1..50)) {
        use ratewarden::backend::AllotOp;
        use ratewarden::pool::{self, Allotment};
        let (w, clock) = warden(policy(json!({"standard": "10%", "background": "30%"})));
        let mut allots: Vec<Allotment> = Vec::new();
        let (mut window, mut used) = (i64::MIN, 0i64);
        for s in steps {
            let t = clock.now();
            let wid = t.div_euclid(60_000_000);
            if wid != window {
                (window, used) = (wid, 0);
            }
            match s {
                Step::Allocate { agent, amount, lease_s } => {
                    let lease = Duration::from_secs(lease_s);
                    let got = now(w.allocate(&self::agent(AGENTS[agent]), "llm", &calls(amount), lease));
                    let want = pool::apply(
                        &mut allots,
                        AllotOp::Set { owner: AGENTS[agent], amount, lease: lease_s as i64 * 1_000_000 },
                        t,
                        100,
                    );
                    proptest::prop_assert_eq!(got.is_ok(), want.is_ok(), "{:?} vs {:?}", got, want);
                }
                Step::Beat { agent } => {
                    let got = now(w.heartbeat(&self::agent(AGENTS[agent]))).unwrap();
                    let want = pool::apply(&mut allots, AllotOp::Beat { owner: AGENTS[agent] }, t, 100).unwrap();
                    proptest::prop_assert_eq!(got, usize::from(want > 0));
                }
                Step::Drop { agent } => {
                    let got = now(w.deallocate(&self::agent(AGENTS[agent]), "llm")).unwrap();
                    let want = pool::apply(&mut allots, AllotOp::Drop { owner: AGENTS[agent] }, t, 100).unwrap();
                    proptest::prop_assert_eq!(got, want > 0);
                }
                Step::Acquire { agent, amount, priority, reserve } => {
                    let who = AGENTS[agent];
                    let r = ask(who, amount, priority);
                    let d = if reserve {
                        now(w.reserve(&r, None)).unwrap()
                    } else {
                        now(w.acquire(&r)).unwrap()
                    };
                    allots.retain(|a| a.phase(t) != pool::Phase::Dead);
                    let usable = match priority {
                        Priority::Critical => 100,
                        Priority::Standard => 90,
                        Priority::Background => 70,
                    };
                    let barred = pool::barred(&allots, who, priority, t, wid);
                    let allowed = amount == 0 || used + barred + amount <= usable;
                    proptest::prop_assert_eq!(d.allowed(), allowed, "{:?} at {} used {} barred {}", d, t, used, barred);
                    proptest::prop_assert_eq!(
                        remaining(&d, "pool"),
                        (100 - used - barred - if allowed { amount } else { 0 }).max(0)
                    );
                    if allowed && amount > 0 {
                        let free = pool::free(&allots, usable, used, 0, t, wid);
                        pool::draw(&mut allots, who, priority, amount, free, t, wid);
                        used += amount;
                        if let Some(res) = d.reservation {
                            // Commit at once: the hold becomes used, as counted.
                            now(w.commit(res.id, &Cost::new())).unwrap();
                        }
                    }
                    proptest::prop_assert!(used <= 100);
                }
                Step::Advance { ms } => clock.advance(Duration::from_millis(ms)),
            }
        }
    }
}
