//! [`Warden`]: the public face of ratewarden. It validates every input,
//! resolves requests against the policy, and hands each decision to the
//! backend as one operation. `wait` adds in-process queueing in priority order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::amount::Cost;
use crate::backend::{Backend, MemoryBackend, Mode};
use crate::clock::{Clock, Micros, SystemClock, micros};
use crate::decision::{Balance, Caps, CommitReceipt, Decision, Outcome, ReservationId};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::plan::{Plan, Request, Waiter, resolve_cost};
use crate::policy::{LimitKind, Policy};
use crate::scope::Scope;
use crate::settle::{CallOutcome, Settlement};

mod allot;
mod light;
mod priced;

use priced::UsageMode;

pub use allot::Allocation;
pub use light::{LINE_WAIT_LEASE, Turn};

/// A failed commit or release: not confirmed (the backend failed: it may have
/// landed) or refused (the backend answered no).
fn settle_error(e: Error) -> crate::settle::Settled {
    if e.kind() == crate::ErrorKind::Backend {
        crate::settle::Settled::Unconfirmed(e)
    } else {
        crate::settle::Settled::Refused(e)
    }
}

/// Cancels a [`Warden::wait_cancellable`] from anywhere (another thread, a
/// binding's cancelled future). Cancelling is sticky and idempotent.
#[derive(Debug, Default)]
pub struct WaitCancel {
    cancelled: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl WaitCancel {
    /// Stops the wait at its next waiting point (at once if it is waiting).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Whether [`WaitCancel::cancel`] was called.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// Longest lease a reservation or delegation may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where a delegation's sub-budget comes from.
#[derive(Debug, Clone, Copy)]
pub enum DelegateFrom<'a> {
    /// From a parent scope's free capacity (the child must lie under it).
    Scope(&'a Scope),
    /// From what an existing reservation holds (the child must lie under its scope).
    Reservation(ReservationId),
}

/// What `wait` does once the request is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// Consume now, like [`Warden::acquire`].
    Acquire,
    /// Hold under a reservation, like [`Warden::reserve`], with an optional lease.
    Reserve(Option<Duration>),
}

/// The governor: a policy plus a backend. Clone it freely (it is an `Arc`).
#[derive(Clone)]
pub struct Warden {
    inner: Arc<Inner>,
}

struct Inner {
    /// The policy in force: every operation reads one snapshot of it
    /// ([`Warden::reload`] swaps it).
    policy: arc_swap::ArcSwap<Policy>,
    /// One reload at a time (each is checked against the policy it replaces).
    reloading: Mutex<()>,
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    queue: WaitQueue,
    events: tokio::sync::broadcast::Sender<Event>,
    /// What webhook deliveries did.
    webhook_log: Arc<Mutex<crate::webhook::Log>>,
    /// What the Redis outlets (`events:`) did.
    outlet_stats: Arc<Mutex<crate::sink::OutletStats>>,
    /// The audit log's channel (`audit:`, [`Warden::on_audit`]).
    audit: crate::audit::Audit,
    /// Events emitted so far, and how many of them the outlets handled.
    emitted: std::sync::atomic::AtomicU64,
    outlets_done: tokio::sync::watch::Receiver<u64>,
    /// Since when decisions are degraded (µs), or `i64::MIN` while the backend answers.
    degraded_since: std::sync::atomic::AtomicI64,
    /// Reservations held on a `shrink.fallback` model (`caps.model`): the
    /// model, and until when (its lease). A governed call's usage is priced
    /// on it when it settles here ([`Warden::finish`]).
    fallbacks: Mutex<std::collections::HashMap<ReservationId, (Arc<str>, Micros)>>,
}

impl Inner {
    /// Sends `event` to every subscriber (listeners, webhooks, outlets),
    /// counted for [`Warden::flush_outlets`].
    fn emit(&self, event: Event) {
        self.emitted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = self.events.send(event);
    }
}

impl std::fmt::Debug for Warden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warden")
            .field("policy", &self.inner.policy.load().source())
            .field("backend", &self.inner.backend.name())
            .finish_non_exhaustive()
    }
}

