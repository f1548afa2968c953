//! Requests and plans.
//!
//! A [`Request`] says who spends (scope), on what (resource, action), how much
//! (cost) and at which priority. [`Plan::build`] resolves it against a policy
//! into the exact list of limit instances it touches — scope chain × resource ×
//! action, each with its storage key and amount in base units. A backend gets
//! the whole plan in one call and decides it atomically.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::amount::{Amount, Cost, MAX_AMOUNT};
use crate::clock::Micros;
use crate::decision::OperationId;
use crate::error::{Error, Result};
use crate::policy::{Attach, LimitDef, LimitKind, Policy, StageRef};
use crate::priority::Priority;
use crate::scope::Scope;
use crate::upstream::Coordination;
use crate::upstream::light::{Ask, DIMENSIONS};

/// One request for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Who is spending.
    pub scope: Scope,
    /// The upstream resource, if any (`github`, `openai:gpt-4o`).
    pub resource: Option<String>,
    /// The action, if any (`send_email`).
    pub action: Option<String>,
    /// What it spends; one request by default.
    pub cost: Cost,
    /// What it uses, priced by its resource's `pricing:` into the cost
    /// ([`crate::pricing`]): the estimate (`max_output_tokens` when given)
    /// is added to `cost` for every unit `cost` does not give itself.
    pub usage: Option<Box<crate::pricing::Usage>>,
    /// Its priority; standard by default.
    pub priority: Priority,
    /// The id under which a state-changing decision is remembered, so asking
    /// again with it returns the first answer and charges at most once; a
    /// fresh one per call when not given (see [`crate::OperationId`]).
    pub operation: Option<OperationId>,
}

impl Request {
    /// A request of one unit of `requests` by `scope` at standard priority.
    #[must_use]
    pub fn new(scope: Scope) -> Self {
        Self {
            scope,
            resource: None,
            action: None,
            cost: Cost::new(),
            usage: None,
            priority: Priority::Standard,
            operation: None,
        }
    }

    /// Parses `scope` and builds a request.
    ///
    /// # Errors
    /// [`Error::InvalidScope`] if the scope is malformed.
    pub fn parse(scope: &str) -> Result<Self> {
        Ok(Self::new(Scope::parse(scope)?))
    }

    /// Sets the resource.
    #[must_use]
    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Sets the action.
    #[must_use]
    pub fn action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    /// Sets the whole cost.
    #[must_use]
    pub fn cost(mut self, cost: Cost) -> Self {
        self.cost = cost;
        self
    }

    /// Sets what the request uses: its resource's prices turn it into the
    /// cost (the money unit, `tokens`…) when the decision is made.
    #[must_use]
    pub fn usage(mut self, usage: crate::pricing::Usage) -> Self {
        self.usage = Some(Box::new(usage));
        self
    }

    /// Adds one unit's amount to the cost.
    #[must_use]
    pub fn spend(mut self, unit: &str, amount: impl Into<Amount>) -> Self {
        self.cost.set(unit, amount.into());
        self
    }

    /// Sets the priority.
    #[must_use]
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the operation id: repeating a request with the id of an earlier
    /// one (e.g. a decision marked `unconfirmed`) returns that earlier
    /// decision instead of deciding again.
    #[must_use]
    pub fn operation(mut self, id: OperationId) -> Self {
        self.operation = Some(id);
        self
    }
}

/// A storage key in two parts, `<prefix>#<name>`, so keys are hashed and
/// compared without being built: `prefix` is a scope prefix (or `@` for a
/// shared pool) and `name` a limit name. Special keys (grants, starvation
/// trackers) are full strings split at their last `#`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRef<'a> {
    /// Everything before the last `#`.
    pub prefix: &'a str,
    /// Everything after the last `#`.
    pub name: &'a str,
}

impl<'a> KeyRef<'a> {
    /// Splits a full key at its last `#`.
    #[must_use]
    pub fn split(full: &'a str) -> Self {
        let (prefix, name) = full.rsplit_once('#').unwrap_or((full, ""));
        Self { prefix, name }
    }

    /// Whether `full` is this key.
    #[must_use]
    pub fn matches(&self, full: &str) -> bool {
        full.len() == self.prefix.len() + 1 + self.name.len()
            && full.as_bytes()[self.prefix.len()] == b'#'
            && full.starts_with(self.prefix)
            && full.ends_with(self.name)
    }
}

