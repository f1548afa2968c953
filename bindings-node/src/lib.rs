//! Node.js bindings for `ratewarden`, loaded by `bindings-node/index.cjs`, which
//! wraps them in the public API (`Warden`, typed errors, Express middleware).
//!
//! This layer converts and bridges async; every decision is made by the core.
//! - On the embedded engine the `*Sync` methods decide on the calling thread
//!   (the JS layer hands back an already-settled Promise: no thread hop).
//! - The `*Async` methods run on napi's Tokio runtime (Redis, and waits) and
//!   return Promises; nothing blocks the event loop and no handle keeps the
//!   process alive.
//! - Errors carry their kind, code and details as JSON after a marker that the JS layer
//!   turns into a typed error class (users never parse messages).

use std::time::Duration;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use ratewarden::decision::{CommitReceipt, Decision as CoreDecision};
use ratewarden::http::{HeaderStyle, denial_body, rate_limit_headers};
use ratewarden::ops::{self, Setup, Source};
use ratewarden::{
    Amount, CallOutcome, Cost, ErrorKind, Policy, Request, ReservationId, Scope, Usage, WaitFor,
    Warden,
};

/// Return the version of the ratewarden core library.
#[napi]
pub fn version() -> &'static str {
    ratewarden::VERSION
}

// ---------------------------------------------------------------------------
// Errors

/// The marker that starts the reason of every error this addon raises: the
/// rest is a JSON object (`kind`, `code`, `message` and the error's details)
/// that the JS layer turns into a typed error with `err.code` and fields —
/// nothing is parsed out of a message.
const ERROR_MARK: &str = "ratewarden\u{1f}";

fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Policy => "Policy",
        ErrorKind::InvalidInput => "InvalidInput",
        ErrorKind::NotFound => "NotFound",
        ErrorKind::Conflict => "Conflict",
        ErrorKind::Backend => "Backend",
        // A bug of ours: the base WardenError, never a degraded-mode trigger.
        ErrorKind::Internal => "Internal",
    }
}

fn to_js(e: &ratewarden::Error) -> Error {
    let d = e.details();
    let data = serde_json::json!({
        "kind": kind_name(e.kind()),
        "code": e.code(),
        "message": e.to_string(),
        "path": d.path,
        "source": d.source,
        "argument": d.argument,
        "unit": d.unit,
        "reservation": d.reservation,
        "operation": d.operation.map(|o| o.to_string()),
    });
    Error::new(Status::GenericFailure, format!("{ERROR_MARK}{data}"))
}

/// The message of an error made by `to_js` (for a problem text).
fn message_of(e: &Error) -> String {
    e.reason
        .strip_prefix(ERROR_MARK)
        .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| e.reason.clone())
}

fn invalid(what: &str, why: impl std::fmt::Display) -> Error {
    let data = serde_json::json!({
        "kind": "InvalidInput",
        "code": "invalid_argument",
        "message": format!("invalid {what}: {why}"),
        "argument": what,
    });
    Error::new(Status::InvalidArg, format!("{ERROR_MARK}{data}"))
}

// ---------------------------------------------------------------------------
// Inputs

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
}

