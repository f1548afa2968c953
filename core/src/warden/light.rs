//! The warden's side of upstream coordination: recording what responses say
//! (`observe`, `report`, `upstream`) and passing each decision on a
//! coordinated resource through its traffic light before its limits.

use super::Warden;
use crate::decision::{Decision, Outcome};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::plan::Plan;
use crate::upstream::breaker::BreakerState;
use crate::upstream::light::Sample;
use crate::upstream::{Coordination, UpstreamView, Zone, parse};

impl Warden {
    /// Names in `d.caps.backpressure` the workflow stages before the
    /// request's stages whose resources are limited now — red, told to wait,
    /// a breaker not closed, or in sequential mode — reading each of those
    /// resources' observed state once. A state that cannot be read names
    /// nothing (the decision stands as the limits made it).
    pub(super) async fn backpressure(&self, plan: &Plan<'_>, d: &mut Decision) {
        let stages = plan.stages_before();
        let mut read: Vec<(&str, bool)> = Vec::new();
        for stage in stages {
            let limited = match read.iter().find(|(r, _)| *r == &*stage.resource) {
                Some(&(_, l)) => l,
                None => {
                    let l = self.limited(&stage.resource).await;
                    read.push((&stage.resource, l));
                    l
                }
            };
            if limited {
                d.caps.backpressure.add(&stage.name);
            }
        }
        if !d.caps.backpressure.is_empty() && d.outcome == Outcome::Allow {
            d.outcome = Outcome::AllowWithCaps;
        }
    }

    /// Whether `resource`'s upstream is limited now (see [`Warden::backpressure`]).
    async fn limited(&self, resource: &str) -> bool {
        let Ok(c) = &self.coordination(resource) else {
            return false;
        };
        match self
            .inner
            .backend
            .observe(resource, c, &Sample::default())
            .await
        {
            Ok(o) => {
                let v = o.state.view(resource, o.now, c);
                v.zone == Zone::Red
                    || v.blocked.is_some()
                    || v.breaker != BreakerState::Closed
                    || v.sequential.is_some()
            }
            Err(_) => false,
        }
    }

    /// Records what one response of `resource`'s upstream said in its
    /// headers — `(name, value)` pairs, names in any case — where every
    /// process sharing the backend sees it at once, and answers the
    /// resource's state after it. Call it once per upstream response
    /// (`report` when the status is known). Malformed and sentinel values are
    /// skipped, listed in [`UpstreamView::warnings`]; headers that say
    /// nothing change nothing. The resource must declare `upstream:` in the
    /// policy.
    ///
    /// # Errors
    /// [`Error::Unknown`] for an undeclared resource,
    /// [`Error::InvalidArgument`] for one without `upstream:`, or a backend
    /// failure.
    pub async fn observe(&self, resource: &str, headers: &[(&str, &str)]) -> Result<UpstreamView> {
        self.observed(resource, None, headers).await
    }

    /// [`Warden::observe`] with the response's HTTP status: a 429 also stops
    /// every caller on the resource until its `Retry-After` (or, when it has
    /// none, until an exhausted quota resets, or for the breaker's `open_for`)
    /// and opens the circuit breaker (a 5xx too): then one probe goes.
    ///
    /// # Errors
    /// As [`Warden::observe`], and [`Error::InvalidArgument`] for a status
    /// outside 100-599.
    pub async fn report(
        &self,
        resource: &str,
        status: u16,
        headers: &[(&str, &str)],
    ) -> Result<UpstreamView> {
        if !(100..=599).contains(&status) {
            return Err(Error::invalid(
                "status",
                format!("{status} is not an HTTP status (100-599)"),
            ));
        }
        self.observed(resource, Some(status), headers).await
    }

    /// `resource`'s upstream state as every process sees it now: zone,
    /// fresh quotas (remaining less what was admitted since), how long
    /// callers must still wait. Changes nothing.
    ///
    /// # Errors
    /// As [`Warden::observe`].
    pub async fn upstream(&self, resource: &str) -> Result<UpstreamView> {
        let c = &self.coordination(resource)?;
        let o = self
            .inner
            .backend
            .observe(resource, c, &Sample::default())
            .await?;
        Ok(o.state.view(resource, o.now, c))
    }

    /// Checks a request an integration sends on every call — its scope,
    /// resource, cost and priority against the policy — and that its
    /// resource coordinates on its upstream, without asking the backend: a
    /// governed client checks its constant options when it is made.
    ///
    /// # Errors
    /// As [`Plan::build`] and [`Warden::coordination`]; a request without a
    /// resource is [`Error::InvalidArgument`].
    pub fn check_governed(&self, request: &crate::Request) -> Result<()> {
        Plan::build(&self.inner.policy.load(), request)?;
        let resource = request.resource.as_deref().ok_or_else(|| {
            Error::invalid(
                "resource",
                "a governed client needs the upstream's resource",
            )
        })?;
        self.coordination(resource).map(|_| ())
    }

    /// How `resource` coordinates on its upstream — checked without asking
    /// the backend, as integrations do when they are made.
    ///
    /// # Errors
    /// [`Error::Unknown`] for an undeclared resource,
    /// [`Error::InvalidArgument`] for one without `upstream:` in the policy.
    pub fn coordination(&self, resource: &str) -> Result<Coordination> {
        let policy = self.inner.policy.load();
        let target = policy.declared_resource(resource)?;
        target.upstream.clone().ok_or_else(|| {
            Error::invalid(
                "resource",
                format!(
                    "resource `{}` does not coordinate on its upstream: add `upstream: {{}}` \
                     under `resources.{}` in the policy",
                    crate::error::truncate(resource),
                    crate::error::truncate(resource)
                ),
            )
        })
    }