impl Warden {
    /// A warden over the embedded engine with the system clock.
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self::with_clock(policy, Arc::new(SystemClock))
    }

    /// A warden over the embedded engine reading time from `clock` (tests use a [`crate::ManualClock`]).
    #[must_use]
    pub fn with_clock(policy: Policy, clock: Arc<dyn Clock>) -> Self {
        let backend = Arc::new(MemoryBackend::new(Arc::clone(&clock)));
        Self::with_backend(policy, backend, clock)
    }

    /// A warden over any backend. `clock` is used for `wait` and lease arithmetic on the
    /// caller's side; decisions use the backend's own clock.
    #[must_use]
    pub fn with_backend(policy: Policy, backend: Arc<dyn Backend>, clock: Arc<dyn Clock>) -> Self {
        let events = tokio::sync::broadcast::Sender::new(crate::events::CAPACITY);
        let webhook_log = Arc::new(Mutex::new(crate::webhook::Log::default()));
        // Deliveries run on threads of their own, never on a decision's path.
        crate::webhook::start(&policy.webhooks, &events, &webhook_log);
        let outlet_stats = Arc::new(Mutex::new(crate::sink::OutletStats::default()));
        let (done_tx, outlets_done) = tokio::sync::watch::channel(0_u64);
        let audit = crate::audit::Audit::new();
        audit.start(&policy.audit, &backend);
        crate::sink::start(&policy.outlets, &events, &backend, &outlet_stats, done_tx);
        Self {
            inner: Arc::new(Inner {
                policy: arc_swap::ArcSwap::from_pointee(policy),
                reloading: Mutex::new(()),
                backend,
                clock,
                queue: WaitQueue::default(),
                events,
                degraded_since: std::sync::atomic::AtomicI64::new(i64::MIN),
                webhook_log,
                outlet_stats,
                emitted: std::sync::atomic::AtomicU64::new(0),
                outlets_done,
                audit,
                fallbacks: Mutex::default(),
            }),
        }
    }

    /// What the policy's Redis outlets (`events.stream`, `events.publish`)
    /// did so far: entries appended, messages published, events dropped
    /// (the outlet fell behind) or failed (Redis unreachable after retries).
    #[must_use]
    pub fn outlet_stats(&self) -> crate::sink::OutletStats {
        self.inner.outlet_stats.lock().clone()
    }

    /// Waits until the Redis outlets have handled (written, or counted as
    /// failed or dropped) every event emitted before this call, for at most
    /// `timeout`; `true` if they did. Call it before a process exits so the
    /// last events reach the stream. Immediate when the policy has no outlets.
    pub async fn flush_outlets(&self, timeout: Duration) -> bool {
        if !self.inner.policy.load().outlets.any() {
            return true;
        }
        let target = self.inner.emitted.load(std::sync::atomic::Ordering::SeqCst);
        let mut done = self.inner.outlets_done.clone();
        tokio::time::timeout(timeout, done.wait_for(|n| *n >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// What the policy's `webhooks:` deliveries did so far: every attempt
    /// (status or error), the dead letters (every attempt failed), and the
    /// events an endpoint never saw because it fell too far behind. Latest
    /// [`crate::webhook::LOG_CAPACITY`] of each.
    #[must_use]
    pub fn webhook_log(&self) -> crate::webhook::Log {
        self.inner.webhook_log.lock().clone()
    }

    /// The policy in force now (a snapshot: a later [`Warden::reload`]
    /// does not change it).
    #[must_use]
    pub fn policy(&self) -> Arc<Policy> {
        self.inner.policy.load_full()
    }

    /// Calls `f` with the policy in force now, without taking a reference
    /// to it (cheaper than [`Warden::policy`] on a hot path).
    pub fn with_policy<R>(&self, f: impl FnOnce(&Policy) -> R) -> R {
        f(&self.inner.policy.load())
    }

    /// Puts `policy` in force in this warden (and every clone of it) without
    /// a restart: new prices, capacities, windows, caps, tools, overage rules
    /// and limits apply to every operation that starts after this returns;
    /// one already under way finishes under the policy it started with.
    ///
    /// What was counted carries over: counters are kept by scope and limit
    /// name, so a budget half spent stays half spent of its new size, and a
    /// quota or budget whose window is redefined starts its new window. A
    /// reservation made before the reload settles under the limits it holds,
    /// even ones the new policy removed (they are refunded or charged as it
    /// commits). Waiters look again at once (a raised limit may admit them).
    /// Emits [`Event::PolicyReloaded`] naming what changed. Each process
    /// reloads its own wardens: a policy shared through Redis is reloaded in
    /// every process that uses it.
    ///
    /// # Errors
    /// [`Error::Policy`] when `policy` cannot replace the one in force (a
    /// unit's decimals, a limit's unit or kind, or the event sinks differ:
    /// see [`Policy::changes_to`]); the policy in force stays.
    pub fn reload(&self, policy: Policy) -> Result<crate::policy::Changes> {
        let _one = self.inner.reloading.lock();
        let current = self.inner.policy.load_full();
        let changes = current.changes_to(&policy)?;
        let mut policy = policy;
        policy.retire(&current);
        let source = policy.source().to_owned();
        self.inner.policy.store(Arc::new(policy));
        self.inner.queue.poke();
        self.inner.emit(Event::PolicyReloaded {
            source,
            changes: Box::new(changes.clone()),
            at: self.inner.clock.now(),
        });
        Ok(changes)
    }

    /// Whether the backend answers now (the embedded engine always does; a
    /// `PING` on Redis), for readiness checks.
    ///
    /// # Errors
    /// [`Error::Backend`] when it does not answer.
    pub async fn ping(&self) -> Result<()> {
        self.inner.backend.ping().await
    }

    /// The backend's name (`memory`, `redis`).
    #[must_use]
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// What the embedded engine holds right now (keys, reservation records,
    /// remembered operations, table capacity); `None` on Redis, whose memory
    /// is the server's.
    #[must_use]
    pub fn stats(&self) -> Option<crate::backend::MemoryStats> {
        self.inner.backend.stats()
    }

    /// The clock used for waiting.
    #[must_use]
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Asks the backend for a decision and reports the events it implies.
    async fn decide(&self, plan: &Plan<'_>, mode: Mode<'_>) -> Result<Decision> {
        let scope = match mode {
            Mode::Delegate { child, .. } => child,
            _ => plan.scope(),
        };
        if let Some(action) = plan.request().and_then(|r| r.action.as_deref())
            && let Some(why) = plan.policy().tool_refusal(scope, action)
        {
            let d = Decision::refused(why, plan.priority());
            if self.inner.audit.on() {
                self.audit_decision(plan, mode, &d);
            }
            return Ok(d);
        }
        let d = match plan.upstream() {
            Some((resource, c)) if !matches!(mode, Mode::Delegate { .. }) => {
                let d = self
                    .inner
                    .backend
                    .decide_gated(plan, mode, resource, c)
                    .await?;
                self.light_events(resource, &d);
                d
            }
            _ => self.inner.backend.decide(plan, mode).await?,
        };
        let mut d = d;
        if !plan.stages_before().is_empty() && d.allowed() {
            // Boxed: its state would otherwise grow every decision's future.
            Box::pin(self.backpressure(plan, &mut d)).await;
        }
        self.emit_for(&d, scope);
        if mode.mutates() && d.allowed() && d.degraded.is_none() {
            self.crossings(&d, plan.scope());
        }
        if self.inner.audit.on() {
            self.audit_decision(plan, mode, &d);
        }
        Ok(d)
    }

    /// The audit record of a decision.
    #[cold]
    fn audit_decision(&self, plan: &Plan<'_>, mode: Mode<'_>, d: &Decision) {
        let (action, scope) = match mode {
            Mode::Check => ("check", plan.scope()),
            Mode::Acquire => ("acquire", plan.scope()),
            Mode::Reserve { .. } => ("reserve", plan.scope()),
            Mode::Delegate { child, .. } => ("delegate", child),
        };
        let request_id = d.reservation.as_ref().map_or_else(
            || plan.operation().map_or_else(|| fastrand::u128(..), |o| o.0),
            |r| r.id.0,
        );
        let amounts = crate::audit::per_unit(d.limits.iter().map(|l| (&l.def, l.amount)));
        let request = plan.request();
        self.inner.audit.send(crate::audit::Record {
            at: self.inner.clock.now(),
            action,
            request_id,
            scope: Some(scope.as_str().to_owned()),
            resource: request.and_then(|r| r.resource.clone()),
            policy_action: request.and_then(|r| r.action.clone()),
            amounts,
            outcome: d.outcome.as_str(),
            reason: d.reason.clone(),
            priority: Some(d.priority.as_str()),
            backend: self.inner.backend.name(),
            degraded: d.degraded.map(crate::Degraded::as_str),
        });
    }

    /// The audit record of a commit, release, extend or expiry.
    #[cold]
    fn audit_settled(
        &self,
        action: &'static str,
        id: ReservationId,
        result: std::result::Result<Option<&CommitReceipt>, &Error>,
    ) {
        let charges = match result {
            Ok(Some(receipt)) => &receipt.charges[..],
            _ => &[],
        };
        let amounts = crate::audit::per_unit(charges.iter().map(|c| (&c.def, c.charged)));
        let expired = matches!(result, Err(Error::ReservationExpired { .. }));
        self.inner.audit.send(crate::audit::Record {
            at: self.inner.clock.now(),
            action: if expired { "expire" } else { action },
            request_id: id.0,
            scope: None,
            resource: None,
            policy_action: None,
            amounts,
            outcome: match result {
                Ok(_) => "ok",
                Err(_) if expired => "expired",
                Err(_) => "error",
            },
            reason: match result {
                Err(e) => Some(e.to_string()),
                Ok(Some(r)) if r.duplicate => {
                    Some("already committed: nothing charged again".into())
                }
                Ok(_) => None,
            },
            priority: None,
            backend: self.inner.backend.name(),
            degraded: None,
        });
    }

    /// Calls `callback` with every audit record (every decision, commit,
    /// release, extend and expiry of this warden), in order, on a thread of
    /// its own — as [`Warden::listen`]: never on a decision's path, failures
    /// and panics counted, the oldest records lost past
    /// [`crate::audit::CAPACITY`] behind. Turns the audit log on while it lives.
    ///
    /// # Errors
    /// [`Error::Backend`] when the thread cannot be started.
    pub fn on_audit<F>(&self, mut callback: F) -> Result<crate::events::Listener>
    where
        F: FnMut(&crate::audit::Record) -> crate::events::Handled + Send + 'static,
    {
        let (rx, guard) = self.inner.audit.consumer();
        crate::events::Listener::spawn(
            rx,
            |_: &Arc<crate::audit::Record>| true,
            move |r: &Arc<crate::audit::Record>| callback(r),
            guard,
        )
    }

    /// Waits until the policy's audit sinks (`audit:`) have written (or
    /// counted as failed) every record made before this call, for at most
    /// `timeout`; `true` if they did. Immediate without sinks.
    pub async fn flush_audit(&self, timeout: Duration) -> bool {
        self.inner
            .audit
            .flush(&self.inner.policy.load_full().audit, timeout)
            .await
    }

    /// What the policy's audit sinks (`audit:`) did so far.
    #[must_use]
    pub fn audit_stats(&self) -> crate::audit::Stats {
        self.inner.audit.stats.lock().clone()
    }

    /// Emits a [`Event::ThresholdCrossed`] / [`Event::LimitExhausted`] for
    /// every threshold an admitted decision took a quota or budget across:
    /// its spend and holds went from under `threshold × capacity` to at
    /// least it, in this one atomic update.
    fn crossings(&self, d: &Decision, scope: &Scope) {
        for l in &d.limits {
            if l.def.thresholds.is_empty() || l.amount <= 0 {
                continue;
            }
            let cap = l.limit();
            let after = cap - l.remaining;
            let owner = || {
                l.scope_depth
                    .map(|depth| scope.prefix(usize::from(depth)).to_owned())
            };
            self.cross(&l.def, owner, cap, after - l.amount, after);
        }
    }

    /// Emits an event for each of `def`'s thresholds that the spend (and
    /// holds) crossed going from `before` to `after`, out of `cap`.
    fn cross(
        &self,
        def: &crate::policy::LimitDef,
        owner: impl Fn() -> Option<String>,
        cap: i64,
        before: i64,
        after: i64,
    ) {
        for &t in &def.thresholds {
            // The first amount at or past the threshold (exact: cap ≤ 2^53,
            // so cap × 1000 fits in i64).
            let mark = (cap * i64::from(t) + 999) / 1000;
            // Crossings are rare: the subscribers are counted (a lock)
            // only then.
            if before >= mark || after < mark || self.inner.events.receiver_count() == 0 {
                continue;
            }
            let crossing = Box::new(crate::events::Crossing {
                id: format!("{:032x}", fastrand::u128(..)),
                owner: owner(),
                limit: def.name.clone(),
                unit: def.unit.clone(),
                decimals: def.decimals,
                threshold: t,
                capacity: cap,
                before,
                after,
                at: self.inner.clock.now(),
            });
            self.inner.emit(if t >= 1000 {
                Event::LimitExhausted(crossing)
            } else {
                Event::ThresholdCrossed(crossing)
            });
        }
    }

    /// Emits the threshold crossings of a commit past its reservation: its
    /// excess moved the spend from `before` to `before + charged − reserved`
    /// in the one atomic update that charged it.
    fn commit_crossings(&self, receipt: &CommitReceipt) {
        for c in &receipt.charges {
            let Some(before) = c.before else { continue };
            if c.def.thresholds.is_empty() || c.charged <= c.reserved {
                continue;
            }
            let owner = || c.owner().map(str::to_owned);
            self.cross(
                &c.def,
                owner,
                c.def.capacity(),
                before,
                before + c.charged - c.reserved,
            );
        }
    }

    /// Emits the events a decision implies: backend outages, degraded
    /// decisions, recoveries. One relaxed load when all is well.
    fn emit_for(&self, d: &Decision, scope: &Scope) {
        use std::sync::atomic::Ordering;
        let inner = &self.inner;
        let since = inner.degraded_since.load(Ordering::Relaxed);
        match d.degraded {
            None if since == i64::MIN => {}
            None => {
                if inner
                    .degraded_since
                    .compare_exchange(since, i64::MIN, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    let at = inner.clock.now();
                    inner.emit(Event::BackendRecovered {
                        after: Duration::from_micros(u64::try_from(at - since).unwrap_or(0)),
                        at,
                    });
                }
            }
            Some(mode) => {
                let at = inner.clock.now();
                let reason = d.reason.clone().unwrap_or_default();
                if since == i64::MIN
                    && inner
                        .degraded_since
                        .compare_exchange(i64::MIN, at, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    inner.emit(Event::BackendUnavailable {
                        reason: reason.clone(),
                        at,
                    });
                }
                inner.emit(Event::DegradedDecision {
                    mode,
                    scope: scope.as_str().to_owned(),
                    outcome: d.outcome,
                    reason,
                    at,
                });
            }
        }
    }

    /// Calls `callback` with every event `filter` wants, in order, on a
    /// thread of its own ([`crate::events::Listener`]): never on a decision's
    /// path, and a callback that returns an error or panics is counted, not
    /// propagated. Stops when the listener is dropped or closed, or the
    /// warden with it.
    ///
    /// # Errors
    /// [`Error::Backend`] when the thread cannot be started.
    pub fn listen<F>(
        &self,
        filter: crate::events::Filter,
        callback: F,
    ) -> Result<crate::events::Listener>
    where
        F: FnMut(&Event) -> crate::events::Handled + Send + 'static,
    {
        crate::events::Listener::start(self.inner.events.subscribe(), filter, callback)
    }

    /// Subscribes to this warden's [`Event`]s (every clone of the warden shares
    /// them). Never slows decisions: a subscriber that falls more than
    /// [`crate::events::CAPACITY`] events behind loses the oldest.
    #[must_use]
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Evaluates `request` against every limit it touches without changing anything.
    ///
    /// # Errors
    /// Invalid input ([`Error::Unknown`], [`Error::InvalidAmount`]…) or a backend failure.
    pub async fn check(&self, request: &Request) -> Result<Decision> {
        let policy = self.inner.policy.load();
        let plan = self.plan_of(&policy, request)?;
        let d = self.decide(&plan, Mode::Check).await?;
        if self.may_shrink(request, &d) {
            return Box::pin(self.shrunk(request, UsageMode::Check, d)).await;
        }
        Ok(d)
    }

    /// Admits `request` and consumes its cost from every limit, or denies it and
    /// changes nothing. A concurrency limit is only **checked** (is a slot free
    /// now?), never held: an acquire ends at once, so it occupies no slot. To
    /// hold a slot while work runs use [`Warden::reserve`] (or
    /// [`Warden::admit`], what the HTTP middlewares use).
    ///
    /// # Errors
    /// Invalid input or a backend failure. A denial is `Ok` with `Outcome::Deny`.
    pub async fn acquire(&self, request: &Request) -> Result<Decision> {
        let policy = self.inner.policy.load();
        let plan = self.plan_of(&policy, request)?;
        let d = self.decide(&plan, Mode::Acquire).await?;
        if self.may_shrink(request, &d) {
            return Box::pin(self.shrunk(request, UsageMode::Acquire, d)).await;
        }
        Ok(d)
    }

    /// What is left of every limit a request by `scope` (on `resource`, if
    /// given) would touch — remaining, capacity, held, reset — read without a
    /// request: nothing is charged or counted (a `check` would evaluate one
    /// unit of `requests`). Read from the backend itself: when it cannot be
    /// asked this is an error, never a fallback's estimate.
    ///
    /// # Errors
    /// Unknown scope kinds or resources; [`Error::Backend`] when the backend
    /// cannot be asked.
    pub async fn balances(&self, scope: &Scope, resource: Option<&str>) -> Result<Vec<Balance>> {
        let mut request = Request::new(scope.clone()).cost(Cost::new().with("requests", 0));
        if let Some(r) = resource {
            request = request.resource(r);
        }
        let policy = self.inner.policy.load();
        let plan = Plan::build(&policy, &request)?;
        let d = self.inner.backend.decide(&plan, Mode::Check).await?;
        if d.degraded.is_some() {
            return Err(Error::Backend {
                message: format!(
                    "balances are read from the backend, which cannot be asked: {}",
                    d.reason.as_deref().unwrap_or("unavailable")
                ),
            });
        }
        Ok(d.limits.iter().map(|l| Balance::of(l, scope)).collect())
    }

    /// Tops up the quota or budget `limit` of `scope` (on `resource`, for a
    /// resource's limit): gives back up to `amount` (in the limit's unit) of
    /// what it spent in its current window — its debt first — never below
    /// zero, so a limit in debt admits again once topped up. Atomic on every
    /// backend; sent once (not idempotent: a lost answer is an error, and the
    /// top-up may or may not have landed).
    ///
    /// # Errors
    /// Unknown scope kinds or resources, a `limit` the scope's requests do
    /// not touch or that is no quota or budget, an amount that is not
    /// positive or is finer than the unit; [`Error::Backend`] when the
    /// backend cannot be asked.
    pub async fn top_up(
        &self,
        scope: &Scope,
        resource: Option<&str>,
        limit: &str,
        amount: crate::Amount,
    ) -> Result<crate::decision::TopUp> {
        let mut request = Request::new(scope.clone()).cost(Cost::new().with("requests", 0));
        if let Some(r) = resource {
            request = request.resource(r);
        }
        let policy = self.inner.policy.load();
        let plan = Plan::build(&policy, &request)?;
        let Some(target) = plan.limits().find(|l| l.def.name == limit) else {
            let touched: Vec<&str> = plan.limits().map(|l| l.def.name.as_str()).collect();
            return Err(Error::invalid(
                "limit",
                format!(
                    "`{}` is not a limit that requests by {scope} touch (they touch: {})",
                    crate::error::truncate(limit),
                    touched.join(", ")
                ),
            ));
        };
        if !matches!(target.def.kind, LimitKind::Quota(_) | LimitKind::Budget(_)) {
            return Err(Error::invalid(
                "limit",
                format!(
                    "`{limit}` is a {} limit; only quotas and budgets are topped up",
                    target.def.kind.name()
                ),
            ));
        }
        let base = amount.to_base(&target.def.unit, target.def.decimals)?;
        if base <= 0 {
            return Err(Error::invalid(
                "amount",
                format!("a top-up is a positive amount of {}", target.def.unit),
            ));
        }
        let (credited, spent) = self.inner.backend.credit(&target, base).await?;
        self.inner.queue.poke();
        if self.inner.audit.on() {
            self.inner.audit.send(crate::audit::Record {
                at: self.inner.clock.now(),
                action: "top_up",
                request_id: fastrand::u128(..),
                scope: Some(scope.as_str().to_owned()),
                resource: resource.map(str::to_owned),
                policy_action: None,
                amounts: smallvec::smallvec![crate::audit::UnitAmount {
                    def: Arc::clone(target.def),
                    amount: credited,
                }],
                outcome: "ok",
                reason: None,
                priority: None,
                backend: self.inner.backend.name(),
                degraded: None,
            });
        }
        Ok(crate::decision::TopUp {
            limit: target.def.name.clone(),
            unit: target.def.unit.clone(),
            decimals: target.def.decimals,
            credited,
            spent,
        })
    }

    /// Admits a request that is served over a stretch of time — an HTTP
    /// request, a job — as the middlewares of every binding do: like
    /// [`Warden::acquire`], except that when it touches a concurrency limit
    /// the slot is **held** (the decision is a reservation, leased for the
    /// concurrency limit's lease) until the caller ends it with
    /// [`Warden::finish`] — `CallOutcome::Ran(Usage::Estimate)` when served,
    /// which charges the rest as acquired and frees the slot. Without a
    /// concurrency limit it is exactly `acquire` (nothing to end).
    ///
    /// # Errors
    /// As [`Warden::acquire`].
    pub async fn admit(&self, request: &Request) -> Result<Decision> {
        let policy = self.inner.policy.load();
        let plan = self.plan_of(&policy, request)?;
        if !plan
            .limits()
            .any(|l| matches!(l.def.kind, LimitKind::Concurrency))
        {
            return self.decide(&plan, Mode::Acquire).await;
        }
        let lease = self.lease(&plan, None)?;
        let id = reservation_id(request);
        self.decide(&plan, Mode::Reserve { id, lease }).await
    }

    /// Admits `request` and holds its (estimated) cost under a lease until
    /// [`Warden::commit`], [`Warden::release`] or expiry. The decision carries the
    /// reservation id.
    ///
    /// # Errors
    /// Invalid input (including a lease of zero or over [`MAX_LEASE`]) or a backend failure.
    pub async fn reserve(&self, request: &Request, lease: Option<Duration>) -> Result<Decision> {
        let policy = self.inner.policy.load();
        let plan = self.plan_of(&policy, request)?;
        let lease_us = self.lease(&plan, lease)?;
        let id = reservation_id(request);
        let d = self
            .decide(
                &plan,
                Mode::Reserve {
                    id,
                    lease: lease_us,
                },
            )
            .await?;
        if self.may_shrink(request, &d) {
            let d = Box::pin(self.shrunk(request, UsageMode::Reserve(lease), d)).await?;
            if let (Some(model), Some(r)) = (&d.caps.model, &d.reservation) {
                self.held_on(r.id, model, r.expires_at);
            }
            return Ok(d);
        }
        Ok(d)
    }

    /// Remembers that reservation `id` is held on the fallback `model` (until
    /// `expires`, when it lapses by itself): its settlement prices usage there.
    #[cold]
    fn held_on(&self, id: ReservationId, model: &Arc<str>, expires: Micros) {
        let mut held = self.inner.fallbacks.lock();
        if held.len() >= 1024 {
            let now = self.inner.clock.now();
            held.retain(|_, (_, until)| *until > now);
        }
        held.insert(id, (Arc::clone(model), expires));
    }

    fn lease(&self, plan: &Plan<'_>, lease: Option<Duration>) -> Result<Micros> {
        match lease {
            Some(d) => validate_lease(d),
            None => Ok(plan
                .limits()
                .filter(|l| matches!(l.def.kind, LimitKind::Concurrency))
                .map(|l| l.def.lease)
                .min()
                .unwrap_or(plan.policy().defaults().lease)),
        }
    }

    /// Charges a reservation's actual usage and ends it. Units missing from
    /// `actual` are charged at their reserved amount. Less than reserved is
    /// refunded; more follows each limit's overage rule. Idempotent: committing
    /// the same id again charges nothing and returns the first receipt with
    /// `duplicate = true`.
    ///
    /// # Errors
    /// [`Error::ReservationNotFound`], [`Error::ReservationExpired`],
    /// [`Error::ReservationClosed`] (released), invalid amounts, backend failures.
    pub async fn commit(&self, id: ReservationId, actual: &Cost) -> Result<CommitReceipt> {
        let policy = self.inner.policy.load();
        let actual = resolve_cost(&policy, actual)?;
        let receipt = self.inner.backend.commit(&policy, id, &actual).await;
        self.inner.queue.poke();
        self.settled(id, "commit", receipt.as_ref());
        receipt
    }

    /// Emits what a commit (or the error it met) implies:
    /// [`Event::Overage`] for a commit past its reservation,
    /// [`Event::ReservationExpired`] for a reservation found expired.
    fn settled(
        &self,
        id: ReservationId,
        operation: &'static str,
        r: std::result::Result<&CommitReceipt, &Error>,
    ) {
        if self.inner.audit.on() {
            let action = if operation == "extend" {
                "extend"
            } else {
                "commit"
            };
            self.audit_settled(action, id, r.map(Some));
        }
        // Only when someone listens (a lock to count them, on a rare path).
        let wanted = || self.inner.events.receiver_count() > 0;
        match r {
            Ok(receipt) => {
                if receipt
                    .charges
                    .iter()
                    .all(|c| c.charged <= c.reserved && c.uncharged == 0)
                {
                    return;
                }
                if !receipt.duplicate {
                    self.commit_crossings(receipt);
                }
                if wanted()
                    && let Some(o) = crate::events::Overage::of(receipt, self.inner.clock.now())
                {
                    if o.lines.iter().any(|l| l.debt > 0) {
                        let mut debt = o.clone();
                        debt.lines.retain(|l| l.debt > 0);
                        self.inner.emit(Event::Overage(Box::new(o)));
                        self.inner.emit(Event::DebtIncurred(Box::new(debt)));
                    } else {
                        self.inner.emit(Event::Overage(Box::new(o)));
                    }
                }
            }
            Err(Error::ReservationExpired { .. }) if wanted() => {
                self.inner.emit(Event::ReservationExpired {
                    reservation: id.to_string(),
                    operation,
                    at: self.inner.clock.now(),
                });
            }
            Err(_) => {}
        }
    }

    /// Settles a reservation held for a governed call once the call is over,
    /// by the one rule every binding's decorator, wrapper and middleware
    /// follows (see [`crate::settle`]): the call failed → released; it ran →
    /// committed at its actual usage (amounts finer than the unit rounded up),
    /// or at the estimate when that usage cannot be used. Never fails: the
    /// call already happened, so what went wrong is in
    /// [`Settlement::problem`](crate::settle::Settlement::problem) and emitted
    /// as [`Event::SettlementProblem`] — the caller returns the call's result
    /// (or re-raises its error) unchanged.
    pub async fn finish(&self, id: ReservationId, outcome: CallOutcome) -> Settlement {
        use crate::settle::{Charged, Settled, charge_for};
        let outcome = self.priced_outcome(id, outcome);
        let (charged, settled, note) = match &outcome {
            CallOutcome::Failed => {
                let settled = match self.inner.backend.release(id).await {
                    Ok(r) => Settled::Released(r),
                    Err(e) => settle_error(e),
                };
                (Charged::Nothing, settled, None)
            }
            CallOutcome::Ran(usage) => {
                let snapshot = self.inner.policy.load();
                let policy = &*snapshot;
                let (amounts, charged, note) = charge_for(policy, usage);
                match self.inner.backend.commit(policy, id, &amounts).await {
                    Ok(receipt) => (charged, Settled::Committed(receipt), note),
                    // The call ran: a `reject` limit refusing its actual
                    // leaves the estimate to charge.
                    Err(Error::OverageRejected {
                        unit,
                        reserved,
                        actual,
                        ..
                    }) => match self.inner.backend.commit(policy, id, &[]).await {
                        Ok(receipt) => (
                            Charged::Estimate,
                            Settled::Committed(receipt),
                            Some(format!(
                                "the actual {actual} {unit} exceeds the {reserved} reserved on a limit whose overage rule is `reject`; charged the estimate"
                            )),
                        ),
                        Err(e) => (Charged::Nothing, settle_error(e), note),
                    },
                    Err(e) => {
                        let charged = if e.kind() == crate::ErrorKind::Backend {
                            charged
                        } else {
                            Charged::Nothing
                        };
                        (charged, settle_error(e), note)
                    }
                }
            }
        };
        self.inner.queue.poke();
        match &settled {
            Settled::Committed(receipt) => self.settled(id, "finish", Ok(receipt)),
            Settled::Refused(e) if !matches!(outcome, CallOutcome::Failed) => {
                self.settled(id, "finish", Err(e));
            }
            Settled::Released(_) | Settled::Refused(_) if self.inner.audit.on() => {
                let r = match &settled {
                    Settled::Refused(e) => Err(e),
                    _ => Ok(None),
                };
                self.audit_settled("release", id, r);
            }
            _ => {}
        }
        let settlement = Settlement {
            id,
            charged,
            settled,
            note,
        };
        if let Some(problem) = settlement.problem() {
            self.inner.emit(Event::SettlementProblem {
                reservation: id,
                problem,
                at: self.inner.clock.now(),
            });
        }
        settlement
    }

    /// Ends a reservation or delegation and returns everything it holds.
    /// Returns `true` if this call released it, `false` if it was already
    /// released or had expired (idempotent).
    ///
    /// # Errors
    /// [`Error::ReservationNotFound`], [`Error::ReservationClosed`] (committed), backend failures.
    pub async fn release(&self, id: ReservationId) -> Result<bool> {
        let released = self.inner.backend.release(id).await;
        self.inner.queue.poke();
        if self.inner.audit.on() {
            self.audit_settled("release", id, released.as_ref().map(|_| None));
        }
        released
    }

    /// Renews a live reservation's lease to `lease` from now; returns the new
    /// expiry (µs since the epoch, backend clock).
    ///
    /// # Errors
    /// [`Error::ReservationExpired`] if it already lapsed, [`Error::ReservationClosed`]
    /// if ended, invalid lease, backend failures.
    pub async fn extend(&self, id: ReservationId, lease: Duration) -> Result<Micros> {
        let lease = validate_lease(lease)?;
        let extended = self.inner.backend.extend(id, lease).await;
        match &extended {
            Err(e @ Error::ReservationExpired { .. }) => self.settled(id, "extend", Err(e)),
            other if self.inner.audit.on() => {
                self.audit_settled("extend", id, other.as_ref().map(|_| None));
            }
            _ => {}
        }
        extended
    }

    /// Carves a sub-budget of `amounts` for the sub-agent scope `child`.
    ///
    /// The parent's quota, budget and concurrency limits (or the parent
    /// reservation's holds) hold the amounts under a lease; requests under
    /// `child` then spend from that grant and can never exceed it; their spend
    /// counts at the parent as it happens. Releasing the delegation (by its
    /// reservation id), or its lease running out, returns what is unspent.
    ///
    /// # Errors
    /// Invalid input: `child` not under the parent, no parent limit counts the
    /// units, an open delegation already on `child`, amounts; backend failures.
    pub async fn delegate(
        &self,
        from: DelegateFrom<'_>,
        child: &Scope,
        amounts: &Cost,
        lease: Option<Duration>,
    ) -> Result<Decision> {
        let snapshot = self.inner.policy.load();
        let policy = &*snapshot;
        let resolved = resolve_cost(policy, amounts)?;
        if resolved.iter().all(|(_, a)| *a == 0) {
            return Err(Error::invalid(
                "delegation amounts",
                "give at least one unit with a positive amount",
            ));
        }
        let (parent_scope, from_id) = match from {
            DelegateFrom::Scope(p) => {
                if !p.is_ancestor_of(child) {
                    return Err(Error::invalid(
                        "delegation",
                        format!("child scope `{child}` is not under parent scope `{p}`"),
                    ));
                }
                (p.clone(), None)
            }
            DelegateFrom::Reservation(id) => {
                if child.depth() < 2 {
                    return Err(Error::invalid(
                        "delegation",
                        format!("child scope `{child}` has no parent segment"),
                    ));
                }
                (child.ancestor(child.depth() - 1), Some(id))
            }
        };
        let plan = Plan::for_delegation(policy, &parent_scope, &resolved)?;
        if !plan.limits().any(|l| l.amount > 0) {
            let units: Vec<&str> = resolved.iter().map(|(u, _)| &**u).collect();
            return Err(Error::invalid(
                "delegation",
                format!(
                    "no quota, budget or concurrency limit of `{parent_scope}` or its ancestors counts {}",
                    units.join(", ")
                ),
            ));
        }
        let lease = match lease {
            Some(d) => validate_lease(d)?,
            None => policy.defaults().lease,
        };
        let mode = Mode::Delegate {
            child,
            from: from_id,
            id: ReservationId::random(),
            lease,
        };
        self.decide(&plan, mode).await
    }

    /// Waits until `request` is admitted (then acquires or reserves it), up to
    /// `max_wait`. Waiters whose limits overlap are served in priority order,
    /// first come first served within a tier: in this process by its own
    /// queue, and on a shared backend (Redis, Redis Cluster) across every
    /// process, each waiter holding a leased place in the line of the limits
    /// it waits on (see [`crate::plan::Waiter`]): a decision counts what the
    /// waiters ahead still need as taken. Returns the last denial if
    /// `max_wait` passes, or at once if the request can never succeed.
    /// Cancel-safe: dropping the future leaves the queue and holds nothing.
    ///
    /// # Errors
    /// Invalid input or a backend failure.
    pub async fn wait(
        &self,
        request: &Request,
        what: WaitFor,
        max_wait: Duration,
    ) -> Result<Decision> {
        self.wait_cancellable(request, what, max_wait, &WaitCancel::default())
            .await
    }

    /// [`Warden::wait`] that stops early once `cancel` is cancelled — only
    /// while it waits, never with a backend call in flight, so a cancelled wait
    /// holds nothing unless it returns an admission (which then belongs to the
    /// caller). Dropping a `wait` future mid-call is not that safe with a shared
    /// backend: the call may have been applied with no one to see the answer.
    /// A cancelled wait returns its last denial, with the reason `cancelled`.
    ///
    /// # Errors
    /// As [`Warden::wait`].
    pub async fn wait_cancellable(
        &self,
        request: &Request,
        what: WaitFor,
        max_wait: Duration,
        cancel: &WaitCancel,
    ) -> Result<Decision> {
        let clock = &self.inner.clock;
        let deadline = clock.now().saturating_add(micros(max_wait));
        // On a shared backend the caller also waits in line across processes.
        let policy = self.inner.policy.load();
        let plan = self.plan_of(&policy, request)?.waiting(Waiter {
            id: fastrand::u64(..),
            until: deadline,
            leave: false,
        });
        let lease = match what {
            WaitFor::Acquire => None,
            WaitFor::Reserve(l) => Some(self.lease(&plan, l)?),
        };
        // Waiters line up behind the limits they share, and behind the
        // traffic light of a coordinated upstream.
        let keys: Vec<Box<str>> = plan
            .limits()
            .map(|l| l.key.to_string().into_boxed_str())
            .chain(
                plan.upstream()
                    .map(|(r, _)| format!("@up#{r}").into_boxed_str()),
            )
            .collect();
        let queue = &self.inner.queue;
        let shared = self.inner.backend.name() != MemoryBackend::NAME;
        let mut ticket: Option<Ticket<'_>> = None;
        // A coordinated resource's breaker may close in another process:
        // its published transition wakes the waiters here at once.
        let changes = plan.upstream().and_then(|_| self.inner.backend.changes());
        loop {
            let notified = queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let changed = changes.as_deref().map(Notify::notified);
            tokio::pin!(changed);
            if let Some(c) = changed.as_mut().as_pin_mut() {
                c.enable();
            }
            // On a shared backend the line is the backend's: every waiter
            // asks it (a waiter held back here would have no place there, and
            // another process's lower tier would pass it). The local queue
            // then only wakes waiters early when capacity is handed back.
            let ahead = !shared
                && queue.ahead(
                    ticket.as_ref().map(|t| t.key),
                    request.priority.rank(),
                    &keys,
                );
            if !ahead {
                let mode = match lease {
                    None => Mode::Acquire,
                    Some(lease) => Mode::Reserve {
                        id: reservation_id(request),
                        lease,
                    },
                };
                let mut d = self.decide(&plan, mode).await?;
                let now = clock.now();
                let Some(retry) = d.retry_after.filter(|_| !d.allowed() && now < deadline) else {
                    if !d.allowed() && d.retry_after.is_some() {
                        self.leave_line(&plan).await;
                    }
                    return Ok(d);
                };
                if cancel.is_cancelled() {
                    self.leave_line(&plan).await;
                    d.reason = Some("cancelled".into());
                    return Ok(d);
                }
                // Join the queue, or move up a tier once the backend promoted us.
                let rank = d.priority.rank();
                match &mut ticket {
                    None => ticket = Some(queue.join(rank, keys.clone())),
                    Some(t) if t.key.0 > rank => t.promote(rank),
                    Some(_) => {}
                }
                let wake = now.saturating_add(micros(retry)).min(deadline);
                // Wake at the retry time, or earlier when capacity is handed back
                // in this process (a release or commit pokes the queue).
                tokio::select! {
                    () = clock.sleep_until(wake) => {}
                    () = &mut notified => {}
                    () = async {
                        match changed.as_mut().as_pin_mut() {
                            Some(c) => c.await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    () = cancel.cancelled() => {
                        self.leave_line(&plan).await;
                        d.reason = Some("cancelled".into());
                        return Ok(d);
                    }
                }
            } else {
                if ticket.is_none() {
                    ticket = Some(queue.join(request.priority.rank(), keys.clone()));
                    continue; // re-check with our place in the queue
                }
                if clock.now() >= deadline {
                    // Out of time while others were ahead: report the state, never an admission.
                    let mut d = self.decide(&leaving(&plan), Mode::Check).await?;
                    if d.allowed() {
                        d.outcome = Outcome::Deny;
                        d.caps = Caps::default();
                        d.reservation = None;
                        d.retry_after = Some(Duration::ZERO);
                        d.reason = Some(
                            "max_wait passed while waiters ahead in the queue were served".into(),
                        );
                    }
                    return Ok(d);
                }
                let cancelled = tokio::select! {
                    () = &mut notified => false,
                    () = clock.sleep_until(deadline) => false,
                    () = cancel.cancelled() => true,
                };
                if cancelled {
                    let mut d = self.decide(&leaving(&plan), Mode::Check).await?;
                    d.outcome = Outcome::Deny;
                    d.caps = Caps::default();
                    d.reservation = None;
                    d.reason = Some("cancelled".into());
                    return Ok(d);
                }
            }
        }
    }
}

impl Warden {
    /// Gives up a waiter's place in the line of a shared backend (a check
    /// that leaves; its answer and any failure are of no use — a place left
    /// behind lapses by itself after [`Waiter::GRACE`]).
    async fn leave_line(&self, plan: &Plan<'_>) {
        if self.inner.backend.name() != MemoryBackend::NAME {
            let _ = self.inner.backend.decide(&leaving(plan), Mode::Check).await;
        }
    }
}

/// `plan` for a check that leaves the line it waits in.
fn leaving<'p>(plan: &Plan<'p>) -> Plan<'p> {
    match plan.waiter() {
        Some(w) => plan.clone().waiting(Waiter { leave: true, ..w }),
        None => plan.clone(),
    }
}

/// The id of a new reservation: the operation id's bits when the caller gave
/// one (so a repeated request names the same reservation), else random.
fn reservation_id(request: &Request) -> ReservationId {
    request
        .operation
        .map_or_else(ReservationId::random, |op| ReservationId(op.0))
}

pub(crate) fn validate_lease(d: Duration) -> Result<Micros> {
    if d.is_zero() {
        return Err(Error::invalid("lease", "must be longer than zero"));
    }
    if d > MAX_LEASE {
        return Err(Error::invalid(
            "lease",
            format!("{d:?} is longer than the maximum of 7 days"),
        ));
    }
    Ok(micros(d).max(1))
}

/// Place in the wait queue: priority rank, then arrival order.
type QueueKey = (u8, u64);

/// In-process queue of `wait` callers: place → the keys they wait on.
#[derive(Default)]
struct WaitQueue {
    waiters: Mutex<BTreeMap<QueueKey, Vec<Box<str>>>>,
    seq: AtomicU64,
    notify: Notify,
}

struct Ticket<'q> {
    queue: &'q WaitQueue,
    key: (u8, u64),
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queue.waiters.lock().remove(&self.key);
        self.queue.notify.notify_waiters();
    }
}

