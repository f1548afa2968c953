//! The whole accepted input range: every amount up to 2^53 − 1 against every
//! kind of limit, including oversized overage commits, decides exactly and the
//! same on every backend — never an overflow, a wrap or a panic.
//!
//! Runs on the embedded engine; with `RATEWARDEN_TEST_BACKEND` set, the
//! property test replays each case on that backend and on the embedded engine
//! side by side and requires identical decisions and receipts.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{now, remaining, warden, warden_at};
use proptest::prelude::*;
use ratewarden::amount::MAX_AMOUNT;
use ratewarden::{Amount, Cost, Decision, ManualClock, Outcome, Policy, Request, Warden};
use serde_json::json;

fn tokens_policy() -> serde_json::Value {
    json!({"resources": {"openai": {"limits": [
        {"name": "tpm", "kind": "rate", "unit": "tokens", "limit": 30000, "per": "1m"}
    ]}}, "scopes": {"tenant": {}}})
}

fn tokens(n: i64) -> Request {
    Request::parse("tenant:a")
        .unwrap()
        .resource("openai")
        .spend("tokens", n)
}

#[test]
fn a_cost_beyond_the_burst_is_denied_for_good_however_large() {
    let (w, _c) = warden(tokens_policy());
    for n in [30_001, 5_000_000_000_000_000, MAX_AMOUNT] {
        let d = now(w.acquire(&tokens(n))).unwrap();
        assert_eq!(d.outcome, Outcome::Deny, "{n} tokens admitted: {d:?}");
        assert_eq!(d.retry_after, None, "{n} tokens can never pass");
        assert_eq!(remaining(&d, "tpm"), 30_000);
    }
    let d = now(w.acquire(&tokens(30_000))).unwrap();
    assert!(d.allowed(), "the whole burst still passes: {d:?}");
}

#[test]
fn an_oversized_rate_overage_leaves_the_bucket_exhausted() {
    let (w, clock) = warden(tokens_policy());
    let d = now(w.reserve(&tokens(1_000), None)).unwrap();
    let id = d.reservation.unwrap().id;
    let r = now(w.commit(id, &Cost::new().with("tokens", 5_000_000_000_000_000_i64))).unwrap();
    assert_eq!(r.charges[0].charged, 5_000_000_000_000_000);
    for _ in 0..3 {
        let d = now(w.acquire(&tokens(1))).unwrap();
        assert_eq!(d.outcome, Outcome::Deny, "a wrapped bucket admitted: {d:?}");
        assert_eq!(remaining(&d, "tpm"), 0);
        assert!(d.retry_after.unwrap() > Duration::from_secs(365 * 24 * 3600));
        clock.advance(Duration::from_secs(3600));
    }
}

#[test]
fn counter_usage_saturates_instead_of_wrapping() {
    for kind in [
        json!({"kind": "budget"}),
        json!({"kind": "quota", "per": "day"}),
    ] {
        let mut limit = json!({"name": "b", "unit": "tokens", "limit": 1_000_000});
        limit
            .as_object_mut()
            .unwrap()
            .extend(kind.as_object().unwrap().clone());
        let (w, _c) = warden(json!({"scopes": {"tenant": {"limits": [limit]}}}));
        let req = || Request::parse("tenant:a").unwrap().spend("tokens", 1);
        // 1,025 open reservations, each committed at the largest amount: the
        // sum is far past i64, and the counter must stay exhausted.
        let ids: Vec<_> = (0..1_025)
            .map(|_| {
                now(w.reserve(&req(), None))
                    .unwrap()
                    .reservation
                    .unwrap()
                    .id
            })
            .collect();
        for id in ids {
            now(w.commit(id, &Cost::new().with("tokens", MAX_AMOUNT))).unwrap();
        }
        let d = now(w.acquire(&req())).unwrap();
        assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
        assert_eq!(remaining(&d, "b"), 0);
    }
}

// ---------------------------------------------------------------------------
// The property test: random policies and operations over the whole range.

/// Amounts that matter: 0, 1, the capacity ± 1, 2^53 − 1, and anything between.
fn amount_near(cap: i64) -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just((cap - 1).max(0)),
        Just(cap),
        Just((cap + 1).min(MAX_AMOUNT)),
        Just(MAX_AMOUNT),
        0..=cap.saturating_mul(2).min(MAX_AMOUNT),
        0..=MAX_AMOUNT,
    ]
}

