//! Pricing from the warden: `cost`, `estimate`, `commit_usage`, and the
//! pricing of a request's usage before its decision ([`crate::pricing`]).

use std::borrow::Cow;

use super::Warden;
use crate::decision::{CommitReceipt, ReservationId};
use crate::error::{Error, Result};
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
