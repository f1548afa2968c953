//! Model-based property tests: random operation sequences against the embedded
//! engine and against small independent reference models, compared step by step.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{now, remaining, warden};
use proptest::prelude::*;
use ratewarden::{Cost, Error, Request, ReservationId};
use serde_json::json;

// ------------------------------------------------------------------ GCRA

/// Textbook GCRA on a theoretical arrival time, in exact integers scaled by
/// `limit` (so the emission interval `period / limit` needs no rounding).
struct Gcra {
    limit: i128,
    period: i128,
    burst: i128,
    tat: i128, // scaled by limit
}

impl Gcra {
    /// Returns `None` if admitted, else `Some(retry_us)` (`Some(None)` = never).
    fn acquire(&mut self, now_us: i128, n: i128) -> Result<(), Option<i128>> {
        let now = now_us * self.limit;
        let start = self.tat.max(now);
        let new_tat = start + n * self.period;
        if n == 0 || new_tat - now <= self.burst * self.period {
            if n > 0 {
                self.tat = new_tat;
            }
            return Ok(());
        }
        if n > self.burst {
            return Err(None);
        }
        let excess = new_tat - now - self.burst * self.period; // scaled µs
        Err(Some((excess + self.limit - 1) / self.limit))
    }
}

#[derive(Debug, Clone)]
enum RateOp {
    Acquire(i64),
    Advance(u64),
}

