//! The warden's side of upstream coordination: recording what responses say
//! (`observe`, `report`, `upstream`) and passing each decision on a
//! coordinated resource through its traffic light before its limits.

use std::time::Duration;

use super::Warden;
use crate::backend::Mode;
use crate::decision::{Caps, Decision, Outcome};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::plan::Plan;
use crate::upstream::light::{Gate, Sample, Verdict, Why};
use crate::upstream::{Coordination, Light, UpstreamView, parse};

impl Warden {
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
    /// none, until an exhausted quota resets, or for the policy's `block`).
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
        let c = self.coordination(resource)?;
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
        Plan::build(&self.inner.policy, request)?;
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
    pub fn coordination(&self, resource: &str) -> Result<&Coordination> {
        let policy = &self.inner.policy;
        let target = policy.resource(resource).ok_or_else(|| {
            Error::unknown(
                "resource",
                resource,
                policy.resources.keys().map(String::as_str),
            )
        })?;
        target.upstream.as_ref().ok_or_else(|| {
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
        let c = self.coordination(resource)?;
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
            let _ = self.inner.events.send(Event::UpstreamZone {
                resource: resource.to_owned(),
                from: view.previous,
                to: view.zone,
                at: o.now,
            });
        }
        self.breaker_event(resource, o.breaker_before, view.breaker, o.now);
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
            let _ = self.inner.events.send(Event::Breaker {
                resource: resource.to_owned(),
                from,
                to,
                at,
            });
        }
    }

    /// A decision on a coordinated resource: its traffic light first, then
    /// its limits. What the light counted is given back when the limits
    /// deny (or fail); a light that denies leaves the limits unchanged (they
    /// are only checked, so the decision reports their true state).
    pub(super) async fn through_light(
        &self,
        plan: &Plan<'_>,
        mode: Mode<'_>,
        resource: &str,
        c: &Coordination,
    ) -> Result<Decision> {
        let backend = &self.inner.backend;
        let gate = backend
            .gate(resource, c, plan.upstream_ask(mode.mutates()))
            .await?;
        let mut d = match gate.verdict {
            Verdict::Deny { retry, why } => {
                let mut d = backend.decide(plan, Mode::Check).await?;
                let retry = Duration::from_micros(u64::try_from(retry).unwrap_or(0));
                d.retry_after = if d.allowed() {
                    Some(retry)
                } else {
                    d.retry_after.map(|r| r.max(retry))
                };
                let why = denial(resource, why, &gate.light);
                d.reason = Some(match d.reason.take().filter(|_| !d.allowed()) {
                    Some(limits) => format!("{why}; {limits}"),
                    None => why,
                });
                d.outcome = Outcome::Deny;
                d.caps = Caps::default();
                d.reservation = None;
                d
            }
            Verdict::Pass | Verdict::Delay(_) => {
                let d = backend.decide(plan, mode).await;
                if !d.as_ref().is_ok_and(Decision::allowed) {
                    self.give_back(resource, c, &gate).await;
                }
                let mut d = d?;
                if d.allowed() && (gate.max_tokens.is_some() || gate.model.is_some()) {
                    d.caps.merge(&Caps {
                        max_tokens: gate.max_tokens.and_then(|t| u64::try_from(t).ok()),
                        model: gate.model.and_then(|i| c.breaker.fallback.get(i).cloned()),
                        ..Caps::default()
                    });
                    d.outcome = Outcome::AllowWithCaps;
                    let why = format!(
                        "the breaker of `{resource}` is pre-emptively open: its quota runs out within {}",
                        crate::policy::fmt_duration(c.breaker.horizon)
                    );
                    d.reason = Some(match d.reason.take() {
                        Some(r) => format!("{r}; {why}"),
                        None => why,
                    });
                }
                if gate.probe && d.allowed() {
                    let why = format!(
                        "the half-open breaker's probe of `{resource}`: report its outcome"
                    );
                    d.reason = Some(match d.reason.take() {
                        Some(r) => format!("{r}; {why}"),
                        None => why,
                    });
                    self.breaker_event(
                        resource,
                        crate::upstream::BreakerState::Open,
                        crate::upstream::BreakerState::HalfOpen,
                        self.inner.clock.now(),
                    );
                }
                if let (Verdict::Delay(us), true) = (gate.verdict, d.allowed()) {
                    if us > 0 {
                        d.caps.merge(&Caps {
                            delay_ms: Some(u64::try_from((us + 999) / 1000).unwrap_or(0)),
                            ..Caps::default()
                        });
                        d.outcome = Outcome::AllowWithCaps;
                        let why = format!(
                            "the upstream of `{resource}` is amber ({}): {} callers wait first",
                            share(&gate.light),
                            d.priority
                        );
                        d.reason = Some(match d.reason.take() {
                            Some(r) => format!("{r}; {why}"),
                            None => why,
                        });
                    }
                }
                d
            }
        };
        d.light = Some(gate.light);
        Ok(d)
    }

    /// Hands back what a pass through the light counted. A failure only
    /// leaves the estimate lower until the next response (never over-admits).
    async fn give_back(&self, resource: &str, c: &Coordination, gate: &Gate) {
        if let Some(t) = gate.ticket {
            let _ = self.inner.backend.ungate(resource, c, t).await;
        }
    }
}

fn share(light: &Light) -> String {
    match (light.left, light.dimension) {
        (Some(l), Some(d)) => format!("{}.{}% of {} left", l / 10, l % 10, d.as_str()),
        _ => "nothing fresh known".to_owned(),
    }
}

fn denial(resource: &str, why: Why, light: &Light) -> String {
    match why {
        Why::Blocked => {
            format!("the upstream of `{resource}` asked callers to wait (Retry-After or 429)")
        }
        Why::Exhausted(d) => format!(
            "the upstream of `{resource}` has no {} left for this request until it resets",
            d.as_str()
        ),
        Why::Red => format!(
            "the upstream of `{resource}` is red ({}): background callers wait for its reset",
            share(light)
        ),
        Why::Open => format!(
            "the breaker of `{resource}` is open: the upstream failed (429 or 5xx); it half-opens for one probe"
        ),
        Why::Probing => format!(
            "the breaker of `{resource}` is half-open and its probe is out: waiting for its outcome"
        ),
        Why::Deferred => format!(
            "the upstream of `{resource}` is amber ({}): a delay could reach past its reset, so this asks again later",
            share(light)
        ),
        Why::Paced => format!(
            "the upstream of `{resource}` is red ({}): standard callers go one at a time, paced",
            share(light)
        ),
    }
}
