//! The traffic light: what the upstream's observed state means for the next
//! request, decided here once for every backend (the Redis script
//! `lua/upstream.lua` mirrors it rule for rule; the conformance tests hold
//! them together).
//!
//! **State.** Per dimension (requests, tokens, input and output tokens) a
//! resource keeps the last [`Reading`]: the upstream's limit and remaining,
//! when it resets, when it was seen, and how much this system admitted since
//! (`spent`) — so N agents in flight between two responses do not all see
//! the same remaining. At its reset a reading **rolls over**: the quota is
//! replenished, so the estimate becomes its whole limit (less what is
//! admitted after), its next reset unknown — rather than nothing known, which
//! would let every waiting agent rush the new window at once. A reading
//! without a reset (or rolled over) is trusted for `ttl` after it was seen
//! (rolled: after its reset); past that it is stale and ignored. A response within the same window (the same limit, its reset no
//! later than the stored one plus [`WINDOW_SLACK`]) can only lower the
//! estimate — a reply to an older request arriving late never raises it; a
//! later window, or another limit, replaces it.
//!
//! **Zones.** From the tightest fresh dimension's share left:
//! green above `green` (default 40%), amber down to `red` (15%), red below.
//! Per priority:
//! - critical passes (unless the upstream is blocked or a dimension is
//!   exhausted — the upstream would refuse it anyway);
//! - amber: standard and background callers get `caps.delay_ms`, growing
//!   linearly from 0 at the top of amber to their tier's maximum at the
//!   bottom (background's maximum is the larger: it yields first); a delay
//!   that would reach past the window's reset waits for the reset instead
//!   (the request would otherwise count in one window and spend in the
//!   next), and one whose reset is unknown is a denial to ask again after
//!   the delay (counted when it goes);
//! - red: background is denied until the tightest dimension resets; standard
//!   is paced to one request per `pace` across every process (the next one
//!   is told when its turn comes);
//! - blocked (the upstream said `Retry-After`, or a 429 was reported) or a
//!   dimension without room for the request: everyone is denied until then.

use std::time::Duration;

use super::breaker::{Breaker, BreakerConfig, BreakerState, MAX_BURN, Outcome};
use super::cascade::{Cascade, CascadeConfig};
use super::{Dimension, Observation};
use crate::clock::Micros;
use crate::priority::Priority;

/// The number of dimensions a resource tracks.
pub const DIMENSIONS: usize = 4;

/// A response whose reset is at most this much later than the stored one is
/// from the same window (resets given as durations drift by the network's
/// latency).
pub const WINDOW_SLACK: Micros = 1_000_000;

/// Largest limit or remaining kept: a reading past it is treated as no
/// constraint (and its arithmetic stays exact in a Redis script's doubles).
pub const MAX_READING: u64 = 1 << 40;

impl Dimension {
    /// Every dimension, in the order of [`Dimension::index`].
    pub const ALL: [Self; DIMENSIONS] = [
        Self::Requests,
        Self::Tokens,
        Self::InputTokens,
        Self::OutputTokens,
    ];

    /// Position in [`Dimension::ALL`].
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// How a resource coordinates on its upstream (`upstream:` under a resource
/// in the policy). Shares are in ‰ of the quota, times in µs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    /// Green while more than this is left (‰; default 400).
    pub green: u16,
    /// Red below this (‰; default 150). Amber in between.
    pub red: u16,
    /// Longest amber delay for standard callers (default 500 ms).
    pub delay_standard: Micros,
    /// Longest amber delay for background callers (default 2 s).
    pub delay_background: Micros,
    /// In red, standard callers go one per this interval across every process
    /// (default 1 s).
    pub pace: Micros,
    /// How long a reading without a reset is trusted (default 60 s).
    pub ttl: Micros,
    /// The predictive circuit breaker (`breaker:`).
    pub breaker: BreakerConfig,
    /// The cascade detector (`cascade:`).
    pub cascade: CascadeConfig,
}