fn rate_ops() -> impl Strategy<Value = Vec<RateOp>> {
    prop::collection::vec(
        prop_oneof![
            3 => (0i64..5).prop_map(RateOp::Acquire),
            2 => (0u64..400_000).prop_map(RateOp::Advance),
        ],
        1..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn gcra_matches_the_reference_model(
        limit in 1i64..50,
        period_ms in prop_oneof![Just(1000u64), Just(60_000), Just(7), Just(333)],
        burst in 1i64..12,
        ops in rate_ops(),
    ) {
        let (w, clock) = warden(json!({"scopes": {"user": {"limits": [
            {"name": "r", "kind": "rate", "limit": limit, "per": format!("{period_ms}ms"), "burst": burst}
        ]}}}));
        let start = ratewarden::Clock::now(&clock);
        let mut model = Gcra { limit: i128::from(limit), period: i128::from(period_ms) * 1000, burst: i128::from(burst), tat: 0 };
        for op in ops {
            match op {
                RateOp::Advance(us) => clock.advance(Duration::from_micros(us)),
                RateOp::Acquire(n) => {
                    let t = i128::from(ratewarden::Clock::now(&clock) - start);
                    let d = now(w.acquire(&Request::parse("user:1").unwrap().spend("requests", n))).unwrap();
                    match model.acquire(t, i128::from(n)) {
                        Ok(()) => prop_assert!(d.allowed(), "model admits {n} at {t}: {d:?}"),
                        Err(retry) => {
                            prop_assert!(!d.allowed(), "model denies {n} at {t}");
                            let got = d.retry_after.map(|r| i128::try_from(r.as_micros()).unwrap());
                            prop_assert_eq!(got, retry.map(|r| r.max(1)), "retry_after for {} at {}", n, t);
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ budget with leases

#[derive(Debug, Clone)]
enum BudgetOp {
    Acquire(i64),
    Reserve(i64, u64),
    Commit(usize, i64),
    Release(usize),
    Extend(usize, u64),
    Advance(u64),
}

fn budget_ops() -> impl Strategy<Value = Vec<BudgetOp>> {
    prop::collection::vec(
        prop_oneof![
            2 => (0i64..6).prop_map(BudgetOp::Acquire),
            3 => (0i64..6, 1u64..20).prop_map(|(n, l)| BudgetOp::Reserve(n, l)),
            2 => (0usize..8, 0i64..9).prop_map(|(i, a)| BudgetOp::Commit(i, a)),
            1 => (0usize..8).prop_map(BudgetOp::Release),
            1 => (0usize..8, 1u64..20).prop_map(|(i, l)| BudgetOp::Extend(i, l)),
            2 => (0u64..15).prop_map(BudgetOp::Advance),
        ],
        1..150,
    )
}

/// A lifetime budget with leased reservations, overage charged.
struct Budget {
    cap: i64,
    used: i64,
    live: BTreeMap<usize, (i64, i64)>, // reservation index -> (amount, expires s)
    ended: BTreeMap<usize, &'static str>,
}

impl Budget {
    fn purge(&mut self, t: i64) {
        let expired: Vec<usize> = self
            .live
            .iter()
            .filter(|(_, (_, e))| *e <= t)
            .map(|(i, _)| *i)
            .collect();
        for i in expired {
            self.live.remove(&i);
            self.ended.insert(i, "expired");
        }
    }
    fn held(&self) -> i64 {
        self.live.values().map(|(a, _)| a).sum()
    }
    fn admits(&self, n: i64) -> bool {
        n == 0 || self.used + self.held() + n <= self.cap
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn budget_matches_the_reference_model(cap in 1i64..25, ops in budget_ops(), rule in 0usize..5, od in 0i64..10) {
        let overage = ["charge", "cap", "reject", "allow_if_available", "allow_with_overdraft"][rule];
        let mut limit = json!({"name": "b", "kind": "budget", "unit": "tokens", "limit": cap, "overage": overage});
        if overage == "allow_with_overdraft" {
            limit["overdraft"] = json!(od);
        }
        let (w, clock) = warden(json!({"scopes": {"tenant": {"limits": [limit]}}}));
        let mut m = Budget { cap, used: 0, live: BTreeMap::new(), ended: BTreeMap::new() };
        let mut ids: Vec<ReservationId> = Vec::new();
        let mut t = 0i64;
        let req = |n: i64| Request::parse("tenant:a").unwrap().spend("tokens", n);
        for op in ops {
            m.purge(t);
            match op {
                BudgetOp::Advance(s) => {
                    clock.advance(Duration::from_secs(s));
                    t += i64::try_from(s).unwrap();
                }
                BudgetOp::Acquire(n) => {
                    let d = now(w.acquire(&req(n))).unwrap();
                    prop_assert_eq!(d.allowed(), m.admits(n));
                    if d.allowed() { m.used += n; }
                    prop_assert_eq!(remaining(&d, "b"), (m.cap - m.used - m.held()).max(0));
                }
                BudgetOp::Reserve(n, lease) => {
                    let d = now(w.reserve(&req(n), Some(Duration::from_secs(lease)))).unwrap();
                    prop_assert_eq!(d.allowed(), m.admits(n));
                    if let Some(r) = &d.reservation {
                        m.live.insert(ids.len(), (n, t + i64::try_from(lease).unwrap()));
                        ids.push(r.id);
                    }
                    prop_assert_eq!(remaining(&d, "b"), (m.cap - m.used - m.held()).max(0));
                }
                BudgetOp::Commit(i, actual) => {
                    let Some(id) = ids.get(i).copied() else { continue };
                    let got = now(w.commit(id, &Cost::new().with("tokens", actual)));
                    if let Some(&(amount, _)) = m.live.get(&i) {
                        // What each overage rule charges of an actual over the reservation.
                        let room = m.cap - m.used - (m.held() - amount);
                        let charged = match overage {
                            _ if actual <= amount => actual,
                            "cap" => amount,
                            "reject" => {
                                let e = got.unwrap_err();
                                prop_assert_eq!(e.code(), "overage_rejected");
                                continue;
                            }
                            "allow_if_available" => actual.min(room).max(amount),
                            "allow_with_overdraft" => actual.min(room + od).max(amount),
                            _ => actual,
                        };
                        let r = got.unwrap();
                        prop_assert_eq!((r.charges[0].charged, r.charges[0].uncharged), (charged, actual - charged));
                        // The debt it reports: how far past the room it charged
                        // (measured by the rules that look at the room).
                        let into_debt = match overage {
                            "charge" | "allow_if_available" | "allow_with_overdraft" if actual > amount => (charged - room.max(0)).max(0),
                            _ => 0,
                        };
                        prop_assert_eq!(r.charges[0].debt, into_debt);
                        m.live.remove(&i);
                        m.used += charged;
                        m.ended.insert(i, "committed");
                        // remaining = limit − spent − held − debt, debt within the rule.
                        let debt = (m.used - m.cap).max(0);
                        match overage {
                            "cap" | "reject" | "allow_if_available" => prop_assert!(m.used + m.held() <= m.cap),
                            "allow_with_overdraft" => prop_assert!(m.used + m.held() <= m.cap + od),
                            _ => {}
                        }
                        let spent = m.used.min(m.cap);
                        let d = now(w.check(&req(0))).unwrap();
                        prop_assert_eq!(remaining(&d, "b"), (m.cap - spent - m.held() - debt).max(0));
                    } else {
                        match (m.ended.get(&i).copied(), got) {
                            (Some("committed"), Ok(r)) => prop_assert!(r.duplicate),
                            (Some("released"), Err(Error::ReservationClosed { .. })) => {}
                            (Some("expired"), Err(Error::ReservationExpired { .. })) => {}
                            (state, got) => prop_assert!(false, "commit of {:?} reservation gave {:?}", state, got),
                        }
                    }
                }
                BudgetOp::Release(i) => {
                    let Some(id) = ids.get(i).copied() else { continue };
                    let got = now(w.release(id));
                    if m.live.remove(&i).is_some() {
                        prop_assert!(got.unwrap());
                        m.ended.insert(i, "released");
                    } else {
                        match (m.ended.get(&i).copied(), got) {
                            (Some("committed"), Err(Error::ReservationClosed { .. })) => {}
                            (Some("released" | "expired"), Ok(false)) => {}
                            (state, got) => prop_assert!(false, "release of {:?} reservation gave {:?}", state, got),
                        }
                    }
                }
                BudgetOp::Extend(i, lease) => {
                    let Some(id) = ids.get(i).copied() else { continue };
                    let got = now(w.extend(id, Duration::from_secs(lease)));
                    if let Some(entry) = m.live.get_mut(&i) {
                        prop_assert!(got.is_ok());
                        entry.1 = t + i64::try_from(lease).unwrap();
                    } else {
                        prop_assert!(got.is_err());
                    }
                }
            }
        }
        m.purge(t);
        let d = now(w.check(&req(0))).unwrap();
        prop_assert_eq!(remaining(&d, "b"), (m.cap - m.used - m.held()).max(0), "final books");
    }
}
