//! Decisions, receipts and balances as plain JS objects.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// Restrictions to honour when allowed with caps (only those set).
#[napi(object)]
pub struct Caps {
    /// Pace: wait this long before going ahead.
    pub delay_ms: Option<i64>,
    /// Ask the model for at most this many tokens.
    pub max_tokens: Option<i64>,
    /// Use this (cheaper) model instead.
    pub model: Option<String>,
    /// Take the ordered lock (cascade mode).
    pub sequential: Option<bool>,
    /// Limited workflow stages before this one (`workflow/stage`).
    pub backpressure: Option<Vec<String>>,
}

/// One limit the request touched.
#[napi(object)]
pub struct LimitInfo {
    /// Its name in the policy.
    pub name: String,
    /// `rate`, `quota`, `concurrency` or `budget`.
    pub kind: String,
    /// The unit it counts.
    pub unit: String,
    /// Capacity, base units.
    pub limit: i64,
    /// What remains, base units (micro-units for a unit with 6 decimals).
    pub remaining: i64,
    /// What remains, as a decimal in the unit (`"4.75"`).
    pub remaining_text: String,
    /// What this request takes (or would take), base units.
    pub amount: i64,
    /// Seconds until fully available again.
    pub reset: f64,
    /// Whether this limit denied the request.
    pub denied: bool,
}

/// The answer to check / acquire / reserve / delegate / wait.
#[napi(object)]
pub struct Decision {
    /// Whether the caller may go ahead (`allow` or `allow_with_caps`).
    pub allowed: bool,
    /// `allow`, `allow_with_caps` or `deny`.
    pub outcome: String,
    /// Restrictions to honour with `allow_with_caps`.
    pub caps: Caps,
    /// With a denial: seconds until a retry can succeed; `null` if it never can.
    pub retry_after: Option<f64>,
    /// Every limit involved, in policy order.
    pub limits: Vec<LimitInfo>,
    /// Why it was denied or capped, in words.
    pub reason: Option<String>,
    /// The reservation id a reserve / delegate / wait(reserve) holds.
    pub reservation: Option<String>,
    /// When that reservation's lease ends, seconds since the epoch.
    pub expires_at: Option<f64>,
    /// The priority it was served at.
    pub priority: String,
    /// `deny`, `allow` or `local` when decided without the shared backend.
    pub degraded: Option<String>,
    /// With `degraded`: the operation id of a request that may have reached
    /// the shared backend although its answer was lost (whether it was charged
    /// is unknown). Repeat the request with `{ operation: id }` to learn the
    /// original decision; it is charged at most once.
    pub unconfirmed: Option<String>,
    /// The first limit that denied it.
    pub denied_by: Option<String>,
    /// That limit's kind.
    pub denied_kind: Option<String>,
    /// The traffic light of the request's resource when it coordinates on its
    /// upstream (`upstream:` in the policy).
    pub light: Option<LightInfo>,
}

/// What the upstream's observed state meant for a decision.
#[napi(object)]
pub struct LightInfo {
    /// `unknown`, `green`, `amber` or `red`.
    pub zone: String,
    /// Share left of the tightest fresh dimension (0-1); null when nothing fresh is known.
    pub left: Option<f64>,
    /// That dimension: `requests`, `tokens`, `input_tokens` or `output_tokens`.
    pub dimension: Option<String>,
    /// The circuit breaker: `closed`, `pre_emptive_open`, `open` or `half_open`.
    pub breaker: String,
    /// Whether the resource is in sequential mode: calls go one at a time.
    pub sequential: bool,
}

fn share(permille: Option<u16>) -> Option<f64> {
    permille.map(|p| f64::from(p) / 1000.0)
}

fn light_of(l: &ratewarden::upstream::Light) -> LightInfo {
    LightInfo {
        zone: l.zone.as_str().to_owned(),
        left: share(l.left),
        dimension: l.dimension.map(|d| d.as_str().to_owned()),
        breaker: l.breaker.as_str().to_owned(),
        sequential: l.sequential,
    }
}