impl Default for Coordination {
    fn default() -> Self {
        Self {
            green: 400,
            red: 150,
            delay_standard: 500_000,
            delay_background: 2_000_000,
            pace: 1_000_000,
            ttl: 60_000_000,
            breaker: BreakerConfig::default(),
            cascade: CascadeConfig::default(),
        }
    }
}

/// The traffic light of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Zone {
    /// Nothing fresh is known about the upstream: no throttling.
    #[default]
    Unknown,
    /// Plenty left: no throttling.
    Green,
    /// Running low: lower tiers are delayed.
    Amber,
    /// Nearly gone (or the upstream said wait): background denied, standard paced.
    Red,
}

impl Zone {
    /// `unknown`, `green`, `amber` or `red`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Green => "green",
            Self::Amber => "amber",
            Self::Red => "red",
        }
    }

    /// The zone of a script's code: 0 unknown, 1 green, 2 amber, 3 red
    /// (anything else is `Unknown`).
    #[must_use]
    pub const fn of_code(code: i64) -> Self {
        match code {
            1 => Self::Green,
            2 => Self::Amber,
            3 => Self::Red,
            _ => Self::Unknown,
        }
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last thing the upstream said about one dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    /// Its limit (when the headers give none: the most seen remaining).
    pub limit: i64,
    /// Remaining, as observed (or lowered by a late reply of the same window).
    pub remaining: i64,
    /// Admitted by this system since it was observed.
    pub spent: i64,
    /// When it resets, µs since the epoch (0: the headers said not).
    pub reset_at: Micros,
    /// When it was observed, µs since the epoch (0: never).
    pub seen_at: Micros,
    /// What the upstream itself last said was left (the burn rate's input).
    pub observed: i64,
    /// How fast the upstream's remaining falls, units per second (a
    /// decaying average; 0: not known).
    pub burn: i64,
}

impl Reading {
    /// Until when it is trusted.
    #[must_use]
    pub const fn expires(&self, ttl: Micros) -> Micros {
        if self.reset_at > 0 {
            self.reset_at
        } else {
            self.seen_at.saturating_add(ttl)
        }
    }

    /// Whether it is trusted at `now`.
    #[must_use]
    pub const fn fresh(&self, now: Micros, ttl: Micros) -> bool {
        self.seen_at > 0 && now < self.expires(ttl)
    }

    /// The reading at `now`: past its reset, the replenished quota (the
    /// whole limit, nothing spent, seen at the reset, next reset unknown).
    #[must_use]
    pub const fn rolled(self, now: Micros) -> Self {
        if self.seen_at > 0 && self.reset_at > 0 && now >= self.reset_at {
            Self {
                limit: self.limit,
                remaining: self.limit,
                spent: 0,
                reset_at: 0,
                seen_at: self.reset_at,
                observed: self.limit,
                burn: self.burn,
            }
        } else {
            self
        }
    }

    /// Until when a caller it refuses should wait: its reset when known,
    /// else at most `pace` (the next response may tell more).
    #[must_use]
    pub fn wait(&self, now: Micros, c: &Coordination) -> Micros {
        if self.reset_at > 0 {
            self.reset_at - now
        } else {
            (self.expires(c.ttl) - now).min(c.pace)
        }
    }

    /// The estimate of what is left: observed remaining minus admitted since.
    #[must_use]
    pub fn left(&self) -> i64 {
        (self.remaining - self.spent).max(0)
    }

    /// [`Reading::left`] in ‰ of the limit (rounded down).
    #[must_use]
    pub fn permille(&self) -> i64 {
        if self.limit <= 0 {
            0
        } else {
            (self.left() * 1000 / self.limit).min(1000)
        }
    }
}

/// A resource's observed upstream state, as a backend keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamState {
    /// One reading per dimension, by [`Dimension::index`] (`seen_at` 0: none).
    pub dims: [Reading; DIMENSIONS],
    /// Everyone waits until then (µs since the epoch; 0: not blocked).
    pub blocked_until: Micros,
    /// In red, the next standard request may go at (µs since the epoch).
    pub pace_next: Micros,
    /// The predictive circuit breaker.
    pub breaker: Breaker,
    /// The cascade detector.
    pub cascade: Cascade,
}

