//! The Cycles runtime protocol (v0.1.25) on `ratewarden serve`, so teams on
//! Cycles keep their clients (the published `runcycles` SDKs) and gain
//! ratewarden's engine.
//!
//! Every decision is the core's: this module maps Cycles' vocabulary onto a
//! [`ratewarden::Request`] and the answers back, and keeps what the protocol
//! needs besides (reservation records, idempotent replies) for the
//! reservations made through it.
//!
//! The mapping:
//! - **subject → scope**: the present fields in canonical order (`tenant`,
//!   `workspace`, `app`, `workflow`, `agent`, `toolset`), gaps skipped,
//!   case kept: `{tenant: acme, agent: x}` → `tenant:acme/agent:x` (with
//!   API keys, a subject without `tenant` is under the key's tenant). Each field's kind
//!   must be a scope kind of the policy (`agent: {}` declares one without
//!   limits); `dimensions` are accepted and not budgeted.
//! - **action**: `name` is the request's resource and `kind` its action
//!   when the policy declares them (`openai:gpt-4o`, `send_email`); else
//!   they only label the reservation.
//! - **units**: `USD_MICROCENTS` (10⁻⁸ USD) ↔ the policy's `usd`, `TOKENS`
//!   ↔ `tokens`, `CREDITS` ↔ `credits`, `RISK_POINTS` ↔ `risk`; an amount
//!   the unit cannot hold exactly (1 microcent in a 6-decimal `usd`) is a
//!   400 naming it, never rounded.
//! - **budgets**: a scope's quota and budget limits in the reservation's
//!   unit. A request none of whose limits counts that unit is `404
//!   NOT_FOUND` (reserve, events) or `DENY` with `BUDGET_NOT_FOUND`
//!   (decide, dry runs). Rate and concurrency limits apply too (Cycles has
//!   none): a live reserve they deny is `429 LIMIT_EXCEEDED` with
//!   `Retry-After`, one a budget denies `409 BUDGET_EXCEEDED`.
//! - **overage**: the limits' own `overage` rules govern a commit past its
//!   reservation; a reservation made with `overage_policy: REJECT` refuses
//!   such a commit (`409 BUDGET_EXCEEDED`, still live) whatever they say.
//! - **lease**: a reservation holds until `expires_at_ms` + its grace
//!   period; it is committed or released up to that moment, extended only
//!   before `expires_at_ms`.
//!
//! API keys (`--api-keys FILE`: lines `<tenant> sha256:<hex of the key>`)
//! name the tenant of every request; a subject or filter naming another
//! tenant is a 403, a missing or unknown key a 401, and nothing is charged.
//! Without a keys file the server trusts the subject (a local sidecar).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ratewarden::decision::{Decision, LimitState, ReservationId};
use ratewarden::{Amount, Cost, Error, Outcome, Scope};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{RequestId, Served};

/// Cycles' subject fields, in canonical order.
const SUBJECT_FIELDS: [&str; 6] = ["tenant", "workspace", "app", "workflow", "agent", "toolset"];

/// An ended reservation's record is kept this long after it ended…
const KEEP_ENDED_MS: i64 = 3600 * 1000;

/// …and at most this many ended records (the oldest go first).
const MAX_ENDED: usize = 100_000;

/// Idempotent answers kept per generation: the last 100,000 to 200,000
/// keys are answered as the first time.
const REPLY_GENERATION: usize = 100_000;

/// Reservations recorded between two prunings of the ended ones.
const PRUNE_EVERY: usize = 50_000;

/// The Cycles side of the server: API keys, reservation records, replies.
pub(super) struct Cycles {
    /// SHA-256 of each key → its tenant; `None`: no authentication.
    keys: Option<HashMap<[u8; 32], String>>,
    ledger: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    reservations: HashMap<u128, Record>,
    /// (tenant, endpoint, idempotency key) → the first answer.
    /// Records at which the ended ones are pruned next.
    prune_at: usize,
    /// (tenant, endpoint, idempotency key) → the first answer, in two
    /// generations: the current one, and the previous (dropped when the
    /// current one fills).
    replies: [HashMap<(String, String, String), Reply>; 2],
}

/// The first answer under an idempotency key.
struct Reply {
    /// SHA-256 of the request body it answered (a different body: mismatch).
    body: [u8; 32],
    status: StatusCode,
    answer: Value,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    Active,
    Committed,
    Released,
}

/// A reservation made through the Cycles API.
struct Record {
    tenant: String,
    subject: Value,
    action: Value,
    unit: Unit,
    reserved: i64,
    scope_path: String,
    affected: Vec<String>,
    created_ms: i64,
    expires_ms: i64,
    grace_ms: i64,
    status: Status,
    committed: Option<i64>,
    finalized_ms: Option<i64>,
    idempotency_key: String,
    reject_overage: bool,
    metadata: Option<Value>,
}

impl Ledger {
    /// Forgets ended reservations (committed, released, or past their
    /// grace) more than [`KEEP_ENDED_MS`] ago, then the oldest ended ones
    /// past [`MAX_ENDED`]; live ones are always kept. Runs every
    /// [`PRUNE_EVERY`] new records.
    fn prune(&mut self, now_ms: i64) {
        let ended = |r: &Record| match r.status {
            Status::Active => r.expires_ms + r.grace_ms,
            _ => r.finalized_ms.unwrap_or(r.created_ms),
        };
        self.reservations
            .retain(|_, r| r.status_at(now_ms) == "ACTIVE" || ended(r) + KEEP_ENDED_MS > now_ms);
        let mut ends: Vec<i64> = self
            .reservations
            .values()
            .filter(|r| r.status_at(now_ms) != "ACTIVE")
            .map(ended)
            .collect();
        if ends.len() > MAX_ENDED {
            let cut = ends.len() - MAX_ENDED;
            let (_, &mut oldest_kept, _) = ends.select_nth_unstable(cut);
            self.reservations
                .retain(|_, r| r.status_at(now_ms) == "ACTIVE" || ended(r) >= oldest_kept);
        }
        self.prune_at = self.reservations.len() + PRUNE_EVERY;
    }
}

impl Record {
    /// `ACTIVE`, `COMMITTED`, `RELEASED`, or `EXPIRED` once its lease and
    /// grace are over.
    fn status_at(&self, now_ms: i64) -> &'static str {
        match self.status {
            Status::Committed => "COMMITTED",
            Status::Released => "RELEASED",
            Status::Active if now_ms > self.expires_ms + self.grace_ms => "EXPIRED",
            Status::Active => "ACTIVE",
        }
    }

    /// Its `ReservationSummary` (the published SDKs refuse more fields in a
    /// list; [`Record::detail`] adds them).
    fn summary(&self, id: u128, now_ms: i64) -> Value {
        json!({
            "reservation_id": format!("{id:032x}"),
            "status": self.status_at(now_ms),
            "subject": self.subject,
            "action": self.action,
            "reserved": self.unit.amount(self.reserved),
            "created_at_ms": self.created_ms,
            "expires_at_ms": self.expires_ms,
            "scope_path": self.scope_path,
            "affected_scopes": self.affected,
            "idempotency_key": self.idempotency_key,
        })
    }

    /// Its `ReservationDetail`: the summary, with `committed`,
    /// `finalized_at_ms` and `metadata` when it has them.
    fn detail(&self, id: u128, now_ms: i64) -> Value {
        let mut v = self.summary(id, now_ms);
        if let Some(m) = v.as_object_mut() {
            if let Some(c) = self.committed {
                m.insert("committed".into(), self.unit.amount(c));
            }
            if let Some(f) = self.finalized_ms {
                m.insert("finalized_at_ms".into(), json!(f));
            }
            if let Some(md) = &self.metadata {
                m.insert("metadata".into(), md.clone());
            }
        }
        v
    }
}

/// A Cycles unit and the policy unit it is counted in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Unit {
    UsdMicrocents,
    Tokens,
    Credits,
    RiskPoints,
}

