//! Events: what a [`crate::Warden`] reports beside its decisions.
//!
//! Subscribe with [`crate::Warden::subscribe`]. Delivery never blocks or slows a
//! decision: events go into a bounded broadcast channel ([`CAPACITY`] per
//! subscriber), and a subscriber that falls behind loses the oldest ones (its
//! next `recv` reports how many, as `RecvError::Lagged`). With no subscriber,
//! nothing is kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::Micros;
use crate::decision::{Degraded, Outcome};
use crate::error::{Error, Result};

/// How long a listener pauses, while items flow, before looking again.
pub(crate) const PAUSE: Duration = Duration::from_millis(1);

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
    /// A commit charged more than its reservation held on some limit (its
    /// overage rule let it): one event per commit, from the process that
    /// committed (a repeated commit charges nothing and emits nothing).
    Overage(Box<Overage>),
    /// A commit took a quota or budget past its capacity, into debt (overage
    /// rules `charge` and `allow_with_overdraft`): the limit denies new
    /// requests until a reset or refill pays it back. One event per commit, naming each such limit
    /// and its debt ([`OverageLine::debt`]).
    DebtIncurred(Box<Overage>),
    /// A commit, extend or settlement found its reservation expired: its
    /// lease ran out, so what it held went back (nothing was charged).
    ReservationExpired {
        /// The reservation.
        reservation: String,
        /// What found it: `commit`, `extend` or `finish`.
        operation: &'static str,
        /// When (µs since the epoch, the warden's clock).
        at: Micros,
    },
    /// [`crate::Warden::reload`] put a new policy in force: what it
    /// changed, by name. Emitted by the process that reloaded.
    PolicyReloaded {
        /// Where the new policy came from (file path or `<inline>`).
        source: String,
        /// Limits added, removed and changed; resources repriced.
        changes: Box<crate::policy::Changes>,
        /// When (µs since the epoch, the warden's clock).
        at: Micros,
    },
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

/// A commit beyond its reservation ([`Event::Overage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overage {
    /// The reservation.
    pub reservation: crate::decision::ReservationId,
    /// Each limit the actual usage went past what was reserved on.
    pub lines: Vec<OverageLine>,
    /// When (µs since the epoch, the warden's clock).
    pub at: Micros,
}

/// One limit of an [`Overage`]; amounts in base units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverageLine {
    /// Whose counter: the scope prefix (`tenant:acme`), or `None` for a pool.
    pub owner: Option<String>,
    /// The limit's name, its unit and the unit's decimals.
    pub limit: String,
    /// The unit.
    pub unit: String,
    /// Decimals of `unit`.
    pub decimals: u8,
    /// The limit's overage rule (`allow_if_available`, `allow_with_overdraft`, `cap`…).
    pub rule: &'static str,
    /// What the reservation held.
    pub reserved: i64,
    /// What was charged (more than `reserved`, unless the rule capped it).
    pub charged: i64,
    /// Actual usage beyond what was charged (rule `cap`).
    pub uncharged: i64,
    /// The debt the commit left on the limit (past its capacity).
    pub debt: i64,
}

impl Overage {
    /// The overage of a commit's receipt, if it charged (or was asked to
    /// charge) more than reserved anywhere.
    #[must_use]
    pub fn of(receipt: &crate::decision::CommitReceipt, at: Micros) -> Option<Self> {
        if receipt.duplicate {
            return None;
        }
        let lines: Vec<OverageLine> = receipt
            .charges
            .iter()
            .filter(|c| c.charged > c.reserved || c.uncharged > 0)
            .map(|c| OverageLine {
                owner: c.owner().map(str::to_owned),
                limit: c.name().to_owned(),
                unit: c.unit().to_owned(),
                decimals: c.def.decimals,
                rule: c.def.overage.name(),
                reserved: c.reserved,
                charged: c.charged,
                uncharged: c.uncharged,
                debt: c.debt,
            })
            .collect();
        (!lines.is_empty()).then_some(Self {
            reservation: receipt.id,
            lines,
            at,
        })
    }
}

/// Every event type, as [`Event::type_name`] spells it.
pub const TYPES: [&str; 13] = [
    "backend.unavailable",
    "backend.recovered",
    "decision.degraded",
    "settlement.problem",
    "upstream.zone_changed",
    "upstream.breaker_changed",
    "upstream.cascade_changed",
    "limit.threshold_crossed",
    "limit.exhausted",
    "reservation.overage",
    "reservation.expired",
    "limit.debt_incurred",
    "policy.reloaded",
];

/// Which events a sink or listener wants: event types (`limit.exhausted`)
/// or prefixes ending in a dot (`limit.`); empty wants every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter(Vec<String>);