/// A backend's answer to [`crate::backend::Backend::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The state after the observation.
    pub state: UpstreamState,
    /// The backend's time of it (µs since the epoch).
    pub now: Micros,
    /// The zone before it.
    pub before: Zone,
    /// The breaker's state before it.
    pub breaker_before: BreakerState,
    /// Whether sequential mode was on before it.
    pub cascade_before: bool,
}

/// One dimension of a response, validated for storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The limit, when the headers give it.
    pub limit: Option<i64>,
    /// What is left.
    pub remaining: i64,
    /// Until it resets, when the headers say.
    pub reset: Option<Micros>,
}

/// What one response tells a backend: the dimensions it reports and how long
/// everyone must wait, if it says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// By [`Dimension::index`].
    pub dims: [Option<Seen>; DIMENSIONS],
    /// Everyone waits this long from now (µs).
    pub block: Option<Micros>,
    /// What the response's status says to the breaker.
    pub outcome: Outcome,
}

impl Sample {
    /// What `observation` (of a response with `status`, if known) tells the
    /// backend. Of several quotas of one dimension (draft-11 lists name
    /// several) the one with the smallest share left counts. A quota
    /// without `remaining` says nothing; one past [`MAX_READING`] is no
    /// constraint (a warning says so). The upstream asks everyone to wait
    /// when it sends `Retry-After`/`retry-after-ms`, or — with a 429 and no
    /// such header — until the earliest reset of an exhausted quota (without
    /// either, the breaker's `open_for` decides).
    #[must_use]
    pub fn of(observation: &Observation, status: Option<u16>) -> (Self, Vec<String>) {
        let mut sample = Self {
            outcome: Outcome::of_status(status),
            ..Self::default()
        };
        let mut warnings = Vec::new();
        for q in &observation.quotas {
            let Some(remaining) = q.remaining else {
                continue;
            };
            if remaining > MAX_READING || q.limit.is_some_and(|l| l > MAX_READING) {
                warnings.push(format!(
                    "the {} quota reports more than 2^40 ({}), treated as no constraint",
                    q.dimension.as_str(),
                    q.limit.unwrap_or(remaining).max(remaining)
                ));
                continue;
            }
            let remaining = to_i64(remaining);
            // An inconsistent limit below remaining is no limit at all.
            let limit = q.limit.map(to_i64).filter(|&l| l >= remaining && l > 0);
            let seen = Seen {
                limit,
                remaining,
                reset: q.reset.map(micros),
            };
            let slot = &mut sample.dims[q.dimension.index()];
            *slot = Some(match *slot {
                Some(prev) if tighter(&prev, &seen) => prev,
                _ => seen,
            });
        }
        sample.block = match observation.retry_after {
            Some(d) if !d.is_zero() => Some(micros(d)),
            Some(_) => None,
            None if status == Some(429) => sample
                .dims
                .iter()
                .flatten()
                .filter(|s| s.remaining == 0)
                .filter_map(|s| s.reset)
                .filter(|&r| r > 0)
                .min(),
            None => None,
        };
        (sample, warnings)
    }

    /// Whether it tells nothing (a read).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.block.is_none()
            && self.outcome == Outcome::Unknown
            && self.dims.iter().all(Option::is_none)
    }
}

/// Whether `a` leaves a smaller share than `b` (unknown limits count as full).
fn tighter(a: &Seen, b: &Seen) -> bool {
    let share = |s: &Seen| {
        (
            i128::from(s.remaining),
            i128::from(s.limit.unwrap_or(s.remaining).max(1)),
        )
    };
    let ((ra, la), (rb, lb)) = (share(a), share(b));
    ra * lb < rb * la
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn micros(d: Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}

/// What a request asks of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// The caller's tier.
    pub priority: Priority,
    /// Per dimension, by [`Dimension::index`].
    pub amounts: [i64; DIMENSIONS],
    /// Whether an admitted request counts (acquire, reserve) or is only
    /// evaluated (check).
    pub mutate: bool,
}

