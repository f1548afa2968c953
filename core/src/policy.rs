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
use crate::upstream::Coordination;

mod build;
mod describe;
mod parse;
mod raw;
mod reload;

pub use describe::fmt_duration;
pub use parse::parse_duration;
pub use reload::Changes;
// The loader's parts see one another through this module.
#[allow(clippy::wildcard_imports)]
use {build::*, describe::*, parse::*, raw::*};

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
///
/// On a limit that counts spend (a quota or budget) the debt is what was
/// charged beyond its capacity: `remaining = limit − spent − held − debt`
/// with `spent` at most the limit, and while there is debt nothing more
/// passes the limit until its window resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overage {
    /// Charge the actual amount, even past the limit (the balance goes into debt
    /// and later requests are denied until it is paid back by a reset or refill).
    #[default]
    Charge,
    /// Charge at most what was reserved; the excess is reported, not charged.
    Cap,
    /// Refuse a commit whose actual exceeds the reservation
    /// ([`crate::Error::OverageRejected`]): nothing is charged and the
    /// reservation stays live, to be committed within it or released.
    /// (A governed call's settlement then charges the estimate.)
    Reject,
    /// Charge the excess as far as the limit has room for it (never into
    /// debt); the rest is reported, not charged. (Quotas and budgets.)
    AllowIfAvailable,
    /// Charge the excess, into debt up to the limit's `overdraft`; what would
    /// go past it is reported, not charged. (Quotas and budgets.)
    AllowWithOverdraft,
}

impl Overage {
    /// The policy's name for it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Cap => "cap",
            Self::Reject => "reject",
            Self::AllowIfAvailable => "allow_if_available",
            Self::AllowWithOverdraft => "allow_with_overdraft",
        }
    }
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
    /// With `allow_with_overdraft`: the most debt a commit may leave, base
    /// units (0 otherwise).
    pub overdraft: i64,
    /// Shares of the limit (‰, ascending) whose crossing is an event
    /// ([`crate::Event::ThresholdCrossed`], and at 1000
    /// [`crate::Event::LimitExhausted`]): quotas and budgets, by default
    /// 50 %, 80 % and 100 %.
    pub thresholds: Vec<u16>,
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
    /// How a resource coordinates on its upstream's observed state
    /// (`upstream:` in the policy); `None`: it does not.
    pub upstream: Option<Coordination>,
    /// Its prices (`pricing:` in the policy), so callers may pass usage
    /// instead of money; `None`: not priced.
    pub pricing: Option<Arc<crate::pricing::Pricing>>,
    /// Shrink a priced request's output to what the budget covers instead
    /// of denying it (`shrink:` in the policy).
    pub shrink: Option<crate::pricing::Shrink>,
    /// Free text.
    pub description: Option<String>,
    /// The workflow stages before every stage that calls this resource
    /// (`workflows:` in the policy): when one of their resources is limited,
    /// decisions here carry `caps.backpressure` naming them.
    pub stages_before: Vec<StageRef>,
}

/// A workflow stage as another stage's decisions name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRef {
    /// `workflow/stage`.
    pub name: Box<str>,
    /// The resource the stage calls.
    pub resource: Box<str>,
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
    /// Limits earlier policies of the same warden had and this one does not
    /// (for receipts of reservations made before a reload).
    pub(crate) retired: HashMap<String, Arc<LimitDef>>,
    /// The serial of its first limit ([`Policy::serial_of`]): 0, or after a
    /// reload, past every serial of the policies before it.
    pub(crate) serial_base: u64,
    /// Where events are delivered (`webhooks:`).
    pub(crate) webhooks: Vec<Arc<crate::webhook::Endpoint>>,
    /// Where events are appended or published on Redis (`events:`).
    pub(crate) outlets: crate::sink::Outlets,
    /// Where the audit log goes (`audit:`).
    pub(crate) audit: crate::audit::Sinks,
    /// Which actions each scope kind may name (`scopes.<kind>.tools`).
    pub(crate) tools: Map<Tools>,
}

/// `scopes.<kind>.tools`: which actions (tools) requests by a scope of that
/// kind may name. A request naming a denied one, or one the allow list
/// leaves out, is denied by policy — no limit is touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tools {
    /// When given, only these.
    pub allow: Option<Vec<String>>,
    /// Never these.
    pub deny: Vec<String>,
}

impl Tools {
    /// Why `action` is refused, if it is.
    #[must_use]
    pub fn refuses(&self, action: &str) -> Option<&'static str> {
        if self.deny.iter().any(|d| d == action) {
            Some("deny")
        } else if self
            .allow
            .as_ref()
            .is_some_and(|a| !a.iter().any(|x| x == action))
        {
            Some("allow")
        } else {
            None
        }
    }
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

    /// A resource by name, or [`Error::Unknown`] listing the declared ones.
    pub(crate) fn declared_resource(&self, name: &str) -> Result<&Target> {
        self.resource(name).ok_or_else(|| {
            Error::unknown("resource", name, self.resources.keys().map(String::as_str))
        })
    }

    /// An action by name.
    #[must_use]
    pub fn action(&self, name: &str) -> Option<&Target> {
        lookup(&self.actions, name)
    }

    /// Why scope `scope` may not name `action` (`scopes.<kind>.tools`): the
    /// first scope kind whose rules refuse it, and which list did.
    #[must_use]
    pub fn tool_refusal(&self, scope: &crate::scope::Scope, action: &str) -> Option<String> {
        if self.tools.is_empty() {
            return None;
        }
        (0..scope.depth()).find_map(|i| {
            let kind = scope.kind(i);
            let list = lookup(&self.tools, kind)?.refuses(action)?;
            Some(if list == "deny" {
                format!("the action `{action}` is denied to `{kind}` scopes (scopes.{kind}.tools.deny)")
            } else {
                format!("the action `{action}` is not among those allowed to `{kind}` scopes (scopes.{kind}.tools.allow)")
            })
        })
    }

    /// The decimals of a unit known to this policy (built in, declared, or used by a limit).
    #[must_use]
    pub fn unit(&self, name: &str) -> Option<&UnitDef> {
        lookup(&self.units, name)
    }
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