impl Filter {
    /// A filter of `types`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`events[i]`) for an entry that is no event
    /// type and no prefix of one, naming the known types.
    pub fn new(types: Vec<String>) -> Result<Self> {
        for (i, e) in types.iter().enumerate() {
            let known = TYPES
                .iter()
                .any(|t| t == e || (e.ends_with('.') && t.starts_with(e.as_str())));
            if !known {
                return Err(Error::InvalidArgument {
                    what: "events",
                    message: format!(
                        "events[{i}]: `{}` is no event type or prefix (known: {})",
                        crate::error::truncate(e),
                        TYPES.join(", ")
                    ),
                });
            }
        }
        Ok(Self(types))
    }

    /// Whether it wants events of `type_name`.
    #[must_use]
    pub fn wants(&self, type_name: &str) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|e| e == type_name || (e.ends_with('.') && type_name.starts_with(e.as_str())))
    }

    /// The types and prefixes as given.
    #[must_use]
    pub fn types(&self) -> &[String] {
        &self.0
    }
}

impl Event {
    /// Its id where the event carries one that every sink shares (a
    /// threshold crossing, made inside the atomic decision).
    #[must_use]
    pub fn id(&self) -> Option<&str> {
        match self {
            Self::ThresholdCrossed(c) | Self::LimitExhausted(c) => Some(&c.id),
            _ => None,
        }
    }

    /// The event as one JSON object, the shape every sink delivers:
    /// `{"id", "type", "timestamp" (RFC 3339 UTC), "at" (µs since the epoch),
    /// "data"}`. `id` is `msg_` and 32 hex digits — the event's own id when
    /// it has one, else `fallback` (so one delivery's retries repeat it).
    #[must_use]
    pub fn envelope(&self, fallback: &str) -> serde_json::Value {
        let id = self
            .id()
            .map_or_else(|| fallback.to_owned(), |id| format!("msg_{id}"));
        serde_json::json!({
            "id": id,
            "type": self.type_name(),
            "timestamp": rfc3339(self.at()),
            "at": self.at(),
            "data": self.data(),
        })
    }

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
            Self::Overage(_) => "reservation.overage",
            Self::DebtIncurred(_) => "limit.debt_incurred",
            Self::ReservationExpired { .. } => "reservation.expired",
            Self::PolicyReloaded { .. } => "policy.reloaded",
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
            | Self::BackendRecovered { at, .. }
            | Self::ReservationExpired { at, .. }
            | Self::PolicyReloaded { at, .. } => *at,
            Self::ThresholdCrossed(c) | Self::LimitExhausted(c) => c.at,
            Self::Overage(o) | Self::DebtIncurred(o) => o.at,
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
            Self::Overage(o) | Self::DebtIncurred(o) => json!({
                "reservation": o.reservation.to_string(),
                "limits": o.lines.iter().map(|l| {
                    let text = |v: i64| crate::amount::format_base(v, l.decimals);
                    json!({
                        "owner": l.owner, "limit": l.limit, "unit": l.unit, "rule": l.rule,
                        "reserved": l.reserved, "reserved_text": text(l.reserved),
                        "charged": l.charged, "charged_text": text(l.charged),
                        "uncharged": l.uncharged, "uncharged_text": text(l.uncharged),
                        "debt": l.debt, "debt_text": text(l.debt),
                    })
                }).collect::<Vec<_>>(),
            }),
            Self::ReservationExpired {
                reservation,
                operation,
                ..
            } => json!({ "reservation": reservation, "operation": operation }),
            Self::PolicyReloaded {
                source, changes, ..
            } => json!({
                "source": source,
                "added": changes.added,
                "removed": changes.removed,
                "changed": changes.changed,
                "repriced": changes.repriced,
            }),
        }
    }
}

/// Runs `work` on a thread of its own named `name`, on a current-thread
/// runtime with timers: the shape of every sink, listener and delivery
/// thread (never on a decision's path).
pub(crate) fn worker(
    name: &str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(work);
            }
        })
}