/// How a request fares at the light.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go.
    Pass,
    /// Go after this long (µs): `caps.delay_ms`.
    Delay(Micros),
    /// Do not go; try again after `retry` µs.
    Deny {
        /// Until the request could pass, µs.
        retry: Micros,
        /// Why.
        why: Why,
    },
}

/// Why the light denied a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The upstream asked everyone to wait (`Retry-After`, a reported 429).
    Blocked,
    /// This dimension has no room left for the request.
    Exhausted(Dimension),
    /// Red: background callers wait for the reset.
    Red,
    /// Red: standard callers go one per `pace`; this one's turn is later.
    Paced,
    /// The breaker is open (a 429 or 5xx was reported).
    Open,
    /// The breaker is half-open and its one probe is out.
    Probing,
    /// Amber, but its delay would reach past the window's reset (or the
    /// reset is unknown): it asks again at the reset (or after the delay) and
    /// counts then.
    Deferred,
}

impl Why {
    /// The reason of a script's code — 0 blocked, 1 exhausted (`dimension`
    /// says which), 2 red, 3 paced, 4 deferred, 5 open, 6 probing — or
    /// `None` for anything else.
    #[must_use]
    pub fn of_code(code: i64, dimension: Option<Dimension>) -> Option<Self> {
        Some(match code {
            0 => Self::Blocked,
            1 => Self::Exhausted(dimension?),
            2 => Self::Red,
            3 => Self::Paced,
            4 => Self::Deferred,
            5 => Self::Open,
            6 => Self::Probing,
            _ => return None,
        })
    }
}

/// The light as a decision reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Light {
    /// The zone.
    pub zone: Zone,
    /// Share left of the tightest fresh dimension, ‰ (`None`: nothing fresh).
    pub left: Option<u16>,
    /// That dimension.
    pub dimension: Option<Dimension>,
    /// The breaker's state.
    pub breaker: BreakerState,
    /// Whether this request went as the half-open breaker's one probe
    /// (report its response: it closes or re-opens the breaker).
    pub probe: bool,
    /// Whether the resource is in sequential mode (the cascade detector saw a
    /// burst of denials): go one at a time (`caps.sequential`).
    pub sequential: bool,
    /// `Some(true)` when this decision's denial switched sequential mode on,
    /// `Some(false)` when it found it over and switched it off.
    pub cascade: Option<bool>,
}

/// What to undo if the limits deny a request the light let through: the
/// amounts it counted on the readings it counted them on, and the pacing
/// turn it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ticket {
    /// Counted per dimension.
    pub amounts: [i64; DIMENSIONS],
    /// The `seen_at` of each reading counted on (0: not counted).
    pub seen: [Micros; DIMENSIONS],
    /// The pacing turn taken: `(before, after)` of `pace_next`.
    pub pace: Option<(Micros, Micros)>,
    /// The half-open probe taken: its lease's end.
    pub probe: Option<Micros>,
    /// Set when the limits denied the request: the denial counts for the
    /// cascade detector.
    pub denied: bool,
}

/// A request's pass through the light.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// The light.
    pub light: Light,
    /// The outcome.
    pub verdict: Verdict,
    /// What was counted (an admitted, mutating pass), to give back if the
    /// limits then deny.
    pub ticket: Option<Ticket>,
    /// While pre-emptively open: `caps.max_tokens`.
    pub max_tokens: Option<i64>,
    /// While pre-emptively open: the fallback model to use (its index in
    /// the breaker's `fallback`).
    pub model: Option<usize>,
    /// Whether this request is the half-open breaker's one probe.
    pub probe: bool,
}

impl UpstreamState {
    /// The light at `now`: the tightest fresh dimension decides; blocked (or
    /// an open breaker) is red.
    #[must_use]
    pub fn light(&self, now: Micros, c: &Coordination) -> Light {
        self.light_of(now, c, true)
    }

