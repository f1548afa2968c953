//! What the HTTP middlewares of every binding share, so they all behave and say
//! the same: who the client of a request is ([`ClientIdentity`]: trusted
//! proxies, normalised addresses, IPv6 subnets), the standard rate-limit
//! headers and the 429 body for a [`Decision`].
//!
//! The default is the IETF draft-11 form (`draft-ietf-httpapi-ratelimit-headers-11`):
//! two Structured-Field lists with one item per limit involved, named after the
//! limit —
//!
//! ```text
//! RateLimit-Policy: "per-ip";q=100;w=60, "tenant-usd";q=5000000;w=86400;qu="usd"
//! RateLimit: "per-ip";r=99;t=1, "tenant-usd";r=4980000;t=51320
//! ```
//!
//! `q` and `r` count the limit's base units (micro-units for a unit with 6
//! decimals); `qu` names the unit when it is not `requests` (a concurrency limit
//! counting requests says `concurrent-requests`); `w` is omitted for lifetime
//! budgets and concurrency. Older generations still on the wire are available:
//! draft-7 (`RateLimit: limit=100, remaining=99, reset=1`) and draft-6
//! (`RateLimit-Limit` / `-Remaining` / `-Reset`), both describing the tightest
//! limit, with the full `RateLimit-Policy` list; or none (`off`). A denied
//! decision adds `Retry-After` (whole seconds, rounded up) unless it can never
//! succeed, in every style.

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use crate::decision::{Decision, LimitState};

mod client;
pub use client::{ClientIdentity, DEFAULT_IPV6_SUBNET, Network, TrustProxy};

/// Largest Structured-Field integer (15 digits); larger counts are clamped to it.
const SF_INTEGER_MAX: i64 = 999_999_999_999_999;

