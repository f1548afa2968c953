//! Policies: the limits per scope kind, resource and action, loaded from YAML,
//! JSON or TOML (or a `serde_json::Value` built in code) and validated once.
//!
//! Every error names the source, the path inside the document
//! (`scopes.tenant.limits[2].per`) and the problem. After loading, a
//! [`Policy`] is immutable and holds amounts in base units.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;

use crate::amount::{Amount, MAX_AMOUNT, format_base};
use crate::calendar::{DAY_US, HOUR_US, MINUTE_US, SECOND_US, Window};
use crate::clock::Micros;
use crate::error::{Error, Result};
use crate::priority::Floors;

/// The format of a policy document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// YAML 1.2.
    Yaml,
    /// JSON.
    Json,
    /// TOML 1.0.
    Toml,
}

impl Format {
    /// The format for a file extension (`yaml`, `yml`, `json`, `toml`).
    #[must_use]
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "yaml" | "yml" => Some(Self::Yaml),
            "json" => Some(Self::Json),
            "toml" => Some(Self::Toml),
            _ => None,
        }
    }
}

/// The four kinds of limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKind {
    /// GCRA / token bucket: `limit` per `period` with `burst`, cost-weighted.
    Rate(RateSpec),
    /// A counter per calendar-aligned window.
    Quota(Window),
    /// At most `limit` held at once; holders have leases.
    Concurrency,
    /// A balance per window (or lifetime) with reserve → commit / release.
    Budget(Window),
}

impl LimitKind {
    /// `rate`, `quota`, `concurrency` or `budget`.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Rate(_) => "rate",
            Self::Quota(_) => "quota",
            Self::Concurrency => "concurrency",
            Self::Budget(_) => "budget",
        }
    }

    /// The counting window of quotas and budgets.
    #[must_use]
    pub const fn window(&self) -> Option<Window> {
        match self {
            Self::Quota(w) | Self::Budget(w) => Some(*w),
            _ => None,
        }
    }
}

/// Parameters of a GCRA rate limit in exact integer form.
///
/// With `g = gcd(period, limit)`, each unit costs `p = period / g` "debt" and
/// debt drains by `l = limit / g` per microsecond; the bucket holds
/// `burst × p`. All of it fits in ±2^53 so the Redis scripts agree exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    /// The period in microseconds.
    pub period: Micros,
    /// Largest number of units admitted at once (bucket size), base units.
    pub burst: i64,
    /// Debt added per unit.
    pub p: i64,
    /// Debt drained per microsecond.
    pub l: i64,
}

/// What to do when `commit` reports more than was reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overage {
    /// Charge the actual amount, even past the limit (the balance goes into debt
    /// and later requests are denied until it is paid back by a reset or refill).
    #[default]
    Charge,
    /// Charge at most what was reserved; the excess is reported, not charged.
    Cap,
}

/// A rule that turns an allow into `allow_with_caps` when a limit runs low.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapRule {
    /// Applies when less than this (‰ of capacity) remains after the request.
    pub below: u16,
    /// The caps to attach.
    pub caps: crate::decision::Caps,
}

/// Where a limit is counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// Declared under `scopes.<kind>`: one counter per scope of that kind.
    Scope(String),
    /// Declared under a resource or action without `scope`: one shared counter (a pool).
    Pool,
    /// Declared under a resource or action with `scope: <kind>`: one counter per scope of that kind.
    PerScope(String),
}

/// One validated limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitDef {
    /// Position in its policy (stable for the policy's lifetime).
    pub id: u32,
    /// Unique name within the policy.
    pub name: String,
    /// Kind and kind-specific parameters.
    pub kind: LimitKind,
    /// The unit it counts.
    pub unit: String,
    /// Decimals of the unit (amounts are in base units).
    pub decimals: u8,
    /// Capacity in base units (for rate: units per period).
    pub limit: i64,
    /// Headroom for higher tiers.
    pub floors: Floors,
    /// Overage rule on commit.
    pub overage: Overage,
    /// Where it is counted.
    pub attach: Attach,
    /// Which resource or action declared it (`None` for scope limits).
    pub owner: Option<Owner>,
    /// `allow_with_caps` rules.
    pub caps: Vec<CapRule>,
    /// Default lease for holders of this limit (concurrency) in µs.
    pub lease: Micros,
    /// Free text from the policy.
    pub description: Option<String>,
}

/// The resource or action a limit belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A resource.
    Resource(String),
    /// An action.
    Action(String),
}