    /// [`UpstreamState::light`]; `roll: false` when the readings were just
    /// rolled over (a decision's hot path).
    fn light_of(&self, now: Micros, c: &Coordination, roll: bool) -> Light {
        let mut tightest: Option<(i64, Dimension)> = None;
        for d in Dimension::ALL {
            let r = &self.dims[d.index()];
            let rolled;
            let r = if roll && r.reset_at > 0 && now >= r.reset_at {
                rolled = r.rolled(now);
                &rolled
            } else {
                r
            };
            if r.fresh(now, c.ttl) {
                let p = r.permille();
                if tightest.is_none_or(|(q, _)| p < q) {
                    tightest = Some((p, d));
                }
            }
        }
        self.light_at(now, c, tightest)
    }

    /// Which readings are fresh at `now` (one look per dimension, shared by
    /// every step of a decision).
    fn fresh(&self, now: Micros, ttl: Micros) -> [bool; DIMENSIONS] {
        std::array::from_fn(|i| self.dims[i].fresh(now, ttl))
    }

    /// [`UpstreamState::light_of`] of a rolled state whose fresh readings are `fresh`.
    fn light_from(&self, now: Micros, c: &Coordination, fresh: &[bool; DIMENSIONS]) -> Light {
        let mut tightest: Option<(i64, Dimension)> = None;
        for d in Dimension::ALL {
            if fresh[d.index()] {
                let p = self.dims[d.index()].permille();
                if tightest.is_none_or(|(q, _)| p < q) {
                    tightest = Some((p, d));
                }
            }
        }
        self.light_at(now, c, tightest)
    }

    /// The light given the tightest fresh reading (‰ left, dimension).
    fn light_at(&self, now: Micros, c: &Coordination, tightest: Option<(i64, Dimension)>) -> Light {
        let breaker = self.breaker.at(now);
        let zone = match tightest {
            _ if self.blocked_until > now || breaker == BreakerState::Open => Zone::Red,
            None => Zone::Unknown,
            Some((p, _)) if p > i64::from(c.green) => Zone::Green,
            Some((p, _)) if p >= i64::from(c.red) => Zone::Amber,
            Some(_) => Zone::Red,
        };
        Light {
            zone,
            left: tightest.map(|(p, _)| u16::try_from(p).unwrap_or(1000)),
            dimension: tightest.map(|(_, d)| d),
            breaker,
            probe: false,
            sequential: self.cascade.sequential(now),
            cascade: None,
        }
    }

    /// Rolls every reading past its reset over ([`Reading::rolled`]).
    pub fn roll(&mut self, now: Micros) {
        for r in &mut self.dims {
            if r.reset_at > 0 && now >= r.reset_at {
                *r = r.rolled(now);
            }
        }
    }

