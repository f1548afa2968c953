//! Degraded mode as a composition: [`Fallback`] wraps any primary backend and
//! decides, when the primary cannot be asked, as `on_backend_error` says —
//! deny, allow, or on a local embedded engine with this node's share of each
//! limit. It knows nothing of Redis: any [`Backend`] whose failures are
//! [`Error::Backend`] / [`Error::Unconfirmed`] can be wrapped, and it is tested
//! alone with a primary that fails on demand.
//!
//! Reservations made while degraded live in the local engine and are settled
//! there; every other settle goes to the primary. The local engine reads the
//! clock it is given (the warden's), so tests drive degraded decisions too.

use std::sync::Arc;
use std::time::Duration;

use super::{Backend, MemoryBackend, Mode, Pending};
use crate::clock::{Clock, Micros};
use crate::decision::{Caps, CommitReceipt, Decision, Degraded, Outcome, ReservationId};
use crate::error::{Error, ErrorKind, Result};
use crate::plan::Plan;
use crate::policy::Policy;
use crate::upstream::Coordination;
use crate::upstream::light::{Ask, Gate, Observed, Sample, Ticket};

/// What a decision does when the shared backend cannot be asked (refused,
/// dropped, timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBackendError {
    /// Deny, marked [`Degraded::Deny`] (fail closed). The default.
    #[default]
    Deny,
    /// Allow without limits, marked [`Degraded::Allow`] (fail open).
    Allow,
    /// Decide on this process's embedded engine with `1/share` of every limit
    /// (e.g. `share: 4` when four nodes share the limits), marked
    /// [`Degraded::Local`]; the primary is asked again on the next decision.
    Local {
        /// Number of nodes the limits are split between (≥ 1).
        share: u32,
    },
}

impl OnBackendError {
    /// `deny`, `allow` or `local`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Allow => "allow",
            Self::Local { .. } => "local",
        }
    }
}

/// A primary backend, and what to do while it fails.
pub struct Fallback<B> {
    primary: B,
    mode: OnBackendError,
    /// Reservations made while degraded live here, and are settled here.
    local: MemoryBackend,
}

impl<B> std::fmt::Debug for Fallback<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Fallback<B> {
    /// Wraps `primary`; degraded local decisions read `clock`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `Local { share: 0 }`.
    pub fn new(primary: B, mode: OnBackendError, clock: Arc<dyn Clock>) -> Result<Self> {
        if mode == (OnBackendError::Local { share: 0 }) {
            return Err(Error::invalid(
                "on_backend_error",
                "local share must be at least 1",
            ));
        }
        Ok(Self {
            primary,
            mode,
            local: MemoryBackend::new(clock),
        })
    }

    /// The wrapped backend.
    #[must_use]
    pub const fn primary(&self) -> &B {
        &self.primary
    }

    /// The decision made without the primary, which failed with `err`.
    fn degraded(&self, plan: &Plan<'_>, mode: Mode<'_>, err: &Error) -> Result<Decision> {
        let unconfirmed = match err {
            Error::Unconfirmed { operation, .. } => Some(*operation),
            _ => None,
        };
        let (local_plan, marker, share) = match self.mode {
            OnBackendError::Deny => {
                return Ok(Decision {
                    outcome: Outcome::Deny,
                    caps: Caps::default(),
                    retry_after: Some(Duration::from_secs(1)),
                    limits: Vec::new(),
                    reason: Some(format!(
                        "the shared backend is unavailable ({err}); on_backend_error = deny"
                    )),
                    reservation: None,
                    priority: plan.priority(),
                    degraded: Some(Degraded::Deny),
                    unconfirmed,
                    light: None,
                });
            }
            OnBackendError::Allow => (plan.unlimited(), Degraded::Allow, 1),
            OnBackendError::Local { share } => (
                plan.scaled(i64::from(share)),
                Degraded::Local,
                i64::from(share),
            ),
        };
        let mut d = self.local.decide_sync(&local_plan, mode)?;
        for l in &mut d.limits {
            l.remaining /= share;
            l.amount /= share;
        }
        d.degraded = Some(marker);
        d.unconfirmed = unconfirmed;
        let why = format!(
            "decided without the shared backend ({err}); on_backend_error = {}",
            marker.as_str()
        );
        d.reason = Some(d.reason.map_or(why.clone(), |r| format!("{r}; {why}")));
        Ok(d)
    }

    /// The primary's answer, or the degraded decision when it failed.
    fn or_degrade(&self, plan: &Plan<'_>, mode: Mode<'_>, r: Result<Decision>) -> Result<Decision> {
        match r {
            Err(e) if e.kind() == ErrorKind::Backend => self.degraded(plan, mode, &e),
            other => other,
        }
    }
}

