//! Pricing from the warden: `cost`, `estimate`, `commit_usage`, and the
//! pricing of a request's usage before its decision ([`crate::pricing`]).

use std::sync::Arc;

use super::Warden;
use crate::amount::Amount;
use crate::backend::Mode;
use crate::decision::{CommitReceipt, Decision, LimitState, Outcome, ReservationId};
use crate::error::{Error, Result};
use crate::plan::Request;
use crate::plan::{Plan, resolve_cost};
use crate::policy::Policy;
use crate::pricing::{Priced, Pricing, Usage};
use crate::settle::{CallOutcome, Usage as Settled};

impl Warden {
    /// What `usage` costs on `resource` at its prices now: `output_tokens`
    /// priced (the actual bill, as a commit charges it).
    ///
    /// # Errors
    /// [`Error::Unknown`] for an undeclared resource; [`Error::InvalidArgument`]
    /// for a resource without `pricing:`, invalid usage, or a bill over the
    /// largest amount.
    pub fn cost(&self, resource: &str, usage: &Usage) -> Result<Priced> {
        pricing_in(&self.inner.policy.load(), resource)?.price(usage, self.inner.clock.now(), false)
    }

    /// What a call with `usage` may cost on `resource` at its prices now:
    /// `max_output_tokens` priced when given (what a reservation holds).
    ///
    /// # Errors
    /// As [`Warden::cost`].
    pub fn estimate(&self, resource: &str, usage: &Usage) -> Result<Priced> {
        pricing_in(&self.inner.policy.load(), resource)?.price(usage, self.inner.clock.now(), true)
    }

    /// The cost this warden's decisions charge for `priced`: its money
    /// unit, `tokens`, and `input_tokens` / `output_tokens` / `requests`
    /// where the policy counts them ([`Priced::cost`]).
    #[must_use]
    pub fn charge_of(&self, priced: &Priced) -> crate::amount::Cost {
        let policy = self.inner.policy.load();
        priced.cost(|u| policy.unit(u).is_some())
    }

    /// Commits a reservation on `resource` at the price of its actual
    /// `usage` (the money unit, `tokens`…; units the usage does not price are
    /// charged as reserved), as [`Warden::commit`].
    ///
    /// # Errors
    /// As [`Warden::cost`] and [`Warden::commit`].
    pub async fn commit_usage(
        &self,
        id: ReservationId,
        resource: &str,
        usage: &Usage,
    ) -> Result<CommitReceipt> {
        let cost = self.priced_cost(resource, usage, false)?;
        self.commit(id, &cost).await
    }

    fn priced_cost(
        &self,
        resource: &str,
        usage: &Usage,
        estimate: bool,
    ) -> Result<crate::amount::Cost> {
        let policy = self.inner.policy.load();
        let priced =
            pricing_in(&policy, resource)?.price(usage, self.inner.clock.now(), estimate)?;
        Ok(priced.cost(|u| policy.unit(u).is_some()))
    }