#[derive(Debug, Clone)]
enum Kind {
    Rate { per_s: i64, burst: i64 },
    Quota { per: &'static str },
    Budget { per: Option<&'static str> },
    Concurrency,
}

#[derive(Debug, Clone)]
struct Limit {
    kind: Kind,
    limit: i64,
    overage_cap: bool,
}

impl Limit {
    fn json(&self, i: usize) -> serde_json::Value {
        let mut v = json!({"name": format!("l{i}"), "unit": "tokens", "limit": self.limit});
        match &self.kind {
            Kind::Rate { per_s, burst } => {
                v["kind"] = json!("rate");
                v["per"] = json!(format!("{per_s}s"));
                v["burst"] = json!(burst);
            }
            Kind::Quota { per } => {
                v["kind"] = json!("quota");
                v["per"] = json!(per);
            }
            Kind::Budget { per } => {
                v["kind"] = json!("budget");
                if let Some(p) = per {
                    v["per"] = json!(p);
                }
            }
            Kind::Concurrency => v["kind"] = json!("concurrency"),
        }
        if self.overage_cap {
            v["overage"] = json!("cap");
        }
        v
    }

    /// Largest amount this limit can admit at once.
    fn capacity(&self) -> i64 {
        match self.kind {
            Kind::Rate { burst, .. } => burst,
            _ => self.limit,
        }
    }
}

fn limit_strategy() -> impl Strategy<Value = Limit> {
    let big = prop_oneof![
        1..=10_i64,
        1..=100_000_i64,
        Just(MAX_AMOUNT),
        1..=MAX_AMOUNT
    ];
    let kind = prop_oneof![
        (1..=3_600_i64, 1..=1_000_000_i64).prop_map(|(per_s, burst)| Kind::Rate { per_s, burst }),
        prop_oneof![Just("minute"), Just("hour"), Just("day")].prop_map(|per| Kind::Quota { per }),
        prop_oneof![Just(None), Just(Some("day"))].prop_map(|per| Kind::Budget { per }),
        Just(Kind::Concurrency),
    ];
    (kind, big, any::<bool>()).prop_filter_map("rate not exact", |(kind, limit, overage_cap)| {
        let l = Limit {
            kind,
            limit,
            overage_cap,
        };
        // Only policies the loader accepts: it refuses rates it cannot track exactly.
        Policy::from_value(&json!({"scopes": {"tenant": {"limits": [l.json(0)]}}})).ok()?;
        Some(l)
    })
}

/// Longer than any case runs on the test clock (at most 24 hours), so records
/// are never forgotten: Redis forgets them by its own clock's key expiry,
/// which a test clock cannot move.
const LEASE: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Clone)]
enum Step {
    Acquire(i64),
    Reserve(i64),
    /// Commit the `n`-th open reservation (modulo) with this actual amount.
    Commit(usize, i64),
    Release(usize),
    Advance(u64),
}

fn steps(cap: i64) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        3 => amount_near(cap).prop_map(Step::Acquire),
        3 => amount_near(cap).prop_map(Step::Reserve),
        3 => (any::<usize>(), amount_near(cap)).prop_map(|(i, a)| Step::Commit(i, a)),
        1 => any::<usize>().prop_map(Step::Release),
        2 => prop_oneof![1..=1_000_u64, 1..=100_000_000_u64, Just(3_600_000_000)].prop_map(Step::Advance),
    ];
    proptest::collection::vec(step, 1..24)
}

/// What a step answered, in a form both backends must agree on.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Decision {
        outcome: Outcome,
        retry: Option<Duration>,
        limits: Vec<(String, i64, Duration, bool)>,
        reserved: bool,
    },
    Receipt(Vec<(String, i64, i64, i64)>),
    Released(bool),
    Error(String),
}

fn seen_decision(d: &Decision) -> Seen {
    Seen::Decision {
        outcome: d.outcome,
        retry: d.retry_after,
        limits: d
            .limits
            .iter()
            .map(|l| (l.name().to_owned(), l.remaining, l.reset, l.denied))
            .collect(),
        reserved: d.reservation.is_some(),
    }
}

async fn replay(w: &Warden, clock: &ManualClock, steps: &[Step]) -> Vec<Seen> {
    let req = |n: i64| Request::parse("tenant:a").unwrap().spend("tokens", n);
    let mut open = Vec::new();
    let mut out = Vec::new();
    for s in steps {
        let seen = match s {
            Step::Acquire(n) => match w.acquire(&req(*n)).await {
                Ok(d) => seen_decision(&d),
                Err(e) => Seen::Error(e.to_string()),
            },
            Step::Reserve(n) => match w.reserve(&req(*n), Some(LEASE)).await {
                Ok(d) => {
                    open.extend(d.reservation.as_ref().map(|r| r.id));
                    seen_decision(&d)
                }
                Err(e) => Seen::Error(e.to_string()),
            },
            Step::Commit(i, n) if !open.is_empty() => {
                let id = open.remove(i % open.len());
                match w
                    .commit(id, &Cost::new().with("tokens", Amount::units(*n)))
                    .await
                {
                    Ok(r) => Seen::Receipt(
                        r.charges
                            .iter()
                            .map(|c| (c.def.name.to_string(), c.reserved, c.charged, c.uncharged))
                            .collect(),
                    ),
                    Err(e) => Seen::Error(e.kind().to_string()),
                }
            }
            Step::Release(i) if !open.is_empty() => {
                let id = open.remove(i % open.len());
                match w.release(id).await {
                    Ok(b) => Seen::Released(b),
                    Err(e) => Seen::Error(e.kind().to_string()),
                }
            }
            Step::Commit(..) | Step::Release(_) => continue,
            Step::Advance(us) => {
                clock.advance(Duration::from_micros(*us));
                continue;
            }
        };
        out.push(seen);
    }
    out
}