impl Unit {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "USD_MICROCENTS" => Self::UsdMicrocents,
            "TOKENS" => Self::Tokens,
            "CREDITS" => Self::Credits,
            "RISK_POINTS" => Self::RiskPoints,
            _ => return None,
        })
    }

    const fn name(self) -> &'static str {
        match self {
            Self::UsdMicrocents => "USD_MICROCENTS",
            Self::Tokens => "TOKENS",
            Self::Credits => "CREDITS",
            Self::RiskPoints => "RISK_POINTS",
        }
    }

    /// The policy unit it is counted in.
    const fn policy_unit(self) -> &'static str {
        match self {
            Self::UsdMicrocents => "usd",
            Self::Tokens => "tokens",
            Self::Credits => "credits",
            Self::RiskPoints => "risk",
        }
    }

    fn of_policy_unit(unit: &str) -> Option<Self> {
        [
            Self::UsdMicrocents,
            Self::Tokens,
            Self::Credits,
            Self::RiskPoints,
        ]
        .into_iter()
        .find(|u| u.policy_unit() == unit)
    }

    /// Decimal places of one Cycles amount in the policy unit: a microcent
    /// is 10⁻⁸ dollars; the others are whole units.
    const fn scale(self) -> u8 {
        match self {
            Self::UsdMicrocents => 8,
            _ => 0,
        }
    }

    /// A Cycles amount as an exact [`Amount`] of the policy unit.
    fn to_amount(self, amount: i64) -> Amount {
        Amount::decimal(amount, self.scale())
    }

    /// Base units of the policy unit (`decimals` places) as a Cycles amount,
    /// rounded up (`up`) or down when the policy unit is finer.
    fn of_base(self, base: i64, decimals: u8, up: bool) -> i64 {
        let (s, d) = (i32::from(self.scale()), i32::from(decimals));
        let v = i128::from(base);
        let out = if s >= d {
            v * 10_i128.pow(u32::try_from(s - d).unwrap_or(0))
        } else {
            let div = 10_i128.pow(u32::try_from(d - s).unwrap_or(0));
            if up {
                (v + div - 1).div_euclid(div)
            } else {
                v.div_euclid(div)
            }
        };
        i64::try_from(out).unwrap_or(if out < 0 { i64::MIN } else { i64::MAX })
    }

    fn amount(self, amount: i64) -> Value {
        json!({"unit": self.name(), "amount": amount})
    }
}

/// A protocol error: `{error, message, request_id}` with its status.
/// (Boxed: results carrying one stay small.)
pub(super) struct Problem(Box<ProblemBody>);

pub(super) struct ProblemBody {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
    retry_after_ms: Option<u64>,
}

impl std::ops::Deref for Problem {
    type Target = ProblemBody;
    fn deref(&self) -> &ProblemBody {
        &self.0
    }
}

impl std::ops::DerefMut for Problem {
    fn deref_mut(&mut self) -> &mut ProblemBody {
        &mut self.0
    }
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(ProblemBody {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after_ms: None,
        }))
    }

    pub(super) fn status(&self) -> StatusCode {
        self.0.status
    }

    pub(super) fn message(&self) -> &str {
        &self.message
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    fn details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// A core error in protocol terms.
    fn of(e: &Error) -> Self {
        use ratewarden::ErrorKind;
        let message = e.to_string();
        match (e.kind(), e) {
            (_, Error::ReservationExpired { .. }) => {
                Self::new(StatusCode::GONE, "RESERVATION_EXPIRED", message)
            }
            (_, Error::ReservationClosed { .. }) => {
                Self::new(StatusCode::CONFLICT, "RESERVATION_FINALIZED", message)
            }
            (_, Error::OverageRejected { .. }) => {
                Self::new(StatusCode::CONFLICT, "BUDGET_EXCEEDED", message)
            }
            (ErrorKind::NotFound, _) => Self::not_found(message),
            (ErrorKind::InvalidInput | ErrorKind::Policy, _) => Self::invalid(message),
            (ErrorKind::Conflict, _) => {
                Self::new(StatusCode::CONFLICT, "IDEMPOTENCY_MISMATCH", message)
            }
            (ErrorKind::Backend, _) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "INTERNAL_ERROR", message)
            }
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", message),
        }
    }

    fn respond(self, id: &RequestId) -> Response {
        let this = *self.0;
        let mut body = json!({"error": this.code, "message": this.message, "request_id": id.id, "trace_id": id.trace});
        if let (Some(d), Some(m)) = (this.details, body.as_object_mut()) {
            m.insert("details".into(), d);
        }
        let mut res = (this.status, axum::Json(body)).into_response();
        if let Some(ms) = this.retry_after_ms {
            if let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string()) {
                res.headers_mut().insert("retry-after", v);
            }
        }
        res
    }
}

type Answer = Result<(StatusCode, Value), Problem>;

fn now_ms(s: &Served) -> i64 {
    s.warden.clock().now().div_euclid(1000)
}

impl Cycles {
    /// Reads the API keys file (`None`: no authentication): one key per
    /// line, `<tenant> sha256:<64 hex digits>`; `#` starts a comment.
    ///
    /// # Errors
    /// The file cannot be read, or a line is not of that form (named by number).
    pub(super) fn new(keys: Option<&std::path::Path>) -> Result<Self, String> {
        let keys = match keys {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read the API keys file {}: {e}", path.display())
                })?;
                Some(parse_keys(&text).map_err(|e| format!("{}: {e}", path.display()))?)
            }
        };
        Ok(Self {
            keys,
            ledger: Mutex::new(Ledger::default()),
        })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The tenant the request's API key names; `None` without keys.
    pub(super) fn tenant(&self, headers: &HeaderMap) -> Result<Option<String>, Problem> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let unauthorized =
            |m: &str| Problem::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m.to_owned());
        let key = headers
            .get("x-cycles-api-key")
            .ok_or_else(|| unauthorized("the X-Cycles-API-Key header is missing"))?;
        keys.get(&sha256(key.as_bytes()))
            .cloned()
            .map(Some)
            .ok_or_else(|| unauthorized("the X-Cycles-API-Key is not a key of this server"))
    }
}

/// `<tenant> sha256:<hex>` lines → hash → tenant.
fn parse_keys(text: &str) -> Result<HashMap<[u8; 32], String>, String> {
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            format!(
                "line {}: expected `<tenant> sha256:<64 hex digits>` (make one with `ratewarden api-key --tenant T`)",
                n + 1
            )
        };
        let (tenant, hash) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        let hex = hash.trim().strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || valid_id(tenant).is_err() {
            return Err(bad());
        }
        let mut digest = [0_u8; 32];
        for (i, b) in digest.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        keys.insert(digest, tenant.to_owned());
    }
    Ok(keys)
}