impl LimitDef {
    /// The capacity shown in headers: the limit (for rate: per period).
    #[must_use]
    pub fn capacity(&self) -> i64 {
        match &self.kind {
            LimitKind::Rate(r) => r.burst,
            _ => self.limit,
        }
    }

    /// Formats base units of this limit's unit.
    #[must_use]
    pub fn fmt_amount(&self, v: i64) -> String {
        format_base(v, self.decimals)
    }
}

/// A resource or an action with its limits.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// Limits declared under it.
    pub limits: Vec<Arc<LimitDef>>,
    /// Risk points per call (actions), base units of `risk`.
    pub risk: i64,
    /// Free text.
    pub description: Option<String>,
}

/// Policy-wide defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// Floors for limits that set none.
    pub floors: Floors,
    /// A background caller denied continuously this long is served as standard.
    pub promote_after: Micros,
    /// Default reservation lease.
    pub lease: Micros,
    /// Overage rule for limits that set none.
    pub overage: Overage,
}

/// A unit and its number of decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitDef {
    /// The unit's name.
    pub name: String,
    /// Decimal places of its base unit (usd: 6 → micro-dollars).
    pub decimals: u8,
}

/// A validated, immutable policy.
#[derive(Debug, Clone)]
pub struct Policy {
    source: String,
    pub(crate) defaults: Defaults,
    pub(crate) units: Map<UnitDef>,
    pub(crate) scopes: Map<Vec<Arc<LimitDef>>>,
    pub(crate) resources: Map<Target>,
    pub(crate) actions: Map<Target>,
    /// Every limit by name.
    pub(crate) by_name: HashMap<String, Arc<LimitDef>>,
    /// Every limit by [`LimitDef::id`].
    pub(crate) all: Vec<Arc<LimitDef>>,
}

/// Name-keyed maps of a loaded policy: document order, fast hashing.
pub(crate) type Map<V> = IndexMap<String, V, foldhash::fast::RandomState>;

/// Looks `name` up in a policy map: a linear scan for the small maps policies
/// usually have (cheaper than hashing the name), hashing beyond that.
pub(crate) fn lookup<'m, V>(map: &'m Map<V>, name: &str) -> Option<&'m V> {
    if map.len() <= 8 {
        map.iter().find(|(k, _)| k.as_str() == name).map(|(_, v)| v)
    } else {
        map.get(name)
    }
}

const BUILTIN_UNITS: [(&str, u8); 4] = [("requests", 0), ("tokens", 0), ("risk", 0), ("usd", 6)];

