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

impl Event {
    /// The event's type as webhooks and streams carry it
    /// (`limit.threshold_crossed`, `upstream.breaker_changed`…).
    #[must_use]
    pub const fn type_name(&self) -> &'static str {
        match self {
            Self::BackendUnavailable { .. } => "backend.unavailable",
            Self::DegradedDecision { .. } => "decision.degraded",
            Self::SettlementProblem { .. } => "settlement.problem",
            Self::UpstreamZone { .. } => "upstream.zone_changed",
            Self::Breaker { .. } => "upstream.breaker_changed",
            Self::Cascade { .. } => "upstream.cascade_changed",
            Self::ThresholdCrossed(_) => "limit.threshold_crossed",
            Self::LimitExhausted(_) => "limit.exhausted",
            Self::BackendRecovered { .. } => "backend.recovered",
        }
    }

    /// When it happened, µs since the epoch.
    #[must_use]
    pub fn at(&self) -> Micros {
        match self {
            Self::BackendUnavailable { at, .. }
            | Self::DegradedDecision { at, .. }
            | Self::SettlementProblem { at, .. }
            | Self::UpstreamZone { at, .. }
            | Self::Breaker { at, .. }
            | Self::Cascade { at, .. }
            | Self::BackendRecovered { at, .. } => *at,
            Self::ThresholdCrossed(c) | Self::LimitExhausted(c) => c.at,
        }
    }

    /// Its fields as JSON (`data` of a webhook message): amounts in base
    /// units beside their decimal text, times as µs since the epoch.
    #[must_use]
    pub fn data(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Self::BackendUnavailable { reason, .. } => json!({ "reason": reason }),
            Self::DegradedDecision {
                mode,
                scope,
                outcome,
                reason,
                ..
            } => json!({
                "mode": mode.as_str(), "scope": scope, "outcome": outcome.as_str(), "reason": reason
            }),
            Self::SettlementProblem {
                reservation,
                problem,
                ..
            } => json!({ "reservation": reservation.to_string(), "problem": problem }),
            Self::UpstreamZone {
                resource, from, to, ..
            } => {
                json!({ "resource": resource, "from": from.to_string(), "to": to.to_string() })
            }
            Self::Breaker {
                resource, from, to, ..
            } => {
                json!({ "resource": resource, "from": from.to_string(), "to": to.to_string() })
            }
            Self::Cascade { resource, on, .. } => json!({ "resource": resource, "sequential": on }),
            Self::ThresholdCrossed(c) | Self::LimitExhausted(c) => {
                let text = |v: i64| crate::amount::format_base(v, c.decimals);
                json!({
                    "event_id": c.id,
                    "owner": c.owner,
                    "limit": c.limit,
                    "unit": c.unit,
                    "threshold": f64::from(c.threshold) / 1000.0,
                    "capacity": c.capacity, "capacity_text": text(c.capacity),
                    "before": c.before, "before_text": text(c.before),
                    "after": c.after, "after_text": text(c.after),
                })
            }
            Self::BackendRecovered { after, .. } => {
                json!({ "degraded_for_ms": u64::try_from(after.as_millis()).unwrap_or(u64::MAX) })
            }
        }
    }
}