fn amount_of(v: &serde_json::Value, at: &str) -> Result<Amount> {
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

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn cost_of(cost: Option<&serde_json::Value>, what: &str) -> Result<Cost> {
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

fn seconds(s: f64, what: &'static str) -> Result<Duration> {
    ops::seconds(s, what).map_err(|e| to_js(&e))
}

fn optional_seconds(v: Option<f64>, what: &'static str) -> Result<Option<Duration>> {
    ops::optional_seconds(v, what).map_err(|e| to_js(&e))
}

fn request_of(scope: &str, o: Option<&RequestOptions>) -> Result<Request> {
    let Some(o) = o else {
        return Request::parse(scope).map_err(|e| to_js(&e));
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
    .map_err(|e| to_js(&e))?;
    match &o.operation {
        None => Ok(req),
        Some(op) => Ok(req.operation(ratewarden::OperationId::parse(op).map_err(|e| to_js(&e))?)),
    }
}

fn reservation_id(id: &str) -> Result<ReservationId> {
    ReservationId::parse(id).map_err(|e| to_js(&e))
}

// ---------------------------------------------------------------------------
// Outputs (plain objects)

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
}

#[allow(clippy::cast_precision_loss)]
fn decision_of(d: &CoreDecision) -> Decision {
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
            model: d.caps.model.clone(),
            sequential: d.caps.sequential.then_some(true),
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

fn receipt_of(r: &CommitReceipt) -> Receipt {
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
            })
            .collect(),
    }
}

/// A decision for an HTTP request: the decision, its response headers and, when
/// denied, the JSON body of the 429.
#[napi(object)]
pub struct HttpDecision {
    /// The decision.
    pub decision: Decision,
    /// Header names, in order (`RateLimit-Policy`, `RateLimit`, `Retry-After`…).
    pub header_names: Vec<String>,
    /// Header values, same order.
    pub header_values: Vec<String>,
    /// The 429 body when denied.
    pub body: Option<String>,
}

fn http_of(d: &CoreDecision, style: HeaderStyle) -> HttpDecision {
    let (header_names, header_values) = rate_limit_headers(d, style)
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .unzip();
    HttpDecision {
        decision: decision_of(d),
        header_names,
        header_values,
        body: (!d.allowed()).then(|| denial_body(d)),
    }
}

/// A core result as a JS one.
fn js<T>(r: ratewarden::Result<T>) -> Result<T> {
    r.map_err(|e| to_js(&e))
}

/// An expiry (µs since the epoch) in seconds.
#[allow(clippy::cast_precision_loss)]
fn seconds_of(at: i64) -> f64 {
    at as f64 / 1e6
}

// ---------------------------------------------------------------------------
// Clock

/// A clock that moves only when told to, for deterministic tests.
#[napi]
pub struct ManualClock {
    inner: ratewarden::ManualClock,
}

#[napi]
impl ManualClock {
    /// Starts at `start` seconds since the epoch (default 2026-01-01T00:00:00Z).
    #[napi(constructor)]
    pub fn new(start: Option<f64>) -> Result<Self> {
        ratewarden::ManualClock::from_secs(
            start.unwrap_or(ratewarden::ManualClock::DEFAULT_START_SECS),
        )
        .map(|inner| Self { inner })
        .map_err(|e| to_js(&e))
    }

    /// Moves time forward by `seconds`.
    #[napi]
    pub fn advance(&self, seconds: f64) -> Result<()> {
        let d = self::seconds(seconds, "seconds")?;
        self.inner.advance(d);
        Ok(())
    }

    /// The current time, seconds since the epoch.
    #[napi]
    #[allow(clippy::cast_precision_loss)]
    pub fn now(&self) -> f64 {
        ratewarden::Clock::now(&self.inner) as f64 / 1e6
    }
}

