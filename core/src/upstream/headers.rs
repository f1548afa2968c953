//! The header parsers: every provider's rate-limit headers into one
//! [`Observation`].

use std::time::Duration;

use crate::calendar::days_from_civil;
use crate::clock::Micros;

/// What a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// Requests.
    Requests,
    /// Tokens, input and output together.
    Tokens,
    /// Input (prompt) tokens.
    InputTokens,
    /// Output (completion) tokens.
    OutputTokens,
}

impl Dimension {
    /// `requests`, `tokens`, `input_tokens` or `output_tokens`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::InputTokens => "input_tokens",
            Self::OutputTokens => "output_tokens",
        }
    }
}

/// One quota of the upstream, as far as its headers tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// What it counts.
    pub dimension: Dimension,
    /// The provider's name for it, when it names it (draft-11 policy names,
    /// GitHub's `x-ratelimit-resource`).
    pub name: Option<String>,
    /// Its capacity, when given.
    pub limit: Option<u64>,
    /// What is left, when given.
    pub remaining: Option<u64>,
    /// Until it is replenished, from the response's time, when given.
    pub reset: Option<Duration>,
}

/// Everything one response's headers say about the upstream's limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The quotas, one per dimension (and name) the headers describe, ordered
    /// by dimension (requests, tokens, input, output tokens), then name.
    pub quotas: Vec<Quota>,
    /// How long the upstream asks callers to wait (`Retry-After`, `retry-after-ms`).
    pub retry_after: Option<Duration>,
    /// Values that were present but could not be used, one line each.
    pub warnings: Vec<String>,
}

impl Observation {
    /// The quota of `dimension` (the first one, if the headers name several).
    #[must_use]
    pub fn quota(&self, dimension: Dimension) -> Option<&Quota> {
        self.quotas.iter().find(|q| q.dimension == dimension)
    }

    fn entry(&mut self, dimension: Dimension, name: Option<&str>) -> &mut Quota {
        let at = self
            .quotas
            .iter()
            .position(|q| q.dimension == dimension && q.name.as_deref() == name);
        let i = at.unwrap_or_else(|| {
            self.quotas.push(Quota {
                dimension,
                name: name.map(str::to_owned),
                limit: None,
                remaining: None,
                reset: None,
            });
            self.quotas.len() - 1
        });
        &mut self.quotas[i]
    }

    fn warn(&mut self, header: &str, value: &str, why: &str) {
        self.warnings.push(format!(
            "ignored `{header}: {}`: {why}",
            crate::error::truncate(value)
        ));
    }
}