impl std::fmt::Display for KeyRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.prefix, self.name)
    }
}

/// FNV-1a, 64 bits: a hash that is the same in every process, version and
/// language, for what is stored in a shared backend.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Hashes one field (followed by a separator).
    fn eat(&mut self, bytes: &[u8]) {
        const PRIME: u64 = 0x0100_0000_01b3;
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(PRIME);
        }
        self.0 = (self.0 ^ 0xff).wrapping_mul(PRIME);
    }
}

/// One limit instance of a plan.
#[derive(Debug, Clone, Copy)]
pub struct PlannedLimit<'p> {
    /// Storage key: `<scope prefix>#<limit>` or `@#<limit>` for shared pools.
    pub key: KeyRef<'p>,
    /// The limit.
    pub def: &'p Arc<LimitDef>,
    /// Amount this request takes from it, base units (may be zero).
    pub amount: i64,
    /// How many segments of the request's scope key the counter; `None` for a shared pool.
    pub scope_depth: Option<u8>,
}

impl PlannedLimit<'_> {
    /// The key without the `#<limit>` suffix: the scope prefix, or `@` for pools.
    #[must_use]
    pub fn owner_key(&self) -> &str {
        self.key.prefix
    }
}

#[derive(Debug, Clone, Copy)]
struct Item {
    /// Scope segments the counter is keyed by; 0 for a shared pool.
    depth: u8,
    limit: u32,
    amount: i64,
}

/// A request resolved against a policy: every limit it touches, in order.
#[derive(Debug, Clone)]
pub struct Plan<'p> {
    policy: &'p Policy,
    scope: &'p Scope,
    items: SmallVec<[Item; 8]>,
    caller: Option<String>,
    priority: Priority,
    promote_after: Micros,
    operation: Option<OperationId>,
    /// The resource, when it coordinates on its upstream.
    upstream: Option<(&'p str, &'p Coordination, &'p Cost)>,
    /// Set by [`crate::Warden::wait`]: the caller waits in line on a shared backend.
    /// (Boxed, like `stages_before` is a thin reference: the plan is moved
    /// on every decision, and these are set on few.)
    waiter: Option<Box<Waiter>>,
    /// The workflow stages before the stages that call the resource.
    stages_before: Option<&'p Vec<StageRef>>,
    /// What the upstream's light counts, when the cost was priced from usage.
    dims: Option<Box<[i64; DIMENSIONS]>>,
    /// The request it was built from (the audit log names its resource and action).
    request: Option<&'p Request>,
}

/// A `wait` caller's place in the line of a shared backend's limits.
///
/// On Redis and Redis Cluster every waiter is recorded in the limits it waits
/// on (rank, arrival, amount, and a lease); a decision for a waiter counts
/// what the live waiters ahead of it (a higher tier, or the same tier and
/// earlier) still need as taken, so capacity goes to waiters in priority
/// order, first come first served within a tier, across every process. The
/// place lapses by itself shortly after the waiter's next retry time, so a
/// dead waiter never blocks the line for long. The embedded engine orders
/// waiters in its own process and ignores this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    /// The waiter's identity in the line (random per `wait` call).
    pub id: u64,
    /// When the waiter gives up, on the warden's clock (µs): its place never
    /// outlives this by more than the grace of [`Waiter::GRACE`].
    pub until: Micros,
    /// Leave the line (sent with a check when a wait ends unadmitted).
    pub leave: bool,
}

impl Waiter {
    /// How long past its next retry time a waiter's place is kept for it: a
    /// waiter that died holds back what it waited for at most this long.
    pub const GRACE: Micros = 1_000_000;
}

/// Base amounts per unit resolved from a [`Cost`], borrowing its unit names.
pub type Amounts<'a> = SmallVec<[(&'a str, i64); 4]>;

/// Converts a cost to base units using the policy's unit decimals.
///
/// # Errors
/// [`Error::Unknown`] for a unit the policy does not know, [`Error::InvalidAmount`]
/// for negative, too precise or too large amounts.
pub fn resolve_cost<'c>(policy: &Policy, cost: &'c Cost) -> Result<Amounts<'c>> {
    let mut out = Amounts::new();
    for (unit, amount) in cost.iter() {
        let def = policy
            .unit(unit)
            .ok_or_else(|| Error::unknown("unit", unit, policy.units.keys().map(String::as_str)))?;
        out.push((unit, amount.to_base(unit, def.decimals)?));
    }
    Ok(out)
}