// ---------------------------------------------------------------------------
// Warden

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
fn balance_of(b: &ratewarden::Balance) -> BalanceInfo {
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

/// The native warden behind the JS `Warden`.
#[napi]
pub struct NativeWarden {
    warden: Warden,
    embedded: bool,
    /// Requests prepared once by a middleware (`prepareHttp`), by index.
    templates: std::sync::RwLock<Vec<Template>>,
}

/// A middleware's constant request fields and header style, resolved once.
struct Template {
    /// resource, action, cost and priority, with a placeholder scope.
    request: Request,
    style: HeaderStyle,
}

fn setup_of(o: Option<&WardenOptions>, clock: Option<&ManualClock>, lazy: bool) -> Result<Setup> {
    let default = WardenOptions::default();
    let o = o.unwrap_or(&default);
    let mut s = Setup::new(o.backend.as_deref(), o.namespace.as_deref().unwrap_or("rw"));
    s.on_error = ratewarden::ops::on_backend_error(
        o.on_backend_error.as_deref().unwrap_or("deny"),
        o.local_share.unwrap_or(1),
    )
    .map_err(|e| to_js(&e))?;
    s.timeout = optional_seconds(o.timeout, "timeout")?;
    s.clock = clock.map(|c| c.inner.clone());
    s.lazy = lazy;
    Ok(s)
}

fn policy_of(json: Option<String>, path: Option<String>) -> Result<Policy> {
    match (json, path) {
        (Some(text), None) => {
            Policy::from_str_as(&text, ratewarden::Format::Json, "<object>").map_err(|e| to_js(&e))
        }
        (None, Some(p)) => Policy::from_file(&p).map_err(|e| to_js(&e)),
        _ => Err(invalid(
            "policy",
            "give exactly one of a policy object or a file path",
        )),
    }
}

/// Completes an embedded-engine operation on the calling thread.
fn at_once<T>(f: impl std::future::Future<Output = ratewarden::Result<T>>) -> Result<T> {
    ratewarden::backend::at_once(f).map_err(|e| to_js(&e))
}

#[napi]
impl NativeWarden {
    /// A warden for a policy (JSON text, or a file path). With a Redis backend
    /// it starts connecting in the background (decisions follow
    /// `onBackendError` until Redis answers); `NativeWarden.connect` waits.
    #[napi(constructor)]
    pub fn new(
        json: Option<String>,
        path: Option<String>,
        options: Option<WardenOptions>,
        clock: Option<&ManualClock>,
    ) -> Result<Self> {
        let policy = policy_of(json, path)?;
        let setup = setup_of(options.as_ref(), clock, true)?;
        let warden = if setup.embedded() {
            at_once(setup.connect(policy))?
        } else {
            // connect_lazy needs a Tokio context: napi's runtime.
            block_on(async { setup.connect(policy).await }).map_err(|e| to_js(&e))?
        };
        Ok(Self {
            embedded: setup.embedded(),
            warden,
            templates: std::sync::RwLock::default(),
        })
    }

    /// Connects first (rejects with a BackendError if Redis cannot be reached).
    #[napi(ts_return_type = "Promise<NativeWarden>")]
    pub fn connect<'env>(
        env: &'env Env,
        json: Option<String>,
        path: Option<String>,
        options: Option<WardenOptions>,
        clock: Option<&ManualClock>,
    ) -> Result<PromiseRaw<'env, NativeWarden>> {
        // Everything borrowed from JS is read here: the future owns what it uses.
        let policy = policy_of(json, path)?;
        let setup = setup_of(options.as_ref(), clock, false)?;
        env.spawn_future(async move {
            let warden = setup.connect(policy).await.map_err(|e| to_js(&e))?;
            Ok(Self {
                embedded: setup.embedded(),
                warden,
                templates: std::sync::RwLock::default(),
            })
        })
    }

    /// Whether decisions are made in this process (every call answers at once).
    #[napi(getter)]
    pub fn embedded(&self) -> bool {
        self.embedded
    }

    /// `memory` or `redis`.
    #[napi(getter)]
    pub fn backend(&self) -> &'static str {
        self.warden.backend_name()
    }

    /// Runs an operation at once on the embedded engine (only there).
    fn sync<T>(&self, op: impl std::future::Future<Output = ratewarden::Result<T>>) -> Result<T> {
        if !self.embedded {
            return Err(invalid(
                "call",
                "only the embedded engine decides synchronously; use the async form",
            ));
        }
        at_once(op)
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn check_sync(&self, scope: String, options: Option<RequestOptions>) -> Result<Decision> {
        let req = request_of(&scope, options.as_ref())?;
        self.sync(self.warden.check(&req)).map(|d| decision_of(&d))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn acquire_sync(&self, scope: String, options: Option<RequestOptions>) -> Result<Decision> {
        let req = request_of(&scope, options.as_ref())?;
        self.sync(self.warden.acquire(&req))
            .map(|d| decision_of(&d))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn reserve_sync(&self, scope: String, options: Option<RequestOptions>) -> Result<Decision> {
        let (req, lease) = reserve_args(&scope, options.as_ref())?;
        self.sync(self.warden.reserve(&req, lease))
            .map(|d| decision_of(&d))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn commit_sync(
        &self,
        reservation: String,
        actual: Option<serde_json::Value>,
    ) -> Result<Receipt> {
        let (id, actual) = commit_args(&reservation, actual.as_ref())?;
        self.sync(self.warden.commit(id, &actual))
            .map(|r| receipt_of(&r))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn release_sync(&self, reservation: String) -> Result<bool> {
        self.sync(self.warden.release(reservation_id(&reservation)?))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn extend_sync(&self, reservation: String, lease: f64) -> Result<f64> {
        let (id, lease) = (reservation_id(&reservation)?, seconds(lease, "lease")?);
        self.sync(self.warden.extend(id, lease)).map(seconds_of)
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn delegate_sync(
        &self,
        child: String,
        amounts: serde_json::Value,
        options: Option<DelegateOptions>,
    ) -> Result<Decision> {
        let (child, amounts, from, lease) = delegate_args(&child, &amounts, options.as_ref())?;
        self.sync(
            self.warden
                .delegate(from.as_from(), &child, &amounts, lease),
        )
        .map(|d| decision_of(&d))
    }

    /// Runs any operation on the runtime (Redis, waits).
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn check_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let req = request_of(&scope, options.as_ref())?;
            js(warden.check(&req).await).map(|d| decision_of(&d))
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn acquire_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let req = request_of(&scope, options.as_ref())?;
            js(warden.acquire(&req).await).map(|d| decision_of(&d))
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn reserve_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (req, lease) = reserve_args(&scope, options.as_ref())?;
            js(warden.reserve(&req, lease).await).map(|d| decision_of(&d))
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Receipt>")]
    pub fn commit_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
        actual: Option<serde_json::Value>,
    ) -> Result<PromiseRaw<'env, Receipt>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (id, actual) = commit_args(&reservation, actual.as_ref())?;
            js(warden.commit(id, &actual).await).map(|r| receipt_of(&r))
        })
    }

    /// What is left of every limit `scope` (on `resource`) touches, charging nothing.
    #[napi]
    pub fn balances_sync(
        &self,
        scope: String,
        resource: Option<String>,
    ) -> Result<Vec<BalanceInfo>> {
        let scope = Scope::parse(&scope).map_err(|e| to_js(&e))?;
        self.sync(self.warden.balances(&scope, resource.as_deref()))
            .map(|b| b.iter().map(balance_of).collect())
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Array<BalanceInfo>>")]
    pub fn balances_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        resource: Option<String>,
    ) -> Result<PromiseRaw<'env, Vec<BalanceInfo>>> {
        let scope = Scope::parse(&scope).map_err(|e| to_js(&e))?;
        let warden = self.warden.clone();
        env.spawn_future(async move {
            js(warden.balances(&scope, resource.as_deref()).await)
                .map(|b| b.iter().map(balance_of).collect())
        })
    }

    /// Settles a wrapped call's reservation by the settlement rule of
    /// `ratewarden::settle` (the same in every binding): `failed` → released;
    /// else committed at `actual` (rounded up to each unit) — or at the
    /// estimate when `actual` is undefined, or `unreadable` says why the call's
    /// usage could not be read, or `actual` is not a valid cost. Resolves to
    /// the problem to report, or null; never rejects for the settlement itself.
    #[napi]
    pub fn finish_sync(
        &self,
        reservation: String,
        failed: bool,
        actual: Option<serde_json::Value>,
        unreadable: Option<String>,
    ) -> Result<Option<String>> {
        let (id, outcome) = finish_args(&reservation, failed, actual, unreadable)?;
        self.sync(async move { Ok(self.warden.finish(id, outcome).await) })
            .map(|s| s.problem())
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<string | null>")]
    pub fn finish_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
        failed: bool,
        actual: Option<serde_json::Value>,
        unreadable: Option<String>,
    ) -> Result<PromiseRaw<'env, Option<String>>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (id, outcome) = finish_args(&reservation, failed, actual, unreadable)?;
            Ok(warden.finish(id, outcome).await.problem())
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn release_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
    ) -> Result<PromiseRaw<'env, bool>> {
        let warden = self.warden.clone();
        env.spawn_future(async move { js(warden.release(reservation_id(&reservation)?).await) })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn extend_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
        lease: f64,
    ) -> Result<PromiseRaw<'env, f64>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (id, lease) = (reservation_id(&reservation)?, seconds(lease, "lease")?);
            js(warden.extend(id, lease).await).map(seconds_of)
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn delegate_async<'env>(
        &self,
        env: &'env Env,
        child: String,
        amounts: serde_json::Value,
        options: Option<DelegateOptions>,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (child, amounts, from, lease) = delegate_args(&child, &amounts, options.as_ref())?;
            js(warden
                .delegate(from.as_from(), &child, &amounts, lease)
                .await)
            .map(|d| decision_of(&d))
        })
    }

    /// Waits up to `maxWait` seconds for admission, then acquires (or reserves).
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn wait_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
        max_wait: f64,
        reserve: bool,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let req = request_of(&scope, options.as_ref())?;
            let what = if reserve {
                WaitFor::Reserve(optional_seconds(
                    options.as_ref().and_then(|o| o.lease),
                    "lease",
                )?)
            } else {
                WaitFor::Acquire
            };
            let max_wait = seconds(max_wait, "maxWait")?;
            js(warden.wait(&req, what, max_wait).await).map(|d| decision_of(&d))
        })
    }

    /// An HTTP request's acquire with its response headers in `style`
    /// (`draft-11`, `draft-7`, `draft-6`, `off`), at once on the embedded
    /// engine, for request fields computed per request: answers as
    /// `decideHttpPrepared` does.
    #[napi]
    pub fn acquire_http_sync(
        &self,
        scope: String,
        options: Option<RequestOptions>,
        style: String,
    ) -> Result<Either<String, HttpDecision>> {
        let (req, style) = (request_of(&scope, options.as_ref())?, style_of(&style)?);
        if !self.embedded {
            return Err(invalid("call", "use acquireHttpAsync with Redis"));
        }
        let d = at_once(self.warden.admit(&req))?;
        Ok(http_joined(&d, style))
    }

    /// Async form of `acquireHttpSync`.
    #[napi(ts_return_type = "Promise<string | HttpDecision>")]
    pub fn acquire_http_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
        style: String,
    ) -> Result<PromiseRaw<'env, Either<String, HttpDecision>>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (req, style) = (request_of(&scope, options.as_ref())?, style_of(&style)?);
            let d = warden.admit(&req).await.map_err(|e| to_js(&e))?;
            Ok(http_joined(&d, style))
        })
    }
}

