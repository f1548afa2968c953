//! The arithmetic of each limit kind, as pure integer functions, and the
//! assembly of a [`Decision`] from per-limit results.
//!
//! Backends own the state and the atomicity; this module owns the meaning, so
//! every backend (and the Redis scripts, which mirror these formulas) answers
//! identically. All values stay within ±2^53.

use std::time::Duration;

use crate::amount::MAX_AMOUNT;
use crate::clock::{Micros, duration};
use crate::decision::{Caps, Decision, LimitState, Outcome, ReservationInfo};
use crate::plan::{Plan, PlannedLimit};
use std::sync::Arc;

use crate::policy::RateSpec;
use crate::priority::Priority;

/// The result of evaluating one limit for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemEval {
    /// Whether this limit admits the request.
    pub allowed: bool,
    /// What remains after the request (if admitted) or now (if not), base units, ≥ 0.
    pub remaining: i64,
    /// Microseconds until the limit is fully available again.
    pub reset: Micros,
    /// When denied: microseconds until a retry can succeed; `None` = never.
    pub retry: Option<Micros>,
    /// Held now by live reservations, delegations and concurrency slots,
    /// base units (0 for rates, whose reservations charge at once).
    pub held: i64,
}

/// `ceil(a / b)` for `a ≥ 0`, `b > 0` (stable-Rust stand-in for signed `div_ceil`).
#[must_use]
pub const fn ceil_div(a: i64, b: i64) -> i64 {
    if a <= 0 { 0 } else { (a - 1) / b + 1 }
}

/// GCRA debt at `now` given the debt recorded at `at`.
#[must_use]
pub fn rate_debt_now(spec: &RateSpec, debt: i64, at: Micros, now: Micros) -> i64 {
    if debt <= 0 || now <= at {
        return debt.max(0);
    }
    let elapsed = now - at;
    // elapsed * l could overflow 2^53 only if it exceeds debt, which we test first.
    if elapsed >= ceil_div(debt, spec.l) {
        0
    } else {
        debt - elapsed * spec.l
    }
}

/// The debt at `now` of a rate state written under a spec whose `p` and
/// `l` were `kept`, in `spec`'s terms: it drains at the pace it was written
/// under until `now`, then the units it still holds carry over, a part of
/// a unit counting as a whole one — a reloaded policy's new rate starts
/// from what was taken, in units, never from a debt measured in another
/// rate's time. Exact in the Lua scripts too: whole units times `p`,
/// saturated at [`crate::amount::MAX_AMOUNT`]. `kept` equal to `spec`'s
/// (every state but the first after a reload): [`rate_debt_now`].
#[must_use]
pub fn rate_debt_restated(
    spec: &RateSpec,
    debt: i64,
    at: Micros,
    kept: (i64, i64),
    now: Micros,
) -> i64 {
    if kept == (spec.p, spec.l) || kept.0 <= 0 || kept.1 <= 0 {
        return rate_debt_now(spec, debt, at, now);
    }
    let old = RateSpec {
        p: kept.0,
        l: kept.1,
        ..*spec
    };
    let units = ceil_div(rate_debt_now(&old, debt, at, now), kept.0);
    units
        .checked_mul(spec.p)
        .map_or(crate::amount::MAX_AMOUNT, |d| {
            d.min(crate::amount::MAX_AMOUNT)
        })
}

/// Evaluates a rate limit; returns the evaluation and the debt after admitting.
///
/// Exact over the whole accepted range: an amount above `usable` is refused
/// before any product is formed, and the admission test compares the debt with
/// the room the request leaves, `(usable − amount) × p` (≤ `burst × p` ≤ 2^53),
/// so no intermediate exceeds 2^53 even when the debt is at [`RATE_DEBT_MAX`].
#[must_use]
pub fn rate_eval(spec: &RateSpec, debt_now: i64, amount: i64, usable: i64) -> (ItemEval, i64) {
    let cap = spec.burst * spec.p;
    let (allowed, retry) = if amount == 0 {
        (true, None)
    } else if amount > usable {
        (false, None)
    } else {
        let room = (usable - amount) * spec.p;
        if debt_now <= room {
            (true, None)
        } else {
            (false, Some(ceil_div(debt_now - room, spec.l)))
        }
    };
    let debt_after = if allowed {
        debt_now + amount * spec.p
    } else {
        debt_now
    };
    let eval = ItemEval {
        allowed,
        remaining: ((cap - debt_after).max(0)) / spec.p,
        reset: ceil_div(debt_after, spec.l),
        retry,
        held: 0,
    };
    (eval, debt_after)
}

