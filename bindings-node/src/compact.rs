//! The hot path: compact decisions.
//!
//! Building a plain object field by field through N-API costs ~10x the decision
//! itself. `decide` instead writes an allowed decision's numbers into a
//! `Float64Array` the JS layer owns and returns a small status code; the JS
//! layer builds the object literal, taking names from the limit table
//! (`limitTable()`, fetched once). Everything else — a denial, caps, a
//! reservation, a degraded decision, an upstream's traffic light, a unit with decimals, an amount beyond
//! 2^53 — comes back as the full `Decision` object, so nothing is approximated
//! and nothing is formatted outside core. The encoding's layout (numbers per
//! limit, the priority codes, the buffer's capacity) is `compactLayout()`: the
//! JS layer reads it from here, never a copy of its own.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// Numbers per limit in the compact encoding: id, remaining, amount, reset.
pub(crate) const COMPACT_STRIDE: usize = 4;

/// Most limits a compact decision carries (the JS buffer holds this many);
/// a decision touching more comes back whole.
pub(crate) const MAX_COMPACT_LIMITS: usize = 64;

/// The compact encoding's layout, read once by the JS layer.
#[napi(object)]
pub struct CompactLayout {
    /// Numbers per limit: id, remaining, amount, reset.
    pub stride: u32,
    /// Priority names by the code `decide` returns (`Priority::rank()`).
    pub priorities: Vec<String>,
    /// Limits the buffer must hold: `1 + stride * maxLimits` numbers.
    pub max_limits: u32,
}

/// The layout of compact decisions (see the module's documentation).
#[napi]
#[allow(clippy::cast_possible_truncation)] // small constants
pub fn compact_layout() -> CompactLayout {
    let mut priorities = [
        ratewarden::Priority::Critical,
        ratewarden::Priority::Standard,
        ratewarden::Priority::Background,
    ];
    priorities.sort_by_key(|p| p.rank());
    CompactLayout {
        stride: COMPACT_STRIDE as u32,
        priorities: priorities.iter().map(|p| p.as_str().to_owned()).collect(),
        max_limits: MAX_COMPACT_LIMITS as u32,
    }
}

/// One limit of the policy, as compact decisions refer to it (by `id`).
#[napi(object)]
pub struct LimitMeta {
    /// The limit's serial ([`ratewarden::Policy::serial_of`]): the index
    /// compact decisions use, never reused by a reloaded policy.
    pub id: i64,
    /// Its name in the policy.
    pub name: String,
    /// `rate`, `quota`, `concurrency` or `budget`.
    pub kind: String,
    /// The unit it counts.
    pub unit: String,
    /// Capacity, base units.
    pub limit: i64,
}

/// Whether `decide`'s `op` consumes (1) or only checks (0).
pub(crate) fn acquires(op: u32) -> Result<bool> {
    match op {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(invalid("op", "expected 0 (check) or 1 (acquire)")),
    }
}

/// Cost given as `unit\x1famount` items separated by `\x1e` (amounts: integer
/// or decimal text); the JS layer encodes only safe integers and strings.
pub(crate) fn cost_of_text(text: &str) -> Result<Cost> {
    let mut out = Cost::new();
    for item in text.split('\x1e').filter(|i| !i.is_empty()) {
        let (unit, amount) = item.split_once('\x1f').unwrap_or((item, ""));
        let at = format!("cost.{unit}");
        out.set(unit, Amount::parse(amount).map_err(|e| invalid(&at, e))?);
    }
    Ok(out)
}

/// Writes an allowed, plain decision into `out`; `None` if it does not fit the
/// compact form (the caller then returns the full object).
#[allow(clippy::cast_precision_loss)]
pub(crate) fn compact(d: &CoreDecision, out: &mut [f64], policy: &Policy) -> Option<u32> {
    const EXACT: i64 = 1 << 53;
    let plain = matches!(d.outcome, ratewarden::decision::Outcome::Allow)
        && d.reason.is_none()
        && d.reservation.is_none()
        && d.degraded.is_none()
        && d.light.is_none()
        && d.caps.is_empty();
    if !plain || 1 + d.limits.len() * COMPACT_STRIDE > out.len() {
        return None;
    }
    out[0] = d.limits.len() as f64;
    for (i, l) in d.limits.iter().enumerate() {
        // Whole units only: their `remainingText` is the integer itself, so the
        // JS layer never formats decimals (that stays in core).
        if l.denied || l.def.decimals != 0 || l.remaining.abs() > EXACT || l.amount.abs() > EXACT {
            return None;
        }
        // A decision made under a policy since reloaded: its limits are not
        // in the table the JS layer holds for this one.
        let serial = policy.serial_of(&l.def).filter(|s| *s < EXACT as u64)?;
        let at = 1 + i * COMPACT_STRIDE;
        out[at] = serial as f64;
        out[at + 1] = l.remaining as f64;
        out[at + 2] = l.amount as f64;
        out[at + 3] = l.reset.as_secs_f64();
    }
    Some(u32::from(d.priority.rank()))
}

