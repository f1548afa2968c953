//! The settlement of a governed call: what is charged once a call that held a
//! reservation has run (or failed), decided once here for every binding's
//! decorator, wrapper and middleware ([`crate::Warden::finish`]).
//!
//! The rule:
//! - **The call failed** ([`CallOutcome::Failed`]): nothing was spent; the hold
//!   is released. The caller's error is the caller's to propagate: a release
//!   that fails is reported here, never raised in its place.
//! - **The call ran** ([`CallOutcome::Ran`]): its side effects happened (a paid
//!   LLM reply), so something is always charged:
//!   - the actual usage it reports, when every unit is known and every amount
//!     valid; an amount finer than its unit is **rounded up** to the next base
//!     unit (`0.0000025` usd → `0.000003`) — what was spent, never less;
//!   - otherwise (the report could not be read, names an unknown unit, is
//!     negative or over the largest amount) the **estimate** that was reserved.
//!
//!   The caller returns the call's result whatever the settlement says: a
//!   commit the backend did not confirm ([`Settled::Unconfirmed`]) may still
//!   have landed, so raising would invite a retry and a double spend.
//!
//! Whatever did not go as reported is in [`Settlement::problem`] (bindings
//! log it) and emitted as [`crate::Event::SettlementProblem`].

use crate::amount::Cost;
use crate::decision::{CommitReceipt, ReservationId};
use crate::error::Error;
use crate::plan::Amounts;
use crate::policy::Policy;

/// What a governed call reports having used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    /// As estimated: the reserved amounts are charged.
    Estimate,
    /// The actual usage (units left out are charged as reserved).
    Actual(Cost),
    /// The actual usage, priced by the resource's `pricing:`
    /// ([`crate::pricing`]) into its cost; when it cannot be priced, the
    /// estimate is charged and the reason reported.
    Priced {
        /// The priced resource.
        resource: String,
        /// What the call used.
        usage: crate::pricing::Usage,
    },
    /// The call ran but its usage could not be read (why: the caller's
    /// `actual` callback raised, returned something that is not a cost…). The
    /// estimate is charged and the reason reported.
    Unreadable(String),
}

/// How a governed call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// It ran (its side effects happened); it used this.
    Ran(Usage),
    /// It failed without spending anything: the hold is released.
    Failed,
}

/// What was charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charged {
    /// The reported actual usage, exactly.
    Actual,
    /// The reported actual usage, with amounts finer than their unit rounded up.
    RoundedUp,
    /// The reserved estimate (asked for, or the actual could not be used).
    Estimate,
    /// Nothing: the call failed and its hold was released (or the settlement
    /// was refused, see [`Settled`]).
    Nothing,
}

/// Where the reservation ended up.
#[derive(Debug)]
pub enum Settled {
    /// Committed; the receipt lists the charges.
    Committed(CommitReceipt),
    /// Released (`false`: it had already been released or had lapsed).
    Released(bool),
    /// The backend did not confirm the commit or release (it failed or timed
    /// out): it may have landed; if not, the hold ends with its lease.
    Unconfirmed(Error),
    /// The backend refused it: the reservation had lapsed, was already ended
    /// the other way, or is unknown. Nothing was charged by this settlement.
    Refused(Error),
}

/// The result of [`crate::Warden::finish`]. Never an error: the call it
/// settles has already happened; what went wrong is in [`Settlement::problem`].
#[derive(Debug)]
pub struct Settlement {
    /// The reservation settled.
    pub id: ReservationId,
    /// What was charged.
    pub charged: Charged,
    /// Where the reservation ended up.
    pub settled: Settled,
    /// Why the reported actual was not charged as given, when it was not.
    pub note: Option<String>,
}

impl Settlement {
    /// `true` when the backend confirmed the commit or release.
    #[must_use]
    pub const fn confirmed(&self) -> bool {
        matches!(self.settled, Settled::Committed(_) | Settled::Released(_))
    }

    /// One line saying what did not go as reported — the actual that could not
    /// be charged as given, a settlement the backend refused or did not
    /// confirm — or `None` when everything did. Rounding up is not a problem.
    #[must_use]
    pub fn problem(&self) -> Option<String> {
        let id = self.id;
        let outcome = match &self.settled {
            Settled::Committed(_) | Settled::Released(_) => None,
            Settled::Unconfirmed(e) => Some(format!(
                "reservation {id} was not confirmed settled ({e}); if it did not land, its hold ends with its lease"
            )),
            Settled::Refused(e) => Some(format!("reservation {id} could not be settled: {e}")),
        };
        match (&self.note, outcome) {
            (None, None) => None,
            (Some(n), None) => Some(format!("reservation {id}: {n}")),
            (None, Some(o)) => Some(o),
            (Some(n), Some(o)) => Some(format!("{o}; {n}")),
        }
    }
}

/// The amounts to commit for `usage` (empty: as reserved), what that charges,
/// and why the actual was not used when it was not.
pub(crate) fn charge_for<'c>(
    policy: &Policy,
    usage: &'c Usage,
) -> (Amounts<'c>, Charged, Option<String>) {
    let estimate = |why: String| {
        (
            Amounts::new(),
            Charged::Estimate,
            Some(format!("{why}; charged the estimate")),
        )
    };
    match usage {
        Usage::Estimate => (Amounts::new(), Charged::Estimate, None),
        Usage::Unreadable(why) => estimate(format!("the call's usage could not be read ({why})")),
        // Priced by the warden before it settles (`Warden::priced_outcome`).
        Usage::Priced { .. } => estimate("the call's usage was not priced".into()),
        Usage::Actual(cost) => {
            let mut out = Amounts::new();
            let mut rounded = false;
            for (unit, amount) in cost.iter() {
                let Some(def) = policy.unit(unit) else {
                    let e = Error::unknown("unit", unit, policy.units.keys().map(String::as_str));
                    return estimate(format!("the actual usage is invalid ({e})"));
                };
                match amount.to_base_ceil(unit, def.decimals) {
                    Ok((base, r)) => {
                        rounded |= r;
                        out.push((unit, base));
                    }
                    Err(e) => return estimate(format!("the actual usage is invalid ({e})")),
                }
            }
            let charged = if rounded {
                Charged::RoundedUp
            } else {
                Charged::Actual
            };
            (out, charged, None)
        }
    }
}
