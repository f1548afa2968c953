//! Soft allocations of shared pools from the warden: `allocate`,
//! `heartbeat`, `deallocate` ([`crate::pool`] says what they do to
//! decisions).

use std::time::Duration;

use super::Warden;
use crate::amount::Cost;
use crate::backend::AllotOp;
use crate::clock::{Micros, micros};
use crate::error::{Error, Result};
use crate::plan::{Plan, PlannedLimit, Request, resolve_cost};
use crate::policy::{Attach, LimitKind};
use crate::pool::MAX_ALLOT_LEASE;
use crate::scope::Scope;

/// An agent's allocation of a resource's pools, as [`Warden::allocate`] made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Per pool limit: its name and the amount set aside per window (base units).
    pub pools: Vec<(String, i64)>,
    /// Until when it stays active without another heartbeat (µs since the
    /// epoch); donated after, gone one lease later.
    pub active_until: Micros,
}

/// Whether `l` is a pool quota or budget (what allocations apply to).
fn allottable(l: &PlannedLimit<'_>) -> bool {
    matches!(l.def.attach, Attach::Pool)
        && matches!(l.def.kind, LimitKind::Quota(_) | LimitKind::Budget(_))
}

impl Warden {
    /// Sets aside `amounts` of every window of `resource`'s shared pools
    /// (its quotas and budgets without `scope:`) for the agent `agent` and
    /// the scopes under it, active for `lease` and renewed by
    /// [`Warden::heartbeat`]; calling it again resizes the allocation. See
    /// [`crate::pool`] for who may draw on it when.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a lease of zero or over a day, amounts
    /// that are not positive, a resource with no pool counting their units,
    /// or more than the other agents' allocations leave of a pool (nothing
    /// of this call is kept then); unknown names; a backend failure.
    pub async fn allocate(
        &self,
        agent: &Scope,
        resource: &str,
        amounts: &Cost,
        lease: Duration,
    ) -> Result<Allocation> {
        let lease = micros(lease);
        if lease <= 0 || lease > MAX_ALLOT_LEASE {
            return Err(Error::invalid(
                "lease",
                "an allocation's lease is longer than zero and at most a day",
            ));
        }
        let snapshot = self.inner.policy.load();
        let policy = &*snapshot;
        let resolved = resolve_cost(policy, amounts)?;
        if resolved.is_empty() || resolved.iter().any(|(_, a)| *a <= 0) {
            return Err(Error::invalid(
                "allocation amounts",
                "give at least one unit, every amount positive",
            ));
        }
        let request = Request::new(agent.clone())
            .resource(resource)
            .cost(amounts.clone());
        let plan = Plan::build(policy, &request)?;
        let pools: Vec<PlannedLimit<'_>> = plan
            .limits()
            .filter(|l| {
                allottable(l) && l.amount > 0 && resolved.iter().any(|(u, _)| *u == l.def.unit)
            })
            .collect();
        if pools.is_empty() {
            let units: Vec<&str> = resolved.iter().map(|(u, _)| *u).collect();
            return Err(Error::invalid(
                "allocation",
                format!(
                    "resource `{resource}` has no shared quota or budget (a limit without `scope:`) counting {}",
                    units.join(", ")
                ),
            ));
        }
        let owner = agent.as_str();
        let mut active_until = 0;
        for (i, l) in pools.iter().enumerate() {
            let set = AllotOp::Set {
                owner,
                amount: l.amount,
                lease,
            };
            match self.inner.backend.allot(l, set).await {
                Ok(t) => active_until = t,
                Err(e) => {
                    for done in &pools[..i] {
                        let _ = self
                            .inner
                            .backend
                            .allot(done, AllotOp::Drop { owner })
                            .await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(Allocation {
            pools: pools
                .iter()
                .map(|l| (l.def.name.clone(), l.amount))
                .collect(),
            active_until,
        })
    }

    /// Keeps every allocation `agent` holds active for another lease (each
    /// its own); returns how many it renewed — 0 when none is left (it went
    /// dead: allocate again).
    ///
    /// # Errors
    /// A scope the policy does not know; a backend failure.
    pub async fn heartbeat(&self, agent: &Scope) -> Result<usize> {
        self.each_pool(agent, None, |owner| AllotOp::Beat { owner })
            .await
    }

    /// Gives up `agent`'s allocation of `resource`'s pools; returns whether
    /// it had one.
    ///
    /// # Errors
    /// Unknown names; a backend failure.
    pub async fn deallocate(&self, agent: &Scope, resource: &str) -> Result<bool> {
        self.each_pool(agent, Some(resource), |owner| AllotOp::Drop { owner })
            .await
            .map(|n| n > 0)
    }

    /// Applies `op` to `agent`'s allocation of every pool of `resource` (or
    /// of every resource); counts the answers above zero.
    async fn each_pool(
        &self,
        agent: &Scope,
        resource: Option<&str>,
        op: impl for<'o> Fn(&'o str) -> AllotOp<'o>,
    ) -> Result<usize> {
        let snapshot = self.inner.policy.load();
        let policy = &*snapshot;
        let names: Vec<&str> = match resource {
            Some(r) => vec![r],
            None => policy.resources.keys().map(String::as_str).collect(),
        };
        let mut n = 0;
        for name in names {
            let request = Request::new(agent.clone()).resource(name);
            let plan = Plan::build(policy, &request)?;
            for l in plan.limits().filter(allottable) {
                if self.inner.backend.allot(&l, op(agent.as_str())).await? > 0 {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}
