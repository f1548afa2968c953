//! The simulated upstream provider: a fixed-window quota of requests (and,
//! optionally, tokens), the real header set of one provider, 429 with
//! `Retry-After` when it is spent, and an optional secondary limit that locks
//! every caller out after too many over-quota calls in one window.

use ratewarden::calendar::{MINUTE_US, SECOND_US, civil_from_days};
use ratewarden::clock::Micros;

use crate::scenario::{Style, UpstreamSpec};

/// How often the remaining quota is sampled (for the plot and `--json`).
pub const SAMPLE_US: Micros = 2 * SECOND_US;

/// What the upstream answered.
pub enum Answer {
    /// 200.
    Ok,
    /// 429, retry after this long (µs).
    TooMany {
        /// Until the caller may call again.
        retry_after: Micros,
    },
}

/// What the upstream saw, for the results.
#[derive(Default, Clone)]
pub struct UpstreamStats {
    /// Calls.
    pub sent: u64,
    /// Calls answered 200.
    pub ok: u64,
    /// Calls answered 429.
    pub rejected: u64,
    /// 429s because the quota was spent.
    pub over_quota: u64,
    /// 429s because of the secondary limit's lockout.
    pub lockout_rejects: u64,
    /// Successes per simulated minute.
    pub ok_per_minute: Vec<u64>,
    /// 429s per simulated minute.
    pub rejected_per_minute: Vec<u64>,
    /// Requests left in the current window, every [`SAMPLE_US`] from the start.
    pub remaining: Vec<u64>,
    /// Most successful calls in any one window (never above the quota).
    pub most_in_a_window: u64,
    /// Most tokens spent in any one window.
    pub most_tokens_in_a_window: u64,
}

impl UpstreamStats {
    /// Adds `other`'s counts (series element by element).
    pub fn add(&mut self, other: &Self) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.rejected += other.rejected;
        self.over_quota += other.over_quota;
        self.lockout_rejects += other.lockout_rejects;
        let sum = |a: &mut Vec<u64>, b: &[u64]| {
            if a.len() < b.len() {
                a.resize(b.len(), 0);
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        };
        sum(&mut self.ok_per_minute, &other.ok_per_minute);
        sum(&mut self.rejected_per_minute, &other.rejected_per_minute);
        sum(&mut self.remaining, &other.remaining);
        self.most_in_a_window = self.most_in_a_window.max(other.most_in_a_window);
        self.most_tokens_in_a_window = self
            .most_tokens_in_a_window
            .max(other.most_tokens_in_a_window);
    }
}

/// One simulated upstream.
pub struct Upstream {
    spec: UpstreamSpec,
    start: Micros,
    /// How long a "minute" of the per-minute series lasts (shorter in real time, scaled).
    minute: Micros,
    next_sample: Micros,
    window: i64,
    used: u32,
    tokens_used: u64,
    over_in_window: u32,
    locked_until: Micros,
    /// What it saw.
    pub stats: UpstreamStats,
}

impl Upstream {
    /// A fresh upstream for a run of `minutes` from `start`, each lasting `minute` µs.
    pub fn new(spec: UpstreamSpec, minutes: u32, start: Micros, minute: Micros) -> Self {
        let n = usize::try_from(minutes).unwrap_or(0).max(1);
        Self {
            spec,
            start,
            minute: minute.max(1),
            next_sample: start,
            window: i64::MIN,
            used: 0,
            tokens_used: 0,
            over_in_window: 0,
            locked_until: 0,
            stats: UpstreamStats {
                ok_per_minute: vec![0; n],
                rejected_per_minute: vec![0; n],
                ..UpstreamStats::default()
            },
        }
    }

    /// Records the samples due up to `now` (inclusive), before a call at `now`.
    pub fn sample_until(&mut self, now: Micros) {
        while self.next_sample <= now {
            let left = if self.next_sample.div_euclid(self.spec.window) == self.window {
                self.spec.requests.saturating_sub(self.used)
            } else {
                self.spec.requests // a window nobody has called in yet
            };
            self.stats.remaining.push(u64::from(left));
            self.next_sample += SAMPLE_US;
        }
    }