/// Largest debt a rate limit records: an overage commit beyond it saturates
/// here (the bucket is exhausted for centuries either way), so debts, like
/// every other stored value, stay within 2^53 − 1.
pub const RATE_DEBT_MAX: i64 = MAX_AMOUNT;

/// The debt after a commit changes a reservation's `reserved` amount to
/// `charged`: refunds lower it (never below zero), overage raises it up to
/// [`RATE_DEBT_MAX`].
#[must_use]
pub fn rate_settle(spec: &RateSpec, debt_now: i64, reserved: i64, charged: i64) -> i64 {
    let delta = (i128::from(charged) - i128::from(reserved)) * i128::from(spec.p);
    let after = (i128::from(debt_now) + delta).clamp(0, i128::from(RATE_DEBT_MAX));
    i64::try_from(after).unwrap_or(RATE_DEBT_MAX)
}

/// A counter's usage after adding `charged`: saturates at 2^53 − 1 (an
/// exhausted counter stays exhausted; it can never wrap).
#[must_use]
pub const fn counter_add(used: i64, charged: i64) -> i64 {
    let sum = used.saturating_add(charged);
    if sum > MAX_AMOUNT { MAX_AMOUNT } else { sum }
}

/// Earliest time (µs from now) at which holds expiring at `expiries` free at least `needed`.
fn time_to_free(needed: i64, now: Micros, holds: &mut [(Micros, i64)]) -> Option<Micros> {
    if needed <= 0 {
        return Some(0);
    }
    holds.sort_unstable_by_key(|h| h.0);
    let mut freed = 0;
    for &(exp, amount) in holds.iter() {
        freed += amount;
        if freed >= needed {
            return Some((exp - now).max(0));
        }
    }
    None
}