// ---------------------------------------------------------------- raw document

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    units: IndexMap<String, RawUnit>,
    #[serde(default)]
    scopes: IndexMap<String, RawScopeKind>,
    #[serde(default)]
    resources: IndexMap<String, RawTarget>,
    #[serde(default)]
    actions: IndexMap<String, RawTarget>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    floors: Option<RawFloors>,
    promote_after: Option<String>,
    lease: Option<String>,
    overage: Option<Overage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnit {
    decimals: u8,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScopeKind {
    #[serde(default)]
    limits: Vec<RawLimit>,
    description: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    #[serde(default)]
    limits: Vec<RawLimit>,
    risk: Option<Value>,
    description: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Rate,
    Quota,
    Concurrency,
    Budget,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    name: String,
    kind: RawKind,
    limit: Value,
    per: Option<String>,
    burst: Option<Value>,
    unit: Option<String>,
    lease: Option<String>,
    tz: Option<String>,
    scope: Option<String>,
    floors: Option<RawFloors>,
    overage: Option<Overage>,
    #[serde(default)]
    caps: Vec<RawCapRule>,
    description: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawFloors {
    standard: Option<Value>,
    background: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapRule {
    when_remaining_below: Value,
    delay_ms: Option<u64>,
    max_tokens: Option<u64>,
    model: Option<String>,
    sequential: Option<bool>,
}

// ---------------------------------------------------------------- loading

struct Ctx<'a> {
    source: &'a str,
}

impl Ctx<'_> {
    fn err(&self, path: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Policy {
            source_name: self.source.to_owned(),
            path: path.into(),
            message: message.into(),
        }
    }
}

impl Policy {
    /// Loads a policy file; the format comes from the extension (`.yaml`, `.yml`, `.json`, `.toml`).
    ///
    /// # Errors
    /// [`Error::PolicyIo`] if unreadable, [`Error::Policy`] naming the file, path and problem.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let format = Format::from_extension(ext).ok_or_else(|| Error::Policy {
            source_name: shown.clone(),
            path: "(file)".into(),
            message: if ext.is_empty() {
                "the file has no extension; name it .yaml, .yml, .json or .toml".to_owned()
            } else {
                format!("unknown extension `.{ext}`; use .yaml, .yml, .json or .toml")
            },
        })?;
        let text = std::fs::read_to_string(path).map_err(|source| Error::PolicyIo {
            path: shown.clone(),
            source,
        })?;
        Self::from_str_as(&text, format, &shown)
    }

    /// Parses a policy document held in memory. `source_name` appears in errors.
    ///
    /// # Errors
    /// [`Error::Policy`] naming the source, path and problem.
    pub fn from_str_as(text: &str, format: Format, source_name: &str) -> Result<Self> {
        let ctx = Ctx {
            source: source_name,
        };
        let value: Value = match format {
            Format::Json => serde_json::from_str(text).map_err(|e| {
                ctx.err(
                    format!("line {} column {}", e.line(), e.column()),
                    format!("not valid JSON: {e}"),
                )
            })?,
            Format::Yaml => serde_norway::from_str(text).map_err(|e| {
                let at = e.location().map_or_else(
                    || "(document)".to_owned(),
                    |l| format!("line {} column {}", l.line(), l.column()),
                );
                ctx.err(at, format!("not valid YAML: {e}"))
            })?,
            Format::Toml => toml::from_str(text).map_err(|e| {
                ctx.err(
                    "(document)",
                    format!("not valid TOML: {}", e.to_string().trim()),
                )
            })?,
        };
        Self::from_value_named(&value, source_name)
    }

    /// Builds a policy from a JSON-like value (e.g. made with `serde_json::json!`).
    ///
    /// # Errors
    /// [`Error::Policy`] naming the path and problem.
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::from_value_named(value, "<inline>")
    }

    fn from_value_named(value: &Value, source: &str) -> Result<Self> {
        let ctx = Ctx { source };
        if value.is_null() {
            return Err(ctx.err("(document)", "the policy is empty"));
        }
        let raw: RawPolicy = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "(document)".to_owned()
            } else {
                path
            };
            ctx.err(path, e.into_inner().to_string())
        })?;
        build(&ctx, raw)
    }

    /// Where the policy came from (file path or `<inline>`).
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Policy-wide defaults.
    #[must_use]
    pub fn defaults(&self) -> &Defaults {
        &self.defaults
    }

    /// The declared scope kinds, in document order.
    pub fn scope_kinds(&self) -> impl Iterator<Item = &str> {
        self.scopes.keys().map(String::as_str)
    }

    /// Every limit, in document order (scopes, then resources, then actions).
    pub fn limits(&self) -> impl Iterator<Item = &Arc<LimitDef>> {
        self.scopes
            .values()
            .flatten()
            .chain(self.resources.values().flat_map(|t| &t.limits))
            .chain(self.actions.values().flat_map(|t| &t.limits))
    }

    /// A limit by name.
    #[must_use]
    pub fn limit(&self, name: &str) -> Option<&Arc<LimitDef>> {
        self.by_name.get(name)
    }

    /// A resource by name.
    #[must_use]
    pub fn resource(&self, name: &str) -> Option<&Target> {
        lookup(&self.resources, name)
    }

    /// An action by name.
    #[must_use]
    pub fn action(&self, name: &str) -> Option<&Target> {
        lookup(&self.actions, name)
    }

    /// The decimals of a unit known to this policy (built in, declared, or used by a limit).
    #[must_use]
    pub fn unit(&self, name: &str) -> Option<&UnitDef> {
        lookup(&self.units, name)
    }

    /// A human-readable table of the effective limits (what `ratewarden check` prints).
    #[must_use]
    pub fn describe(&self) -> String {
        let mut rows: Vec<[String; 7]> = vec![[
            "LIMIT".into(),
            "KIND".into(),
            "COUNTED PER".into(),
            "CAPACITY".into(),
            "WINDOW".into(),
            "UNIT".into(),
            "FLOORS std/bg".into(),
        ]];
        for l in self.limits() {
            let per = match (&l.attach, &l.owner) {
                (Attach::Scope(k), _) => format!("scope {k}"),
                (Attach::Pool, Some(o)) => format!("{} (shared pool)", owner_name(o)),
                (Attach::PerScope(k), Some(o)) => format!("{} per {k}", owner_name(o)),
                (_, None) => "-".into(),
            };
            let (cap, window) = match &l.kind {
                LimitKind::Rate(r) => (
                    format!(
                        "{} (burst {})",
                        l.fmt_amount(l.limit),
                        l.fmt_amount(r.burst)
                    ),
                    format!("per {}", fmt_duration(r.period)),
                ),
                LimitKind::Quota(w) | LimitKind::Budget(w) => {
                    (l.fmt_amount(l.limit), fmt_window(w))
                }
                LimitKind::Concurrency => (
                    format!("{} in flight", l.fmt_amount(l.limit)),
                    format!("lease {}", fmt_duration(l.lease)),
                ),
            };
            let floors = format!(
                "{}/{}",
                fmt_permille(l.floors.standard),
                fmt_permille(l.floors.background)
            );
            rows.push([
                l.name.clone(),
                l.kind.name().into(),
                per,
                cap,
                window,
                l.unit.clone(),
                floors,
            ]);
        }
        let mut widths = [0usize; 7];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &rows {
            let mut line = String::new();
            for (c, w) in r.iter().zip(widths) {
                let _ = write!(line, "{c:<w$}  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for (name, t) in &self.actions {
            if t.risk > 0 {
                let _ = writeln!(out, "action {name}: {} risk points per call", t.risk);
            }
        }
        out
    }
}

fn owner_name(o: &Owner) -> String {
    match o {
        Owner::Resource(r) => format!("resource {r}"),
        Owner::Action(a) => format!("action {a}"),
    }
}

fn fmt_permille(p: u16) -> String {
    if p % 10 == 0 {
        format!("{}%", p / 10)
    } else {
        format!("{}.{}%", p / 10, p % 10)
    }
}

/// Formats microseconds as `1h30m`, `250ms`…
#[must_use]
pub fn fmt_duration(us: Micros) -> String {
    if us == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = us;
    for (unit, len) in [
        ("d", DAY_US),
        ("h", HOUR_US),
        ("m", MINUTE_US),
        ("s", SECOND_US),
        ("ms", 1000),
        ("us", 1),
    ] {
        if rest >= len {
            let _ = write!(out, "{}{unit}", rest / len);
            rest %= len;
        }
    }
    out
}

fn fmt_window(w: &Window) -> String {
    let tz = |o: i64| {
        if o == 0 {
            String::new()
        } else {
            format!(
                " (UTC{}{})",
                if o < 0 { "-" } else { "+" },
                fmt_duration(o.abs())
            )
        }
    };
    match *w {
        Window::Lifetime => "lifetime".into(),
        Window::Fixed { len, offset } => format!("per {}{}", fmt_duration(len), tz(offset)),
        Window::Week { offset } => format!("per week{}", tz(offset)),
        Window::Month { offset } => format!("per month{}", tz(offset)),
        Window::Year { offset } => format!("per year{}", tz(offset)),
    }
}

/// Parses a duration like `500ms`, `1s`, `5m`, `1h30m`, `1d`, `2w`.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_duration(s: &str) -> std::result::Result<Micros, String> {
    let expected =
        || format!("`{s}` is not a duration (expected e.g. `500ms`, `1s`, `5m`, `1h30m`, `1d`)");
    let t = s.trim();
    if t.is_empty() {
        return Err(expected());
    }
    let mut total: i64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(expected());
        }
        let n: i64 = rest[..digits].parse().map_err(|_| expected())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let len = match &rest[..unit_len] {
            "us" => 1,
            "ms" => 1000,
            "s" => SECOND_US,
            "m" => MINUTE_US,
            "h" => HOUR_US,
            "d" => DAY_US,
            "w" => 7 * DAY_US,
            _ => return Err(expected()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(len)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("`{s}` is too long"))?;
    }
    // Every time the Redis scripts handle stays exact in a double.
    if total > MAX_AMOUNT {
        return Err(format!(
            "`{s}` is longer than the longest supported duration (2^53 µs, about 285 years)"
        ));
    }
    Ok(total)
}