    /// Records what a response said (see the module docs and
    /// [`super::breaker`], [`super::cascade`]); returns the zone, breaker
    /// state and sequential mode before.
    pub fn observe(
        &mut self,
        sample: &Sample,
        now: Micros,
        c: &Coordination,
    ) -> (Zone, BreakerState, bool) {
        self.roll(now);
        let before = (
            self.light(now, c).zone,
            self.breaker.at(now),
            self.cascade.sequential(now),
        );
        self.settle_cascade(now);
        for (i, seen) in sample.dims.iter().enumerate() {
            let Some(s) = seen else { continue };
            let prev = self.dims[i];
            let fresh = prev.fresh(now, c.ttl);
            let reset_at = s.reset.map_or(0, |r| now.saturating_add(r));
            let same_window = fresh
                && s.limit.is_none_or(|l| l == prev.limit)
                && (reset_at == 0
                    || prev.reset_at == 0
                    || reset_at <= prev.reset_at.saturating_add(WINDOW_SLACK));
            let remaining = if same_window {
                s.remaining.min(prev.left())
            } else {
                s.remaining
            };
            let limit = s.limit.unwrap_or(if fresh {
                prev.limit.max(s.remaining)
            } else {
                s.remaining
            });
            // The burn rate: how fast the upstream's own remaining fell since
            // the last response of this window (a decaying average, ¼ new).
            let dt_ms = (now - prev.seen_at) / 1000;
            let burn = if same_window && dt_ms >= 1 {
                let rate = ((prev.observed - s.remaining).max(0) * 1000 / dt_ms).min(MAX_BURN);
                if prev.burn == 0 {
                    rate
                } else {
                    (3 * prev.burn + rate) / 4
                }
            } else {
                prev.burn
            };
            self.dims[i] = Reading {
                limit,
                remaining,
                spent: 0,
                reset_at: if reset_at == 0 && same_window {
                    prev.reset_at
                } else {
                    reset_at
                },
                seen_at: now,
                observed: s.remaining,
                burn,
            };
        }
        if let Some(b) = sample.block {
            self.blocked_until = self.blocked_until.max(now.saturating_add(b));
        }
        if sample.outcome == Outcome::Failure {
            self.note_denial(now, c);
        }
        self.breaker_observe(sample, now, c);
        before
    }

    /// Passes a request through the breaker and the light at `now` (see the
    /// module docs); a mutating pass keeps what it changed (the amounts
    /// counted, a pacing turn, the half-open probe), a check changes nothing.
    pub fn gate(&mut self, ask: &Ask, now: Micros, c: &Coordination) -> Gate {
        if !ask.mutate {
            let mut scratch = *self;
            return scratch.pass(ask, now, c);
        }
        let settled = self.settle_cascade(now);
        let mut gate = self.pass(ask, now, c);
        let noted = match gate.verdict {
            Verdict::Deny { .. } => self.note_denial(now, c),
            _ => None,
        };
        gate.light.cascade = noted.or(settled);
        if noted.is_some() {
            gate.light.sequential = self.cascade.sequential(now);
        }
        gate
    }

    fn pass(&mut self, ask: &Ask, now: Micros, c: &Coordination) -> Gate {
        self.roll(now);
        let fresh = self.fresh(now, c.ttl);
        self.pre_empt_fresh(now, c, &fresh);
        let light = self.light_from(now, c, &fresh);
        let deny = |retry: Micros, why| Gate {
            light,
            verdict: Verdict::Deny {
                retry: retry.max(1),
                why,
            },
            ticket: None,
            max_tokens: None,
            model: None,
            probe: false,
        };
        if light.breaker == BreakerState::Open {
            return deny(self.breaker.until - now, Why::Open);
        }
        if self.blocked_until > now {
            return deny(self.blocked_until - now, Why::Blocked);
        }
        for d in Dimension::ALL {
            let r = &self.dims[d.index()];
            let want = ask.amounts[d.index()];
            if want > 0 && fresh[d.index()] && r.left() < want {
                return deny(r.wait(now, c), Why::Exhausted(d));
            }
        }
        let mut ticket = Ticket::default();
        let probe = light.breaker == BreakerState::HalfOpen;
        let verdict = if probe {
            // Exactly one request goes as the probe; the rest look again soon.
            if self.breaker.probe > now {
                return deny((self.breaker.probe - now).min(c.pace), Why::Probing);
            }
            let lease = now + c.breaker.probe_lease;
            self.breaker.state = BreakerState::HalfOpen;
            self.breaker.probe = lease;
            ticket.probe = Some(lease);
            Verdict::Pass
        } else {
            match (light.zone, ask.priority) {
                (Zone::Unknown | Zone::Green, _) | (_, Priority::Critical) => Verdict::Pass,
                (Zone::Amber, tier) => {
                    let top = if tier == Priority::Background {
                        c.delay_background
                    } else {
                        c.delay_standard
                    };
                    let depth = i64::from(c.green) - i64::from(light.left.unwrap_or(0));
                    let span = (i64::from(c.green) - i64::from(c.red)).max(1);
                    let delay = top * depth.clamp(0, span) / span;
                    // A delay that could carry the request past the window's
                    // reset would spend the next window's quota on this one's
                    // count: it waits for the reset instead — or, the reset
                    // unknown, asks again after the delay (and counts then).
                    let reset = light.dimension.map_or(0, |d| self.dims[d.index()].reset_at);
                    if delay > 0 && reset == 0 {
                        return deny(delay, Why::Deferred);
                    }
                    if delay > 0 && now + delay >= reset {
                        return deny(reset - now, Why::Deferred);
                    }
                    Verdict::Delay(delay)
                }
                (Zone::Red, Priority::Background) => {
                    let wait = light
                        .dimension
                        .map_or(c.pace, |d| self.dims[d.index()].wait(now, c));
                    return deny(wait, Why::Red);
                }
                (Zone::Red, Priority::Standard) => {
                    if self.pace_next > now {
                        return deny(self.pace_next - now, Why::Paced);
                    }
                    ticket.pace = Some((self.pace_next, now + c.pace));
                    self.pace_next = now + c.pace;
                    Verdict::Pass
                }
            }
        };
        for d in Dimension::ALL {
            let i = d.index();
            let r = &mut self.dims[i];
            if ask.amounts[i] > 0 && fresh[i] {
                r.spent += ask.amounts[i];
                ticket.amounts[i] = ask.amounts[i];
                ticket.seen[i] = r.seen_at;
            }
        }
        let (max_tokens, model) = self.pre_emptive_caps(now, &c.breaker);
        Gate {
            light: Light { probe, ..light },
            verdict,
            ticket: ask.mutate.then_some(ticket),
            max_tokens,
            model,
            probe,
        }
    }