/// Checks everything about `request` but its scope against `policy` — the
/// resource, the action, the cost's units and amounts — as a middleware does
/// once for its constant request fields, so a typo fails when the middleware
/// is made rather than on every request.
///
/// # Errors
/// [`Error::Unknown`] for undeclared resources, actions or units;
/// [`Error::InvalidAmount`] for bad amounts.
pub fn check_parts(policy: &Policy, request: &Request) -> Result<()> {
    resolve_cost(policy, &request.cost)?;
    if let Some(a) = &request.action {
        if policy.action(a).is_none() {
            return Err(Error::unknown(
                "action",
                a,
                policy.actions.keys().map(String::as_str),
            ));
        }
    }
    if let Some(r) = &request.resource {
        if policy.resource(r).is_none() {
            return Err(Error::unknown(
                "resource",
                r,
                policy.resources.keys().map(String::as_str),
            ));
        }
    }
    Ok(())
}

/// What a request takes of each upstream dimension, in whole units: its
/// `requests` (1 when unsaid); `tokens` (or input plus output tokens);
/// `input_tokens` (or, unsaid, its `tokens`: the conservative guess);
/// `output_tokens`.
fn upstream_amounts(policy: &Policy, amounts: &[(&str, i64)]) -> [i64; DIMENSIONS] {
    let get = |unit: &str| {
        amounts.iter().find(|(u, _)| *u == unit).map(|&(u, a)| {
            let decimals = policy.unit(u).map_or(0, |d| u32::from(d.decimals));
            10i64
                .checked_pow(decimals)
                .map_or(i64::from(a > 0), |p| a / p + i64::from(a % p != 0))
        })
    };
    let (input, output) = (get("input_tokens"), get("output_tokens"));
    let tokens = get("tokens").or_else(|| {
        (input.is_some() || output.is_some()).then(|| input.unwrap_or(0) + output.unwrap_or(0))
    });
    [
        get("requests").unwrap_or(1),
        tokens.unwrap_or(0),
        input.or_else(|| get("tokens")).unwrap_or(0),
        output.unwrap_or(0),
    ]
}

fn amount_for(amounts: &[(&str, i64)], unit: &str, default_requests: bool) -> Option<i64> {
    match amounts.iter().find(|(u, _)| *u == unit) {
        Some((_, a)) => Some(*a),
        None if default_requests && unit == "requests" => Some(1),
        None => None,
    }
}

impl<'p> Plan<'p> {
    /// Resolves `request` against `policy`.
    ///
    /// # Errors
    /// [`Error::Unknown`] for undeclared scope kinds, resources, actions or units;
    /// [`Error::InvalidAmount`] for bad amounts.
    #[inline]
    pub fn build(policy: &'p Policy, request: &'p Request) -> Result<Self> {
        let amounts = resolve_cost(policy, &request.cost)?;
        Self::build_with(policy, request, amounts, false)
    }