/// Checks what holds on any backend: remaining never exceeds the capacity,
/// an admitted amount fits the capacity, nothing over capacity is ever admitted.
fn invariants(limits: &[Limit], steps: &[Step], seen: &[Seen]) {
    let cap: i64 = limits.iter().map(Limit::capacity).min().unwrap();
    let mut i = 0;
    for s in steps {
        let amount = match s {
            Step::Acquire(n) | Step::Reserve(n) => *n,
            _ => continue,
        };
        let Some(Seen::Decision {
            outcome,
            limits: ls,
            retry,
            ..
        }) = seen.get(i)
        else {
            break;
        };
        if amount > cap {
            assert_eq!(
                *outcome,
                Outcome::Deny,
                "{amount} > capacity {cap} admitted"
            );
            assert_eq!(*retry, None);
        }
        for (name, rem, _, _) in ls {
            let idx: usize = name[1..].parse().unwrap();
            assert!(*rem >= 0 && *rem <= limits[idx].limit.max(limits[idx].capacity()));
        }
        i += 1;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if common::test_backend().is_some() { 96 } else { 512 },
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_whole_range_decides_alike_everywhere(
        limits in proptest::collection::vec(limit_strategy(), 1..=3),
        steps in steps(MAX_AMOUNT).no_shrink(),
        near in steps(1_000),
    ) {
        let policy = json!({"scopes": {"tenant": {"limits":
            limits.iter().enumerate().map(|(i, l)| l.json(i)).collect::<Vec<_>>()
        }}});
        let cap = limits.iter().map(Limit::capacity).min().unwrap();
        // Amounts near the smallest capacity exercise the boundaries; the rest
        // the whole range.
        let steps: Vec<Step> = near
            .into_iter()
            .map(|s| match s {
                Step::Acquire(n) => Step::Acquire(n.min(cap.saturating_add(1)).min(MAX_AMOUNT)),
                other => other,
            })
            .chain(steps)
            .collect();
        let rt = runtime();
        let start = ManualClock::at_date(2026, 1, 15);
        let mem_clock = ManualClock::at_date(2026, 1, 15);
        let mem = Warden::with_clock(Policy::from_value(&policy).unwrap(), Arc::new(mem_clock.clone()));
        let on_mem = rt.block_on(replay(&mem, &mem_clock, &steps));
        invariants(&limits, &steps, &on_mem);
        if common::test_backend().is_some() {
            let (w, clock) = warden_at(policy, start);
            let on_backend = now(replay(&w, &clock, &steps));
            prop_assert_eq!(on_mem, on_backend);
        }
    }
}

proptest::proptest! {
    /// Retry bands never overlap: for any base (a Retry-After or an attempt's
    /// backoff) and any draws, every critical delay is below every standard
    /// one, and every standard below every background one.
    #[test]
    fn retry_bands_never_overlap(
        attempt in 0u32..100,
        retry_after_ms in proptest::option::of(0u64..(400 * 24 * 3600 * 1000)),
        draws in proptest::array::uniform3(0.0f64..1.0),
        edges in proptest::array::uniform3(proptest::prop_oneof![proptest::strategy::Just(0.0f64), proptest::strategy::Just(0.999_999_999_9f64), 0.0f64..1.0]),
    ) {
        use ratewarden::Priority;
        use ratewarden::retry::RetryBands;
        let bands = RetryBands::default();
        let ra = retry_after_ms.map(std::time::Duration::from_millis);
        for (a, b) in [(draws, edges), (edges, draws)] {
            let c = bands.delay_with(attempt, Priority::Critical, ra, a[0]);
            let s = bands.delay_with(attempt, Priority::Standard, ra, b[1]);
            let g = bands.delay_with(attempt, Priority::Background, ra, a[2]);
            proptest::prop_assert!(c < s && s < g, "{c:?} {s:?} {g:?}");
        }
    }
}
