//! The predictive circuit breaker of a coordinated resource: `closed →
//! pre_emptive_open → open → half_open`, kept with its upstream state (one
//! atomic script on Redis, `lua/upstream.lua`, mirrors it rule for rule).
//!
//! - **Burn rate**: each response of the same window tells how fast the
//!   upstream's remaining falls; the breaker keeps a decaying average per
//!   dimension (each new rate weighs ¼).
//! - **Pre-emptive open**: when a fresh dimension's runway — what is left over
//!   the burn rate — is shorter than `horizon`, the breaker opens before the
//!   429: decisions carry `caps.max_tokens` (when configured), then, every
//!   `step`, `caps.model` walks the configured fallback chain. It closes again
//!   once every runway is at least twice the horizon (a reset rolls the
//!   quota over, so it recovers by itself).
//! - **Open**: a reported 429 or 5xx opens it for the response's
//!   `Retry-After` — or, without one, for `open_for`, doubled with every
//!   consecutive open (up to 16×). Everyone is denied until then.
//! - **Half-open**: then exactly one request — across every process — goes as
//!   the probe, holding the probe for `probe_lease` (a probe that never
//!   reports frees it then); the others are told to look again within `pace`.
//!   The next success reported closes the breaker; a failure opens it again.

use super::light::{Coordination, Sample, UpstreamState};
use crate::clock::Micros;

/// The breaker's configuration (`upstream.breaker` in the policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Pre-emptive open when a runway is shorter than this (0: never; default 10 s).
    pub horizon: Micros,
    /// `caps.max_tokens` while pre-emptively open (0: none).
    pub max_tokens: i64,
    /// Fallback models, walked one per `step` while pre-emptively open.
    pub fallback: Vec<std::sync::Arc<str>>,
    /// How long each stage of the walk lasts (default 10 s).
    pub step: Micros,
    /// How long a reported 429 or 5xx without `Retry-After` opens it first
    /// (default 5 s; doubled with every consecutive open, up to 16×).
    pub open_for: Micros,
    /// How long the half-open probe is held without a report (default 30 s).
    pub probe_lease: Micros,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            horizon: 10_000_000,
            max_tokens: 0,
            fallback: Vec::new(),
            step: 10_000_000,
            open_for: 5_000_000,
            probe_lease: 30_000_000,
        }
    }
}