    /// Gives back what `ticket` counted, where nothing newer replaced it;
    /// a denial by the limits counts for the cascade detector (`Some(true)`
    /// when it switched sequential mode on).
    pub fn ungate(&mut self, ticket: &Ticket, now: Micros, c: &Coordination) -> Option<bool> {
        for i in 0..DIMENSIONS {
            let r = &mut self.dims[i];
            if ticket.seen[i] > 0 && r.seen_at == ticket.seen[i] {
                r.spent = (r.spent - ticket.amounts[i]).max(0);
            }
        }
        if let Some((before, after)) = ticket.pace {
            if self.pace_next == after {
                self.pace_next = before;
            }
        }
        if let Some(lease) = ticket.probe {
            if self.breaker.state == BreakerState::HalfOpen && self.breaker.probe == lease {
                self.breaker.probe = 0;
            }
        }
        if ticket.denied {
            return self.note_denial(now, c);
        }
        None
    }

    /// How it looks at `now`, for people and dashboards.
    #[must_use]
    pub fn view(&self, resource: &str, now: Micros, c: &Coordination) -> UpstreamView {
        let mut rolled = *self;
        rolled.roll(now);
        let light = rolled.light(now, c);
        UpstreamView {
            resource: resource.to_owned(),
            zone: light.zone,
            left: light.left,
            blocked: (self.blocked_until > now).then(|| until(self.blocked_until, now)),
            breaker: light.breaker,
            sequential: self
                .cascade
                .sequential(now)
                .then(|| until(self.cascade.until, now)),
            quotas: Dimension::ALL
                .iter()
                .filter_map(|&d| {
                    let r = &rolled.dims[d.index()];
                    r.fresh(now, c.ttl).then(|| QuotaView {
                        dimension: d,
                        limit: r.limit,
                        remaining: r.left(),
                        observed: r.remaining,
                        reset: (r.reset_at > 0).then(|| until(r.reset_at, now)),
                        age: until(now, r.seen_at),
                        burn: r.burn,
                    })
                })
                .collect(),
            previous: light.zone,
            warnings: Vec::new(),
        }
    }
}

fn until(at: Micros, now: Micros) -> Duration {
    Duration::from_micros(u64::try_from(at - now).unwrap_or(0))
}