/// The compact buffer's memory, for this call.
#[allow(unsafe_code)]
pub(crate) fn writable<'a>(out: &'a mut Float64ArraySlice) -> &'a mut [f64] {
    // SAFETY: the slice is valid for the duration of the native call, which
    // runs on the JS thread; the buffer is a plain (non-shared) Float64Array
    // private to the JS Warden, so nothing else reads or writes it meanwhile.
    unsafe { out.as_mut() }
}

#[napi]
impl NativeWarden {
    /// The policy's limits, indexed by `id`, for reading compact decisions.
    #[napi]
    pub fn limit_table(&self) -> Vec<LimitMeta> {
        let policy = self.warden.policy();
        policy
            .limits()
            .map(|l| LimitMeta {
                id: policy
                    .serial_of(l)
                    .and_then(|s| i64::try_from(s).ok())
                    .unwrap_or(-1),
                name: l.name.clone(),
                kind: l.kind.name().to_owned(),
                unit: l.unit.clone(),
                limit: l.limit,
            })
            .collect()
    }

    /// Check (`op` 0) or acquire (`op` 1) at once on the embedded engine. An
    /// allowed, plain decision is written into `out` (see `limitTable`) and its
    /// priority code returned; any other decision is returned whole. `cost` is
    /// `unit\x1famount` items joined by `\x1e`.
    #[napi]
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        op: u32,
        scope: String,
        resource: Option<String>,
        action: Option<String>,
        cost: Option<String>,
        priority: Option<String>,
        mut out: Float64ArraySlice,
    ) -> Result<Either<u32, Decision>> {
        let (acquire, req) = (
            acquires(op)?,
            compact_request(&scope, resource, action, cost, priority)?,
        );
        let d = if acquire {
            self.sync(self.warden.acquire(&req))?
        } else {
            self.sync(self.warden.check(&req))?
        };
        let code = self
            .warden
            .with_policy(|p| compact(&d, writable(&mut out), p));
        Ok(match code {
            Some(code) => Either::A(code),
            None => Either::B(decision_of(&d)),
        })
    }

    /// `decide` for any backend, as a Promise: an allowed, plain decision
    /// resolves to `[priority code, then the compact encoding]`, any other to
    /// the whole decision.
    #[napi(ts_return_type = "Promise<Array<number> | Decision>")]
    #[allow(clippy::too_many_arguments)]
    pub fn decide_async<'env>(
        &self,
        env: &'env Env,
        op: u32,
        scope: String,
        resource: Option<String>,
        action: Option<String>,
        cost: Option<String>,
        priority: Option<String>,
    ) -> Result<PromiseRaw<'env, Either<Vec<f64>, Decision>>> {
        let (acquire, req) = (
            acquires(op)?,
            compact_request(&scope, resource, action, cost, priority)?,
        );
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let d = (if acquire {
                warden.acquire(&req).await
            } else {
                warden.check(&req).await
            })
            .or_throw()?;
            let mut out = vec![0.0; 2 + d.limits.len() * COMPACT_STRIDE];
            Ok(
                match warden.with_policy(|p| compact(&d, &mut out[1..], p)) {
                    Some(code) => {
                        out[0] = f64::from(code);
                        Either::A(out)
                    }
                    None => Either::B(decision_of(&d)),
                },
            )
        })
    }
}

/// A request from the compact path's arguments (`cost` as `cost_of_text` reads it).
pub(crate) fn compact_request(
    scope: &str,
    resource: Option<String>,
    action: Option<String>,
    cost: Option<String>,
    priority: Option<String>,
) -> Result<Request> {
    let cost = cost.as_deref().map(cost_of_text).transpose()?;
    ops::request(
        scope,
        resource.as_deref(),
        action.as_deref(),
        cost,
        priority.as_deref(),
    )
    .or_throw()
}
