//! Priority tiers and the headroom (floors) each limit keeps for higher tiers.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Who goes first when a limit runs low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// P0: may use a limit to the last unit.
    Critical,
    /// P1 (the default): may use a limit while more than `floors.standard` of it remains.
    #[default]
    Standard,
    /// P2: may use a limit while more than `floors.background` of it remains; promoted
    /// to standard after being denied continuously for `promote_after`.
    Background,
}

impl Priority {
    /// All tiers, highest first.
    pub const ALL: [Self; 3] = [Self::Critical, Self::Standard, Self::Background];

    /// The lowercase name (`critical`, `standard`, `background`).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Standard => "standard",
            Self::Background => "background",
        }
    }

    /// 0 for critical, 1 for standard, 2 for background.
    #[must_use]
    pub const fn rank(self) -> u8 {
        match self {
            Self::Critical => 0,
            Self::Standard => 1,
            Self::Background => 2,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "critical" | "p0" | "P0" => Ok(Self::Critical),
            "standard" | "p1" | "P1" => Ok(Self::Standard),
            "background" | "p2" | "P2" => Ok(Self::Background),
            _ => Err(Error::invalid(
                "priority",
                format!(
                    "`{}` is not one of critical, standard, background (or p0, p1, p2)",
                    crate::error::truncate(s)
                ),
            )),
        }
    }
}

/// Headroom a limit keeps for higher tiers, in permille (tenths of a percent) of its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floors {
    /// Standard callers may not take the last `standard` ‰ of the limit.
    pub standard: u16,
    /// Background callers may not take the last `background` ‰ of the limit.
    pub background: u16,
}

impl Default for Floors {
    /// Background keeps 30 % for the tiers above it; standard may use everything.
    fn default() -> Self {
        Self {
            standard: 0,
            background: 300,
        }
    }
}

impl Floors {
    /// The floor (‰) that applies to `priority`.
    #[must_use]
    pub const fn for_priority(&self, priority: Priority) -> u16 {
        match priority {
            Priority::Critical => 0,
            Priority::Standard => self.standard,
            Priority::Background => self.background,
        }
    }

    /// The part of `capacity` a caller of `priority` may fill: `capacity − ceil(capacity × floor)`.
    #[must_use]
    pub fn usable(&self, capacity: i64, priority: Priority) -> i64 {
        let floor = i64::from(self.for_priority(priority));
        if floor == 0 {
            return capacity;
        }
        // capacity ≤ 2^53 and floor ≤ 1000, so the product fits in i64.
        capacity - (capacity.saturating_mul(floor) + 999) / 1000
    }
}
