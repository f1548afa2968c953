//! The storage backend contract.
//!
//! A [`Backend`] owns the state of every limit and makes each decision
//! atomically: one typed method per operation ([`Backend::decide`] with a
//! [`Mode`], `commit`, `release`, `extend`), each answering its own type. The
//! embedded [`MemoryBackend`] answers synchronously ([`Pending::Ready`]); a
//! networked backend (Redis) returns a future that performs one round trip.
//! The meaning of every operation is fixed by the conformance tests, not by a
//! backend.

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use crate::clock::Micros;
use crate::decision::{CommitReceipt, Decision, ReservationId};
use crate::error::Result;
use crate::plan::{Plan, PlannedLimit};
use crate::policy::Policy;
use crate::scope::Scope;
use crate::upstream::Coordination;
use crate::upstream::light::{Ask, Gate, Observed, Sample, Ticket};

mod fallback;
mod memory;
mod redis;

pub use fallback::{Fallback, OnBackendError};
pub use memory::{MemoryBackend, MemoryStats};
pub use redis::{
    IMPLICIT_OPERATION_MEMORY, KeyState, OPERATION_MEMORY, RedisBackend, prepare_for_fork,
};

/// What a decision does with an admitted request.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// Evaluate without changing anything.
    Check,
    /// Consume now.
    Acquire,
    /// Hold the amounts under `id` until `lease` µs from now.
    Reserve {
        /// The new reservation's id.
        id: ReservationId,
        /// Lease length, µs.
        lease: Micros,
    },
    /// Carve a sub-budget for `child` out of the plan's scope (holding its
    /// amounts on the plan's limits) or out of an existing reservation (`from`).
    Delegate {
        /// The sub-agent's scope (a strict descendant of the plan's).
        child: &'a Scope,
        /// Carve from this reservation instead of from the parent's free capacity.
        from: Option<ReservationId>,
        /// The delegation's id (it is a reservation).
        id: ReservationId,
        /// Lease length, µs.
        lease: Micros,
    },
}

impl Mode<'_> {
    /// Whether an admitted request changes state (everything but a check).
    #[must_use]
    pub const fn mutates(&self) -> bool {
        !matches!(self, Self::Check)
    }

    /// `check`, `acquire`, `reserve` or `delegate`.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::Acquire => "acquire",
            Self::Reserve { .. } => "reserve",
            Self::Delegate { .. } => "delegate",
        }
    }

    /// The reservation an admitted request creates, with its lease.
    #[must_use]
    pub const fn hold(&self) -> Option<(ReservationId, Micros)> {
        match *self {
            Self::Reserve { id, lease } | Self::Delegate { id, lease, .. } => Some((id, lease)),
            Self::Check | Self::Acquire => None,
        }
    }
}

/// A backend's answer of type `T`: already computed, or a future to await.
/// `.await` it directly (it implements [`IntoFuture`]).
pub enum Pending<'a, T> {
    /// Computed synchronously (embedded engine).
    Ready(Result<T>),
    /// In flight (networked backends).
    Future(Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>),
}

impl<'a, T: Send + 'a> IntoFuture for Pending<'a, T> {
    type Output = Result<T>;
    type IntoFuture = PendingFuture<'a, T>;

    fn into_future(self) -> Self::IntoFuture {
        PendingFuture(Some(self))
    }
}

/// The future of a [`Pending`]: ready at the first poll for [`Pending::Ready`].
pub struct PendingFuture<'a, T>(Option<Pending<'a, T>>);

// Never pinned structurally: the result is moved out, the future is boxed.
impl<T> Unpin for PendingFuture<'_, T> {}

impl<T> Future for PendingFuture<'_, T> {
    type Output = Result<T>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            Some(Pending::Future(f)) => f.as_mut().poll(cx),
            ready @ Some(Pending::Ready(_)) => match ready.take() {
                Some(Pending::Ready(r)) => std::task::Poll::Ready(r),
                _ => std::task::Poll::Pending,
            },
            // Polled after completion: a caller error, never reached by `.await`.
            None => std::task::Poll::Pending,
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