fn parse_tz(s: &str) -> std::result::Result<Micros, String> {
    if s == "UTC" || s == "Z" {
        return Ok(0);
    }
    let bad = || {
        format!(
            "`{}` is not a UTC offset (expected `UTC`, or ±HH:MM between -12:00 and +14:00, e.g. `+05:30`, `-08:00`)",
            crate::error::truncate(s)
        )
    };
    // Exactly `±HH:MM`: one sign, two digits, a colon, two digits.
    let b = s.as_bytes();
    let two = |i: usize| -> Option<i64> {
        let (x, y) = (*b.get(i)?, *b.get(i + 1)?);
        (x.is_ascii_digit() && y.is_ascii_digit())
            .then(|| i64::from(x - b'0') * 10 + i64::from(y - b'0'))
    };
    let sign = match b.first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(bad()),
    };
    let (Some(h), Some(m)) = (two(1), two(4)) else {
        return Err(bad());
    };
    if b.len() != 6 || b[3] != b':' || m > 59 {
        return Err(bad());
    }
    let offset = sign * (h * HOUR_US + m * MINUTE_US);
    if !(-12 * HOUR_US..=14 * HOUR_US).contains(&offset) {
        return Err(bad());
    }
    Ok(offset)
}

fn parse_window(
    per: Option<&str>,
    tz: Micros,
    budget: bool,
) -> std::result::Result<Window, String> {
    let Some(per) = per else {
        return if budget {
            Ok(Window::Lifetime)
        } else {
            Err("a quota needs `per` (e.g. `minute`, `day`, `month`, `15m`)".into())
        };
    };
    Ok(match per {
        "lifetime" if budget => Window::Lifetime,
        "second" => Window::Fixed {
            len: SECOND_US,
            offset: tz,
        },
        "minute" => Window::Fixed {
            len: MINUTE_US,
            offset: tz,
        },
        "hour" => Window::Fixed {
            len: HOUR_US,
            offset: tz,
        },
        "day" => Window::Fixed {
            len: DAY_US,
            offset: tz,
        },
        "week" => Window::Week { offset: tz },
        "month" => Window::Month { offset: tz },
        "year" => Window::Year { offset: tz },
        other => {
            let len = parse_duration(other).map_err(|e| {
                format!(
                    "{e}, or one of second, minute, hour, day, week, month, year{}",
                    if budget { ", lifetime" } else { "" }
                )
            })?;
            if len < SECOND_US {
                return Err(format!("window `{other}` is shorter than one second"));
            }
            Window::Fixed { len, offset: tz }
        }
    })
}

