//! JS values into core inputs: request options, amounts, costs, durations,
//! ids, warden options and policies.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// What a request asks for (everything but the scope).
#[napi(object)]
#[derive(Default)]
pub struct RequestOptions {
    /// The resource it uses (`openai`…), whose limits apply too.
    pub resource: Option<String>,
    /// The action it takes (`send_email`…), whose limits apply too.
    pub action: Option<String>,
    /// Amount per unit: `{ tokens: 800, usd: '0.0125' }` (numbers, decimal strings or BigInts).
    #[napi(ts_type = "Record<string, number | string | bigint>")]
    pub cost: Option<serde_json::Value>,
    /// `critical`, `standard` (default) or `background`.
    #[napi(ts_type = "'critical' | 'standard' | 'background'")]
    pub priority: Option<String>,
    /// Lease of a reservation, seconds.
    pub lease: Option<f64>,
    /// Operation id (32 hex digits): a request repeated with the id of an
    /// earlier one (e.g. a decision's `unconfirmed`) answers that decision,
    /// charged at most once.
    pub operation: Option<String>,
    /// What the call uses, priced by the resource's `pricing:` into the cost:
    /// `{ input_tokens: 1200, max_output_tokens: 800 }`.
    #[napi(ts_type = "Usage")]
    pub usage: Option<serde_json::Value>,
}

/// What a priced call uses (field names as in the policy and the providers'
/// usage objects: snake_case, as in the policy and the Python binding).
/// Declared for its TypeScript type; values cross as JSON.
#[napi(object, js_name = "Usage")]
#[allow(dead_code)]
pub struct UsageFields {
    /// Input (prompt) tokens, cached ones included.
    #[napi(js_name = "input_tokens", ts_type = "number | bigint")]
    pub input_tokens: Option<serde_json::Value>,
    /// How many of the input tokens were read from the provider's cache.
    #[napi(js_name = "cached_input_tokens", ts_type = "number | bigint")]
    pub cached_input_tokens: Option<serde_json::Value>,
    /// Output tokens the call produced (what a commit prices).
    #[napi(js_name = "output_tokens", ts_type = "number | bigint")]
    pub output_tokens: Option<serde_json::Value>,
    /// The most output tokens it may produce (what an estimate prices).
    #[napi(js_name = "max_output_tokens", ts_type = "number | bigint")]
    pub max_output_tokens: Option<serde_json::Value>,
    /// Images generated or read.
    #[napi(js_name = "images", ts_type = "number | bigint")]
    pub images: Option<serde_json::Value>,
    /// Seconds of audio or video (up to three decimals).
    #[napi(js_name = "seconds", ts_type = "number | string")]
    pub seconds: Option<serde_json::Value>,
    /// Calls (one when unsaid).
    #[napi(js_name = "calls", ts_type = "number | bigint")]
    pub calls: Option<serde_json::Value>,
}

/// A usage object (`{ input_tokens: 1200, max_output_tokens: 800 }`) as core
/// reads it: field names and counts are judged there.
pub(crate) fn usage_of(v: &serde_json::Value, what: &str) -> Result<PricedUsage> {
    let serde_json::Value::Object(map) = v else {
        return Err(invalid(
            what,
            format!(
                "expected an object of usage field to count, got {}",
                json_type(v)
            ),
        ));
    };
    let mut fields = Vec::with_capacity(map.len());
    for (name, v) in map {
        fields.push((name.as_str(), amount_of(v, &format!("{what}.{name}"))?));
    }
    PricedUsage::from_fields(fields).or_throw()
}

pub(crate) fn amount_of(v: &serde_json::Value, at: &str) -> Result<Amount> {
    match v {
        // JS numbers are doubles: integral ones print (and convert) exactly.
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(Amount::from(i)),
            None => Amount::from_f64(n.as_f64().unwrap_or(f64::NAN)).map_err(|e| invalid(at, e)),
        },
        serde_json::Value::String(s) => Amount::parse(s).map_err(|e| invalid(at, e)),
        other => Err(invalid(
            at,
            format!(
                "expected a number or a decimal string, got {}",
                json_type(other)
            ),
        )),
    }
}

pub(crate) fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

pub(crate) fn cost_of(cost: Option<&serde_json::Value>, what: &str) -> Result<Cost> {
    let mut out = Cost::new();
    match cost {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (unit, v) in map {
                out.set(unit, amount_of(v, &format!("{what}.{unit}"))?);
            }
        }
        Some(other) => {
            return Err(invalid(
                what,
                format!(
                    "expected an object of unit to amount, got {}",
                    json_type(other)
                ),
            ));
        }
    }
    Ok(out)
}

pub(crate) fn seconds(s: f64, what: &'static str) -> Result<Duration> {
    ops::seconds(s, what).or_throw()
}

pub(crate) fn optional_seconds(v: Option<f64>, what: &'static str) -> Result<Option<Duration>> {
    ops::optional_seconds(v, what).or_throw()
}

pub(crate) fn request_of(scope: &str, o: Option<&RequestOptions>) -> Result<Request> {
    let Some(o) = o else {
        return Request::parse(scope).or_throw();
    };
    let cost = o
        .cost
        .as_ref()
        .map(|c| cost_of(Some(c), "cost"))
        .transpose()?;
    let req = ops::request(
        scope,
        o.resource.as_deref(),
        o.action.as_deref(),
        cost,
        o.priority.as_deref(),
    )
    .or_throw()?;
    let req = match &o.usage {
        None | Some(serde_json::Value::Null) => req,
        Some(u) => req.usage(usage_of(u, "usage")?),
    };
    match &o.operation {
        None => Ok(req),
        Some(op) => Ok(req.operation(ratewarden::OperationId::parse(op).or_throw()?)),
    }
}