/// Which generation of the rate-limit header fields to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HeaderStyle {
    /// `RateLimit-Policy` and `RateLimit` as Structured-Field lists, one item per limit
    /// (draft-11, the newest; the default).
    #[default]
    Draft11,
    /// `RateLimit: limit=…, remaining=…, reset=…` for the tightest limit, plus the
    /// `RateLimit-Policy` list (draft-7).
    Draft7,
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` for the tightest
    /// limit, plus the `RateLimit-Policy` list (draft-6).
    Draft6,
    /// No rate-limit fields; a denial still says `Retry-After`.
    Off,
}

impl HeaderStyle {
    /// `draft-11`, `draft-7`, `draft-6` or `off`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Draft11 => "draft-11",
            Self::Draft7 => "draft-7",
            Self::Draft6 => "draft-6",
            Self::Off => "off",
        }
    }
}

impl FromStr for HeaderStyle {
    type Err = crate::Error;

    /// Accepts `draft-11`, `draft-7`, `draft-6` (also without the dash, or the
    /// bare number) and `off`.
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "draft-11" | "draft11" | "11" => Ok(Self::Draft11),
            "draft-7" | "draft7" | "7" => Ok(Self::Draft7),
            "draft-6" | "draft6" | "6" => Ok(Self::Draft6),
            "off" => Ok(Self::Off),
            _ => Err(crate::Error::invalid(
                "headers",
                format!(
                    "`{}` is not a header style (draft-11, draft-7, draft-6 or off)",
                    crate::error::truncate(s)
                ),
            )),
        }
    }
}

/// Whole seconds, rounded up (a client told `0` would retry at once).
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn sf_int(v: i64) -> i64 {
    v.clamp(0, SF_INTEGER_MAX)
}

/// Appends `s` as a Structured-Field String (printable ASCII; quotes and
/// backslashes escaped; anything else replaced by `?`).
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

/// The quota unit for `qu`: `None` when it is the default (`requests`).
fn quota_unit(l: &LimitState) -> Option<&str> {
    let requests = matches!(l.unit(), "requests" | "request");
    match (l.kind(), requests) {
        ("concurrency", true) => Some("concurrent-requests"),
        (_, true) => None,
        _ => Some(l.unit()),
    }
}

/// The `RateLimit-Policy` list, in the given form (draft-11 items are named).
fn policy_list(limits: &[LimitState], named: bool) -> String {
    let mut out = String::new();
    for (i, l) in limits.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        if named {
            push_sf_string(&mut out, l.name());
            let _ = write!(out, ";q={}", sf_int(l.limit()));
        } else {
            let _ = write!(out, "{}", sf_int(l.limit()));
        }
        if let Some(w) = l.window_secs() {
            let _ = write!(out, ";w={}", sf_int(w));
        }
        if let Some(unit) = quota_unit(l) {
            out.push_str(";qu=");
            push_sf_string(&mut out, unit);
        }
    }
    out
}

/// The limit a single-limit header generation describes: the one that denied,
/// else the one with the smallest share left (ties: the first in policy order).
fn tightest(d: &Decision) -> Option<&LimitState> {
    d.denied_by().or_else(|| {
        d.limits.iter().min_by(|a, b| {
            // a.remaining / a.limit < b.remaining / b.limit, without division.
            let lhs = i128::from(a.remaining) * i128::from(b.limit().max(1));
            let rhs = i128::from(b.remaining) * i128::from(a.limit().max(1));
            lhs.cmp(&rhs)
        })
    })
}

/// The rate-limit response headers for `decision`, as `(name, value)` pairs with
/// the names in their canonical case. Empty when no limit was involved (and the
/// request was allowed). Values are plain ASCII, safe for any HTTP stack.
#[must_use]
pub fn rate_limit_headers(decision: &Decision, style: HeaderStyle) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(4);
    if !decision.limits.is_empty() {
        match style {
            HeaderStyle::Draft11 => {
                out.push(("RateLimit-Policy", policy_list(&decision.limits, true)));
                let mut now = String::new();
                for (i, l) in decision.limits.iter().enumerate() {
                    if i > 0 {
                        now.push_str(", ");
                    }
                    push_sf_string(&mut now, l.name());
                    let _ = write!(now, ";r={}", sf_int(l.remaining));
                    // A lifetime budget or a concurrency limit never resets
                    // (its policy item has no `w` either): no `t` then.
                    if l.window_secs().is_some() {
                        let t = ceil_secs(l.reset).min(SF_INTEGER_MAX.unsigned_abs());
                        let _ = write!(now, ";t={t}");
                    }
                }
                out.push(("RateLimit", now));
            }
            HeaderStyle::Draft7 | HeaderStyle::Draft6 => {
                out.push(("RateLimit-Policy", policy_list(&decision.limits, false)));
                if let Some(l) = tightest(decision) {
                    let (limit, remaining, reset) =
                        (sf_int(l.limit()), sf_int(l.remaining), ceil_secs(l.reset));
                    if style == HeaderStyle::Draft7 {
                        out.push((
                            "RateLimit",
                            format!("limit={limit}, remaining={remaining}, reset={reset}"),
                        ));
                    } else {
                        out.push(("RateLimit-Limit", limit.to_string()));
                        out.push(("RateLimit-Remaining", remaining.to_string()));
                        out.push(("RateLimit-Reset", reset.to_string()));
                    }
                }
            }
            HeaderStyle::Off => {}
        }
    }
    if !decision.allowed() {
        if let Some(after) = decision.retry_after {
            out.push(("Retry-After", ceil_secs(after).to_string()));
        }
    }
    out
}

/// The JSON body of a 429 response for a denied `decision`:
/// `{"error":"rate_limited","limit":…,"kind":…,"reason":…,"retry_after":…}` where
/// `error` is `budget_exceeded` when a budget denied it, and `retry_after`
/// (seconds, fractional) is `null` when the request can never succeed as asked.
#[must_use]
pub fn denial_body(decision: &Decision) -> String {
    let by = decision.denied_by();
    let error = match by.map(LimitState::kind) {
        Some("budget") => "budget_exceeded",
        _ => "rate_limited",
    };
    serde_json::json!({
        "error": error,
        "limit": by.map(LimitState::name),
        "kind": by.map(LimitState::kind),
        "reason": decision.reason,
        "retry_after": decision.retry_after.map(|d| d.as_secs_f64()),
    })
    .to_string()
}

/// A decision as JSON, the shape `ratewarden serve` answers with and the
/// Python binding's `Decision.to_dict()` has: `allowed`, `outcome`, `caps`
/// (only those set), `retry_after` (seconds, `null` when waiting cannot
/// help or when allowed), `reason`, `priority`, `degraded`, `reservation`
/// (`{id, expires_at_ms}` or `null`) and `limits` (per limit: `name`, `kind`,
/// `unit`, `limit`, `remaining`, `held`, `amount` in base units
/// beside `remaining_text`, `reset` in seconds, `denied`).
#[must_use]
pub fn decision_json(d: &Decision) -> serde_json::Value {
    use serde_json::json;
    let mut caps = serde_json::Map::new();
    if let Some(v) = d.caps.delay_ms {
        caps.insert("delay_ms".into(), json!(v));
    }
    if let Some(v) = d.caps.max_tokens {
        caps.insert("max_tokens".into(), json!(v));
    }
    if let Some(v) = &d.caps.model {
        caps.insert("model".into(), json!(&**v));
    }
    if d.caps.sequential {
        caps.insert("sequential".into(), json!(true));
    }
    if !d.caps.backpressure.is_empty() {
        let stages: Vec<&str> = d.caps.backpressure.stages().iter().map(|s| &**s).collect();
        caps.insert("backpressure".into(), json!(stages));
    }
    json!({
        "allowed": d.allowed(),
        "outcome": d.outcome.as_str(),
        "caps": caps,
        "retry_after": d.retry_after.map(|r| r.as_secs_f64()),
        "reason": d.reason,
        "priority": d.priority.as_str(),
        "degraded": d.degraded.map(crate::decision::Degraded::as_str),
        "reservation": d.reservation.as_ref().map(|r| json!({
            "id": r.id.to_string(),
            "expires_at_ms": r.expires_at.div_euclid(1000),
        })),
        "limits": d.limits.iter().map(|l| json!({
            "name": l.name(),
            "kind": l.kind(),
            "unit": l.unit(),
            "limit": l.limit(),
            "remaining": l.remaining,
            "remaining_text": crate::amount::format_base(l.remaining, l.decimals()),
            "held": l.held,
            "amount": l.amount,
            "reset": l.reset.as_secs_f64(),
            "denied": l.denied,
        })).collect::<Vec<_>>(),
    })
}

/// A commit's receipt as JSON: `reservation`, `duplicate` and per limit
/// `name`, `unit`, `reserved`, `charged`, `uncharged`, `debt` (base units)
/// with `charged_text`.
#[must_use]
pub fn receipt_json(r: &crate::decision::CommitReceipt) -> serde_json::Value {
    serde_json::json!({
        "reservation": r.id.to_string(),
        "duplicate": r.duplicate,
        "charges": r.charges.iter().map(|c| serde_json::json!({
            "name": c.name(),
            "unit": c.def.unit,
            "reserved": c.reserved,
            "charged": c.charged,
            "charged_text": c.def.fmt_amount(c.charged),
            "uncharged": c.uncharged,
            "debt": c.debt,
        })).collect::<Vec<_>>(),
    })
}

/// A balance as JSON: `name`, `kind`, `unit`, `owner`, `limit`,
/// `remaining`, `held` (base units) with `remaining_text`, and `reset`
/// (seconds; `null` for lifetime budgets and concurrency).
#[must_use]
pub fn balance_json(b: &crate::decision::Balance) -> serde_json::Value {
    serde_json::json!({
        "name": b.name,
        "kind": b.kind,
        "unit": b.unit,
        "owner": b.owner,
        "limit": b.limit,
        "remaining": b.remaining,
        "remaining_text": crate::amount::format_base(b.remaining, b.decimals),
        "held": b.held,
        "reset": b.reset.map(|r| r.as_secs_f64()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::amount::Amount;
    use crate::{Cost, Policy, Warden};

    fn usd(s: &str) -> Cost {
        Cost::new().with("usd", Amount::parse(s).expect("amount"))
    }

    fn warden() -> Warden {
        let policy = Policy::from_str_as(
            r#"{"scopes": {"ip": {"limits": [
                {"name": "per-ip", "kind": "rate", "unit": "requests", "limit": 2, "per": "minute"},
                {"name": "ip-day", "kind": "quota", "unit": "requests", "limit": 100, "per": "day"}
            ]}},
            "resources": {"llm": {"limits": [
                {"name": "llm-usd", "kind": "budget", "unit": "usd", "limit": "5", "per": "lifetime"},
                {"name": "llm-slots", "kind": "concurrency", "unit": "requests", "limit": 4}
            ]}}}"#,
            crate::Format::Json,
            "test.json",
        )
        .expect("policy");
        // Midnight UTC plus 12 h: the day quota resets in 43 200 s.
        let clock = crate::ManualClock::new(1_700_006_400_000_000 + 43_200_000_000);
        Warden::with_clock(policy, Arc::new(clock))
    }

    fn acquire(w: &Warden, cost: Option<Cost>) -> Decision {
        let mut req = crate::Request::parse("ip:10.0.0.1").expect("scope");
        if let Some(cost) = cost {
            req = req.resource("llm").cost(cost);
        }
        futures_util::FutureExt::now_or_never(w.acquire(&req))
            .expect("embedded decides at once")
            .expect("decision")
    }

    fn header<'a>(h: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn draft11_lists_every_limit_with_units_and_windows() {
        let w = warden();
        let d = acquire(&w, Some(usd("0.25")));
        let h = rate_limit_headers(&d, HeaderStyle::Draft11);
        assert_eq!(
            header(&h, "RateLimit-Policy"),
            Some(
                r#""per-ip";q=2;w=60, "ip-day";q=100;w=86400, "llm-usd";q=5000000;qu="usd", "llm-slots";q=4;qu="concurrent-requests""#
            )
        );
        let now = header(&h, "RateLimit").expect("RateLimit");
        assert!(
            now.starts_with(r#""per-ip";r=1;t=30, "ip-day";r=99;t=43200, "#),
            "{now}"
        );
        // A lifetime budget and a concurrency limit never reset: no `t`.
        assert!(
            now.ends_with(r#""llm-usd";r=4750000, "llm-slots";r=3"#),
            "{now}"
        );
        assert_eq!(header(&h, "Retry-After"), None);
    }

    #[test]
    fn denial_adds_retry_after_rounded_up_and_a_json_body() {
        let w = warden();
        assert!(acquire(&w, None).allowed());
        assert!(acquire(&w, None).allowed());
        let d = acquire(&w, None);
        assert!(!d.allowed());
        let h = rate_limit_headers(&d, HeaderStyle::Draft11);
        assert_eq!(header(&h, "Retry-After"), Some("30"));
        assert!(
            header(&h, "RateLimit")
                .expect("RateLimit")
                .starts_with(r#""per-ip";r=0;t=60"#)
        );
        let body: serde_json::Value = serde_json::from_str(&denial_body(&d)).expect("json");
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["limit"], "per-ip");
        assert_eq!(body["kind"], "rate");
        assert_eq!(body["retry_after"], 30.0);
    }

    #[test]
    fn budget_denial_that_can_never_succeed_has_no_retry_after() {
        let w = warden();
        let d = acquire(&w, Some(usd("6")));
        assert!(!d.allowed());
        let h = rate_limit_headers(&d, HeaderStyle::Draft11);
        assert_eq!(header(&h, "Retry-After"), None);
        let body: serde_json::Value = serde_json::from_str(&denial_body(&d)).expect("json");
        assert_eq!(body["error"], "budget_exceeded");
        assert_eq!(body["retry_after"], serde_json::Value::Null);
    }

    #[test]
    fn older_drafts_describe_the_tightest_limit() {
        let w = warden();
        let d = acquire(&w, None);
        let h7 = rate_limit_headers(&d, HeaderStyle::Draft7);
        assert_eq!(header(&h7, "RateLimit-Policy"), Some("2;w=60, 100;w=86400"));
        assert_eq!(
            header(&h7, "RateLimit"),
            Some("limit=2, remaining=1, reset=30")
        );
        let h6 = rate_limit_headers(&d, HeaderStyle::Draft6);
        assert_eq!(header(&h6, "RateLimit-Limit"), Some("2"));
        assert_eq!(header(&h6, "RateLimit-Remaining"), Some("1"));
        assert_eq!(header(&h6, "RateLimit-Reset"), Some("30"));
        assert_eq!(header(&h6, "RateLimit"), None);
    }

    #[test]
    fn off_keeps_only_retry_after() {
        let w = warden();
        assert!(acquire(&w, None).allowed());
        assert!(rate_limit_headers(&acquire(&w, None), HeaderStyle::Off).is_empty());
        let denied = acquire(&w, None);
        assert_eq!(
            rate_limit_headers(&denied, HeaderStyle::Off),
            vec![("Retry-After", "30".to_owned())]
        );
    }

    #[test]
    fn names_are_escaped_and_styles_parse() {
        let mut s = String::new();
        push_sf_string(&mut s, "a\"b\\c\u{e9}");
        assert_eq!(s, r#""a\"b\\c?""#);
        assert_eq!(
            "draft-7".parse::<HeaderStyle>().ok(),
            Some(HeaderStyle::Draft7)
        );
        assert_eq!("11".parse::<HeaderStyle>().ok(), Some(HeaderStyle::Draft11));
        let e = "draft-9".parse::<HeaderStyle>().expect_err("unknown");
        assert!(e.to_string().contains("draft-9"), "{e}");
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
    }
}