    /// One call at `now` spending `tokens`.
    pub fn call(&mut self, now: Micros, tokens: u64) -> Answer {
        self.sample_until(now);
        let minute = usize::try_from((now - self.start) / self.minute).unwrap_or(0);
        let slot = minute.min(self.stats.ok_per_minute.len() - 1);
        self.stats.sent += 1;
        let window = now.div_euclid(self.spec.window);
        if window != self.window {
            self.window = window;
            self.used = 0;
            self.tokens_used = 0;
            self.over_in_window = 0;
        }
        let reset = (window + 1) * self.spec.window;
        if now < self.locked_until {
            self.stats.rejected += 1;
            self.stats.lockout_rejects += 1;
            self.stats.rejected_per_minute[slot] += 1;
            return Answer::TooMany {
                retry_after: self.locked_until - now,
            };
        }
        let tokens_fit = self
            .spec
            .tokens
            .is_none_or(|t| self.tokens_used + tokens <= t);
        if self.used < self.spec.requests && tokens_fit {
            self.used += 1;
            self.tokens_used += tokens;
            self.stats.ok += 1;
            self.stats.ok_per_minute[slot] += 1;
            self.stats.most_in_a_window = self.stats.most_in_a_window.max(u64::from(self.used));
            self.stats.most_tokens_in_a_window =
                self.stats.most_tokens_in_a_window.max(self.tokens_used);
            return Answer::Ok;
        }
        self.stats.rejected += 1;
        self.stats.over_quota += 1;
        self.stats.rejected_per_minute[slot] += 1;
        self.over_in_window += 1;
        if let Some(s) = self.spec.secondary {
            if self.over_in_window > s.after {
                // Secondary limit: hammering a spent quota locks callers out.
                self.locked_until = now + s.lockout;
                return Answer::TooMany {
                    retry_after: s.lockout,
                };
            }
        }
        Answer::TooMany {
            retry_after: reset - now,
        }
    }

    /// The rate-limit headers of an answer given at `now`, in the upstream's style.
    pub fn headers(&self, now: Micros, answer: &Answer) -> Vec<(String, String)> {
        let reset_at = (self.window + 1) * self.spec.window;
        let until = (reset_at - now).max(0);
        let limit = self.spec.requests;
        let left = limit.saturating_sub(self.used);
        let mut h: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: String| h.push((k.to_owned(), v));
        match self.spec.style {
            Style::Github => {
                put("x-ratelimit-limit", limit.to_string());
                put("x-ratelimit-remaining", left.to_string());
                put("x-ratelimit-used", self.used.to_string());
                put("x-ratelimit-reset", (reset_at / SECOND_US).to_string());
                put("x-ratelimit-resource", "core".to_owned());
            }
            Style::Openai => {
                put("x-ratelimit-limit-requests", limit.to_string());
                put("x-ratelimit-remaining-requests", left.to_string());
                put("x-ratelimit-reset-requests", go_duration(until));
                if let Some(t) = self.spec.tokens {
                    put("x-ratelimit-limit-tokens", t.to_string());
                    put(
                        "x-ratelimit-remaining-tokens",
                        t.saturating_sub(self.tokens_used).to_string(),
                    );
                    put("x-ratelimit-reset-tokens", go_duration(until));
                }
            }
            Style::Anthropic => {
                put("anthropic-ratelimit-requests-limit", limit.to_string());
                put("anthropic-ratelimit-requests-remaining", left.to_string());
                put("anthropic-ratelimit-requests-reset", rfc3339(reset_at));
                if let Some(t) = self.spec.tokens {
                    put("anthropic-ratelimit-tokens-limit", t.to_string());
                    put(
                        "anthropic-ratelimit-tokens-remaining",
                        t.saturating_sub(self.tokens_used).to_string(),
                    );
                    put("anthropic-ratelimit-tokens-reset", rfc3339(reset_at));
                }
            }
            Style::Ietf => {
                let secs = (until + SECOND_US - 1) / SECOND_US;
                put(
                    "ratelimit",
                    format!("limit={limit}, remaining={left}, reset={secs}"),
                );
                put(
                    "ratelimit-policy",
                    format!("{limit};w={}", self.spec.window / SECOND_US),
                );
            }
        }
        if let Answer::TooMany { retry_after } = answer {
            let secs = (retry_after + SECOND_US - 1) / SECOND_US;
            put("retry-after", secs.max(1).to_string());
        }
        h
    }
}

/// A duration the way Go prints one (OpenAI's resets): `1m30s`, `1.5s`, `20ms`.
fn go_duration(us: Micros) -> String {
    fn secs(us: Micros) -> String {
        let whole = us / SECOND_US;
        let ms = (us % SECOND_US + 999) / 1000;
        if ms == 0 {
            format!("{whole}s")
        } else if ms == 1000 {
            format!("{}s", whole + 1)
        } else {
            format!("{}.{}s", whole, format!("{ms:03}").trim_end_matches('0'))
        }
    }
    if us >= MINUTE_US {
        format!("{}m{}", us / MINUTE_US, secs(us % MINUTE_US))
    } else if us >= SECOND_US {
        secs(us)
    } else {
        format!("{}ms", ((us + 999) / 1000).max(1))
    }
}