/// µs since the epoch as RFC 3339 UTC with milliseconds.
#[must_use]
pub fn rfc3339(us: Micros) -> String {
    let secs = us.div_euclid(1_000_000);
    let ms = us.rem_euclid(1_000_000) / 1000;
    let (y, mo, d) = crate::calendar::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// A fresh message id: `msg_` and 32 random hex digits.
#[must_use]
pub fn new_id() -> String {
    format!("msg_{:032x}", fastrand::u128(..))
}

/// What a [`Listener`] did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Events handed to the callback.
    pub delivered: u64,
    /// Events the callback never saw: it fell more than [`CAPACITY`] behind.
    pub dropped: u64,
    /// Calls that failed (the callback returned an error or panicked).
    pub failed: u64,
    /// The last failure, one line.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Counts {
    delivered: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A callback receiving a warden's events on a thread of its own
/// ([`crate::Warden::listen`]): in order, never on a decision's path. A
/// callback that fails or panics is counted ([`Listener::stats`]) and keeps
/// receiving; one that falls more than [`CAPACITY`] events behind loses the
/// oldest. [`Listener::close`] stops it and waits for a call under way;
/// dropping it stops it without waiting.
pub struct Listener {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    counts: Arc<Counts>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// What a listener's callback returns: `Err` with one line when it failed.
pub type Handled = std::result::Result<(), String>;

impl Listener {
    /// Starts a thread calling `callback` with every event `filter` wants.
    pub(crate) fn start<F>(
        rx: tokio::sync::broadcast::Receiver<Event>,
        filter: Filter,
        mut callback: F,
    ) -> Result<Self>
    where
        F: FnMut(&Event) -> Handled + Send + 'static,
    {
        Self::spawn(
            rx,
            move |e: &Event| filter.wants(e.type_name()),
            move |e: &Event| callback(e),
            (),
        )
    }

    /// Starts a thread calling `callback` with every item of `rx` that it
    /// `wants`; `guard` is dropped when the thread ends.
    pub(crate) fn spawn<T, W, F, G>(
        rx: tokio::sync::broadcast::Receiver<T>,
        wants: W,
        mut callback: F,
        guard: G,
    ) -> Result<Self>
    where
        T: Clone + Send + 'static,
        W: Fn(&T) -> bool + Send + 'static,
        F: FnMut(&T) -> Handled + Send + 'static,
        G: Send + 'static,
    {
        use tokio::sync::broadcast::error::RecvError;
        let counts = Arc::new(Counts::default());
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(&counts);
        let mut rx = rx;
        let thread = worker("ratewarden-listener", async move {
            let _guard = guard;
            {
                use tokio::sync::broadcast::error::TryRecvError;
                // While items flow, look again after a pause rather than
                // be woken by each one (a wake-up costs the sending
                // thread a system call); idle, wait for the next.
                let mut busy = false;
                loop {
                    if !matches!(
                        stopped.try_recv(),
                        Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                    ) {
                        return;
                    }
                    let item = match rx.try_recv() {
                        Ok(x) => Ok(x),
                        Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                        Err(TryRecvError::Closed) => Err(RecvError::Closed),
                        Err(TryRecvError::Empty) if busy => {
                            tokio::select! {
                                biased;
                                _ = &mut stopped => return,
                                () = tokio::time::sleep(PAUSE) => {}
                            }
                            busy = false;
                            continue;
                        }
                        Err(TryRecvError::Empty) => tokio::select! {
                            biased;
                            _ = &mut stopped => return,
                            e = rx.recv() => e,
                        },
                    };
                    busy = true;
                    match item {
                        Ok(item) if wants(&item) => {
                            shared.delivered.fetch_add(1, Ordering::Relaxed);
                            let called =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    callback(&item)
                                }));
                            let failure = match called {
                                Ok(Ok(())) => None,
                                Ok(Err(why)) => Some(why),
                                Err(panic) => Some(panic_text(panic.as_ref())),
                            };
                            if let Some(why) = failure {
                                shared.failed.fetch_add(1, Ordering::Relaxed);
                                *shared.last_error.lock() = Some(why);
                            }
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(n)) => {
                            shared.dropped.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(RecvError::Closed) => return,
                    }
                }
            }
        })
        .map_err(|e| Error::Backend {
            message: format!("the listener thread could not start: {e}"),
        })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            counts,
        })
    }

    /// What it did so far.
    #[must_use]
    pub fn stats(&self) -> ListenerStats {
        ListenerStats {
            delivered: self.counts.delivered.load(Ordering::Relaxed),
            dropped: self.counts.dropped.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            last_error: self.counts.last_error.lock().clone(),
        }
    }

    /// Stops it: no call starts after this returns, and a call under way
    /// has ended — unless `close` runs inside the callback itself, which
    /// only stops the next ones. Idempotent.
    pub fn close(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }

    /// Tells it to stop without waiting: no call starts after the one under
    /// way (if any). Idempotent; [`Listener::close`] also waits.
    pub fn stop(&mut self) {
        drop(self.stop.take());
    }

    /// Whether it is still listening (not closed, and the warden lives).
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Listener {
    /// Tells the thread to stop without waiting for it (a call under way
    /// finishes on its own; [`Listener::close`] waits for it).
    fn drop(&mut self) {
        self.stop();
    }
}

/// A panic's message, one line.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned());
    format!("the callback panicked: {text}")
}