fn parse_amount(v: &Value, unit: &str, decimals: u8) -> std::result::Result<i64, String> {
    let amount = match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if i < 0 {
                    return Err(format!("{i} is negative"));
                }
                Amount::units(i)
            } else if let Some(f) = n.as_f64() {
                Amount::from_f64(f).map_err(|e| e.to_string())?
            } else {
                return Err(format!("{n} is out of range"));
            }
        }
        Value::String(s) => Amount::parse(s).map_err(|e| e.to_string())?,
        other => return Err(format!("expected a number, found {}", kind_of(other))),
    };
    amount.to_base(unit, decimals).map_err(|e| match e {
        Error::InvalidAmount { message, .. } => format!("{message} (unit `{unit}`)"),
        other => other.to_string(),
    })
}

fn parse_permille(v: &Value) -> std::result::Result<u16, String> {
    let bad = || format!("expected a percentage like `30%` or a fraction like 0.3, found {v}");
    let permille = match v {
        Value::String(s) => {
            let num = s.trim().strip_suffix('%').ok_or_else(bad)?;
            let a = Amount::parse(num).map_err(|_| bad())?;
            a.to_base("%", 1)
                .map_err(|_| format!("`{s}`: at most one decimal place (0.1%)"))?
        }
        Value::Number(n) => {
            let f = n.as_f64().ok_or_else(bad)?;
            let a = Amount::from_f64(f).map_err(|_| bad())?;
            a.to_base("fraction", 3)
                .map_err(|_| format!("{f}: at most three decimal places (0.1%)"))?
        }
        _ => return Err(bad()),
    };
    if permille > 1000 {
        return Err(format!("{v} is more than 100%"));
    }
    u16::try_from(permille).map_err(|_| bad())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

fn valid_name(s: &str, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' || extra.contains(&c)
        })
}

fn gcd(mut a: i64, mut b: i64) -> i64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.abs()
}

fn build_floors(
    ctx: &Ctx<'_>,
    path: &str,
    raw: Option<&RawFloors>,
    base: Floors,
) -> Result<Floors> {
    let Some(raw) = raw else { return Ok(base) };
    let mut f = base;
    if let Some(v) = &raw.standard {
        f.standard = parse_permille(v).map_err(|m| ctx.err(format!("{path}.standard"), m))?;
    }
    if let Some(v) = &raw.background {
        f.background = parse_permille(v).map_err(|m| ctx.err(format!("{path}.background"), m))?;
    }
    if f.standard > f.background {
        return Err(ctx.err(
            path,
            format!(
                "standard floor ({}) is above background floor ({}); higher tiers must not keep less headroom",
                fmt_permille(f.standard),
                fmt_permille(f.background)
            ),
        ));
    }
    if f.background >= 1000 {
        return Err(ctx.err(
            format!("{path}.background"),
            "a 100% floor would deny every background call",
        ));
    }
    Ok(f)
}