// ---------------------------------------------------------------------------
// Compact decisions: the hot path
//
// Building a plain object field by field through N-API costs ~10x the decision
// itself. `decide` instead writes an allowed decision's numbers into a
// `Float64Array` the JS layer owns and returns a small status code; the JS
// layer builds the object literal, taking names from the limit table
// (`limitTable()`, fetched once). Everything else — a denial, caps, a
// reservation, a degraded decision, a unit with decimals, an amount beyond
// 2^53 — comes back as the full `Decision` object, so nothing is approximated
// and nothing is formatted outside core.

/// Numbers per limit in the compact encoding: id, remaining, amount, reset.
const COMPACT_STRIDE: usize = 4;

/// One limit of the policy, as compact decisions refer to it (by `id`).
#[napi(object)]
pub struct LimitMeta {
    /// Position in the policy: the index compact decisions use.
    pub id: u32,
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
fn acquires(op: u32) -> Result<bool> {
    match op {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(invalid("op", "expected 0 (check) or 1 (acquire)")),
    }
}

/// Cost given as `unit\x1famount` items separated by `\x1e` (amounts: integer
/// or decimal text); the JS layer encodes only safe integers and strings.
fn cost_of_text(text: &str) -> Result<Cost> {
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
fn compact(d: &CoreDecision, out: &mut [f64]) -> Option<u32> {
    const EXACT: i64 = 1 << 53;
    let plain = matches!(d.outcome, ratewarden::decision::Outcome::Allow)
        && d.reason.is_none()
        && d.reservation.is_none()
        && d.degraded.is_none()
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
        let at = 1 + i * COMPACT_STRIDE;
        out[at] = f64::from(l.def.id);
        out[at + 1] = l.remaining as f64;
        out[at + 2] = l.amount as f64;
        out[at + 3] = l.reset.as_secs_f64();
    }
    Some(u32::from(d.priority.rank()))
}

/// The compact buffer's memory, for this call.
#[allow(unsafe_code)]
fn writable<'a>(out: &'a mut Float64ArraySlice) -> &'a mut [f64] {
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
        self.warden
            .policy()
            .limits()
            .map(|l| LimitMeta {
                id: l.id,
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
        Ok(match compact(&d, writable(&mut out)) {
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
            let d = js(if acquire {
                warden.acquire(&req).await
            } else {
                warden.check(&req).await
            })?;
            let mut out = vec![0.0; 2 + d.limits.len() * COMPACT_STRIDE];
            Ok(match compact(&d, &mut out[1..]) {
                Some(code) => {
                    out[0] = f64::from(code);
                    Either::A(out)
                }
                None => Either::B(decision_of(&d)),
            })
        })
    }
}