/// Largest count believed: a value past it is a sentinel or garbage.
const MAX_COUNT: u64 = 1 << 53;
/// Longest reset or retry believed (a year): longer is a sentinel or garbage.
const MAX_WAIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses the rate-limit headers of one response received at `now` (µs since
/// the epoch; absolute resets — epoch seconds, RFC 3339, HTTP-dates — become
/// durations from it). Header names are matched case-insensitively; unknown
/// headers are ignored.
#[must_use]
pub fn parse<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    now: Micros,
) -> Observation {
    let mut o = Observation::default();
    let mut github_resource: Option<String> = None;
    let mut deferred: Vec<(String, &'a str)> = Vec::new();
    for (name, value) in headers {
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        if name == "x-ratelimit-resource" {
            github_resource = Some(value.to_owned());
        } else {
            deferred.push((name, value));
        }
    }
    for (name, value) in &deferred {
        header(&mut o, name, value, now, github_resource.as_deref());
    }
    // Whatever order the headers came in (fetch's Headers sorts them).
    o.quotas
        .sort_by(|a, b| (a.dimension, &a.name).cmp(&(b.dimension, &b.name)));
    o
}

fn header(o: &mut Observation, name: &str, value: &str, now: Micros, github: Option<&str>) {
    use Dimension::{InputTokens, OutputTokens, Requests, Tokens};
    match name {
        "retry-after" => match retry_after(value, now) {
            Some(d) => o.retry_after = Some(o.retry_after.map_or(d, |r| r.max(d))),
            None => o.warn(name, value, "not seconds or an HTTP-date"),
        },
        "retry-after-ms" => match count(value).map(Duration::from_millis) {
            Some(d) if d <= MAX_WAIT => o.retry_after = Some(o.retry_after.map_or(d, |r| r.max(d))),
            _ => o.warn(name, value, "not a number of milliseconds"),
        },
        "ratelimit" => draft_ratelimit(o, value),
        "ratelimit-policy" => draft11_policy(o, value),
        "ratelimit-limit" | "x-ratelimit-limit" => {
            set_count(o, name, value, Requests, github, |q, v| q.limit = Some(v));
        }
        "ratelimit-remaining" | "x-ratelimit-remaining" => {
            set_count(o, name, value, Requests, github, |q, v| {
                q.remaining = Some(v)
            });
        }
        "ratelimit-reset" => match count(value).map(Duration::from_secs) {
            Some(d) if d <= MAX_WAIT => o.entry(Requests, None).reset = Some(d),
            _ => o.warn(name, value, "not a number of seconds"),
        },
        // GitHub sends epoch seconds; generic servers often a delta.
        "x-ratelimit-reset" => match count(value) {
            Some(v) if v > 1_000_000_000 => match epoch_delta(v, now) {
                Some(d) => o.entry(Requests, github).reset = Some(d),
                None => o.warn(name, value, "a reset too far in the future"),
            },
            Some(v) if v <= MAX_WAIT.as_secs() => {
                o.entry(Requests, github).reset = Some(Duration::from_secs(v));
            }
            _ => o.warn(name, value, "not a reset time"),
        },
        "x-ratelimit-used" => {}
        _ => {
            if let Some(rest) = name.strip_prefix("x-ratelimit-") {
                openai(o, name, rest, value);
            } else if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
                let (dim, field) = match rest {
                    r if r.starts_with("input-tokens-") => (InputTokens, &r[13..]),
                    r if r.starts_with("output-tokens-") => (OutputTokens, &r[14..]),
                    r if r.starts_with("tokens-") => (Tokens, &r[7..]),
                    r if r.starts_with("requests-") => (Requests, &r[9..]),
                    _ => return,
                };
                match field {
                    "limit" => set_count(o, name, value, dim, None, |q, v| q.limit = Some(v)),
                    "remaining" => {
                        set_count(o, name, value, dim, None, |q, v| q.remaining = Some(v))
                    }
                    "reset" => match rfc3339(value).and_then(|at| until(at, now)) {
                        Some(d) => o.entry(dim, None).reset = Some(d),
                        None => o.warn(name, value, "not an RFC 3339 time within a year"),
                    },
                    _ => {}
                }
            }
        }
    }
}

/// OpenAI / Azure OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
fn openai(o: &mut Observation, name: &str, rest: &str, value: &str) {
    let (field, dim) = match rest.rsplit_once('-') {
        Some((f, "requests")) => (f, Dimension::Requests),
        Some((f, "tokens")) => (f, Dimension::Tokens),
        _ => return,
    };
    match field {
        "limit" => set_count(o, name, value, dim, None, |q, v| q.limit = Some(v)),
        "remaining" => set_count(o, name, value, dim, None, |q, v| q.remaining = Some(v)),
        "reset" => match go_duration(value) {
            Some(d) if d <= MAX_WAIT => o.entry(dim, None).reset = Some(d),
            _ => o.warn(name, value, "not a duration like 6m0s, 1.5s or 20ms"),
        },
        _ => {}
    }
}

fn set_count(
    o: &mut Observation,
    name: &str,
    value: &str,
    dim: Dimension,
    quota_name: Option<&str>,
    set: impl FnOnce(&mut Quota, u64),
) {
    match count(value) {
        Some(v) => set(o.entry(dim, quota_name), v),
        None => o.warn(name, value, "not a count"),
    }
}

/// A non-negative whole number no larger than 2^53 (sentinels like `-1` or
/// `18446744073709551615` are not counts).
fn count(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|v| *v <= MAX_COUNT)
}

fn epoch_delta(epoch_secs: u64, now: Micros) -> Option<Duration> {
    let at = i64::try_from(epoch_secs).ok()?.checked_mul(1_000_000)?;
    until(at, now)
}