pub(crate) fn reservation_id(id: &str) -> Result<ReservationId> {
    ReservationId::parse(id).or_throw()
}

/// How to build a warden (besides the policy).
#[napi(object)]
#[derive(Default)]
pub struct WardenOptions {
    /// `memory` (default) or a Redis URL.
    pub backend: Option<String>,
    /// Prefix of every Redis key (default `rw`).
    pub namespace: Option<String>,
    /// `deny` (default), `allow` or `local`.
    pub on_backend_error: Option<String>,
    /// With `local`: this process's share is `1/localShare` of each limit.
    pub local_share: Option<u32>,
    /// Redis command timeout, seconds (default 0.25).
    pub timeout: Option<f64>,
}

pub(crate) fn setup_of(
    o: Option<&WardenOptions>,
    clock: Option<&ManualClock>,
    lazy: bool,
) -> Result<Setup> {
    let default = WardenOptions::default();
    let o = o.unwrap_or(&default);
    let mut s = Setup::new(o.backend.as_deref(), o.namespace.as_deref().unwrap_or("rw"));
    s.on_error = ratewarden::ops::on_backend_error(
        o.on_backend_error.as_deref().unwrap_or("deny"),
        o.local_share.unwrap_or(1),
    )
    .or_throw()?;
    s.timeout = optional_seconds(o.timeout, "timeout")?;
    s.clock = clock.map(|c| c.inner.clone());
    s.lazy = lazy;
    Ok(s)
}

pub(crate) fn policy_of(json: Option<String>, path: Option<String>) -> Result<Policy> {
    match (json, path) {
        (Some(text), None) => {
            Policy::from_str_as(&text, ratewarden::Format::Json, "<object>").or_throw()
        }
        (None, Some(p)) => Policy::from_file(&p).or_throw(),
        _ => Err(invalid(
            "policy",
            "give exactly one of a policy object or a file path",
        )),
    }
}

pub(crate) fn reserve_args(
    scope: &str,
    o: Option<&RequestOptions>,
) -> Result<(Request, Option<Duration>)> {
    Ok((
        request_of(scope, o)?,
        optional_seconds(o.and_then(|o| o.lease), "lease")?,
    ))
}

/// A settlement's reservation and outcome (see `finish_sync`).
/// With `priced` (the resource of a call reserved by usage), `actual` is the
/// usage the call reports, priced by core.
pub(crate) fn finish_args(
    reservation: &str,
    failed: bool,
    actual: Option<serde_json::Value>,
    unreadable: Option<String>,
    priced: Option<String>,
) -> Result<(ReservationId, CallOutcome)> {
    let id = reservation_id(reservation)?;
    if failed {
        return Ok((id, CallOutcome::Failed));
    }
    let usage = match (unreadable, actual) {
        (Some(why), _) => Usage::Unreadable(why),
        (None, None | Some(serde_json::Value::Null)) => Usage::Estimate,
        (None, Some(v)) if priced.is_some() => match usage_of(&v, "actual") {
            Ok(usage) => Usage::Priced {
                resource: priced.unwrap_or_default(),
                usage,
            },
            Err(e) => Usage::Unreadable(message_of(&e)),
        },
        (None, Some(v)) => match cost_of(Some(&v), "actual") {
            Ok(c) => Usage::Actual(c),
            // The message without the kind prefix the JS layer reads.
            Err(e) => Usage::Unreadable(message_of(&e)),
        },
    };
    Ok((id, CallOutcome::Ran(usage)))
}

pub(crate) fn commit_args(
    reservation: &str,
    actual: Option<&serde_json::Value>,
) -> Result<(ReservationId, Cost)> {
    Ok((reservation_id(reservation)?, cost_of(actual, "actual")?))
}

/// Where a delegation comes from, and its lease.
#[napi(object)]
pub struct DelegateOptions {
    /// A parent scope whose free capacity is carved.
    pub from_scope: Option<String>,
    /// A reservation whose held amounts are carved.
    pub from_reservation: Option<String>,
    /// Lease, seconds.
    pub lease: Option<f64>,
}

/// `allocate`'s arguments, checked.
pub(crate) fn allocate_args(
    agent: &str,
    amounts: &serde_json::Value,
    lease: f64,
) -> Result<(Scope, Cost, Duration)> {
    let agent = Scope::parse(agent).or_throw()?;
    let amounts = cost_of(Some(amounts), "amounts")?;
    Ok((agent, amounts, seconds(lease, "lease")?))
}

pub(crate) fn delegate_args(
    child: &str,
    amounts: &serde_json::Value,
    o: Option<&DelegateOptions>,
) -> Result<(Scope, Cost, Source, Option<Duration>)> {
    let child = Scope::parse(child).or_throw()?;
    let amounts = cost_of(Some(amounts), "amounts")?;
    let (from_scope, from_reservation) = o.map_or((None, None), |o| {
        (o.from_scope.as_deref(), o.from_reservation.as_deref())
    });
    let from = Source::pick(
        from_scope,
        from_reservation,
        ["fromScope", "fromReservation"],
    )
    .or_throw()?;
    Ok((
        child,
        amounts,
        from,
        optional_seconds(o.and_then(|o| o.lease), "lease")?,
    ))
}