    /// The plan of `request` charging `usage` priced by its resource
    /// (`max_output_tokens` when given): the money unit, `tokens`, and
    /// `input_tokens` / `output_tokens` / `requests` where the policy counts
    /// them, beside every unit the request's cost gives itself (which wins).
    /// Borrows the policy's unit names: nothing is copied.
    pub(crate) fn usage_plan<'p>(
        &self,
        policy: &'p Policy,
        request: &'p Request,
        usage: &Usage,
    ) -> Result<Plan<'p>> {
        let Some(resource) = request.resource.as_deref() else {
            return Err(Error::InvalidArgument {
                what: "usage",
                message: "a request with usage needs a resource whose prices turn it into a cost"
                    .into(),
            });
        };
        let pricing = pricing_in(policy, resource)?;
        let bill = pricing.amount(usage, self.inner.clock.now(), true)?;
        let (input, output) = (usage.input_tokens, usage.estimated_output());
        let mut amounts = resolve_cost(policy, &request.cost)?;
        let money = pricing.unit();
        if !amounts.iter().any(|(u, _)| *u == money) {
            amounts.push((money, bill));
        }
        let mut add = |unit: &'p str, count: u64| -> Result<()> {
            if amounts.iter().any(|(u, _)| *u == unit) {
                return Ok(());
            }
            let Some(def) = policy.unit(unit) else {
                return Ok(());
            };
            // Counts are validated to 2^53 - 1: whole units need no conversion.
            let base = match def.decimals {
                0 => i64::try_from(count).unwrap_or(i64::MAX),
                d => Amount::from(count).to_base(unit, d)?,
            };
            amounts.push((unit, base));
            Ok(())
        };
        add("tokens", input + output)?;
        add("input_tokens", input)?;
        add("output_tokens", output)?;
        if let Some(calls) = usage.calls {
            add("requests", calls)?;
        }
        Plan::build_with(policy, request, amounts, true)
    }

    /// The plan of `request`: priced from its usage when it has one.
    pub(crate) fn plan_of<'p>(&self, policy: &'p Policy, request: &'p Request) -> Result<Plan<'p>> {
        match request.usage.as_deref() {
            Some(usage) => self.usage_plan(policy, request, usage),
            None => Plan::build(policy, request),
        }
    }

    /// A governed call's outcome with a priced usage turned into its cost
    /// (or, when it cannot be priced, into an unreadable usage: the estimate
    /// is charged and the reason reported). A reservation held on a
    /// `shrink.fallback` model (`caps.model`) is priced there: the call was
    /// made on it, whatever resource the guard names.
    pub(crate) fn priced_outcome(&self, id: ReservationId, outcome: CallOutcome) -> CallOutcome {
        let model = self.inner.fallbacks.lock().remove(&id).map(|(m, _)| m);
        match outcome {
            CallOutcome::Ran(Settled::Priced { resource, usage }) => {
                let resource = model.as_deref().unwrap_or(&resource);
                CallOutcome::Ran(match self.priced_cost(resource, &usage, false) {
                    Ok(cost) => Settled::Actual(cost),
                    Err(e) => Settled::Unreadable(format!("its usage could not be priced: {e}")),
                })
            }
            other => other,
        }
    }
}

/// How a decision by usage ends, when its output may be shrunk.
#[derive(Debug, Clone, Copy)]
pub(crate) enum UsageMode {
    Check,
    Acquire,
    Reserve(Option<std::time::Duration>),
}

impl Warden {
    /// Whether a decision on `request` may be shrunk ([`Warden::shrunk`]):
    /// a request by usage, without an operation id, denied by the backend
    /// itself (not a degraded fallback).
    pub(crate) fn may_shrink(&self, request: &Request, d: &Decision) -> bool {
        request.usage.is_some()
            && d.outcome == Outcome::Deny
            && d.degraded.is_none()
            && request.operation.is_none()
    }

    /// A request by usage on a resource with `shrink:` that `first` denied:
    /// when only limits its output counts in (the money unit, `tokens`,
    /// `output_tokens`) denied it, decided again with `max_output_tokens`
    /// shrunk to what they leave this caller, allowed with
    /// `caps.max_tokens`; else `first`. A request that names its operation
    /// ([`Request::operation`]) is never shrunk ([`Warden::may_shrink`]): a
    /// repeat with that id must answer what the first attempt did, and the
    /// size of a shrunk one depends on the state it met.
    pub(crate) async fn shrunk(
        &self,
        request: &Request,
        how: UsageMode,
        first: Decision,
    ) -> Result<Decision> {
        let snapshot = self.inner.policy.load();
        let policy = &*snapshot;
        let Some(usage) = request.usage.as_deref() else {
            return Ok(first);
        };
        let Some(shrink) = request
            .resource
            .as_deref()
            .and_then(|r| policy.resource(r))
            .and_then(|t| t.shrink.as_ref())
        else {
            return Ok(first);
        };
        let min = shrink.min_output_tokens;
        if let Some(d) = self.shrink_on(request, usage, how, &first, min).await? {
            return Ok(d);
        }
        // Cheaper models, in order: the same usage, priced (and shrunk) there.
        for name in shrink.fallback.iter() {
            let mut other = request.clone();
            other.resource = Some(name.to_string());
            let plan = self.usage_plan(policy, &other, usage)?;
            let mode = self.usage_mode(&plan, &other, how)?;
            let d = self.decide(&plan, mode).await?;
            let d = if d.allowed() {
                Some(d)
            } else if d.degraded.is_none() {
                self.shrink_on(&other, usage, how, &d, min).await?
            } else {
                None
            };
            if let Some(d) = d {
                let from = request.resource.as_deref().unwrap_or_default();
                return Ok(on_fallback(d, from, name));
            }
        }
        Ok(first)
    }