#[napi]
impl NativeWarden {
    /// Validates a middleware's constant request fields and header style once
    /// and returns their index for `decideHttpPrepared`. `cost` as in `decide`.
    #[napi]
    pub fn prepare_http(
        &self,
        resource: Option<String>,
        action: Option<String>,
        cost: Option<serde_json::Value>,
        priority: Option<String>,
        style: String,
    ) -> Result<u32> {
        let cost = cost.map(|c| cost_of(Some(&c), "cost")).transpose()?;
        let request = ops::request(
            "prepared:request",
            resource.as_deref(),
            action.as_deref(),
            cost,
            priority.as_deref(),
        )
        .map_err(|e| to_js(&e))?;
        // Resource, action and cost against the policy: a typo fails here, once.
        ratewarden::plan::check_parts(self.warden.policy(), &request).map_err(|e| to_js(&e))?;
        let template = Template {
            request,
            style: style_of(&style)?,
        };
        let mut all = self
            .templates
            .write()
            .map_err(|_| invalid("template", "a previous preparation panicked"))?;
        all.push(template);
        u32::try_from(all.len() - 1).map_err(|_| invalid("template", "too many prepared requests"))
    }

    /// An HTTP request's acquire with a prepared request (`prepareHttp`), at
    /// once on the embedded engine: when allowed, its response headers as one
    /// string `name\nvalue\nname\nvalue…` (one value crossing instead of an
    /// array of strings: in a busy server each N-API crossing is cold and
    /// costs ~0.2 µs); when denied, the whole `HttpDecision`.
    #[napi]
    pub fn decide_http_prepared(
        &self,
        scope: Option<String>,
        peer: Option<String>,
        forwarded_for: Option<String>,
        identity: &ClientIdentity,
        template: u32,
    ) -> Result<Either<String, HttpDecision>> {
        let (req, style) = self.prepared(template, scope, peer, forwarded_for, identity)?;
        let d = self.sync(self.warden.admit(&req))?;
        Ok(http_joined(&d, style))
    }