impl<B: Backend> Backend for Fallback<B> {
    fn decide<'a>(&'a self, plan: &'a Plan<'a>, mode: Mode<'a>) -> Pending<'a, Decision> {
        match self.primary.decide(plan, mode) {
            Pending::Ready(r) => Pending::Ready(self.or_degrade(plan, mode, r)),
            Pending::Future(f) => {
                Pending::Future(Box::pin(
                    async move { self.or_degrade(plan, mode, f.await) },
                ))
            }
        }
    }

    fn commit<'a>(
        &'a self,
        policy: &'a Policy,
        id: ReservationId,
        actual: &'a [(&'a str, i64)],
    ) -> Pending<'a, CommitReceipt> {
        if self.local.knows(id) {
            self.local.commit(policy, id, actual)
        } else {
            self.primary.commit(policy, id, actual)
        }
    }

    fn release(&self, id: ReservationId) -> Pending<'_, bool> {
        if self.local.knows(id) {
            self.local.release(id)
        } else {
            self.primary.release(id)
        }
    }

    fn extend(&self, id: ReservationId, lease: Micros) -> Pending<'_, Micros> {
        if self.local.knows(id) {
            self.local.extend(id, lease)
        } else {
            self.primary.extend(id, lease)
        }
    }

    fn name(&self) -> &'static str {
        self.primary.name()
    }

    // The upstream's state: while the primary cannot be asked, this process
    // observes and gates on its own engine (what it saw itself during the
    // outage; nothing known is the unknown zone, which passes) — the limits'
    // own degraded decision still follows `on_backend_error`.
    fn observe<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        sample: &'a Sample,
    ) -> Pending<'a, Observed> {
        or_local(
            self.primary.observe(resource, coordination, sample),
            move || self.local.observe(resource, coordination, sample),
        )
    }

    fn gate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ask: Ask,
    ) -> Pending<'a, Gate> {
        or_local(self.primary.gate(resource, coordination, ask), move || {
            self.local.gate(resource, coordination, ask)
        })
    }

    fn changes(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.primary.changes()
    }

    fn ping(&self) -> Pending<'_, ()> {
        self.primary.ping()
    }

    fn credit<'a>(
        &'a self,
        limit: &'a crate::plan::PlannedLimit<'a>,
        amount: i64,
    ) -> Pending<'a, (i64, i64)> {
        // The shared books only: a top-up while Redis is down is an error.
        self.primary.credit(limit, amount)
    }

    fn append_events<'a>(
        &'a self,
        key: &'a str,
        max_len: u64,
        entries: &'a [crate::sink::Entry],
    ) -> Pending<'a, ()> {
        self.primary.append_events(key, max_len, entries)
    }

    fn publish_events<'a>(
        &'a self,
        channel: &'a str,
        entries: &'a [crate::sink::Entry],
    ) -> Pending<'a, ()> {
        self.primary.publish_events(channel, entries)
    }

    fn allot<'a>(
        &'a self,
        limit: &'a crate::plan::PlannedLimit<'a>,
        op: super::AllotOp<'a>,
    ) -> Pending<'a, i64> {
        // While the primary is down, decisions run on the local engine: the
        // allocation is recorded there too, so local decisions honour it.
        or_local(self.primary.allot(limit, op), move || {
            self.local.allot(limit, op)
        })
    }

    fn line<'a>(&'a self, resource: &'a str, holder: u128, op: super::LineOp) -> Pending<'a, i64> {
        or_local(self.primary.line(resource, holder, op), move || {
            self.local.line(resource, holder, op)
        })
    }

    fn ungate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ticket: Ticket,
    ) -> Pending<'a, bool> {
        or_local(
            self.primary.ungate(resource, coordination, ticket),
            move || self.local.ungate(resource, coordination, ticket),
        )
    }

    fn stats(&self) -> Option<super::MemoryStats> {
        self.primary.stats()
    }
}

/// The primary's answer, or — when it cannot be asked — the local engine's.
fn or_local<'a, T: Send + 'a>(
    primary: Pending<'a, T>,
    local: impl FnOnce() -> Pending<'a, T> + Send + 'a,
) -> Pending<'a, T> {
    match primary {
        Pending::Ready(Err(e)) if e.kind() == ErrorKind::Backend => local(),
        Pending::Ready(r) => Pending::Ready(r),
        Pending::Future(f) => Pending::Future(Box::pin(async move {
            match f.await {
                Err(e) if e.kind() == ErrorKind::Backend => local().await,
                r => r,
            }
        })),
    }
}