fn build(ctx: &Ctx<'_>, raw: RawPolicy) -> Result<Policy> {
    if let Some(v) = raw.version {
        if v != 1 {
            return Err(ctx.err(
                "version",
                format!("unsupported version {v}; this ratewarden reads version 1"),
            ));
        }
    }
    let floors = build_floors(
        ctx,
        "defaults.floors",
        raw.defaults.floors.as_ref(),
        Floors::default(),
    )?;
    let dur = |path: &str, v: &Option<String>, default: Micros| -> Result<Micros> {
        match v {
            None => Ok(default),
            Some(s) => {
                let d = parse_duration(s).map_err(|m| ctx.err(path, m))?;
                if d <= 0 {
                    return Err(ctx.err(path, "must be longer than zero"));
                }
                Ok(d)
            }
        }
    };
    let defaults = Defaults {
        floors,
        promote_after: dur(
            "defaults.promote_after",
            &raw.defaults.promote_after,
            5 * MINUTE_US,
        )?,
        lease: dur("defaults.lease", &raw.defaults.lease, 30 * SECOND_US)?,
        overage: raw.defaults.overage.unwrap_or_default(),
    };

    let mut units: Map<UnitDef> = BUILTIN_UNITS
        .iter()
        .map(|&(n, d)| {
            (
                n.to_owned(),
                UnitDef {
                    name: n.to_owned(),
                    decimals: d,
                },
            )
        })
        .collect();
    for (name, u) in &raw.units {
        if !valid_unit(name) {
            return Err(ctx.err(
                format!("units.{name}"),
                "unit names are lowercase words: a-z, 0-9, `_`",
            ));
        }
        if u.decimals > 9 {
            return Err(ctx.err(format!("units.{name}.decimals"), "at most 9 decimals"));
        }
        units.insert(
            name.clone(),
            UnitDef {
                name: name.clone(),
                decimals: u.decimals,
            },
        );
    }

    let mut by_name: HashMap<String, Arc<LimitDef>> = HashMap::new();
    let mut scopes = Map::default();
    for (kind, sk) in raw.scopes {
        let path = format!("scopes.{kind}");
        if crate::scope::Scope::from_segments([(kind.as_str(), "x")]).is_err() {
            return Err(ctx.err(&path, format!("`{kind}` is not a valid scope kind (a-z, 0-9, `_`, `-`, starting with a letter)")));
        }
        let _ = sk.description;
        let mut limits = Vec::new();
        for (i, rl) in sk.limits.into_iter().enumerate() {
            let lpath = format!("{path}.limits[{i}]");
            if rl.scope.is_some() {
                return Err(ctx.err(format!("{lpath}.scope"), "`scope` is only for resource and action limits; scope limits count per their own scope kind"));
            }
            let def = build_limit(
                ctx,
                &lpath,
                rl,
                &defaults,
                &mut units,
                Attach::Scope(kind.clone()),
                None,
            )?;
            limits.push(register(ctx, &lpath, def, &mut by_name)?);
        }
        scopes.insert(kind, limits);
    }
    let targets = |raws: IndexMap<String, RawTarget>,
                   section: &str,
                   units: &mut Map<UnitDef>,
                   by_name: &mut HashMap<String, Arc<LimitDef>>|
     -> Result<Map<Target>> {
        let mut out = Map::default();
        for (name, rt) in raws {
            let path = format!("{section}.{name}");
            if !valid_name(&name, &[':', '/']) {
                return Err(ctx.err(
                    &path,
                    format!(
                        "`{name}` is not a valid {} name (1-64 of a-z A-Z 0-9 `_ - . : /`)",
                        &section[..section.len() - 1]
                    ),
                ));
            }
            let owner = if section == "resources" {
                Owner::Resource(name.clone())
            } else {
                Owner::Action(name.clone())
            };
            let risk = match &rt.risk {
                None => 0,
                Some(v) => {
                    if section == "resources" {
                        return Err(
                            ctx.err(format!("{path}.risk"), "risk points belong to actions")
                        );
                    }
                    let d = units.get("risk").map_or(0, |u| u.decimals);
                    parse_amount(v, "risk", d).map_err(|m| ctx.err(format!("{path}.risk"), m))?
                }
            };
            let mut limits = Vec::new();
            for (i, rl) in rt.limits.into_iter().enumerate() {
                let lpath = format!("{path}.limits[{i}]");
                let attach = match &rl.scope {
                    None => Attach::Pool,
                    Some(k) => {
                        if !scopes.contains_key(k) {
                            return Err(ctx.err(format!("{lpath}.scope"), format!("scope kind `{k}` is not declared under `scopes` (declared: {})", scopes.keys().cloned().collect::<Vec<_>>().join(", "))));
                        }
                        Attach::PerScope(k.clone())
                    }
                };
                let def = build_limit(
                    ctx,
                    &lpath,
                    rl,
                    &defaults,
                    units,
                    attach,
                    Some(owner.clone()),
                )?;
                limits.push(register(ctx, &lpath, def, by_name)?);
            }
            out.insert(
                name,
                Target {
                    limits,
                    risk,
                    description: rt.description,
                },
            );
        }
        Ok(out)
    };
    let resources = targets(raw.resources, "resources", &mut units, &mut by_name)?;
    let actions = targets(raw.actions, "actions", &mut units, &mut by_name)?;
    let mut all: Vec<Arc<LimitDef>> = by_name.values().cloned().collect();
    all.sort_by_key(|d| d.id);
    Ok(Policy {
        source: ctx.source.to_owned(),
        defaults,
        units,
        scopes,
        resources,
        actions,
        by_name,
        all,
    })
}