    /// As [`Plan::build`], charging `amounts` (base units) instead of the
    /// request's own cost — its usage priced ([`crate::pricing`]); with
    /// `priced`, what the upstream's light counts comes from them too.
    ///
    /// # Errors
    /// As [`Plan::build`].
    pub fn build_with(
        policy: &'p Policy,
        request: &'p Request,
        mut amounts: Amounts<'p>,
        priced: bool,
    ) -> Result<Self> {
        let action = match &request.action {
            None => None,
            Some(a) => Some(policy.action(a).ok_or_else(|| {
                Error::unknown("action", a, policy.actions.keys().map(String::as_str))
            })?),
        };
        if let Some(act) = action {
            if act.risk > 0 && !amounts.iter().any(|(u, _)| *u == "risk") {
                amounts.push(("risk", act.risk));
            }
        }
        let resource = match &request.resource {
            None => None,
            Some(r) => Some(policy.resource(r).ok_or_else(|| {
                Error::unknown("resource", r, policy.resources.keys().map(String::as_str))
            })?),
        };
        let scope = &request.scope;
        let mut plan = Self::empty(policy, scope, request.priority);
        plan.operation = request.operation;
        plan.request = Some(request);
        for i in 0..scope.depth() {
            let kind = scope.kind(i);
            let limits = crate::policy::lookup(&policy.scopes, kind).ok_or_else(|| {
                Error::unknown("scope kind", kind, policy.scopes.keys().map(String::as_str))
            })?;
            for def in limits {
                let amount = amount_for(&amounts, &def.unit, true).unwrap_or(0);
                plan.push(i + 1, def, amount);
            }
        }
        if let Some(r) = resource {
            if let (Some(name), Some(c)) = (&request.resource, r.upstream.as_ref()) {
                plan.upstream = Some((name.as_str(), c, &request.cost));
                if priced {
                    plan.dims = Some(Box::new(upstream_amounts(policy, &amounts)));
                }
            }
            if !r.stages_before.is_empty() {
                plan.stages_before = Some(&r.stages_before);
            }
        }
        for target in resource.into_iter().chain(action) {
            for def in &target.limits {
                let depth = match &def.attach {
                    Attach::PerScope(kind) => match scope.position_of_kind(kind) {
                        Some(pos) => pos + 1,
                        None => continue,
                    },
                    _ => 0,
                };
                let amount = amount_for(&amounts, &def.unit, true).unwrap_or(0);
                plan.push(depth, def, amount);
            }
        }
        if request.priority == Priority::Background {
            plan.caller = Some(format!(
                "{}#@starve#{}#{}",
                scope.as_str(),
                request.resource.as_deref().unwrap_or(""),
                request.action.as_deref().unwrap_or("")
            ));
        }
        Ok(plan)
    }

    fn empty(policy: &'p Policy, scope: &'p Scope, priority: Priority) -> Self {
        Self {
            policy,
            scope,
            items: SmallVec::new(),
            caller: None,
            priority,
            promote_after: policy.defaults.promote_after,
            operation: None,
            upstream: None,
            waiter: None,
            stages_before: None,
            dims: None,
            request: None,
        }
    }

    /// This plan for a caller waiting in line (see [`Waiter`]).
    #[must_use]
    pub fn waiting(mut self, waiter: Waiter) -> Self {
        self.waiter = Some(Box::new(waiter));
        self
    }