    /// `decideHttpPrepared` for any backend, as a Promise.
    #[napi(ts_return_type = "Promise<string | HttpDecision>")]
    pub fn decide_http_prepared_async<'env>(
        &self,
        env: &'env Env,
        scope: Option<String>,
        peer: Option<String>,
        forwarded_for: Option<String>,
        identity: &ClientIdentity,
        template: u32,
    ) -> Result<PromiseRaw<'env, Either<String, HttpDecision>>> {
        let (req, style) = self.prepared(template, scope, peer, forwarded_for, identity)?;
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let d = js(warden.admit(&req).await)?;
            Ok(http_joined(&d, style))
        })
    }
}

impl NativeWarden {
    /// The prepared request `template` for this HTTP request's scope.
    fn prepared(
        &self,
        template: u32,
        scope: Option<String>,
        peer: Option<String>,
        forwarded_for: Option<String>,
        identity: &ClientIdentity,
    ) -> Result<(Request, HeaderStyle)> {
        let scope = http_scope(scope, peer, forwarded_for, identity)?;
        let scope = Scope::parse(&scope).map_err(|e| to_js(&e))?;
        let all = self
            .templates
            .read()
            .map_err(|_| invalid("template", "a previous preparation panicked"))?;
        let t = usize::try_from(template)
            .ok()
            .and_then(|i| all.get(i))
            .ok_or_else(|| invalid("template", format!("no prepared request {template}")))?;
        let mut request = t.request.clone();
        request.scope = scope;
        Ok((request, t.style))
    }
}