    /// `request` (by `usage` on its priced resource) decided again with
    /// `max_output_tokens` shrunk to what `denied` says is left, if that is
    /// at least `min`: the allowed decision with `caps.max_tokens`, or `None`.
    async fn shrink_on(
        &self,
        request: &Request,
        usage: &Usage,
        how: UsageMode,
        denied: &Decision,
        min: u64,
    ) -> Result<Option<Decision>> {
        let snapshot = self.inner.policy.load();
        let Some(pricing) = request
            .resource
            .as_deref()
            .and_then(|r| snapshot.resource(r))
            .and_then(|t| t.pricing.as_deref())
        else {
            return Ok(None);
        };
        let now = self.inner.clock.now();
        let Some(fits) = fitting_output(denied, pricing, usage, now) else {
            return Ok(None);
        };
        let asked = usage.estimated_output();
        if fits < min || fits >= asked {
            return Ok(None);
        }
        let smaller = Usage {
            max_output_tokens: Some(fits),
            ..usage.clone()
        };
        let plan = self.usage_plan(&snapshot, request, &smaller)?;
        let mode = self.usage_mode(&plan, request, how)?;
        let second = self.decide(&plan, mode).await?;
        Ok(second.allowed().then(|| capped(second, fits, asked)))
    }

    fn usage_mode(
        &self,
        plan: &Plan<'_>,
        request: &Request,
        how: UsageMode,
    ) -> Result<Mode<'static>> {
        Ok(match how {
            UsageMode::Check => Mode::Check,
            UsageMode::Acquire => Mode::Acquire,
            UsageMode::Reserve(lease) => Mode::Reserve {
                id: super::reservation_id(request),
                lease: self.lease(plan, lease)?,
            },
        })
    }
}

/// The most output tokens a limit of `l`'s unit lets pass for `usage` when
/// it has `room` base units: `None` when the unit does not count output.
fn output_within(
    l: &LimitState,
    room: i64,
    pricing: &Pricing,
    usage: &Usage,
    now: crate::clock::Micros,
) -> Option<u64> {
    let room = room.max(0);
    let input = usage.input_tokens;
    match l.unit() {
        u if u == pricing.unit() => Some(pricing.max_output_within(usage, room, now).unwrap_or(0)),
        "tokens" => Some(room.unsigned_abs().saturating_sub(input)),
        "output_tokens" => Some(room.unsigned_abs()),
        _ => None,
    }
}

/// The most output tokens every limit that denied `d` leaves its caller
/// (what remains above the floor kept from its priority); `None` when a
/// limit that does not count output denied it.
fn fitting_output(
    d: &Decision,
    pricing: &Pricing,
    usage: &Usage,
    now: crate::clock::Micros,
) -> Option<u64> {
    let mut fits = u64::MAX;
    for l in d.limits.iter().filter(|l| l.denied) {
        let cap = l.limit();
        let kept = cap - l.def.floors.usable(cap, d.priority);
        fits = fits.min(output_within(l, l.remaining - kept, pricing, usage, now)?);
    }
    Some(fits)
}

/// A decision made on the fallback model `name` instead of `from`.
fn on_fallback(mut d: Decision, from: &str, name: &str) -> Decision {
    d.caps.model = Some(Arc::from(name));
    with_caps(
        d,
        format!(
            "the budget does not cover the call on `{from}`: allowed on the fallback `{name}` with caps.model (commit its usage on `{name}`)"
        ),
    )
}

/// The shrunk attempt's decision: allowed with `caps.max_tokens = fits`.
fn capped(mut d: Decision, fits: u64, asked: u64) -> Decision {
    d.caps.max_tokens = Some(d.caps.max_tokens.map_or(fits, |m| m.min(fits)));
    with_caps(
        d,
        format!(
            "the budget covers {fits} of the {asked} output tokens asked: allowed with caps.max_tokens"
        ),
    )
}

/// `d` as an allow with caps, `why` added to its reason.
fn with_caps(mut d: Decision, why: String) -> Decision {
    d.outcome = Outcome::AllowWithCaps;
    d.reason = Some(match d.reason.take() {
        Some(r) => format!("{r}; {why}"),
        None => why,
    });
    d
}

/// `resource`'s prices in `policy`.
fn pricing_in<'p>(policy: &'p Policy, resource: &str) -> Result<&'p Pricing> {
    policy
        .declared_resource(resource)?
        .pricing
        .as_deref()
        .ok_or_else(|| Error::InvalidArgument {
            what: "usage",
            message: format!(
                "resource `{}` has no `pricing:` in the policy, so usage cannot be priced (pass a cost instead)",
                crate::error::truncate(resource)
            ),
        })
}