/// From `now` until `at` (µs since the epoch): zero if past, `None` past a year.
fn until(at: Micros, now: Micros) -> Option<Duration> {
    let d = Duration::from_micros(u64::try_from(at.saturating_sub(now).max(0)).ok()?);
    (d <= MAX_WAIT).then_some(d)
}

/// `Retry-After`: delay-seconds, or an HTTP-date (IMF-fixdate).
fn retry_after(s: &str, now: Micros) -> Option<Duration> {
    if let Some(v) = count(s) {
        return (v <= MAX_WAIT.as_secs()).then(|| Duration::from_secs(v));
    }
    http_date(s).and_then(|at| until(at, now))
}

/// A Go-style duration as OpenAI sends them: `6m0s`, `1.5s`, `20ms`, `1h2m3s`.
fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// RFC 3339 (`2026-12-01T04:30:00Z`, fractional seconds and offsets allowed)
/// as µs since the epoch.
pub(crate) fn rfc3339(s: &str) -> Option<Micros> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(digits);
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut frac_us = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = s.get(start..i)?;
        let six: String = digits
            .chars()
            .chain(std::iter::repeat('0'))
            .take(6)
            .collect();
        frac_us = six.parse().ok()?;
    }
    let offset_secs = match s.get(i..)? {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60)
        }
        _ => return None,
    };
    civil_micros(y, mo, d, h, mi, se).map(|t| t - offset_secs * 1_000_000 + frac_us)
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) as µs since the epoch:
/// a two-digit day, a four-digit year, `HH:MM:SS`, exactly as RFC 9110 writes it.
fn http_date(s: &str) -> Option<Micros> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)?;
    let t = time.as_bytes();
    if day.len() != 2 || year.len() != 4 || t.len() != 8 || t[2] != b':' || t[5] != b':' {
        return None;
    }
    civil_micros(
        digits(year)?,
        i64::try_from(month + 1).ok()?,
        digits(day)?,
        digits(time.get(0..2)?)?,
        digits(time.get(3..5)?)?,
        digits(time.get(6..8)?)?,
    )
}