pub(super) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0_u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A new API key for `tenant` and its line for the keys file.
pub(crate) fn new_key(tenant: &str) -> Result<(String, String), String> {
    valid_id(tenant).map_err(|m| format!("--tenant: {m}"))?;
    let key = format!("rwk_{:032x}{:032x}", fastrand::u128(..), fastrand::u128(..));
    let hex: String = sha256(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((key, format!("{tenant} sha256:{hex}")))
}

/// Cycles' rule for subject values: 1–128 of `[a-zA-Z0-9_.-]`.
fn valid_id(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 128 {
        return Err(format!("`{v}` must be 1 to 128 characters"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "`{v}` has `{c}`; use letters, digits, `_`, `.` and `-`"
        ));
    }
    Ok(())
}

// ---- request bodies ----------------------------------------------------

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Subject {
    tenant: Option<String>,
    workspace: Option<String>,
    app: Option<String>,
    workflow: Option<String>,
    agent: Option<String>,
    toolset: Option<String>,
    dimensions: Option<BTreeMap<String, String>>,
}

impl Subject {
    fn fields(&self) -> [(&'static str, Option<&String>); 6] {
        [
            ("tenant", self.tenant.as_ref()),
            ("workspace", self.workspace.as_ref()),
            ("app", self.app.as_ref()),
            ("workflow", self.workflow.as_ref()),
            ("agent", self.agent.as_ref()),
            ("toolset", self.toolset.as_ref()),
        ]
    }
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Action {
    kind: String,
    name: String,
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    idempotency_key: String,
    subject: Subject,
    action: Action,
    estimate: Value,
    ttl_ms: Option<i64>,
    grace_period_ms: Option<i64>,
    overage_policy: Option<String>,
    dry_run: Option<bool>,
    metadata: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    idempotency_key: String,
    subject: Subject,
    action: Action,
    estimate: Value,
    metadata: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    idempotency_key: String,
    subject: Subject,
    action: Action,
    actual: Value,
    overage_policy: Option<String>,
    metrics: Option<Map<String, Value>>,
    client_time_ms: Option<i64>,
    metadata: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    idempotency_key: String,
    actual: Value,
    metrics: Option<Map<String, Value>>,
    metadata: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    idempotency_key: String,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendBody {
    idempotency_key: String,
    extend_by_ms: i64,
    metadata: Option<Map<String, Value>>,
}

/// `{unit, amount}`: a Cycles unit and an int64 ≥ 0.
fn amount_of(v: &Value, at: &str) -> Result<(Unit, i64), Problem> {
    let m = v
        .as_object()
        .ok_or_else(|| Problem::invalid(format!("`{at}` must be an object {{unit, amount}}")))?;
    if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "unit" | "amount")) {
        return Err(Problem::invalid(format!(
            "`{at}.{k}` is not a field of an amount"
        )));
    }
    let unit = m.get("unit").and_then(Value::as_str).ok_or_else(|| {
        Problem::invalid(format!(
            "`{at}.unit` is required: USD_MICROCENTS, TOKENS, CREDITS or RISK_POINTS"
        ))
    })?;
    let unit = Unit::parse(unit).ok_or_else(|| {
        Problem::invalid(format!(
            "`{at}.unit` `{unit}` is not a unit; use USD_MICROCENTS, TOKENS, CREDITS or RISK_POINTS"
        ))
    })?;
    let amount = m
        .get("amount")
        .and_then(Value::as_i64)
        .filter(|a| *a >= 0)
        .ok_or_else(|| {
            Problem::invalid(format!(
                "`{at}.amount` must be a whole number from 0 to 9223372036854775807"
            ))
        })?;
    Ok((unit, amount))
}

/// A request's scope, resource, action and cost from Cycles fields.
struct Mapped {
    request: ratewarden::Request,
    scope: Scope,
    unit: Unit,
    amount: i64,
}

impl Mapped {
    /// `tenant` is the API key's (`None`: no keys): the subject's tenant, when
    /// given, must be it, and defaults to it.
    fn new(
        s: &Served,
        tenant: Option<&str>,
        subject: &Subject,
        action: &Action,
        amount: &Value,
        at: &str,
    ) -> Result<Self, Problem> {
        let scope = subject_scope(s, tenant, subject)?;
        if action.kind.is_empty() || action.kind.len() > 64 {
            return Err(Problem::invalid("`action.kind` must be 1 to 64 characters"));
        }
        if action.name.is_empty() || action.name.len() > 256 {
            return Err(Problem::invalid(
                "`action.name` must be 1 to 256 characters",
            ));
        }
        if let Some(tags) = &action.tags {
            if tags.len() > 10 || tags.iter().any(|t| t.len() > 64) {
                return Err(Problem::invalid(
                    "`action.tags`: at most 10 tags of at most 64 characters",
                ));
            }
        }
        let (unit, n) = amount_of(amount, at)?;
        let policy = s.warden.policy();
        if policy.unit(unit.policy_unit()).is_none() {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "UNIT_MISMATCH",
                format!(
                    "`{at}.unit` {} is counted in the policy unit `{}`, which this policy does not declare",
                    unit.name(),
                    unit.policy_unit()
                ),
            ));
        }
        if let Some(d) = policy.unit(unit.policy_unit()).map(|u| u.decimals) {
            let step = 10_i64.pow(u32::from(unit.scale().saturating_sub(d)));
            if n % step != 0 {
                return Err(Problem::invalid(format!(
                    "`{at}.amount`: {n} {} is finer than the policy's `{}` holds ({d} decimals: whole multiples of {step}); give a multiple of {step}, or declare `{}: {{decimals: {}}}` in the policy",
                    unit.name(),
                    unit.policy_unit(),
                    unit.policy_unit(),
                    unit.scale()
                )));
            }
        }
        let mut request = ratewarden::Request::new(scope.clone())
            .cost(Cost::new().with(unit.policy_unit(), unit.to_amount(n)));
        if policy.resource(&action.name).is_some() {
            request = request.resource(action.name.clone());
        }
        if policy.action(&action.kind).is_some() {
            request = request.action(action.kind.clone());
        }
        // The amount must fit the unit exactly (and the plan must resolve).
        ratewarden::plan::Plan::build(&policy, &request).map_err(|e| {
            let mut p = Problem::of(&e);
            p.message = format!("`{at}.amount`: {}", p.message);
            p
        })?;
        Ok(Self {
            request,
            scope,
            unit,
            amount: n,
        })
    }

    /// Every prefix of the scope (Cycles' `affected_scopes`), when some
    /// budget (a quota or budget limit of a scope) counts the unit; else
    /// why not: no budget at all (`None`), or budgets in other units only.
    fn affected(&self, s: &Served) -> Result<Vec<String>, Option<Vec<&'static str>>> {
        let policy = s.warden.policy();
        let Ok(plan) = ratewarden::plan::Plan::build(&policy, &self.request) else {
            return Err(None);
        };
        let mut others: Vec<&'static str> = Vec::new();
        for l in plan
            .limits()
            .filter(|l| is_budget(l.def) && l.scope_depth.is_some())
        {
            match Unit::of_policy_unit(&l.def.unit) {
                Some(u) if u == self.unit => {
                    return Ok((1..=self.scope.depth())
                        .map(|d| self.scope.prefix(d).to_owned())
                        .collect());
                }
                Some(u) if !others.contains(&u.name()) => others.push(u.name()),
                _ => {}
            }
        }
        Err((!others.is_empty()).then_some(others))
    }

    /// The problem of a request no budget counts: `UNIT_MISMATCH` when
    /// budgets count other units, else `NOT_FOUND`.
    fn no_budget(&self, others: Option<Vec<&'static str>>) -> Problem {
        match others {
            Some(units) => Problem::new(
                StatusCode::BAD_REQUEST,
                "UNIT_MISMATCH",
                format!(
                    "no budget of `{}` counts {}; its budgets count {}",
                    self.scope.as_str(),
                    self.unit.name(),
                    units.join(", ")
                ),
            )
            .details(json!({"scope": self.scope.as_str(), "requested_unit": self.unit.name(), "expected_units": units})),
            None => Problem::not_found(format!(
                "Budget not found for provided scope: `{}` has no quota or budget limit in `{}` ({})",
                self.scope.as_str(),
                self.unit.policy_unit(),
                self.unit.name()
            )),
        }
    }

    fn with_operation(mut self, tenant: &str, endpoint: &str, key: &str) -> Result<Self, Problem> {
        let op = ratewarden::OperationId::of_key(&format!("cycles/{tenant}/{endpoint}/{key}"))
            .map_err(|e| Problem::of(&e))?;
        self.request = self.request.operation(op);
        Ok(self)
    }
}

fn is_budget(def: &ratewarden::policy::LimitDef) -> bool {
    matches!(def.kind.name(), "quota" | "budget")
}