/// Completes on the calling thread an operation the embedded engine answers
/// without waiting (every one but `wait`, as [`poll_ready`] does); a future
/// that would wait is an [`crate::Error::Internal`] — callers use it only where
/// the engine is known to answer at once.
///
/// # Errors
/// The operation's own error, or `Internal` if it did not complete.
pub fn at_once<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    poll_ready(future).unwrap_or_else(|| {
        Err(crate::Error::Internal {
            message: "the embedded engine did not answer synchronously".into(),
        })
    })
}

/// What [`Backend::line`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineOp {
    /// Join or renew a place: the holder's lease and a waiter's, µs.
    Enter {
        /// How long the lock is held once taken.
        hold: Micros,
        /// How long a waiter's place lasts without it looking again.
        wait: Micros,
    },
    /// Leave the line (releasing the lock if held).
    Leave,
}

/// What [`Backend::allot`] does to an agent's allocation of a pool limit
/// ([`crate::pool`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllotOp<'a> {
    /// Set (or resize) `owner`'s allocation to `amount` per window, active
    /// for `lease` µs: answers when it stops being active, or an error when
    /// the other live allocations leave less than `amount` of the limit.
    Set {
        /// The agent's scope.
        owner: &'a str,
        /// Per window, base units, 1..=the limit.
        amount: i64,
        /// µs.
        lease: Micros,
    },
    /// Renew `owner`'s allocation (if it is not dead) for its lease: answers
    /// when it stops being active, or 0 when there is none.
    Beat {
        /// The agent's scope.
        owner: &'a str,
    },
    /// Remove `owner`'s allocation: 1 if there was one, else 0.
    Drop {
        /// The agent's scope.
        owner: &'a str,
    },
}

fn no_outlets(name: &str) -> crate::Error {
    crate::Error::Backend {
        message: format!(
            "the {name} backend has no Redis Streams or pub/sub: `events.stream` and `events.publish` need a Redis backend"
        ),
    }
}

fn no_upstream(name: &str) -> crate::Error {
    crate::Error::Backend {
        message: format!("the {name} backend keeps no upstream state"),
    }
}