impl Ticket<'_> {
    /// Moves to a higher tier, keeping the arrival order (older waiters stay ahead).
    fn promote(&mut self, rank: u8) {
        let mut waiters = self.queue.waiters.lock();
        if let Some(keys) = waiters.remove(&self.key) {
            self.key.0 = rank;
            waiters.insert(self.key, keys);
        }
    }
}

impl WaitQueue {
    /// Wakes queued waiters to retry now (capacity may have been handed back).
    fn poke(&self) {
        if !self.waiters.lock().is_empty() {
            self.notify.notify_waiters();
        }
    }

    fn join(&self, rank: u8, keys: Vec<Box<str>>) -> Ticket<'_> {
        let key = (rank, self.seq.fetch_add(1, Ordering::Relaxed));
        self.waiters.lock().insert(key, keys);
        Ticket { queue: self, key }
    }

    /// Whether a waiter ahead of us (higher tier, or same tier and earlier) waits on one of our keys.
    /// Without a ticket, every queued waiter of our tier or higher is ahead.
    fn ahead(&self, me: Option<(u8, u64)>, rank: u8, keys: &[Box<str>]) -> bool {
        let waiters = self.waiters.lock();
        if waiters.is_empty() {
            return false;
        }
        let bound = me.unwrap_or((rank, u64::MAX));
        waiters
            .range(..bound)
            .any(|(_, theirs)| theirs.iter().any(|k| keys.contains(k)))
    }
}