fn subject_scope(s: &Served, tenant: Option<&str>, subject: &Subject) -> Result<Scope, Problem> {
    let policy = s.warden.policy();
    let mut segments: Vec<(&str, String)> = Vec::new();
    for (kind, value) in subject.fields() {
        let value = match (kind, value, tenant) {
            ("tenant", Some(v), Some(t)) if v != t => {
                return Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    "FORBIDDEN",
                    format!("`subject.tenant` `{v}` is not the API key's tenant"),
                ));
            }
            ("tenant", None, Some(t)) => t.to_owned(),
            (_, Some(v), _) => v.clone(),
            (_, None, _) => continue,
        };
        valid_id(&value).map_err(|m| Problem::invalid(format!("`subject.{kind}`: {m}")))?;
        if !policy.scope_kinds().any(|k| k == kind) {
            return Err(Problem::invalid(format!(
                "`subject.{kind}`: the policy has no `{kind}` scope kind (it has: {}); declare `{kind}: {{}}` under `scopes:`",
                policy.scope_kinds().collect::<Vec<_>>().join(", ")
            )));
        }
        segments.push((kind, value));
    }
    if segments.is_empty() {
        return Err(Problem::invalid(
            "`subject` needs at least one of tenant, workspace, app, workflow, agent, toolset",
        ));
    }
    if let Some(d) = &subject.dimensions {
        if d.len() > 16 || d.values().any(|v| v.len() > 256) {
            return Err(Problem::invalid(
                "`subject.dimensions`: at most 16 entries of at most 256 characters",
            ));
        }
    }
    Scope::from_segments(segments.iter().map(|(k, v)| (*k, v.as_str())))
        .map_err(|e| Problem::invalid(format!("`subject`: {e}")))
}

fn key_of(key: &str, header: Option<&HeaderValue>) -> Result<String, Problem> {
    if key.is_empty() || key.len() > 256 {
        return Err(Problem::invalid(
            "`idempotency_key` must be 1 to 256 characters",
        ));
    }
    if let Some(h) = header {
        if h.as_bytes() != key.as_bytes() {
            return Err(Problem::invalid(
                "the X-Idempotency-Key header differs from the body's `idempotency_key`",
            ));
        }
    }
    Ok(key.to_owned())
}

fn overage_rejects(p: Option<&str>) -> Result<bool, Problem> {
    match p {
        None | Some("ALLOW_IF_AVAILABLE" | "ALLOW_WITH_OVERDRAFT") => Ok(false),
        Some("REJECT") => Ok(true),
        Some(other) => Err(Problem::invalid(format!(
            "`overage_policy` `{other}`: use REJECT, ALLOW_IF_AVAILABLE or ALLOW_WITH_OVERDRAFT"
        ))),
    }
}

// ---- responses -----------------------------------------------------------

/// `ALLOW`, `ALLOW_WITH_CAPS` or `DENY`.
const fn decision_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Allow => "ALLOW",
        Outcome::AllowWithCaps => "ALLOW_WITH_CAPS",
        Outcome::Deny => "DENY",
    }
}

/// Adds `caps` (with `ALLOW_WITH_CAPS`) and the fallback model to an answer.
fn put_caps(out: &mut Map<String, Value>, d: &Decision) {
    if let Some(c) = caps_of(d) {
        out.insert("caps".into(), c);
    }
    if let (Outcome::AllowWithCaps, Some(model)) = (d.outcome, &d.caps.model) {
        out.insert(MODEL.into(), json!(&**model));
    }
}

/// Cycles' caps: `max_tokens`, and the pacing delay as `cooldown_ms`.
fn caps_of(d: &Decision) -> Option<Value> {
    (d.outcome == Outcome::AllowWithCaps).then(|| {
        let mut caps = Map::new();
        if let Some(t) = d.caps.max_tokens {
            caps.insert("max_tokens".into(), json!(t));
        }
        if let Some(ms) = d.caps.delay_ms {
            caps.insert("cooldown_ms".into(), json!(ms));
        }
        Value::Object(caps)
    })
}

/// Why a request was denied, as a Cycles reason code.
fn reason_of(d: &Decision) -> &'static str {
    match d.denied_by().map(LimitState::kind) {
        Some("quota" | "budget") => "BUDGET_EXCEEDED",
        Some("rate") => "RATE_LIMITED",
        Some("concurrency") => "CONCURRENCY_LIMITED",
        _ if d.degraded.is_some() => "BACKEND_UNAVAILABLE",
        _ => "ACTION_DENIED",
    }
}

fn retry_ms(d: &Decision) -> Option<u64> {
    d.retry_after
        .map(|r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX))
}

/// The Cycles balance of each scope's budget in `unit` (its tightest when
/// several count it) among `limits`, most general scope first.
fn balances_of(limits: &[LimitState], scope: &Scope) -> Vec<Value> {
    let mut out: BTreeMap<(u8, Unit), &LimitState> = BTreeMap::new();
    for l in limits {
        let (Some(depth), Some(unit)) = (l.scope_depth, Unit::of_policy_unit(l.unit())) else {
            continue;
        };
        if !matches!(l.kind(), "quota" | "budget") {
            continue;
        }
        out.entry((depth, unit))
            .and_modify(|e| {
                if l.remaining < e.remaining {
                    *e = l;
                }
            })
            .or_insert(l);
    }
    out.into_iter()
        .map(|((depth, unit), l)| {
            let path = scope.prefix(usize::from(depth));
            let last = path.rsplit('/').next().unwrap_or(path);
            let d = l.decimals();
            let spent = (l.limit() - l.remaining - l.held).max(0);
            json!({
                "scope": last,
                "scope_path": path,
                "remaining": unit.amount(unit.of_base(l.remaining, d, false)),
                "reserved": unit.amount(unit.of_base(l.held, d, true)),
                "spent": unit.amount(unit.of_base(spent, d, true)),
                "allocated": unit.amount(unit.of_base(l.limit(), d, false)),
                "debt": unit.amount(0),
                "is_over_limit": false,
            })
        })
        .collect()
}

impl Ord for Unit {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}

impl PartialOrd for Unit {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

// ---- the endpoints -------------------------------------------------------

/// Runs `answer` once per (tenant, endpoint, idempotency key): a repeat of
/// the same body gets the first answer (nothing done again), a different
/// body `409 IDEMPOTENCY_MISMATCH`. Only successes are kept: a refused
/// request may be retried once what refused it has changed.
async fn once<F>(
    s: &Served,
    tenant: &str,
    endpoint: String,
    key: &str,
    raw: &[u8],
    answer: F,
) -> Answer
where
    F: std::future::Future<Output = Answer>,
{
    let body = sha256(raw);
    let slot = (tenant.to_owned(), endpoint, key.to_owned());
    let found = {
        let ledger = s.cycles.ledger();
        ledger.replies[0]
            .get(&slot)
            .or_else(|| ledger.replies[1].get(&slot))
            .map(|r| (r.body, r.status, r.answer.clone()))
    };
    if let Some((first, status, answer)) = found {
        if first != body {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "IDEMPOTENCY_MISMATCH",
                format!(
                    "the idempotency key `{key}` was used with a different request on this endpoint"
                ),
            ));
        }
        return Ok((status, answer));
    }
    let (status, answer) = answer.await?;
    let mut ledger = s.cycles.ledger();
    if ledger.replies[0].len() >= REPLY_GENERATION {
        ledger.replies[1] = std::mem::take(&mut ledger.replies[0]);
    }
    if let Some(r) = ledger.replies[1].get(&slot) {
        return Ok((r.status, r.answer.clone()));
    }
    let kept = ledger.replies[0].entry(slot).or_insert(Reply {
        body,
        status,
        answer,
    });
    Ok((kept.status, kept.answer.clone()))
}