/// One fresh dimension of an [`UpstreamView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaView {
    /// What it counts.
    pub dimension: Dimension,
    /// Its limit (the most seen remaining when the headers give none).
    pub limit: i64,
    /// The estimate of what is left now: observed minus admitted since.
    pub remaining: i64,
    /// What the upstream last said was left.
    pub observed: i64,
    /// Until it resets, when the upstream said.
    pub reset: Option<Duration>,
    /// How long ago it was observed.
    pub age: Duration,
    /// How fast the upstream's remaining falls, units per second (0: not known).
    pub burn: i64,
}

/// A resource's upstream state as every process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamView {
    /// The resource.
    pub resource: String,
    /// Its traffic light now.
    pub zone: Zone,
    /// Share left of the tightest fresh dimension, ‰.
    pub left: Option<u16>,
    /// How long everyone must still wait, if the upstream said so.
    pub blocked: Option<Duration>,
    /// The predictive circuit breaker's state.
    pub breaker: BreakerState,
    /// How long sequential mode still lasts (the cascade detector saw a
    /// burst of denials or failures), if it is on.
    pub sequential: Option<Duration>,
    /// The fresh dimensions.
    pub quotas: Vec<QuotaView>,
    /// The zone before the response that produced this view (the same as
    /// `zone` for a read).
    pub previous: Zone,
    /// Header values that could not be used, one line each.
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c() -> Coordination {
        Coordination::default()
    }

    fn seen(limit: i64, remaining: i64, reset_s: i64) -> Sample {
        let mut s = Sample::default();
        s.dims[0] = Some(Seen {
            limit: Some(limit),
            remaining,
            reset: Some(reset_s * 1_000_000),
        });
        s
    }

    fn ask(priority: Priority) -> Ask {
        Ask {
            priority,
            amounts: [1, 0, 0, 0],
            mutate: true,
        }
    }

    #[test]
    fn a_late_reply_of_the_same_window_never_raises_the_estimate() {
        let mut s = UpstreamState::default();
        s.observe(&seen(100, 50, 60), 1_000_000, &c());
        s.observe(&seen(100, 80, 60), 1_500_000, &c());
        assert_eq!(s.dims[0].remaining, 50);
        // A later window replaces it.
        s.observe(&seen(100, 90, 120), 2_000_000, &c());
        assert_eq!(s.dims[0].remaining, 90);
        // So does another limit (the upstream changed the quota).
        s.observe(&seen(1000, 500, 120), 2_000_001, &c());
        assert_eq!((s.dims[0].limit, s.dims[0].remaining), (1000, 500));
    }

    #[test]
    fn amber_delay_grows_linearly_and_background_yields_first() {
        let mut s = UpstreamState::default();
        s.observe(&seen(1000, 275, 60), 1, &c());
        let g = s.gate(&ask(Priority::Standard), 2, &c());
        assert_eq!(g.verdict, Verdict::Delay(250_000));
        let g = s.gate(&ask(Priority::Background), 2, &c());
        // 274 left after the standard one: (400 - 274) / 250 of 2 s.
        assert_eq!(g.verdict, Verdict::Delay(2_000_000 * 126 / 250));
        assert_eq!(
            s.gate(&ask(Priority::Critical), 2, &c()).verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn ungate_gives_back_only_what_nothing_replaced() {
        let mut s = UpstreamState::default();
        s.observe(&seen(100, 10, 60), 1, &c());
        let g = s.gate(&ask(Priority::Standard), 2, &c());
        assert_eq!(s.pace_next, 1_000_002);
        let t = g.ticket.expect("counted");
        s.ungate(&t, 5, &c());
        assert_eq!((s.dims[0].spent, s.pace_next), (0, 0));
        let t = s
            .gate(&ask(Priority::Standard), 3, &c())
            .ticket
            .expect("counted");
        s.observe(&seen(100, 9, 60), 4, &c());
        s.ungate(&t, 5, &c());
        assert_eq!(s.dims[0].spent, 0, "the new reading stands");
    }
}