/// Storage and atomic evaluation of limits: one typed method per operation,
/// so an operation and its answer cannot be mismatched.
pub trait Backend: Send + Sync + 'static {
    /// Evaluates every limit of `plan` and, if all admit it, applies `mode`
    /// to all of them together (nothing otherwise). Errors are invalid input
    /// (e.g. a refused delegation) or a backend failure.
    fn decide<'a>(&'a self, plan: &'a Plan<'a>, mode: Mode<'a>) -> Pending<'a, Decision>;

    /// Charges a reservation's actual usage (units absent from `actual` at
    /// their reserved amount) and ends it. Idempotent: a repeated commit
    /// returns the first receipt marked `duplicate`.
    fn commit<'a>(
        &'a self,
        policy: &'a Policy,
        id: ReservationId,
        actual: &'a [(&'a str, i64)],
    ) -> Pending<'a, CommitReceipt>;

    /// Ends a reservation (or delegation), returning everything it holds:
    /// `true` if this call released it, `false` if it already was or expired.
    fn release(&self, id: ReservationId) -> Pending<'_, bool>;

    /// Renews a live reservation's lease to `lease` µs from now; returns the
    /// new expiry (µs since the epoch).
    fn extend(&self, id: ReservationId, lease: Micros) -> Pending<'_, Micros>;

    /// A short name for logs and `Decision` provenance (`memory`, `redis`).
    fn name(&self) -> &'static str;

    /// A decision on a resource that coordinates on its upstream: its
    /// breaker and traffic light, then its limits, with the light's caps —
    /// the sequence of [`Backend::gate`], [`Backend::decide`] and
    /// [`Backend::ungate`] decided in `upstream::gated` (a backend that
    /// answers at once overrides it only to avoid the boxed future).
    fn decide_gated<'a>(
        &'a self,
        plan: &'a Plan<'a>,
        mode: Mode<'a>,
        resource: &'a str,
        coordination: &'a Coordination,
    ) -> Pending<'a, Decision> {
        Pending::Future(Box::pin(crate::upstream::gated::decide(
            self,
            plan,
            mode,
            resource,
            coordination,
        )))
    }

    /// `holder` enters `resource`'s ordered lock (or renews its place), or
    /// leaves it ([`crate::upstream::sequence::Line`]): the position for
    /// `Enter` (0: it holds the lock), 1 or 0 for `Leave` (whether it was in
    /// the line).
    fn line<'a>(&'a self, resource: &'a str, holder: u128, op: LineOp) -> Pending<'a, i64> {
        let _ = (resource, holder, op);
        Pending::Ready(Err(no_upstream(self.name())))
    }

    /// Records what an upstream response said about `resource`'s upstream
    /// (an empty `sample` only reads), atomically, on the backend's clock,
    /// following [`crate::upstream::light::UpstreamState::observe`]; answers
    /// the state after it.
    fn observe<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        sample: &'a Sample,
    ) -> Pending<'a, Observed> {
        let _ = (resource, coordination, sample);
        Pending::Ready(Err(no_upstream(self.name())))
    }

    /// Passes a request through `resource`'s traffic light atomically
    /// ([`crate::upstream::light::UpstreamState::gate`]).
    fn gate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ask: Ask,
    ) -> Pending<'a, Gate> {
        let _ = (resource, coordination, ask);
        Pending::Ready(Err(no_upstream(self.name())))
    }

    /// Gives back what a pass through the light counted
    /// ([`crate::upstream::light::UpstreamState::ungate`]); `true` when the
    /// denial it records switched sequential mode on.
    fn ungate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ticket: Ticket,
    ) -> Pending<'a, bool> {
        let _ = (resource, coordination, ticket);
        Pending::Ready(Err(no_upstream(self.name())))
    }

    /// What wakes when another process publishes a change of an upstream's
    /// state (a breaker transition), so waiters look again at once; `None`
    /// when the backend has no such channel (the embedded engine: every
    /// waiter is in this process and looks at its own pace).
    fn changes(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    /// Whether the backend answers now: at once for the embedded engine, a
    /// `PING` on Redis.
    fn ping(&self) -> Pending<'_, ()> {
        Pending::Ready(Ok(()))
    }

    /// Applies `op` to an allocation of the pool limit `limit` (a quota or
    /// budget without `scope:`), atomically ([`crate::pool`]).
    fn allot<'a>(&'a self, limit: &'a PlannedLimit<'a>, op: AllotOp<'a>) -> Pending<'a, i64> {
        let _ = (limit, op);
        Pending::Ready(Err(crate::Error::Backend {
            message: format!("the {} backend keeps no allocations", self.name()),
        }))
    }

    /// Gives back up to `amount` (base units, > 0) of what the quota or
    /// budget `limit` spent in its current window — its debt first — never
    /// below zero: `(credited, spent after)` ([`crate::Warden::top_up`]).
    fn credit<'a>(&'a self, limit: &'a PlannedLimit<'a>, amount: i64) -> Pending<'a, (i64, i64)> {
        let _ = (limit, amount);
        Pending::Ready(Err(crate::Error::Backend {
            message: format!("the {} backend keeps no counters to top up", self.name()),
        }))
    }

    /// Appends `entries` to the stream `<namespace>:<key>`, trimmed to about
    /// `max_len` entries (the `events.stream` outlet, [`crate::sink`]).
    fn append_events<'a>(
        &'a self,
        key: &'a str,
        max_len: u64,
        entries: &'a [crate::sink::Entry],
    ) -> Pending<'a, ()> {
        let _ = (key, max_len, entries);
        Pending::Ready(Err(no_outlets(self.name())))
    }

    /// Publishes `entries` on the channel `<namespace>:<channel>` (the
    /// `events.publish` outlet).
    fn publish_events<'a>(
        &'a self,
        channel: &'a str,
        entries: &'a [crate::sink::Entry],
    ) -> Pending<'a, ()> {
        let _ = (channel, entries);
        Pending::Ready(Err(no_outlets(self.name())))
    }

    /// What an in-process engine holds (keys, records, table capacity);
    /// `None` for a backend whose state lives elsewhere (Redis).
    fn stats(&self) -> Option<MemoryStats> {
        None
    }
}