/// Allowed: the header pairs joined by newlines (header names and values
/// never contain one); denied, or holding a concurrency slot the middleware
/// must free when the response ends (`Warden::admit`): the whole `HttpDecision`.
fn http_joined(d: &CoreDecision, style: HeaderStyle) -> Either<String, HttpDecision> {
    if !d.allowed() || d.reservation.is_some() {
        return Either::B(http_of(d, style));
    }
    let mut out = String::with_capacity(96);
    for (name, value) in rate_limit_headers(d, style) {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(name);
        out.push('\n');
        out.push_str(&value);
    }
    Either::A(out)
}

/// A request from the compact path's arguments (`cost` as `cost_of_text` reads it).
fn compact_request(
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
    .map_err(|e| to_js(&e))
}

/// The scope of an HTTP request: the one given, or the client's (`clientScope`).
fn http_scope(
    scope: Option<String>,
    peer: Option<String>,
    forwarded_for: Option<String>,
    identity: &ClientIdentity,
) -> Result<String> {
    match scope {
        Some(s) => Ok(s),
        None => identity
            .inner
            .scope(peer.as_deref(), forwarded_for.as_deref())
            .map_err(|e| to_js(&e)),
    }
}

fn style_of(style: &str) -> Result<HeaderStyle> {
    style.parse::<HeaderStyle>().map_err(|e| to_js(&e))
}

/// The canonical name of a rate-limit header style (`draft-11`, `draft-7`,
/// `draft-6`, `off`); an InvalidInput error for anything else.
#[napi]
pub fn header_style(style: String) -> Result<&'static str> {
    style_of(&style).map(HeaderStyle::as_str)
}

/// The default scope of an HTTP request, `ip:<client address>`: the socket
/// `peer`, or with `trustProxy` the first `X-Forwarded-For` entry.
/// Who the client of an HTTP request is (core `http::ClientIdentity`): the
/// proxies trusted (`false`, `true` = one hop, a hop count, or networks) and
/// the IPv6 subnet clients are keyed by (default 56).
#[napi]
pub struct ClientIdentity {
    inner: ratewarden::http::ClientIdentity,
}