/// Evaluates a counter (quota / budget / concurrency) with `used` in the current
/// window, `held` by live reservations (listed in `holds` as `(expiry, amount)`,
/// consulted only to estimate the retry time of a denial), and the window end
/// (`None` when it never resets).
#[must_use]
#[allow(clippy::too_many_arguments)]
pub fn counter_eval(
    limit: i64,
    used: i64,
    held: i64,
    holds: &mut [(Micros, i64)],
    amount: i64,
    usable: i64,
    now: Micros,
    window_end: Option<Micros>,
) -> ItemEval {
    let allowed = amount == 0 || used + held + amount <= usable;
    let taken = if allowed { amount } else { 0 };
    let remaining = (limit - used - held - taken).max(0);
    let reset = window_end.map_or(0, |e| (e - now).max(0));
    let retry = if allowed || amount > usable {
        None
    } else {
        let by_holds = if used + amount <= usable {
            // Grouped as the scripts must group it (held ≤ usable keeps every
            // partial sum within 2^53, exact in a double).
            time_to_free((used + amount - usable) + held, now, holds)
        } else {
            None
        };
        let by_window = window_end.and_then(|end| {
            let after = time_to_free((amount - usable) + held, now, holds)?;
            Some(after.max(end - now))
        });
        match (by_holds, by_window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    ItemEval {
        allowed,
        remaining,
        reset,
        retry,
        held,
    }
}

/// Turns per-limit evaluations into a [`Decision`]. `evals[i]` belongs to `plan.get(i)`.
#[must_use]
pub fn assemble(
    plan: &Plan<'_>,
    evals: &[ItemEval],
    served: Priority,
    reservation: Option<ReservationInfo>,
) -> Decision {
    assemble_with(
        evals.len(),
        |i| (plan.get(i), &evals[i]),
        served,
        reservation,
    )
}

/// [`assemble`] over items a backend already resolved: `item(i)` gives the `i`-th
/// planned limit and its evaluation, for `i < len`.
pub fn assemble_with<'p, 'e>(
    len: usize,
    item: impl Fn(usize) -> (PlannedLimit<'p>, &'e ItemEval),
    served: Priority,
    reservation: Option<ReservationInfo>,
) -> Decision {
    let allowed = (0..len).all(|i| item(i).1.allowed);
    let mut caps = Caps::default();
    let mut cap_reason: Option<String> = None;
    let mut limits = Vec::with_capacity(len);
    let mut retry: Option<Micros> = Some(0);
    let mut reason = None;
    for i in 0..len {
        let (item, e) = item(i);
        let def = item.def;
        if !e.allowed {
            retry = match (retry, e.retry) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            if reason.is_none() {
                reason = Some(deny_reason(&item, e, served));
            }
        } else if allowed {
            for rule in &def.caps {
                let cap = i128::from(def.capacity());
                if i128::from(e.remaining) * 1000 < cap * i128::from(rule.below) {
                    caps.merge(&rule.caps);
                    cap_reason.get_or_insert_with(|| {
                        format!(
                            "{} `{}` ({}) has {} {} left",
                            def.kind.name(),
                            def.name,
                            item.owner_key(),
                            def.fmt_amount(e.remaining),
                            def.unit
                        )
                    });
                }
            }
        }
        // A limit that would have admitted the request reports what it would
        // have left after it (`remaining` net of the charge); when another
        // limit denied, nothing was charged: report its true state.
        let remaining = if !allowed && e.allowed {
            e.remaining.saturating_add(item.amount)
        } else {
            e.remaining
        };
        limits.push(LimitState {
            def: Arc::clone(def),
            scope_depth: item.scope_depth,
            remaining,
            reset: duration(e.reset),
            denied: !e.allowed,
            amount: item.amount,
            held: e.held,
        });
    }
    let (outcome, retry_after) = if !allowed {
        (
            Outcome::Deny,
            retry.map(|us| Duration::from_micros(us.max(1).unsigned_abs())),
        )
    } else if caps.is_empty() {
        (Outcome::Allow, None)
    } else {
        reason = cap_reason;
        (Outcome::AllowWithCaps, None)
    };
    Decision {
        outcome,
        caps: if outcome == Outcome::AllowWithCaps {
            caps
        } else {
            Caps::default()
        },
        retry_after,
        limits,
        reason,
        reservation: if allowed { reservation } else { None },
        priority: served,
        degraded: None,
        unconfirmed: None,
        light: None,
    }
}

fn deny_reason(item: &crate::plan::PlannedLimit<'_>, e: &ItemEval, served: Priority) -> String {
    let def = item.def;
    let what = format!("{} `{}` ({})", def.kind.name(), def.name, item.owner_key());
    let needs = format!("needs {} {}", def.fmt_amount(item.amount), def.unit);
    let usable = def.floors.usable(def.capacity(), served);
    if item.amount > usable {
        format!(
            "{what}: the request {needs}, more than the {} this limit can ever give {served} callers",
            def.fmt_amount(usable),
        )
    } else if e.retry.is_none() {
        format!(
            "{what}: the request {needs}, {} remain{} and nothing refills it (a lifetime budget, or a delegated grant)",
            def.fmt_amount(e.remaining),
            if e.remaining == 1 { "s" } else { "" },
        )
    } else {
        format!(
            "{what}: the request {needs}, {} of {} remain (priority {served})",
            def.fmt_amount(e.remaining),
            def.fmt_amount(def.capacity()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_ten_per_second_burst_five() {
        // 10/s, burst 5: g = gcd(1e6, 10) = 10, p = 100_000, l = 1.
        let spec = RateSpec {
            period: 1_000_000,
            burst: 5,
            p: 100_000,
            l: 1,
        };
        let mut debt = 0;
        for _ in 0..5 {
            let (e, d) = rate_eval(&spec, debt, 1, 5);
            assert!(e.allowed);
            debt = d;
        }
        let (e, _) = rate_eval(&spec, debt, 1, 5);
        assert!(!e.allowed);
        assert_eq!(e.retry, Some(100_000));
        assert_eq!(rate_debt_now(&spec, debt, 0, 100_000), 400_000);
        let (e, _) = rate_eval(&spec, debt, 6, 5);
        assert_eq!(e.retry, None);
    }
}