/// Parses a JSON body, keeping its bytes (for the idempotency check).
fn parse<T: serde::de::DeserializeOwned>(
    raw: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    headers: &HeaderMap,
) -> Result<(T, axum::body::Bytes), Problem> {
    let raw = raw.map_err(|e| Problem::new(e.status(), "INVALID_REQUEST", e.body_text()))?;
    let json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
    if !json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "INVALID_REQUEST",
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&raw);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        Problem::invalid(format!("`{path}`: {}", e.into_inner()))
    })?;
    de.end()
        .map_err(|e| Problem::invalid(format!("the body is not one JSON value: {e}")))?;
    Ok((v, raw))
}

type Body = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

/// Where an answer carries its fallback model until [`done`] moves it into
/// the `X-Ratewarden-Model` header (kept with the answer, so a replay
/// repeats it; never sent as a field: the SDKs refuse unknown ones).
const MODEL: &str = "\u{0}model";

fn done(id: &RequestId, a: Answer) -> Response {
    match a {
        Ok((status, mut v)) => {
            let model = v.as_object_mut().and_then(|m| m.remove(MODEL));
            let mut res = (status, axum::Json(v)).into_response();
            if let Some(Ok(h)) = model
                .as_ref()
                .and_then(Value::as_str)
                .map(HeaderValue::from_str)
            {
                res.headers_mut().insert("x-ratewarden-model", h);
            }
            res
        }
        Err(p) => p.respond(id),
    }
}

/// `POST /v1/reservations`.
pub(super) async fn reserve(
    State(s): State<Arc<Served>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    done(&id, reserve_answer(&s, &headers, raw).await)
}

async fn reserve_answer(s: &Arc<Served>, headers: &HeaderMap, raw: Body) -> Answer {
    let tenant = s.cycles.tenant(headers)?;
    let (b, raw): (ReserveBody, _) = parse(raw, headers)?;
    let key = key_of(&b.idempotency_key, headers.get("x-idempotency-key"))?;
    let ttl = b.ttl_ms.unwrap_or(60_000);
    if !(1_000..=86_400_000).contains(&ttl) {
        return Err(Problem::invalid("`ttl_ms` must be from 1000 to 86400000"));
    }
    let grace = b.grace_period_ms.unwrap_or(5_000);
    if !(0..=60_000).contains(&grace) {
        return Err(Problem::invalid(
            "`grace_period_ms` must be from 0 to 60000",
        ));
    }
    let reject = overage_rejects(b.overage_policy.as_deref())?;
    let m = Mapped::new(
        s,
        tenant.as_deref(),
        &b.subject,
        &b.action,
        &b.estimate,
        "estimate",
    )?;
    let owner = tenant.unwrap_or_else(|| m.scope.id(0));
    let dry = b.dry_run.unwrap_or(false);
    let affected = match m.affected(s) {
        Ok(a) => a,
        // A dry run reports a missing budget as a decision.
        Err(None) if dry => {
            return Ok((
                StatusCode::OK,
                json!({"decision": "DENY", "reason_code": "BUDGET_NOT_FOUND",
                    "affected_scopes": (1..=m.scope.depth()).map(|d| m.scope.prefix(d)).collect::<Vec<_>>(),
                    "scope_path": m.scope.as_str()}),
            ));
        }
        Err(others) => return Err(m.no_budget(others)),
    };
    let endpoint = if dry { "reserve?dry_run" } else { "reserve" };
    let m = m.with_operation(&owner, endpoint, &key)?;
    once(s, &owner, endpoint.to_owned(), &key, &raw, async {
        let mut out = Map::new();
        if dry {
            let d = s
                .warden
                .check(&m.request)
                .await
                .map_err(|e| Problem::of(&e))?;
            s.metrics.decided(&d);
            out.insert("decision".into(), json!(decision_name(d.outcome)));
            put_caps(&mut out, &d);
            if !d.allowed() {
                out.insert("reason_code".into(), json!(reason_of(&d)));
                if let Some(ms) = retry_ms(&d) {
                    out.insert("retry_after_ms".into(), json!(ms));
                }
            } else {
                out.insert("reserved".into(), m.unit.amount(m.amount));
            }
            out.insert("affected_scopes".into(), json!(affected));
            out.insert("scope_path".into(), json!(m.scope.as_str()));
            out.insert("balances".into(), json!(balances_of(&d.limits, &m.scope)));
            return Ok((StatusCode::OK, Value::Object(out)));
        }
        let lease = Duration::from_millis(u64::try_from(ttl + grace).unwrap_or(0));
        let d = s
            .warden
            .reserve(&m.request, Some(lease))
            .await
            .map_err(|e| Problem::of(&e))?;
        s.metrics.decided(&d);
        let Some(r) = d.reservation.as_ref().filter(|_| d.allowed()) else {
            return Err(denied(&d, &m.scope));
        };
        let expires_ms = r.expires_at.div_euclid(1000) - grace;
        let created_ms = now_ms(s);
        let record = Record {
            tenant: owner.clone(),
            subject: subject_json(&b.subject, &m.scope),
            action: action_json(&b.action),
            unit: m.unit,
            reserved: m.amount,
            scope_path: m.scope.as_str().to_owned(),
            affected: affected.clone(),
            created_ms,
            expires_ms,
            grace_ms: grace,
            status: Status::Active,
            committed: None,
            finalized_ms: None,
            idempotency_key: key.clone(),
            reject_overage: reject,
            metadata: b.metadata.clone().map(Value::Object),
        };
        {
            let mut ledger = s.cycles.ledger();
            if ledger.reservations.len() >= ledger.prune_at {
                ledger.prune(created_ms);
            }
            // A replay from another process made the same id: keep the first record.
            ledger.reservations.entry(r.id.0).or_insert(record);
        }
        out.insert("decision".into(), json!(decision_name(d.outcome)));
        out.insert("reservation_id".into(), json!(r.id.to_string()));
        out.insert("reserved".into(), m.unit.amount(m.amount));
        out.insert("expires_at_ms".into(), json!(expires_ms));
        out.insert("scope_path".into(), json!(m.scope.as_str()));
        out.insert("affected_scopes".into(), json!(affected));
        put_caps(&mut out, &d);
        // No `balances` (optional): a reservation's decision does not
        // measure what is held, and reading it would cost a round trip.
        Ok((StatusCode::OK, Value::Object(out)))
    })
    .await
}

/// A live request the core denied: a budget's `409 BUDGET_EXCEEDED`, a
/// rate or concurrency limit's `429 LIMIT_EXCEEDED` (with `Retry-After`).
fn denied(d: &Decision, scope: &Scope) -> Problem {
    let reason = d.reason.clone().unwrap_or_else(|| "denied".to_owned());
    let mut details = json!({"scope_path": scope.as_str(), "reason_code": reason_of(d)});
    if let (Some(l), Some(m)) = (d.denied_by(), details.as_object_mut()) {
        m.insert("limit".into(), json!(l.name()));
    }
    if let (Some(ms), Some(m)) = (retry_ms(d), details.as_object_mut()) {
        m.insert("retry_after_ms".into(), json!(ms));
    }
    let mut p = match d.denied_by().map(LimitState::kind) {
        Some("rate" | "concurrency") => {
            Problem::new(StatusCode::TOO_MANY_REQUESTS, "LIMIT_EXCEEDED", reason)
        }
        None if d.degraded.is_some() => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "INTERNAL_ERROR", reason)
        }
        None => Problem::new(StatusCode::FORBIDDEN, "FORBIDDEN", reason),
        _ => Problem::new(StatusCode::CONFLICT, "BUDGET_EXCEEDED", reason),
    };
    p.retry_after_ms = retry_ms(d);
    p.details(details)
}

fn subject_json(subject: &Subject, scope: &Scope) -> Value {
    let mut m = Map::new();
    for (i, (kind, _)) in subject
        .fields()
        .iter()
        .filter(|(_, v)| v.is_some())
        .enumerate()
    {
        m.insert((*kind).into(), json!(scope.id(i)));
    }
    // A tenant taken from the API key is the scope's first segment.
    if subject.tenant.is_none() && scope.kind(0) == "tenant" {
        m.clear();
        for i in 0..scope.depth() {
            m.insert(scope.kind(i).into(), json!(scope.id(i)));
        }
    }
    if let Some(d) = &subject.dimensions {
        m.insert("dimensions".into(), json!(d));
    }
    Value::Object(m)
}