/// The largest burn rate kept (units per second): `rate × horizon` stays
/// exact in a Redis script's doubles.
pub const MAX_BURN: i64 = 1 << 29;

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BreakerState {
    /// Normal operation.
    #[default]
    Closed,
    /// A runway is shorter than the horizon: load is capped before the 429.
    PreEmptiveOpen,
    /// A 429 or 5xx was reported: everyone waits.
    Open,
    /// One probe may go; its outcome closes or re-opens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `pre_emptive_open`, `open` or `half_open`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::PreEmptiveOpen => "pre_emptive_open",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The state of a script's code: 0 closed, 1 pre-emptive, 2 open,
    /// 3 half-open (anything else is `Closed`).
    #[must_use]
    pub const fn of_code(code: i64) -> Self {
        match code {
            1 => Self::PreEmptiveOpen,
            2 => Self::Open,
            3 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The breaker as a backend keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breaker {
    /// The stored state (an open one whose time is up is half-open: see
    /// [`Breaker::at`]).
    pub state: BreakerState,
    /// Open until (µs since the epoch).
    pub until: Micros,
    /// Half-open: the probe out holds it until then (0: no probe out).
    pub probe: Micros,
    /// Pre-emptively open since (the fallback walk counts from it).
    pub since: Micros,
    /// Consecutive opens.
    pub opens: i64,
}

impl Breaker {
    /// The state at `now`: open turns half-open when its time is up.
    #[must_use]
    pub const fn at(&self, now: Micros) -> BreakerState {
        match self.state {
            BreakerState::Open if now >= self.until => BreakerState::HalfOpen,
            s => s,
        }
    }
}

/// What a response's status says to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// Not given (`observe` without a status).
    #[default]
    Unknown,
    /// Below 400.
    Success,
    /// 429 or 5xx.
    Failure,
    /// Another 4xx: the caller's fault, nothing about the upstream's health.
    Neither,
}

impl Outcome {
    /// The outcome of an HTTP status.
    #[must_use]
    pub const fn of_status(status: Option<u16>) -> Self {
        match status {
            None => Self::Unknown,
            Some(s) if s < 400 => Self::Success,
            Some(s) if s == 429 || s >= 500 => Self::Failure,
            Some(_) => Self::Neither,
        }
    }

    /// 0 unknown, 1 success, 2 failure, 3 neither (the scripts' encoding).
    #[must_use]
    pub const fn code(self) -> i64 {
        match self {
            Self::Unknown => 0,
            Self::Success => 1,
            Self::Failure => 2,
            Self::Neither => 3,
        }
    }
}

/// Largest doubling of `open_for` (16×).
const MAX_DOUBLINGS: i64 = 4;

impl UpstreamState {
    /// The breaker's part of an observation, after the readings were merged.
    pub(super) fn breaker_observe(&mut self, sample: &Sample, now: Micros, c: &Coordination) {
        let b = &mut self.breaker;
        match sample.outcome {
            Outcome::Failure => {
                let state = b.at(now);
                if state != BreakerState::Open {
                    b.opens += 1;
                }
                let doublings = (b.opens - 1).clamp(0, MAX_DOUBLINGS);
                let time = sample.block.unwrap_or(c.breaker.open_for << doublings);
                b.until = if state == BreakerState::Open {
                    b.until.max(now + time)
                } else {
                    now + time
                };
                b.state = BreakerState::Open;
                b.probe = 0;
                b.since = 0;
                return;
            }
            Outcome::Success if b.at(now) == BreakerState::HalfOpen => {
                *b = Breaker::default();
            }
            _ => {}
        }
        self.pre_empt(now, c);
    }

    /// Opens pre-emptively when a runway is short, closes again when every
    /// runway is long (only from closed or pre-emptive).
    pub(super) fn pre_empt(&mut self, now: Micros, c: &Coordination) {
        let fresh = std::array::from_fn(|i| self.dims[i].fresh(now, c.ttl));
        self.pre_empt_fresh(now, c, &fresh);
    }

    /// [`UpstreamState::pre_empt`] knowing which readings are fresh.
    pub(super) fn pre_empt_fresh(
        &mut self,
        now: Micros,
        c: &Coordination,
        fresh: &[bool; super::light::DIMENSIONS],
    ) {
        let horizon_ms = c.breaker.horizon / 1000;
        if horizon_ms <= 0 {
            return;
        }
        let (mut short, mut long) = (false, true);
        for (r, fresh) in self.dims.iter().zip(fresh) {
            if r.burn > 0 && *fresh {
                let left = r.left() * 1000;
                short |= left < r.burn * horizon_ms;
                long &= left >= 2 * r.burn * horizon_ms;
            }
        }
        let b = &mut self.breaker;
        match b.state {
            BreakerState::Closed if short => {
                b.state = BreakerState::PreEmptiveOpen;
                b.since = now;
            }
            BreakerState::PreEmptiveOpen if long => {
                b.state = BreakerState::Closed;
                b.since = 0;
            }
            _ => {}
        }
    }

    /// While pre-emptively open: `(max_tokens, fallback index)` to cap with.
    #[must_use]
    pub fn pre_emptive_caps(&self, now: Micros, c: &BreakerConfig) -> (Option<i64>, Option<usize>) {
        if self.breaker.state != BreakerState::PreEmptiveOpen {
            return (None, None);
        }
        let max_tokens = (c.max_tokens > 0).then_some(c.max_tokens);
        let stage = (now - self.breaker.since).max(0) / c.step.max(1);
        let walk = stage - i64::from(max_tokens.is_some());
        let model = (walk >= 0 && !c.fallback.is_empty()).then(|| {
            usize::try_from(walk)
                .unwrap_or(usize::MAX)
                .min(c.fallback.len() - 1)
        });
        (max_tokens, model)
    }
}