    async fn observed(
        &self,
        resource: &str,
        status: Option<u16>,
        headers: &[(&str, &str)],
    ) -> Result<UpstreamView> {
        let c = &self.coordination(resource)?;
        let observation = parse(headers.iter().copied(), self.inner.clock.now());
        let (sample, warnings) = Sample::of(&observation, status);
        let o = self.inner.backend.observe(resource, c, &sample).await?;
        // Waiters in this process look again: the light may have changed.
        self.inner.queue.poke();
        let mut view = o.state.view(resource, o.now, c);
        view.previous = o.before;
        view.warnings = observation.warnings;
        view.warnings.extend(warnings);
        if view.previous != view.zone {
            self.inner.emit(Event::UpstreamZone {
                resource: resource.to_owned(),
                from: view.previous,
                to: view.zone,
                at: o.now,
            });
        }
        self.breaker_event(resource, o.breaker_before, view.breaker, o.now);
        let on = view.sequential.is_some();
        if o.cascade_before != on {
            self.cascade_event(resource, on, o.now);
        }
        Ok(view)
    }

    fn breaker_event(
        &self,
        resource: &str,
        from: crate::upstream::BreakerState,
        to: crate::upstream::BreakerState,
        at: crate::clock::Micros,
    ) {
        if from != to {
            self.inner.emit(Event::Breaker {
                resource: resource.to_owned(),
                from,
                to,
                at,
            });
        }
    }

    fn cascade_event(&self, resource: &str, on: bool, at: crate::clock::Micros) {
        self.inner.emit(Event::Cascade {
            resource: resource.to_owned(),
            on,
            at,
        });
    }

    /// The events a gated decision implies: the half-open breaker let it
    /// through as its probe; it switched sequential mode on or off.
    #[inline]
    pub(super) fn light_events(&self, resource: &str, d: &Decision) {
        let Some(light) = d.light else { return };
        if light.cascade.is_none() && !light.probe {
            return;
        }
        if let Some(on) = light.cascade {
            self.cascade_event(resource, on, self.inner.clock.now());
        }
        if d.allowed() && light.probe {
            self.breaker_event(
                resource,
                crate::upstream::BreakerState::Open,
                crate::upstream::BreakerState::HalfOpen,
                self.inner.clock.now(),
            );
        }
    }

    /// Takes `resource`'s **ordered lock** — what callers do when a decision
    /// carries `caps.sequential` (sequential mode): first come, first served
    /// across every process sharing the backend. Waits up to `max_wait`
    /// (looking again every 50 ms, or at once when a holder in this process
    /// releases); `None` if the time ran out (it left the line). The lock is
    /// held for at most `hold` — end it with [`Warden::release_turn`]; a
    /// holder that never does frees it when `hold` runs out, and a waiter
    /// that stops looking (a dead process, a dropped future) loses its place
    /// within [`LINE_WAIT_LEASE`].
    ///
    /// # Errors
    /// As [`Warden::coordination`]; [`Error::InvalidArgument`] for a `hold`
    /// of zero or over [`super::MAX_LEASE`]; a backend failure.
    pub async fn sequential(
        &self,
        resource: &str,
        hold: std::time::Duration,
        max_wait: std::time::Duration,
    ) -> Result<Option<Turn>> {
        self.coordination(resource)?;
        let hold = super::validate_lease(hold)?;
        let clock = &self.inner.clock;
        let deadline = clock.now().saturating_add(crate::clock::micros(max_wait));
        let id = crate::decision::ReservationId::random_in_process().0;
        let enter = crate::backend::LineOp::Enter {
            hold,
            wait: LINE_WAIT_LEASE,
        };
        loop {
            let notified = self.inner.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.backend.line(resource, id, enter).await? == 0 {
                return Ok(Some(Turn {
                    resource: resource.to_owned(),
                    id,
                }));
            }
            let now = clock.now();
            if now >= deadline {
                self.inner
                    .backend
                    .line(resource, id, crate::backend::LineOp::Leave)
                    .await?;
                return Ok(None);
            }
            tokio::select! {
                () = clock.sleep_until((now + LINE_POLL).min(deadline)) => {}
                () = &mut notified => {}
            }
        }
    }

    /// Releases an ordered lock taken with [`Warden::sequential`]: `true` if
    /// it still held it (`false`: its `hold` had run out and the line moved
    /// on).
    ///
    /// # Errors
    /// A backend failure.
    pub async fn release_turn(&self, turn: &Turn) -> Result<bool> {
        let held = self
            .inner
            .backend
            .line(&turn.resource, turn.id, crate::backend::LineOp::Leave)
            .await?;
        self.inner.queue.poke();
        Ok(held == 1)
    }
}

/// How often a waiter for an ordered lock looks again (µs).
const LINE_POLL: crate::clock::Micros = 50_000;

/// How long a waiter keeps its place in an ordered lock's line without
/// looking again (µs): a waiter that died leaves the line within it.
pub const LINE_WAIT_LEASE: crate::clock::Micros = 2_000_000;

/// A held ordered lock ([`Warden::sequential`]); end it with
/// [`Warden::release_turn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    resource: String,
    id: u128,
}

impl Turn {
    /// A turn as a binding carries it between calls (the resource and the
    /// holder's id from [`Turn::id`]).
    #[must_use]
    pub fn from_parts(resource: &str, id: u128) -> Self {
        Self {
            resource: resource.to_owned(),
            id,
        }
    }

    /// The resource whose lock it is.
    #[must_use]
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The holder's id (32 hex digits when shown).
    #[must_use]
    pub const fn id(&self) -> u128 {
        self.id
    }
}