fn action_json(a: &Action) -> Value {
    let mut v = json!({"kind": a.kind, "name": a.name});
    if let (Some(t), Some(m)) = (&a.tags, v.as_object_mut()) {
        m.insert("tags".into(), json!(t));
    }
    v
}

/// `POST /v1/decide`: evaluates without reserving.
pub(super) async fn decide(
    State(s): State<Arc<Served>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    done(&id, decide_answer(&s, &headers, raw).await)
}

async fn decide_answer(s: &Arc<Served>, headers: &HeaderMap, raw: Body) -> Answer {
    let tenant = s.cycles.tenant(headers)?;
    let (b, raw): (DecideBody, _) = parse(raw, headers)?;
    let key = key_of(&b.idempotency_key, headers.get("x-idempotency-key"))?;
    let _ = &b.metadata;
    let m = Mapped::new(
        s,
        tenant.as_deref(),
        &b.subject,
        &b.action,
        &b.estimate,
        "estimate",
    )?;
    let owner = tenant.unwrap_or_else(|| m.scope.id(0));
    let affected = match m.affected(s) {
        Ok(a) => a,
        Err(None) => {
            return Ok((
                StatusCode::OK,
                json!({"decision": "DENY", "reason_code": "BUDGET_NOT_FOUND",
                    "affected_scopes": (1..=m.scope.depth()).map(|d| m.scope.prefix(d)).collect::<Vec<_>>()}),
            ));
        }
        Err(others) => return Err(m.no_budget(others)),
    };
    once(s, &owner, "decide".to_owned(), &key, &raw, async {
        let d = s
            .warden
            .check(&m.request)
            .await
            .map_err(|e| Problem::of(&e))?;
        s.metrics.decided(&d);
        let mut out = Map::new();
        out.insert("decision".into(), json!(decision_name(d.outcome)));
        put_caps(&mut out, &d);
        if !d.allowed() {
            out.insert("reason_code".into(), json!(reason_of(&d)));
            if let Some(ms) = retry_ms(&d) {
                out.insert("retry_after_ms".into(), json!(ms));
            }
        }
        out.insert("affected_scopes".into(), json!(affected));
        Ok((StatusCode::OK, Value::Object(out)))
    })
    .await
}

/// `POST /v1/events`: charges an actual amount without a reservation
/// (all of it or nothing: a budget without room for it is `409`).
pub(super) async fn event(
    State(s): State<Arc<Served>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    done(&id, event_answer(&s, &headers, raw).await)
}

async fn event_answer(s: &Arc<Served>, headers: &HeaderMap, raw: Body) -> Answer {
    let tenant = s.cycles.tenant(headers)?;
    let (b, raw): (EventBody, _) = parse(raw, headers)?;
    let key = key_of(&b.idempotency_key, headers.get("x-idempotency-key"))?;
    let reject = overage_rejects(b.overage_policy.as_deref())?;
    if b.client_time_ms.is_some_and(|t| t < 0) {
        return Err(Problem::invalid("`client_time_ms` must not be negative"));
    }
    let _ = (&b.metrics, &b.metadata);
    let m = Mapped::new(
        s,
        tenant.as_deref(),
        &b.subject,
        &b.action,
        &b.actual,
        "actual",
    )?;
    let owner = tenant.unwrap_or_else(|| m.scope.id(0));
    m.affected(s).map_err(|others| m.no_budget(others))?;
    let m = m.with_operation(&owner, "events", &key)?;
    let event_id = ratewarden::OperationId::of_key(&format!("cycles/{owner}/events/{key}"))
        .map_err(|e| Problem::of(&e))?;
    once(s, &owner, "events".to_owned(), &key, &raw, async {
        let charged = if reject {
            // All of it or nothing: a budget without room for it refuses.
            let d = s
                .warden
                .acquire(&m.request)
                .await
                .map_err(|e| Problem::of(&e))?;
            s.metrics.decided(&d);
            if !d.allowed() {
                return Err(denied(&d, &m.scope));
            }
            m.amount
        } else {
            // A commit without a reservation: hold nothing, then charge the
            // actual under each limit's overage rule (it always lands, as
            // far as those rules let it).
            let zero = m
                .request
                .clone()
                .cost(Cost::new().with(m.unit.policy_unit(), Amount::units(0)));
            let d = s
                .warden
                .reserve(&zero, None)
                .await
                .map_err(|e| Problem::of(&e))?;
            s.metrics.decided(&d);
            let Some(r) = d.reservation.as_ref().filter(|_| d.allowed()) else {
                return Err(denied(&d, &m.scope));
            };
            let cost = Cost::new().with(m.unit.policy_unit(), m.unit.to_amount(m.amount));
            let receipt = s
                .warden
                .commit(r.id, &cost)
                .await
                .map_err(|e| Problem::of(&e))?;
            charged_of(&receipt, m.unit, m.amount)
        };
        Ok((
            StatusCode::CREATED,
            json!({
                "status": "APPLIED",
                "event_id": event_id.to_string(),
                "charged": m.unit.amount(charged),
            }),
        ))
    })
    .await
}

/// What a commit charged in `unit`: the most any budget counting it took
/// (a rule like `cap` may take less than the actual); `actual` when none did.
fn charged_of(receipt: &ratewarden::decision::CommitReceipt, unit: Unit, actual: i64) -> i64 {
    receipt
        .charges
        .iter()
        .filter(|c| c.unit() == unit.policy_unit() && is_budget(&c.def))
        .map(|c| unit.of_base(c.charged, c.def.decimals, true))
        .max()
        .unwrap_or(actual)
}

/// The record of reservation `id` for `tenant` (`None`: any).
fn lookup(s: &Served, id: &str, tenant: Option<&str>) -> Result<u128, Problem> {
    let rid = ReservationId::parse(id)
        .map_err(|_| Problem::not_found(format!("no reservation `{id}`")))?;
    let ledger = s.cycles.ledger();
    match ledger.reservations.get(&rid.0) {
        None => Err(Problem::not_found(format!("no reservation `{id}`"))),
        Some(r) if tenant.is_some_and(|t| t != r.tenant) => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!("reservation `{id}` belongs to another tenant"),
        )),
        Some(_) => Ok(rid.0),
    }
}

/// Reads a record's fields under the lock.
fn with_record<R>(s: &Served, id: u128, f: impl FnOnce(&mut Record) -> R) -> Option<R> {
    s.cycles.ledger().reservations.get_mut(&id).map(f)
}

/// The state check shared by commit, release and extend: finalized → 409,
/// past its grace (or, for extend, its expiry) → 410.
fn still_open(s: &Served, id: u128, extend: bool) -> Result<(Unit, i64, bool, String), Problem> {
    let now = now_ms(s);
    with_record(s, id, |r| {
        if r.status != Status::Active {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "RESERVATION_FINALIZED",
                format!(
                    "the reservation is already {}",
                    r.status_at(now).to_ascii_lowercase()
                ),
            ));
        }
        let end = if extend {
            r.expires_ms
        } else {
            r.expires_ms + r.grace_ms
        };
        if now > end {
            return Err(Problem::new(
                StatusCode::GONE,
                "RESERVATION_EXPIRED",
                "the reservation expired",
            ));
        }
        Ok((r.unit, r.reserved, r.reject_overage, r.tenant.clone()))
    })
    .unwrap_or_else(|| Err(Problem::not_found("no such reservation")))
}

/// `POST /v1/reservations/{id}/commit`.
pub(super) async fn commit(
    State(s): State<Arc<Served>>,
    Extension(rq): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    done(&rq, commit_answer(&s, &id, &headers, raw).await)
}

