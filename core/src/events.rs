//! Events: what a [`crate::Warden`] reports beside its decisions.
//!
//! Subscribe with [`crate::Warden::subscribe`]. Delivery never blocks or slows a
//! decision: events go into a bounded broadcast channel ([`CAPACITY`] per
//! subscriber), and a subscriber that falls behind loses the oldest ones (its
//! next `recv` reports how many, as `RecvError::Lagged`). With no subscriber,
//! nothing is kept.

use std::time::Duration;

use crate::clock::Micros;
use crate::decision::{Degraded, Outcome};

/// Events kept per subscriber before the oldest are dropped.
pub const CAPACITY: usize = 1024;

/// Something a warden reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The shared backend could not be asked: the first degraded decision after
    /// the backend was last answering (or since start).
    BackendUnavailable {
        /// Why, as the backend reported it.
        reason: String,
        /// When (µs since the epoch, the warden's clock).
        at: Micros,
    },
    /// A decision was made without the shared backend (`on_backend_error`).
    /// Every such decision emits one; its [`crate::Decision::degraded`] says the same.
    DegradedDecision {
        /// Which fallback made it.
        mode: Degraded,
        /// The request's scope.
        scope: String,
        /// What was decided.
        outcome: Outcome,
        /// The decision's reason (includes the backend's error).
        reason: String,
        /// When (µs since the epoch, the warden's clock).
        at: Micros,
    },
    /// A governed call's settlement ([`crate::Warden::finish`]) did not go as
    /// reported: its actual usage could not be charged as given (the estimate
    /// was), or the backend refused or did not confirm the commit or release.
    SettlementProblem {
        /// The reservation.
        reservation: crate::decision::ReservationId,
        /// What went wrong, one line (as [`crate::settle::Settlement::problem`]).
        problem: String,
        /// When (µs since the epoch, the warden's clock).
        at: Micros,
    },
    /// An upstream response moved a coordinated resource's traffic light
    /// ([`crate::Warden::observe`], [`crate::Warden::report`]).
    UpstreamZone {
        /// The resource.
        resource: String,
        /// The zone before.
        from: crate::upstream::Zone,
        /// The zone now.
        to: crate::upstream::Zone,
        /// When (µs since the epoch, the backend's clock).
        at: Micros,
    },
    /// A coordinated resource's circuit breaker changed state (a reported
    /// response opened or closed it, or a request went as the half-open
    /// probe).
    Breaker {
        /// The resource.
        resource: String,
        /// The state before.
        from: crate::upstream::BreakerState,
        /// The state now.
        to: crate::upstream::BreakerState,
        /// When (µs since the epoch).
        at: Micros,
    },
    /// A coordinated resource switched sequential mode on (a burst of
    /// denials or reported failures) or off (its cooldown was over).
    Cascade {
        /// The resource.
        resource: String,
        /// On or off.
        on: bool,
        /// When (µs since the epoch).
        at: Micros,
    },
    /// A decision took a quota's or budget's spend (with what reservations
    /// hold) across one of its `thresholds` (below 100 %). Exactly one
    /// decision crosses each: the one whose atomic update did, in whichever
    /// process it ran.
    ThresholdCrossed(Box<Crossing>),
    /// A decision took a quota's or budget's spend to its whole capacity
    /// (the 100 % threshold).
    LimitExhausted(Box<Crossing>),
    /// The shared backend answered again after degraded decisions.
    BackendRecovered {
        /// How long decisions were degraded.
        after: Duration,
        /// When (µs since the epoch, the warden's clock).
        at: Micros,
    },
}

/// A threshold crossing ([`Event::ThresholdCrossed`], [`Event::LimitExhausted`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// Unique id of the event (random 128 bits, as 32 hex digits).
    pub id: String,
    /// Whose counter: the scope prefix (`tenant:acme`), or `None` for a
    /// pool shared by everyone.
    pub owner: Option<String>,
    /// The limit's name.
    pub limit: String,
    /// Its unit, and the amounts' decimals.
    pub unit: String,
    /// Decimals of `unit`: amounts are base units.
    pub decimals: u8,
    /// The threshold crossed, ‰ of the capacity.
    pub threshold: u16,
    /// The capacity, base units.
    pub capacity: i64,
    /// Spent and held before the decision, base units.
    pub before: i64,
    /// Spent and held after it.
    pub after: i64,
    /// When (µs since the epoch, the warden's clock).
    pub at: Micros,
}
