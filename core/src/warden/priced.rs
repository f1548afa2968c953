//! Pricing from the warden: `cost`, `estimate`, `commit_usage`, and the
//! pricing of a request's usage before its decision ([`crate::pricing`]).

use std::borrow::Cow;

use super::Warden;
use crate::backend::Mode;
use crate::decision::{CommitReceipt, Decision, LimitState, Outcome, ReservationId};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::plan::Request;
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
        self.pricing(resource)?
            .price(usage, self.inner.clock.now(), false)
    }

    /// What a call with `usage` may cost on `resource` at its prices now:
    /// `max_output_tokens` priced when given (what a reservation holds).
    ///
    /// # Errors
    /// As [`Warden::cost`].
    pub fn estimate(&self, resource: &str, usage: &Usage) -> Result<Priced> {
        self.pricing(resource)?
            .price(usage, self.inner.clock.now(), true)
    }

    /// The cost this warden's decisions charge for `priced`: its money
    /// unit, `tokens`, and `input_tokens` / `output_tokens` / `requests`
    /// where the policy counts them ([`Priced::cost`]).
    #[must_use]
    pub fn charge_of(&self, priced: &Priced) -> crate::amount::Cost {
        let policy = &self.inner.policy;
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

    /// A resource's prices.
    pub(crate) fn pricing(&self, resource: &str) -> Result<&Pricing> {
        let policy = &self.inner.policy;
        let target = policy.resource(resource).ok_or_else(|| {
            Error::unknown(
                "resource",
                resource,
                policy.resources.keys().map(String::as_str),
            )
        })?;
        target
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

    fn priced_cost(
        &self,
        resource: &str,
        usage: &Usage,
        estimate: bool,
    ) -> Result<crate::amount::Cost> {
        let priced = self
            .pricing(resource)?
            .price(usage, self.inner.clock.now(), estimate)?;
        Ok(self.charge_of(&priced))
    }

    /// `request` with its usage priced into its cost (every unit its cost
    /// does not give itself); itself when it has no usage.
    pub(crate) fn priced<'r>(&self, request: &'r Request) -> Result<Cow<'r, Request>> {
        let Some(usage) = &request.usage else {
            return Ok(Cow::Borrowed(request));
        };
        let Some(resource) = &request.resource else {
            return Err(Error::InvalidArgument {
                what: "usage",
                message: "a request with usage needs a resource whose prices turn it into a cost"
                    .into(),
            });
        };
        let priced = self.priced_cost(resource, usage, true)?;
        let mut out = request.clone();
        for (unit, amount) in priced.iter() {
            if request.cost.get(unit).is_none() {
                out.cost.set(unit, amount);
            }
        }
        Ok(Cow::Owned(out))
    }

    /// A governed call's outcome with a priced usage turned into its cost
    /// (or, when it cannot be priced, into an unreadable usage: the estimate
    /// is charged and the reason reported).
    pub(crate) fn priced_outcome(&self, outcome: CallOutcome) -> CallOutcome {
        match outcome {
            CallOutcome::Ran(Settled::Priced { resource, usage }) => {
                CallOutcome::Ran(match self.priced_cost(&resource, &usage, false) {
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
    /// Decides a request by usage on a resource with `shrink:`: as asked,
    /// else — when only limits its output counts in (the money unit,
    /// `tokens`, `output_tokens`) denied it — again with `max_output_tokens`
    /// shrunk to what they leave this caller, allowed with
    /// `caps.max_tokens`. A request that names its operation
    /// ([`Request::operation`]) is decided as asked, never shrunk: a repeat
    /// with that id must answer what the first attempt did, and the size of
    /// a shrunk one depends on the state it met.
    pub(crate) async fn decide_usage(&self, request: &Request, how: UsageMode) -> Result<Decision> {
        let policy = &*self.inner.policy;
        let full = self.priced(request)?;
        let plan = Plan::build(policy, &full)?;
        let shrink = request
            .resource
            .as_deref()
            .and_then(|r| policy.resource(r))
            .and_then(|t| t.shrink.zip(t.pricing.as_deref()));
        let (Some((shrink, pricing)), Some(usage), None) =
            (shrink, request.usage.as_deref(), request.operation)
        else {
            let mode = self.usage_mode(&plan, request, how)?;
            return self.decide(&plan, mode).await;
        };
        let mode = self.usage_mode(&plan, request, how)?;
        let first = self.decide(&plan, mode).await?;
        let now = self.inner.clock.now();
        if first.outcome != Outcome::Deny || first.degraded.is_some() {
            return Ok(capped(first, pricing, usage, now));
        }
        let Some(fits) = fitting_output(&first, pricing, usage, now) else {
            return Ok(first);
        };
        if fits < shrink.min_output_tokens || fits >= usage.estimated_output() {
            return Ok(first);
        }
        let mut smaller = request.clone();
        if let Some(u) = smaller.usage.as_deref_mut() {
            u.max_output_tokens = Some(fits);
        }
        let priced = self.priced(&smaller)?;
        let plan = Plan::build(policy, &priced)?;
        let mode = self.usage_mode(&plan, request, how)?;
        let second = self.decide(&plan, mode).await?;
        if second.allowed() {
            Ok(capped(second, pricing, usage, now))
        } else {
            Ok(first)
        }
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

/// An admitted decision by usage with `caps.max_tokens` when what it took
/// covers fewer output tokens than asked (the shrunk attempt).
fn capped(
    mut d: Decision,
    pricing: &Pricing,
    usage: &Usage,
    now: crate::clock::Micros,
) -> Decision {
    if !d.allowed() {
        return d;
    }
    let asked = usage.estimated_output();
    let took = d
        .limits
        .iter()
        .filter_map(|l| output_within(l, l.amount, pricing, usage, now))
        .min()
        .unwrap_or(u64::MAX);
    if took < asked {
        d.caps.max_tokens = Some(d.caps.max_tokens.map_or(took, |m| m.min(took)));
        d.outcome = Outcome::AllowWithCaps;
        let why = format!(
            "the budget covers {took} of the {asked} output tokens asked: allowed with caps.max_tokens"
        );
        d.reason = Some(match d.reason.take() {
            Some(r) => format!("{r}; {why}"),
            None => why,
        });
    }
    d
}