#[napi]
impl ClientIdentity {
    /// Validates the settings once (the middleware's `trustProxy`, `ipv6Subnet`).
    #[napi(constructor)]
    pub fn new(trust_proxy: serde_json::Value, ipv6_subnet: Option<u32>) -> Result<Self> {
        let trust = ratewarden::http::TrustProxy::from_json(&trust_proxy).map_err(|e| to_js(&e))?;
        let subnet = match ipv6_subnet {
            None => ratewarden::http::DEFAULT_IPV6_SUBNET,
            Some(n) => u8::try_from(n).unwrap_or(u8::MAX),
        };
        let inner = ratewarden::http::ClientIdentity::new(trust, subnet).map_err(|e| to_js(&e))?;
        Ok(Self { inner })
    }

    /// Whether `X-Forwarded-For` is read at all.
    #[napi(getter)]
    pub fn trusts_proxies(&self) -> bool {
        *self.inner.trust() != ratewarden::http::TrustProxy::Nobody
    }

    /// The default scope of a request: `ip:<client address>`.
    #[napi]
    pub fn scope(&self, peer: Option<String>, forwarded_for: Option<String>) -> Result<String> {
        http_scope(None, peer, forwarded_for, self)
    }
}

fn reserve_args(scope: &str, o: Option<&RequestOptions>) -> Result<(Request, Option<Duration>)> {
    Ok((
        request_of(scope, o)?,
        optional_seconds(o.and_then(|o| o.lease), "lease")?,
    ))
}

/// A settlement's reservation and outcome (see `finish_sync`).
fn finish_args(
    reservation: &str,
    failed: bool,
    actual: Option<serde_json::Value>,
    unreadable: Option<String>,
) -> Result<(ReservationId, CallOutcome)> {
    let id = reservation_id(reservation)?;
    if failed {
        return Ok((id, CallOutcome::Failed));
    }
    let usage = match (unreadable, actual) {
        (Some(why), _) => Usage::Unreadable(why),
        (None, None | Some(serde_json::Value::Null)) => Usage::Estimate,
        (None, Some(v)) => match cost_of(Some(&v), "actual") {
            Ok(c) => Usage::Actual(c),
            // The message without the kind prefix the JS layer reads.
            Err(e) => Usage::Unreadable(message_of(&e)),
        },
    };
    Ok((id, CallOutcome::Ran(usage)))
}

fn commit_args(
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

fn delegate_args(
    child: &str,
    amounts: &serde_json::Value,
    o: Option<&DelegateOptions>,
) -> Result<(Scope, Cost, Source, Option<Duration>)> {
    let child = Scope::parse(child).map_err(|e| to_js(&e))?;
    let amounts = cost_of(Some(amounts), "amounts")?;
    let (from_scope, from_reservation) = o.map_or((None, None), |o| {
        (o.from_scope.as_deref(), o.from_reservation.as_deref())
    });
    let from = Source::pick(
        from_scope,
        from_reservation,
        ["fromScope", "fromReservation"],
    )
    .map_err(|e| to_js(&e))?;
    Ok((
        child,
        amounts,
        from,
        optional_seconds(o.and_then(|o| o.lease), "lease")?,
    ))
}

/// A scope string from `[kind, id]` pairs; ids may hold any text (`/`, `:`…):
/// they are escaped, never interpreted.
#[napi]
pub fn scope_of(segments: Vec<Vec<String>>) -> Result<String> {
    let mut pairs = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        match s.as_slice() {
            [k, id] => pairs.push((k.as_str(), id.as_str())),
            _ => {
                return Err(invalid(
                    "scope",
                    format!("segment {} is not a [kind, id] pair", i + 1),
                ));
            }
        }
    }
    Scope::from_segments(pairs)
        .map(|s| s.as_str().to_owned())
        .map_err(|e| to_js(&e))
}