    /// The workflow stages before the stages that call the request's
    /// resource (`workflows:` in the policy; empty for most requests).
    #[must_use]
    pub fn stages_before(&self) -> &'p [StageRef] {
        self.stages_before.map_or(&[], Vec::as_slice)
    }

    /// The caller's place in line, when it waits (see [`Waiter`]).
    #[must_use]
    pub fn waiter(&self) -> Option<Waiter> {
        self.waiter.as_deref().copied()
    }

    /// A plan for carving a delegation out of `scope`'s own limits: only the
    /// scope chain's quota, budget and concurrency limits whose unit is in `amounts`.
    ///
    /// # Errors
    /// [`Error::Unknown`] for undeclared scope kinds.
    pub(crate) fn for_delegation(
        policy: &'p Policy,
        scope: &'p Scope,
        amounts: &[(&str, i64)],
    ) -> Result<Self> {
        let mut plan = Self::empty(policy, scope, Priority::Standard);
        for i in 0..scope.depth() {
            let kind = scope.kind(i);
            let limits = crate::policy::lookup(&policy.scopes, kind).ok_or_else(|| {
                Error::unknown("scope kind", kind, policy.scopes.keys().map(String::as_str))
            })?;
            for def in limits {
                if matches!(def.kind, LimitKind::Rate(_)) {
                    continue;
                }
                if let Some(amount) = amount_for(amounts, &def.unit, false) {
                    plan.push(i + 1, def, amount);
                }
            }
        }
        Ok(plan)
    }

    /// This plan with every amount multiplied by `factor` (saturating at the
    /// largest amount): evaluating it against full limits is evaluating the
    /// original against `1/factor` of each — a node's share in local mode.
    #[must_use]
    pub fn scaled(&self, factor: i64) -> Self {
        let mut p = self.clone();
        for it in &mut p.items {
            it.amount = it.amount.saturating_mul(factor).min(MAX_AMOUNT);
        }
        p
    }

    /// This plan with no limits at all (always admitted).
    #[must_use]
    pub fn unlimited(&self) -> Self {
        let mut p = self.clone();
        p.items.clear();
        p.caller = None;
        p
    }

    /// The resource and how it coordinates on its upstream, when it does
    /// (`upstream:` in the policy).
    #[must_use]
    pub fn upstream(&self) -> Option<(&'p str, &'p Coordination)> {
        self.upstream.map(|(r, c, _)| (r, c))
    }

    /// What the request asks of its resource's upstream at the traffic light.
    #[must_use]
    pub fn upstream_ask(&self, mutate: bool) -> Ask {
        Ask {
            priority: self.priority,
            amounts: self.upstream.map_or([0; DIMENSIONS], |(_, _, cost)| {
                if let Some(d) = &self.dims {
                    return **d;
                }
                if cost.is_empty() {
                    // The default cost: one request.
                    return [1, 0, 0, 0];
                }
                // Checked when the plan was built: it resolves.
                resolve_cost(self.policy, cost)
                    .map_or([0; DIMENSIONS], |a| upstream_amounts(self.policy, &a))
            }),
            mutate,
        }
    }

    fn push(&mut self, depth: usize, def: &Arc<LimitDef>, amount: i64) {
        self.items.push(Item {
            depth: u8::try_from(depth).unwrap_or(u8::MAX),
            limit: def.id,
            amount: amount.min(MAX_AMOUNT),
        });
    }

    /// Number of limits.
    #[must_use]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the request touches no limit at all (always allowed).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The `i`-th limit.
    #[must_use]
    pub fn get(&self, i: usize) -> PlannedLimit<'p> {
        let it = self.items[i];
        let def = &self.policy.all[it.limit as usize];
        let (prefix, scope_depth) = if it.depth == 0 {
            ("@", None)
        } else {
            (self.scope.prefix(usize::from(it.depth)), Some(it.depth))
        };
        PlannedLimit {
            key: KeyRef {
                prefix,
                name: &def.name,
            },
            def,
            amount: it.amount,
            scope_depth,
        }
    }

    /// Every limit, in order.
    pub fn limits(&self) -> impl Iterator<Item = PlannedLimit<'p>> + '_ {
        (0..self.items.len()).map(|i| self.get(i))
    }

    /// The policy it was resolved against (a warden's snapshot: every step
    /// of one operation reads the same one).
    #[must_use]
    pub fn policy(&self) -> &'p Policy {
        self.policy
    }

    /// The scope that spends.
    #[must_use]
    pub fn scope(&self) -> &'p Scope {
        self.scope
    }

    /// The requested priority.
    #[must_use]
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// A fingerprint of what this plan asks (`mode`, scope, priority, every
    /// limit's key and amount): stable across processes, versions and
    /// languages (FNV-1a), so an operation id sent again with another request
    /// is recognised.
    #[must_use]
    pub fn fingerprint(&self, mode: &str) -> u64 {
        let mut h = Fnv::default();
        h.eat(mode.as_bytes());
        h.eat(self.scope.as_str().as_bytes());
        h.eat(&[self.priority.rank()]);
        for l in self.limits() {
            h.eat(l.key.prefix.as_bytes());
            h.eat(l.key.name.as_bytes());
            h.eat(&l.amount.to_le_bytes());
        }
        h.0
    }

    /// What operation ids are scoped to: the scope tree (first segment), as
    /// a stable hash — an id names one request per tree, like an idempotency
    /// key per tenant.
    #[must_use]
    pub fn operation_tree(&self) -> u64 {
        let mut h = Fnv::default();
        h.eat(self.scope.prefix(1).as_bytes());
        h.0
    }

    /// The operation id the caller gave, if any.
    #[must_use]
    pub fn operation(&self) -> Option<OperationId> {
        self.operation
    }

    /// The request it was built from, when it was built from one.
    #[must_use]
    pub fn request(&self) -> Option<&'p Request> {
        self.request
    }

    /// The key tracking continuous denials of a background caller (starvation promotion).
    #[must_use]
    pub fn caller_key(&self) -> Option<&str> {
        self.caller.as_deref()
    }

    /// After how long continuous denial a background caller is promoted.
    #[must_use]
    pub fn promote_after(&self) -> Micros {
        self.promote_after
    }

    /// The key of a delegation grant attached to the first `depth` segments of the scope.
    #[must_use]
    pub fn grant_key(scope: &Scope, depth: usize) -> String {
        let mut k = String::with_capacity(scope.prefix(depth).len() + 7);
        k.push_str(scope.prefix(depth));
        k.push_str("#@grant");
        k
    }
}
