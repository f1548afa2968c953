//! The cascade detector of a coordinated resource: when `denials` callers
//! are denied on it (or 429s / 5xx are reported) within `within`, it switches
//! to **sequential mode** for `cooldown` — every admission carries
//! `caps.sequential`, telling callers to go one at a time (the resource's
//! ordered lock) instead of retrying together. Each further burst renews the
//! cooldown. Kept with the upstream state (one script on Redis,
//! `lua/upstream.lua`, mirrors it).

use super::light::{Coordination, UpstreamState};
use crate::clock::Micros;

/// The most denials a burst can be configured to take.
pub const MAX_DENIALS: usize = 16;

/// The detector's configuration (`upstream.cascade` in the policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CascadeConfig {
    /// Denials (or reported failures) that make a burst (0: off; default 3).
    pub denials: u8,
    /// Within this long (default 30 s).
    pub within: Micros,
    /// Sequential mode lasts this long after the last burst (default 60 s).
    pub cooldown: Micros,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        Self {
            denials: 3,
            within: 30_000_000,
            cooldown: 60_000_000,
        }
    }
}

/// The detector's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cascade {
    /// When the last [`MAX_DENIALS`] denials happened, oldest first (0: none).
    pub recent: [Micros; MAX_DENIALS],
    /// Sequential mode lasts until then.
    pub until: Micros,
    /// Whether sequential mode is on (it turns off, with an event, at the
    /// first change after `until`).
    pub on: bool,
}

impl Cascade {
    /// Whether calls go one at a time at `now`.
    #[must_use]
    pub const fn sequential(&self, now: Micros) -> bool {
        self.on && now < self.until
    }
}

impl UpstreamState {
    /// Records a denial (or a reported failure) at `now`; `Some(true)` when
    /// it switched sequential mode on.
    pub fn note_denial(&mut self, now: Micros, c: &Coordination) -> Option<bool> {
        let n = usize::from(c.cascade.denials);
        if n == 0 {
            return None;
        }
        let k = &mut self.cascade;
        k.recent.rotate_left(1);
        k.recent[MAX_DENIALS - 1] = now;
        let oldest = k.recent[MAX_DENIALS - n];
        if oldest > 0 && now - oldest <= c.cascade.within {
            k.until = now + c.cascade.cooldown;
            if !k.on {
                k.on = true;
                return Some(true);
            }
        }
        None
    }

    /// Turns sequential mode off once its cooldown is over; `Some(false)`
    /// when it did.
    pub fn settle_cascade(&mut self, now: Micros) -> Option<bool> {
        let k = &mut self.cascade;
        if k.on && now >= k.until {
            k.on = false;
            return Some(false);
        }
        None
    }
}