fn valid_unit(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn register(
    ctx: &Ctx<'_>,
    path: &str,
    def: LimitDef,
    by_name: &mut HashMap<String, Arc<LimitDef>>,
) -> Result<Arc<LimitDef>> {
    if by_name.contains_key(&def.name) {
        return Err(ctx.err(
            format!("{path}.name"),
            format!(
                "limit name `{}` is used twice; names must be unique in a policy",
                def.name
            ),
        ));
    }
    let mut def = def;
    def.id = u32::try_from(by_name.len()).unwrap_or(u32::MAX);
    let def = Arc::new(def);
    by_name.insert(def.name.clone(), Arc::clone(&def));
    Ok(def)
}

#[allow(clippy::too_many_lines)]
fn build_limit(
    ctx: &Ctx<'_>,
    path: &str,
    rl: RawLimit,
    defaults: &Defaults,
    units: &mut Map<UnitDef>,
    attach: Attach,
    owner: Option<Owner>,
) -> Result<LimitDef> {
    if !valid_name(&rl.name, &[]) {
        return Err(ctx.err(
            format!("{path}.name"),
            format!(
                "`{}` is not a valid limit name (1-64 of a-z A-Z 0-9 `_ - .`)",
                rl.name
            ),
        ));
    }
    let unit = rl.unit.clone().unwrap_or_else(|| "requests".to_owned());
    if !valid_unit(&unit) {
        return Err(ctx.err(
            format!("{path}.unit"),
            format!("`{unit}` is not a valid unit name (lowercase a-z, 0-9, `_`)"),
        ));
    }
    let decimals = units
        .entry(unit.clone())
        .or_insert_with(|| UnitDef {
            name: unit.clone(),
            decimals: 0,
        })
        .decimals;
    let limit = parse_amount(&rl.limit, &unit, decimals)
        .map_err(|m| ctx.err(format!("{path}.limit"), m))?;
    if limit == 0 {
        return Err(ctx.err(format!("{path}.limit"), "must be greater than zero"));
    }
    let only = |field: &str, present: bool, kinds: &str| -> Result<()> {
        if present {
            Err(ctx.err(
                format!("{path}.{field}"),
                format!("`{field}` only applies to {kinds} limits"),
            ))
        } else {
            Ok(())
        }
    };
    let tz = match &rl.tz {
        None => 0,
        Some(s) => parse_tz(s).map_err(|m| ctx.err(format!("{path}.tz"), m))?,
    };
    let kind = match rl.kind {
        RawKind::Rate => {
            only("tz", rl.tz.is_some(), "quota and budget")?;
            only("lease", rl.lease.is_some(), "concurrency")?;
            let per = rl
                .per
                .as_deref()
                .ok_or_else(|| ctx.err(path, "a rate limit needs `per` (e.g. `1s`, `1m`, `1h`)"))?;
            let period = match per {
                "second" => SECOND_US,
                "minute" => MINUTE_US,
                "hour" => HOUR_US,
                "day" => DAY_US,
                other => parse_duration(other).map_err(|m| {
                    ctx.err(
                        format!("{path}.per"),
                        format!("{m}; rate periods are fixed durations"),
                    )
                })?,
            };
            if period <= 0 {
                return Err(ctx.err(format!("{path}.per"), "must be longer than zero"));
            }
            let burst = match &rl.burst {
                None => limit,
                Some(v) => parse_amount(v, &unit, decimals)
                    .map_err(|m| ctx.err(format!("{path}.burst"), m))?,
            };
            if burst == 0 {
                return Err(ctx.err(format!("{path}.burst"), "must be greater than zero"));
            }
            let g = gcd(period, limit);
            let (p, l) = (period / g, limit / g);
            if i128::from(burst) * i128::from(p) > i128::from(MAX_AMOUNT) {
                return Err(ctx.err(
                    path,
                    format!(
                        "{} per {} with burst {} cannot be tracked exactly (burst × period/gcd exceeds 2^53); use a coarser unit or a quota",
                        format_base(limit, decimals), per, format_base(burst, decimals)
                    ),
                ));
            }
            LimitKind::Rate(RateSpec {
                period,
                burst,
                p,
                l,
            })
        }
        RawKind::Quota | RawKind::Budget => {
            let budget = rl.kind == RawKind::Budget;
            only("burst", rl.burst.is_some(), "rate")?;
            only("lease", rl.lease.is_some(), "concurrency")?;
            let w = parse_window(rl.per.as_deref(), tz, budget)
                .map_err(|m| ctx.err(format!("{path}.per"), m))?;
            if budget {
                LimitKind::Budget(w)
            } else {
                LimitKind::Quota(w)
            }
        }
        RawKind::Concurrency => {
            only("burst", rl.burst.is_some(), "rate")?;
            only("per", rl.per.is_some(), "rate, quota and budget")?;
            only("tz", rl.tz.is_some(), "quota and budget")?;
            LimitKind::Concurrency
        }
    };
    let lease = match &rl.lease {
        None => defaults.lease,
        Some(s) => {
            let d = parse_duration(s).map_err(|m| ctx.err(format!("{path}.lease"), m))?;
            if d <= 0 {
                return Err(ctx.err(format!("{path}.lease"), "must be longer than zero"));
            }
            d
        }
    };
    let floors = build_floors(
        ctx,
        &format!("{path}.floors"),
        rl.floors.as_ref(),
        defaults.floors,
    )?;
    let mut caps = Vec::new();
    for (i, c) in rl.caps.into_iter().enumerate() {
        let cpath = format!("{path}.caps[{i}]");
        let below = parse_permille(&c.when_remaining_below)
            .map_err(|m| ctx.err(format!("{cpath}.when_remaining_below"), m))?;
        let caps_v = crate::decision::Caps {
            delay_ms: c.delay_ms,
            max_tokens: c.max_tokens,
            model: c.model,
            sequential: c.sequential.unwrap_or(false),
        };
        if caps_v.is_empty() {
            return Err(ctx.err(
                &cpath,
                "a caps rule needs at least one of delay_ms, max_tokens, model, sequential",
            ));
        }
        caps.push(CapRule {
            below,
            caps: caps_v,
        });
    }
    Ok(LimitDef {
        id: 0, // assigned by register()
        name: rl.name,
        kind,
        unit,
        decimals,
        limit,
        floors,
        overage: rl.overage.unwrap_or(defaults.overage),
        attach,
        owner,
        caps,
        lease,
        description: rl.description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(SECOND_US));
        assert_eq!(parse_duration("1h30m"), Ok(HOUR_US + 30 * MINUTE_US));
        assert_eq!(parse_duration("250ms"), Ok(250_000));
        assert!(parse_duration("1").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1y").is_err());
        assert_eq!(fmt_duration(HOUR_US + 30 * MINUTE_US), "1h30m");
    }

    #[test]
    fn errors_name_the_path() {
        let yaml = "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: rate, limit: 10, per: 1s}\n      - {name: b, kind: quota, limit: 10, per: fortnight}\n";
        let e = Policy::from_str_as(yaml, Format::Yaml, "p.yaml").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("p.yaml")
                && s.contains("scopes.tenant.limits[1].per")
                && s.contains("fortnight"),
            "{s}"
        );
        let e = Policy::from_str_as(
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: rate, limit: 10, pre: 1s}\n",
            Format::Yaml,
            "p.yaml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("scopes.tenant.limits[0]"), "{e}");
        assert!(e.to_string().contains("unknown field `pre`"), "{e}");
    }
}