async fn commit_answer(s: &Arc<Served>, id: &str, headers: &HeaderMap, raw: Body) -> Answer {
    let tenant = s.cycles.tenant(headers)?;
    let (b, raw): (CommitBody, _) = parse(raw, headers)?;
    let key = key_of(&b.idempotency_key, headers.get("x-idempotency-key"))?;
    let _ = (&b.metrics, &b.metadata);
    let rid = lookup(s, id, tenant.as_deref())?;
    let (actual_unit, actual) = amount_of(&b.actual, "actual")?;
    let owner = with_record(s, rid, |r| r.tenant.clone()).unwrap_or_default();
    once(s, &owner, format!("commit/{rid:032x}"), &key, &raw, async {
        let (unit, reserved, reject, _) = still_open(s, rid, false)?;
        if actual_unit != unit {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "UNIT_MISMATCH",
                format!("`actual.unit` {} is not the reservation's {}", actual_unit.name(), unit.name()),
            ));
        }
        if reject && actual > reserved {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "BUDGET_EXCEEDED",
                format!("the actual {actual} exceeds the {reserved} reserved and the reservation's overage_policy is REJECT"),
            ));
        }
        let cost = Cost::new().with(unit.policy_unit(), unit.to_amount(actual));
        let receipt = s
            .warden
            .commit(ReservationId(rid), &cost)
            .await
            .map_err(|e| Problem::of(&e))?;
        if receipt.duplicate {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "RESERVATION_FINALIZED",
                "the reservation is already committed",
            ));
        }
        let charged = charged_of(&receipt, unit, actual);
        let now = now_ms(s);
        with_record(s, rid, |r| {
            r.status = Status::Committed;
            r.committed = Some(charged);
            r.finalized_ms = Some(now);
        });
        let mut out = json!({"status": "COMMITTED", "charged": unit.amount(charged)});
        if actual < reserved {
            if let Some(m) = out.as_object_mut() {
                m.insert("released".into(), unit.amount(reserved - actual));
            }
        }
        Ok((StatusCode::OK, out))
    })
    .await
}

/// `POST /v1/reservations/{id}/release`.
pub(super) async fn release(
    State(s): State<Arc<Served>>,
    Extension(rq): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    done(&rq, release_answer(&s, &id, &headers, raw).await)
}

async fn release_answer(s: &Arc<Served>, id: &str, headers: &HeaderMap, raw: Body) -> Answer {
    let tenant = s.cycles.tenant(headers)?;
    let (b, raw): (ReleaseBody, _) = parse(raw, headers)?;
    let key = key_of(&b.idempotency_key, headers.get("x-idempotency-key"))?;
    if b.reason.as_ref().is_some_and(|r| r.len() > 256) {
        return Err(Problem::invalid("`reason` must be at most 256 characters"));
    }
    let rid = lookup(s, id, tenant.as_deref())?;
    let owner = with_record(s, rid, |r| r.tenant.clone()).unwrap_or_default();
    once(
        s,
        &owner,
        format!("release/{rid:032x}"),
        &key,
        &raw,
        async {
            let (unit, reserved, _, _) = still_open(s, rid, false)?;
            let released = s
                .warden
                .release(ReservationId(rid))
                .await
                .map_err(|e| Problem::of(&e))?;
            if !released {
                return Err(Problem::new(
                    StatusCode::GONE,
                    "RESERVATION_EXPIRED",
                    "the reservation had already ended",
                ));
            }
            let now = now_ms(s);
            with_record(s, rid, |r| {
                r.status = Status::Released;
                r.finalized_ms = Some(now);
            });
            Ok((
                StatusCode::OK,
                json!({"status": "RELEASED", "released": unit.amount(reserved)}),
            ))
        },
    )
    .await
}

/// `POST /v1/reservations/{id}/extend`.
pub(super) async fn extend(
    State(s): State<Arc<Served>>,
    Extension(rq): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    done(&rq, extend_answer(&s, &id, &headers, raw).await)
}

async fn extend_answer(s: &Arc<Served>, id: &str, headers: &HeaderMap, raw: Body) -> Answer {
    let tenant = s.cycles.tenant(headers)?;
    let (b, raw): (ExtendBody, _) = parse(raw, headers)?;
    let key = key_of(&b.idempotency_key, headers.get("x-idempotency-key"))?;
    let _ = &b.metadata;
    if !(1..=86_400_000).contains(&b.extend_by_ms) {
        return Err(Problem::invalid(
            "`extend_by_ms` must be from 1 to 86400000",
        ));
    }
    let rid = lookup(s, id, tenant.as_deref())?;
    let owner = with_record(s, rid, |r| r.tenant.clone()).unwrap_or_default();
    once(s, &owner, format!("extend/{rid:032x}"), &key, &raw, async {
        still_open(s, rid, true)?;
        let now = now_ms(s);
        let (expires, grace) =
            with_record(s, rid, |r| (r.expires_ms, r.grace_ms)).unwrap_or_default();
        let until = expires + b.extend_by_ms;
        let lease = Duration::from_millis(u64::try_from(until + grace - now).unwrap_or(1).max(1));
        s.warden
            .extend(ReservationId(rid), lease)
            .await
            .map_err(|e| Problem::of(&e))?;
        with_record(s, rid, |r| r.expires_ms = until);
        Ok((
            StatusCode::OK,
            json!({"status": "ACTIVE", "expires_at_ms": until, "remaining_ttl_ms": (until - now).max(0)}),
        ))
    })
    .await
}

/// `GET /v1/reservations/{id}`.
pub(super) async fn get_reservation(
    State(s): State<Arc<Served>>,
    Extension(rq): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let answer = (|| {
        let tenant = s.cycles.tenant(&headers)?;
        let rid = lookup(&s, &id, tenant.as_deref())?;
        let now = now_ms(&s);
        with_record(&s, rid, |r| {
            if r.status_at(now) == "EXPIRED" {
                return Err(Problem::new(
                    StatusCode::GONE,
                    "RESERVATION_EXPIRED",
                    format!("reservation `{id}` expired"),
                ));
            }
            Ok((StatusCode::OK, r.detail(rid, now)))
        })
        .unwrap_or_else(|| Err(Problem::not_found("no such reservation")))
    })();
    done(&rq, answer)
}