/// One fresh dimension of an upstream's state.
#[napi(object)]
pub struct ObservedQuota {
    /// `requests`, `tokens`, `input_tokens` or `output_tokens`.
    pub dimension: String,
    /// Its limit (the most seen remaining when the headers give none).
    pub limit: f64,
    /// The estimate of what is left: observed less what was admitted since.
    pub remaining: f64,
    /// What the upstream last said was left.
    pub observed: f64,
    /// Seconds until it resets, when the upstream said.
    pub reset: Option<f64>,
    /// Seconds since it was observed.
    pub age: f64,
    /// How fast the upstream's remaining falls, per second (0: not known).
    pub burn: f64,
}

/// A resource's upstream state as every process sees it.
#[napi(object)]
pub struct UpstreamInfo {
    /// The resource.
    pub resource: String,
    /// Its traffic light: `unknown`, `green`, `amber` or `red`.
    pub zone: String,
    /// The zone before the response that produced this (the same for a read).
    pub previous: String,
    /// Share left of the tightest fresh dimension (0-1).
    pub left: Option<f64>,
    /// Seconds everyone must still wait (Retry-After, a reported 429).
    pub blocked: Option<f64>,
    /// The circuit breaker: `closed`, `pre_emptive_open`, `open` or `half_open`.
    pub breaker: String,
    /// Seconds of sequential mode left (a burst of denials or failures), if on.
    pub sequential: Option<f64>,
    /// The fresh dimensions.
    pub quotas: Vec<ObservedQuota>,
    /// Header values that were ignored, one line each.
    pub warnings: Vec<String>,
}