/// A field of ASCII digits only (no sign, no spaces) as a number.
fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A civil UTC time as µs since the epoch; `None` for any field out of range
/// (years 1–9999, so no arithmetic can overflow).
fn civil_micros(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<Micros> {
    let ok = (1..=9999).contains(&y)
        && (1..=12).contains(&mo)
        && (1..=31).contains(&d)
        && (0..=23).contains(&h)
        && (0..=59).contains(&mi)
        && (0..=60).contains(&s);
    if !ok {
        return None;
    }
    let days = days_from_civil(y, u32::try_from(mo).ok()?, u32::try_from(d).ok()?);
    Some((((days * 24 + h) * 60 + mi) * 60 + s) * 1_000_000)
}

/// draft-7 (`limit=…, remaining=…, reset=…`, a Dictionary) or draft-11
/// (`"name";r=…;t=…`, a List) `RateLimit`.
fn draft_ratelimit(o: &mut Observation, value: &str) {
    if let Ok(dict) = sfv::Parser::new(value).parse_dictionary::<sfv::Dictionary>() {
        if dict.contains_key("remaining") || dict.contains_key("limit") {
            let int = |k: &str| match dict.get(k) {
                Some(sfv::ListEntry::Item(i)) => i.bare_item.as_integer().map(i64::from),
                _ => None,
            };
            let q = o.entry(Dimension::Requests, None);
            q.limit = int("limit").and_then(|v| u64::try_from(v).ok()).or(q.limit);
            q.remaining = int("remaining")
                .and_then(|v| u64::try_from(v).ok())
                .or(q.remaining);
            q.reset = int("reset")
                .and_then(|v| u64::try_from(v).ok())
                .map(Duration::from_secs)
                .filter(|d| *d <= MAX_WAIT)
                .or(q.reset);
            return;
        }
    }
    for (name, params) in named_items(o, "ratelimit", value) {
        // Its dimension is the policy item's of the same name (`qu`),
        // whichever header came first; requests until known.
        let q = match o
            .quotas
            .iter()
            .position(|x| x.name.as_deref() == Some(&name))
        {
            Some(i) => &mut o.quotas[i],
            None => o.entry(Dimension::Requests, Some(&name)),
        };
        if let Some(r) = count_param(&params, "r") {
            q.remaining = Some(r);
        }
        if let Some(t) = count_param(&params, "t").filter(|t| *t <= MAX_WAIT.as_secs()) {
            q.reset = Some(Duration::from_secs(t));
        }
    }
}

/// draft-11 `RateLimit-Policy`: `"name";q=…;w=…;qu="…"`.
fn draft11_policy(o: &mut Observation, value: &str) {
    for (name, params) in named_items(o, "ratelimit-policy", value) {
        let dim = match params
            .get("qu")
            .and_then(sfv::BareItem::as_string)
            .map(|s| s.as_str())
        {
            Some("tokens") => Dimension::Tokens,
            Some("input-tokens" | "input_tokens") => Dimension::InputTokens,
            Some("output-tokens" | "output_tokens") => Dimension::OutputTokens,
            _ => Dimension::Requests,
        };
        // The RateLimit item of the same name was filed as requests: move it
        // to the policy's dimension.
        if let Some(i) = o
            .quotas
            .iter()
            .position(|x| x.name.as_deref() == Some(&name) && x.dimension != dim)
        {
            o.quotas[i].dimension = dim;
        }
        if let Some(q) = count_param(&params, "q") {
            o.entry(dim, Some(&name)).limit = Some(q);
        }
    }
}

/// The named items (`"name";params`) of a draft-11 Structured-Field List;
/// a value that is not one is a warning and yields nothing.
fn named_items(o: &mut Observation, header: &str, value: &str) -> Vec<(String, sfv::Parameters)> {
    match sfv::Parser::new(value).parse_list::<sfv::List>() {
        Ok(list) => list
            .into_iter()
            .filter_map(|entry| match entry {
                sfv::ListEntry::Item(item) => {
                    let name = item.bare_item.as_string()?.as_str().to_owned();
                    Some((name, item.params))
                }
                sfv::ListEntry::InnerList(_) => None,
            })
            .collect(),
        Err(e) => {
            o.warn(header, value, &format!("not a Structured Field ({e})"));
            Vec::new()
        }
    }
}

/// A non-negative integer parameter.
fn count_param(params: &sfv::Parameters, key: &str) -> Option<u64> {
    params
        .get(key)
        .and_then(sfv::BareItem::as_integer)
        .and_then(|v| u64::try_from(i64::from(v)).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Micros = 1_764_563_400_000_000; // 2025-12-01T04:30:00Z

    #[test]
    fn durations_and_dates() {
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        for bad in ["", "s", "5", "5x", "-1s", "1.2.3s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
        assert_eq!(rfc3339("2025-12-01T04:30:00Z"), Some(NOW));
        assert_eq!(rfc3339("2025-12-01T05:30:00.5+01:00"), Some(NOW + 500_000));
        assert_eq!(rfc3339("2025-13-01T04:30:00Z"), None);
        assert_eq!(
            http_date("Mon, 01 Dec 2025 04:30:07 GMT"),
            Some(NOW + 7_000_000)
        );
        assert_eq!(http_date("yesterday"), None);
        // Out-of-range fields are not dates (a huge year overflowed the day
        // arithmetic; negative hours passed the range check).
        for bad in [
            "Mon, 01 Dec 99999999999999999 04:30:07 GMT",
            "Mon, 01 Dec 2025 -4:30:07 GMT",
            "Mon, 01 Dec 2025 04:-1:07 GMT",
            "Mon, 01 Dec 2025 04:30:-7 GMT",
            "Mon, 01 Dec 2025 +4:30:07 GMT",
            "Mon, 00 Dec 2025 04:30:07 GMT",
            "Mon, 01 Dec 0 04:30:07 GMT",
        ] {
            assert_eq!(http_date(bad), None, "{bad}");
        }
        assert_eq!(count("-1"), None);
        assert_eq!(count("18446744073709551615"), None);
    }
}
