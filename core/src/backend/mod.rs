//! The storage backend contract.
//!
//! A [`Backend`] owns the state of every limit and makes each decision
//! atomically: one [`Op`] in, one [`Reply`] out, one call. The embedded
//! [`MemoryBackend`] answers synchronously ([`Pending::Ready`]); a networked
//! backend (Redis) returns a future that performs exactly one round trip.
//! The meaning of every op is fixed by the conformance tests, not by a backend.

use std::future::Future;
use std::pin::Pin;

use crate::clock::Micros;
use crate::decision::{CommitReceipt, Decision, ReservationId};
use crate::error::Result;
use crate::plan::Plan;
use crate::scope::Scope;

mod memory;
mod redis;

pub use memory::{MemoryBackend, MemoryStats};
pub use redis::{KeyState, OnBackendError, RedisBackend};

/// One operation for a backend.
#[derive(Debug)]
pub enum Op<'a> {
    /// Evaluate without changing anything.
    Check(&'a Plan<'a>),
    /// Evaluate and, if allowed, consume now.
    Acquire(&'a Plan<'a>),
    /// Evaluate and, if allowed, hold the amounts under `id` until `lease` µs from now.
    Reserve {
        /// The request.
        plan: &'a Plan<'a>,
        /// The new reservation's id.
        id: ReservationId,
        /// Lease length, µs.
        lease: Micros,
    },
    /// Charge the actual amounts of a reservation and end it. Units absent from
    /// `actual` are charged at their reserved amount.
    Commit {
        /// The policy in force (names the limits in the receipt).
        policy: &'a crate::Policy,
        /// The reservation.
        id: ReservationId,
        /// Actual usage per unit, base units.
        actual: &'a [(&'a str, i64)],
    },
    /// End a reservation (or delegation), returning everything it holds.
    Release {
        /// The reservation.
        id: ReservationId,
    },
    /// Renew a reservation's lease to `lease` µs from now.
    Extend {
        /// The reservation.
        id: ReservationId,
        /// New lease length, µs.
        lease: Micros,
    },
    /// Carve a sub-budget for `child` out of a parent scope (`plan`, holding
    /// `amounts` on its limits) or out of an existing reservation (`from`).
    Delegate {
        /// Plan over the parent scope's own limits (used when `from` is `None`).
        plan: &'a Plan<'a>,
        /// Carve from this reservation instead of from the parent's free capacity.
        from: Option<ReservationId>,
        /// The sub-agent's scope (a strict descendant of the parent's).
        child: &'a Scope,
        /// The delegation's id (it is a reservation).
        id: ReservationId,
        /// Lease length, µs.
        lease: Micros,
    },
}

/// The answer to an [`Op`].
#[derive(Debug, Clone)]
pub enum Reply {
    /// For check, acquire, reserve and delegate.
    Decision(Decision),
    /// For commit.
    Committed(CommitReceipt),
    /// For release: `true` if this call released it, `false` if it was already released.
    Released(bool),
    /// For extend: the new expiry, µs since the epoch.
    Extended(Micros),
}

/// A backend's answer: already computed, or a future to await.
pub enum Pending<'a> {
    /// Computed synchronously (embedded engine).
    Ready(Result<Reply>),
    /// In flight (networked backends).
    Future(Pin<Box<dyn Future<Output = Result<Reply>> + Send + 'a>>),
}

impl Pending<'_> {
    /// Awaits the reply.
    ///
    /// # Errors
    /// Whatever the backend reports.
    pub async fn resolve(self) -> Result<Reply> {
        match self {
            Self::Ready(r) => r,
            Self::Future(f) => f.await,
        }
    }
}

/// Completes a future that needs no waiting — every embedded-engine operation is
/// one — on the calling thread, without an executor. Returns `None` if it would
/// have to wait (a networked backend), so callers can fall back to a runtime.
/// Bindings use it to answer embedded decisions without a thread hop.
pub fn poll_ready<F: Future>(future: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Storage and atomic evaluation of limits.
pub trait Backend: Send + Sync + 'static {
    /// Executes one operation atomically: every limit of the plan is evaluated
    /// and charged together or not at all.
    fn execute<'a>(&'a self, op: Op<'a>) -> Pending<'a>;

    /// A short name for logs and `Decision` provenance (`memory`, `redis`).
    fn name(&self) -> &'static str;
}