#[allow(clippy::cast_precision_loss)] // readings ≤ 2^40: exact in a double
pub(crate) fn upstream_of(v: ratewarden::UpstreamView) -> UpstreamInfo {
    UpstreamInfo {
        zone: v.zone.as_str().to_owned(),
        previous: v.previous.as_str().to_owned(),
        left: share(v.left),
        blocked: v.blocked.map(|b| b.as_secs_f64()),
        breaker: v.breaker.as_str().to_owned(),
        sequential: v.sequential.map(|t| t.as_secs_f64()),
        quotas: v
            .quotas
            .iter()
            .map(|q| ObservedQuota {
                dimension: q.dimension.as_str().to_owned(),
                limit: q.limit as f64,
                remaining: q.remaining as f64,
                observed: q.observed as f64,
                reset: q.reset.map(|r| r.as_secs_f64()),
                age: q.age.as_secs_f64(),
                burn: q.burn as f64,
            })
            .collect(),
        warnings: v.warnings,
        resource: v.resource,
    }
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn decision_of(d: &CoreDecision) -> Decision {
    let by = d.denied_by();
    Decision {
        allowed: d.allowed(),
        outcome: d.outcome.as_str().to_owned(),
        caps: Caps {
            delay_ms: d
                .caps
                .delay_ms
                .map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
            max_tokens: d
                .caps
                .max_tokens
                .map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
            model: d.caps.model.as_deref().map(str::to_owned),
            sequential: d.caps.sequential.then_some(true),
            backpressure: (!d.caps.backpressure.is_empty()).then(|| {
                d.caps
                    .backpressure
                    .stages()
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            }),
        },
        retry_after: d.retry_after.map(|r| r.as_secs_f64()),
        limits: d
            .limits
            .iter()
            .map(|l| LimitInfo {
                name: l.name().to_owned(),
                kind: l.kind().to_owned(),
                unit: l.unit().to_owned(),
                limit: l.limit(),
                remaining: l.remaining,
                remaining_text: ratewarden::amount::format_base(l.remaining, l.def.decimals),
                amount: l.amount,
                reset: l.reset.as_secs_f64(),
                denied: l.denied,
            })
            .collect(),
        reason: d.reason.clone(),
        reservation: d.reservation.as_ref().map(|r| r.id.to_string()),
        expires_at: d.reservation.as_ref().map(|r| r.expires_at as f64 / 1e6),
        priority: d.priority.as_str().to_owned(),
        degraded: d.degraded.map(|g| g.as_str().to_owned()),
        unconfirmed: d.unconfirmed.map(|op| op.to_string()),
        denied_by: by.map(|l| l.name().to_owned()),
        denied_kind: by.map(|l| l.kind().to_owned()),
        light: d.light.as_ref().map(light_of),
    }
}

/// What one limit was charged by a commit.
#[napi(object)]
pub struct Charge {
    /// The limit.
    pub name: String,
    /// Its unit.
    pub unit: String,
    /// Held by the reservation, base units.
    pub reserved: i64,
    /// Charged, base units.
    pub charged: i64,
    /// Used beyond what was charged (overage `cap`), base units.
    pub uncharged: i64,
    /// How far past its capacity the commit took the limit (its debt), base
    /// units; measured for `allow_if_available` and `allow_with_overdraft`.
    pub debt: i64,
}

/// The result of a commit.
#[napi(object)]
pub struct Receipt {
    /// The reservation id.
    pub reservation: String,
    /// `true` if it had been committed before: nothing charged this time.
    pub duplicate: bool,
    /// Per-limit charges.
    pub charges: Vec<Charge>,
}

pub(crate) fn receipt_of(r: &CommitReceipt) -> Receipt {
    Receipt {
        reservation: r.id.to_string(),
        duplicate: r.duplicate,
        charges: r
            .charges
            .iter()
            .map(|c| Charge {
                name: c.name().to_owned(),
                unit: c.unit().to_owned(),
                reserved: c.reserved,
                charged: c.charged,
                uncharged: c.uncharged,
                debt: c.debt,
            })
            .collect(),
    }
}

/// An expiry (µs since the epoch) in seconds.
#[allow(clippy::cast_precision_loss)]
/// An agent's allocation of a resource's pools.
#[napi(object)]
pub struct AllocationInfo {
    /// Per pool limit: the amount set aside per window (base units).
    pub pools: std::collections::HashMap<String, f64>,
    /// Active until (seconds since the epoch) without another heartbeat.
    pub active_until: f64,
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn allocation_of(a: ratewarden::Allocation) -> AllocationInfo {
    AllocationInfo {
        pools: a.pools.into_iter().map(|(n, v)| (n, v as f64)).collect(),
        active_until: seconds_of(a.active_until),
    }
}

pub(crate) fn seconds_of(at: i64) -> f64 {
    at as f64 / 1e6
}

/// What is left of one limit (`Warden.balances`); amounts in base units of
/// `unit` (`decimals` places), with their decimal text beside them.
#[napi(object)]
pub struct BalanceInfo {
    /// The limit's name in the policy.
    pub name: String,
    /// `rate`, `quota`, `budget` or `concurrency`.
    pub kind: String,
    /// The unit it counts.
    pub unit: String,
    /// The scope prefix whose counter it is; null for a pool shared by everyone.
    pub owner: Option<String>,
    /// Capacity (rate: the burst), base units.
    pub limit: f64,
    /// Free now, base units.
    pub remaining: f64,
    /// Held by live reservations, delegations and concurrency slots, base units.
    pub held: f64,
    /// `limit` as a decimal in the unit.
    pub limit_text: String,
    /// `remaining` as a decimal in the unit.
    pub remaining_text: String,
    /// `held` as a decimal in the unit.
    pub held_text: String,
    /// Seconds until fully available again; null for lifetime budgets and concurrency.
    pub reset: Option<f64>,
}

#[allow(clippy::cast_precision_loss)] // base units stay within ±2^53: exact in a double
pub(crate) fn balance_of(b: &ratewarden::Balance) -> BalanceInfo {
    let text = |v: i64| ratewarden::amount::format_base(v, b.decimals);
    BalanceInfo {
        name: b.name.clone(),
        kind: b.kind.to_owned(),
        unit: b.unit.clone(),
        owner: b.owner.clone(),
        limit: b.limit as f64,
        remaining: b.remaining as f64,
        held: b.held as f64,
        limit_text: text(b.limit),
        remaining_text: text(b.remaining),
        held_text: text(b.held),
        reset: b.reset.map(|r| r.as_secs_f64()),
    }
}

/// What a usage costs: `warden.cost` / `warden.estimate`.
#[napi(object)]
pub struct Priced {
    /// The money unit (`usd`).
    pub unit: String,
    /// The bill in base units of `unit` (micro-dollars for `usd`), rounded up once.
    pub amount: i64,
    /// The bill as a decimal of `unit` (`0.00395`).
    pub amount_text: String,
    /// Decimals of `unit`.
    pub decimals: u32,
    /// Input tokens.
    pub input_tokens: i64,
    /// Output tokens priced.
    pub output_tokens: i64,
    /// What a decision charges for it, unit → amount (decimal strings for the
    /// money unit, numbers for counts): usable as a `cost` again.
    #[napi(ts_type = "Record<string, string | number>")]
    pub cost: serde_json::Value,
}

#[allow(clippy::cast_possible_wrap)] // token counts are at most 2^53 - 1
pub(crate) fn priced_of(p: &CorePriced, cost: &ratewarden::Cost) -> Priced {
    let mut map = serde_json::Map::new();
    for (unit, amount) in cost.iter() {
        let v = match amount.parts() {
            (v, 0) => serde_json::Value::from(v),
            _ => serde_json::Value::from(amount.to_string()),
        };
        map.insert(unit.to_owned(), v);
    }
    Priced {
        unit: p.unit.to_string(),
        amount: p.amount,
        amount_text: p.money().to_string(),
        decimals: u32::from(p.decimals),
        input_tokens: p.input_tokens as i64,
        output_tokens: p.output_tokens as i64,
        cost: serde_json::Value::Object(map),
    }
}

/// One webhook delivery attempt.
#[napi(object)]
pub struct WebhookDelivery {
    /// The message (`webhook-id`).
    pub message_id: String,
    /// Its event type.
    pub event_type: String,
    /// The endpoint.
    pub url: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The HTTP status answered, if any.
    pub status: Option<u32>,
    /// Why it failed, when no status came back.
    pub error: Option<String>,
    /// When it ended, seconds since the epoch.
    pub at: f64,
}

/// A message every attempt failed to deliver.
#[napi(object)]
pub struct WebhookDeadLetter {
    /// The message (`webhook-id`).
    pub message_id: String,
    /// Its event type.
    pub event_type: String,
    /// The endpoint.
    pub url: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's status or error.
    pub last: String,
    /// The message body, as signed.
    pub body: String,
}

/// What a warden's webhook deliveries did.
#[napi(object)]
pub struct WebhookLog {
    /// Every attempt, oldest first.
    pub deliveries: Vec<WebhookDelivery>,
    /// Dead letters, oldest first.
    pub dead_letters: Vec<WebhookDeadLetter>,
    /// Events an endpoint never saw (it fell behind).
    pub dropped: f64,
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn webhook_log_of(log: &ratewarden::webhook::Log) -> WebhookLog {
    WebhookLog {
        deliveries: log
            .deliveries
            .iter()
            .map(|d| WebhookDelivery {
                message_id: d.message_id.clone(),
                event_type: d.event_type.to_owned(),
                url: d.url.clone(),
                attempt: d.attempt,
                status: d.status.map(u32::from),
                error: d.error.clone(),
                at: d.at as f64 / 1e6,
            })
            .collect(),
        dead_letters: log
            .dead_letters
            .iter()
            .map(|d| WebhookDeadLetter {
                message_id: d.message.id.clone(),
                event_type: d.event_type.to_owned(),
                url: d.url.clone(),
                attempts: d.attempts,
                last: d.last.clone(),
                body: d.message.body.clone(),
            })
            .collect(),
        dropped: log.dropped as f64,
    }
}

/// What a top-up did (`topUp`): base units, and their decimal text.
#[napi(object)]
pub struct TopUpInfo {
    /// The limit topped up.
    pub limit: String,
    /// Its unit.
    pub unit: String,
    /// Given back, base units (at most what was spent this window).
    pub credited: i64,
    /// `credited` as a decimal in the unit.
    pub credited_text: String,
    /// Spent this window now, base units (past the capacity: in debt).
    pub spent: i64,
    /// `spent` as a decimal in the unit.
    pub spent_text: String,
}

pub(crate) fn top_up_of(t: &ratewarden::decision::TopUp) -> TopUpInfo {
    TopUpInfo {
        limit: t.limit.clone(),
        unit: t.unit.clone(),
        credited: t.credited,
        credited_text: ratewarden::amount::format_base(t.credited, t.decimals),
        spent: t.spent,
        spent_text: ratewarden::amount::format_base(t.spent, t.decimals),
    }
}