/// `GET /v1/reservations?status=&idempotency_key=&tenant=…&limit=&cursor=`:
/// the caller's reservations, newest first, `limit` (1–200, default 50)
/// per page; parameters it does not know are ignored.
pub(super) async fn list_reservations(
    State(s): State<Arc<Served>>,
    Extension(rq): Extension<RequestId>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Response {
    let answer = (|| {
        let tenant = s.cycles.tenant(&headers)?;
        let Query(q) = q.map_err(|r| Problem::invalid(r.body_text()))?;
        let mut filters: Vec<(&str, String)> = Vec::new();
        let mut status = None;
        let mut limit = 50_usize;
        let mut after: Option<(i64, u128)> = None;
        let mut key = None;
        for (k, v) in &q {
            match k.as_str() {
                "status" => {
                    if !matches!(v.as_str(), "ACTIVE" | "COMMITTED" | "RELEASED" | "EXPIRED") {
                        return Err(Problem::invalid(format!(
                            "`status` `{v}`: use ACTIVE, COMMITTED, RELEASED or EXPIRED"
                        )));
                    }
                    status = Some(v.as_str());
                }
                "limit" => {
                    limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=200).contains(n))
                        .ok_or_else(|| {
                            Problem::invalid("`limit` must be a whole number from 1 to 200")
                        })?;
                }
                "cursor" => after = Some(cursor_of(v)?),
                f if SUBJECT_FIELDS.contains(&f) => {
                    filters.push((
                        SUBJECT_FIELDS[SUBJECT_FIELDS.iter().position(|x| *x == f).unwrap_or(0)],
                        v.to_ascii_lowercase(),
                    ));
                }
                "idempotency_key" => key = Some(v.as_str()),
                // Parameters this server does not know are ignored (the protocol's rule).
                _ => {}
            }
        }
        if let (Some(t), Some((_, v))) = (&tenant, filters.iter().find(|(k, _)| *k == "tenant")) {
            if t != v {
                return Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    "FORBIDDEN",
                    "`tenant` is not the API key's tenant",
                ));
            }
        }
        let now = now_ms(&s);
        let ledger = s.cycles.ledger();
        let mut found: Vec<(i64, u128, &Record)> = ledger
            .reservations
            .iter()
            .filter(|(_, r)| tenant.as_ref().is_none_or(|t| *t == r.tenant))
            .filter(|(_, r)| status.is_none_or(|st| r.status_at(now) == st))
            .filter(|(_, r)| key.is_none_or(|k| r.idempotency_key == k))
            .filter(|(_, r)| {
                filters
                    .iter()
                    .all(|(k, v)| r.subject.get(*k).and_then(Value::as_str) == Some(v.as_str()))
            })
            .map(|(id, r)| (r.created_ms, *id, r))
            .filter(|(c, id, _)| after.is_none_or(|a| (*c, *id) < a))
            .collect();
        // Newest first (the protocol's default order).
        found.sort_unstable_by_key(|(c, id, _)| std::cmp::Reverse((*c, *id)));
        let more = found.len() > limit;
        found.truncate(limit);
        let mut out = json!({
            "reservations": found.iter().map(|(_, id, r)| r.summary(*id, now)).collect::<Vec<_>>(),
            "has_more": more,
        });
        if let (true, Some((c, id, _)), Some(m)) = (more, found.last(), out.as_object_mut()) {
            m.insert("next_cursor".into(), json!(format!("{c}.{id:032x}")));
        }
        Ok((StatusCode::OK, out))
    })();
    done(&rq, answer)
}

fn cursor_of(v: &str) -> Result<(i64, u128), Problem> {
    let bad = || Problem::invalid(format!("`cursor` `{v}` is not a cursor this server gave"));
    let (c, id) = v.split_once('.').ok_or_else(bad)?;
    Ok((
        c.parse().map_err(|_| bad())?,
        u128::from_str_radix(id, 16).map_err(|_| bad())?,
    ))
}

/// `GET /v1/balances?tenant=…&workspace=…`: the budgets of the scope the
/// filters name (one page: every budget it touches).
pub(super) async fn balances(
    State(s): State<Arc<Served>>,
    Extension(rq): Extension<RequestId>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Response {
    let answer = async {
        let tenant = s.cycles.tenant(&headers)?;
        let Query(q) = q.map_err(|r| Problem::invalid(r.body_text()))?;
        let mut subject = Subject {
            tenant: None,
            workspace: None,
            app: None,
            workflow: None,
            agent: None,
            toolset: None,
            dimensions: None,
        };
        for (k, v) in &q {
            let slot = match k.as_str() {
                "tenant" => &mut subject.tenant,
                "workspace" => &mut subject.workspace,
                "app" => &mut subject.app,
                "workflow" => &mut subject.workflow,
                "agent" => &mut subject.agent,
                "toolset" => &mut subject.toolset,
                "limit" | "cursor" | "include_children" => continue,
                _ => continue,
            };
            *slot = Some(v.clone());
        }
        if subject.fields().iter().all(|(_, v)| v.is_none()) {
            return Err(Problem::invalid(
                "give at least one of tenant, workspace, app, workflow, agent, toolset",
            ));
        }
        let scope = subject_scope(&s, tenant.as_deref(), &subject)?;
        let list = s
            .warden
            .balances(&scope, None)
            .await
            .map_err(|e| Problem::of(&e))?;
        // Balances as limit states of the scope (what `balances_of` reads).
        let states = balance_states(&s, &scope, &list);
        Ok((
            StatusCode::OK,
            json!({"balances": balances_of(&states, &scope), "has_more": false}),
        ))
    }
    .await;
    done(&rq, answer)
}

/// [`ratewarden::decision::Balance`]s as the limit states they were read from.
fn balance_states(
    s: &Served,
    scope: &Scope,
    list: &[ratewarden::decision::Balance],
) -> Vec<LimitState> {
    let policy = s.warden.policy();
    list.iter()
        .filter_map(|b| {
            let def = policy.limit(&b.name)?;
            let depth = b.owner.as_ref().map(|o| {
                u8::try_from(
                    (0..=scope.depth())
                        .find(|d| scope.prefix(*d) == o)
                        .unwrap_or(0),
                )
                .unwrap_or(0)
            });
            Some(LimitState {
                def: Arc::clone(def),
                scope_depth: depth,
                remaining: b.remaining,
                reset: b.reset.unwrap_or_default(),
                denied: false,
                amount: 0,
                held: b.held,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{
        KEEP_ENDED_MS, Ledger, MAX_ENDED, PRUNE_EVERY, Record, Status, Unit, parse_keys, sha256,
    };
    use serde_json::json;

    fn record(created_ms: i64, status: Status, finalized_ms: Option<i64>) -> Record {
        Record {
            tenant: "acme".into(),
            subject: json!({"tenant": "acme"}),
            action: json!({"kind": "k", "name": "n"}),
            unit: Unit::UsdMicrocents,
            reserved: 1,
            scope_path: "tenant:acme".into(),
            affected: vec!["tenant:acme".into()],
            created_ms,
            expires_ms: created_ms + 60_000,
            grace_ms: 5_000,
            status,
            committed: None,
            finalized_ms,
            idempotency_key: "k".into(),
            reject_overage: false,
            metadata: None,
        }
    }

    #[test]
    fn pruning_keeps_live_reservations_and_the_newest_ended_ones() {
        let now = 10 * KEEP_ENDED_MS;
        let mut l = Ledger::default();
        // Live, however old its creation: kept.
        l.reservations
            .insert(1, record(now - 30_000, Status::Active, None));
        // Ended just now and an hour ago (+1 ms): the first kept.
        l.reservations
            .insert(2, record(0, Status::Committed, Some(now - 1)));
        l.reservations.insert(
            3,
            record(0, Status::Released, Some(now - KEEP_ENDED_MS - 1)),
        );
        // Lapsed (its lease and grace over) more than an hour ago: gone.
        l.reservations
            .insert(4, record(now - 2 * KEEP_ENDED_MS, Status::Active, None));
        l.prune(now);
        let mut kept: Vec<u128> = l.reservations.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, [1, 2]);
        assert_eq!(l.prune_at, 2 + PRUNE_EVERY);

        // Past MAX_ENDED ended records, the oldest go.
        let mut l = Ledger::default();
        let total = MAX_ENDED + 10;
        for i in 0..total {
            let ended = now - 1_000_000 + i64::try_from(i).unwrap();
            l.reservations
                .insert(i as u128, record(0, Status::Committed, Some(ended)));
        }
        l.reservations
            .insert(u128::MAX, record(now, Status::Active, None));
        l.prune(now);
        assert_eq!(l.reservations.len(), MAX_ENDED + 1);
        assert!(l.reservations.contains_key(&u128::MAX));
        assert!(!l.reservations.contains_key(&9) && l.reservations.contains_key(&10));
    }

    #[test]
    fn a_keys_file_holds_hashes_and_names_a_bad_line() {
        let hash: String = sha256(b"secret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let keys = parse_keys(&format!("# keys\n\nacme sha256:{hash}  # ops\n")).unwrap();
        assert_eq!(
            keys.get(&sha256(b"secret")).map(String::as_str),
            Some("acme")
        );
        for bad in [
            "acme".to_owned(),
            format!("acme {hash}"),
            format!("acme sha256:{}", &hash[..62]),
            format!("ac/me sha256:{hash}"),
            format!("acme sha256:{}zz", &hash[..62]),
        ] {
            let e = parse_keys(&format!("# first\n{bad}\n")).unwrap_err();
            assert!(e.starts_with("line 2:"), "{bad}: {e}");
        }
    }
}