/// An RFC 3339 UTC time (Anthropic's resets).
fn rfc3339(at: Micros) -> String {
    let day = ratewarden::calendar::DAY_US;
    let (y, m, d) = civil_from_days(at.div_euclid(day));
    let t = at.rem_euclid(day);
    let (hh, mm, ss) = (t / 3_600_000_000, t / MINUTE_US % 60, t / SECOND_US % 60);
    let ms = t % SECOND_US / 1000;
    if ms == 0 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Secondary;
    use ratewarden::upstream::{Dimension, parse};

    /// An upstream of 3 requests per 10 s whose run starts at `start`.
    fn upstream(style: Style, tokens: Option<u64>, start: Micros) -> Upstream {
        Upstream::new(
            UpstreamSpec {
                name: "u".into(),
                style,
                requests: 3,
                tokens,
                window: 10 * SECOND_US,
                secondary: Some(Secondary {
                    after: 1,
                    lockout: 30 * SECOND_US,
                }),
            },
            1,
            start,
            MINUTE_US,
        )
    }

    #[test]
    fn go_durations_and_rfc3339_times() {
        assert_eq!(go_duration(20_000), "20ms");
        assert_eq!(go_duration(1_500_000), "1.5s");
        assert_eq!(go_duration(90 * SECOND_US), "1m30s");
        assert_eq!(go_duration(6 * MINUTE_US), "6m0s");
        assert_eq!(rfc3339(1_764_563_401_000_000), "2025-12-01T04:30:01Z");
        assert_eq!(rfc3339(1_764_563_400_750_000), "2025-12-01T04:30:00.750Z");
    }

    /// Every style's headers, read back by core's parser, say what the upstream knows.
    #[test]
    fn every_style_is_read_back_by_the_parser() {
        let now = 1_764_563_404_000_000; // 4 s into a 10 s window
        for (style, tokens) in [
            (Style::Github, None),
            (Style::Openai, Some(1000)),
            (Style::Anthropic, Some(1000)),
            (Style::Ietf, None),
        ] {
            let mut u = upstream(style, tokens, now);
            assert!(matches!(u.call(now, 300), Answer::Ok));
            let h = u.headers(now, &Answer::Ok);
            let o = parse(h.iter().map(|(k, v)| (k.as_str(), v.as_str())), now);
            assert_eq!(o.warnings, Vec::<String>::new(), "{style:?}");
            let q = o.quota(Dimension::Requests).cloned();
            let q = q.unwrap_or_else(|| panic!("{style:?}: no requests quota in {h:?}"));
            assert_eq!((q.limit, q.remaining), (Some(3), Some(2)), "{style:?}");
            assert_eq!(q.reset.map(|d| d.as_secs()), Some(6), "{style:?}");
            let t = o.quota(Dimension::Tokens).map(|t| t.remaining);
            assert_eq!(t, tokens.map(|_| Some(700)), "{style:?}");
            let a = u.call(now, 800); // the tokens do not fit where counted
            let h = u.headers(now, &a);
            let o = parse(h.iter().map(|(k, v)| (k.as_str(), v.as_str())), now);
            if tokens.is_some() {
                assert!(matches!(a, Answer::TooMany { .. }), "{style:?}");
                assert_eq!(o.retry_after.map(|d| d.as_secs()), Some(6), "{style:?}");
            }
        }
    }

    #[test]
    fn the_secondary_limit_locks_out_after_too_many_over_quota_calls() {
        let mut u = upstream(Style::Github, None, 0);
        for _ in 0..3 {
            assert!(matches!(u.call(0, 0), Answer::Ok));
        }
        // The first over-quota call is told the reset; the second trips the lockout.
        assert!(
            matches!(u.call(0, 0), Answer::TooMany { retry_after } if retry_after == 10 * SECOND_US)
        );
        assert!(
            matches!(u.call(0, 0), Answer::TooMany { retry_after } if retry_after == 30 * SECOND_US)
        );
        // A new window does not lift it.
        assert!(matches!(u.call(12 * SECOND_US, 0), Answer::TooMany { .. }));
        assert!(matches!(u.call(30 * SECOND_US, 0), Answer::Ok));
        assert_eq!((u.stats.over_quota, u.stats.lockout_rejects), (2, 1));
        assert_eq!(u.stats.most_in_a_window, 3);
    }
}
