//! Calendar arithmetic for quota and budget windows: civil dates from day
//! numbers and back (proleptic Gregorian, leap years included), and window
//! boundaries for minute … year periods in UTC or a fixed UTC offset.
//!
//! Pure integer functions; the Redis scripts implement the same formulas.

use crate::clock::Micros;

/// Microseconds in a second.
pub const SECOND_US: i64 = 1_000_000;
/// Microseconds in a minute.
pub const MINUTE_US: i64 = 60 * SECOND_US;
/// Microseconds in an hour.
pub const HOUR_US: i64 = 60 * MINUTE_US;
/// Microseconds in a day.
pub const DAY_US: i64 = 24 * HOUR_US;

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
#[must_use]
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let m = i64::from(month);
    let d = i64::from(day);
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date `(year, month, day)` of a day number (days since 1970-01-01).
#[must_use]
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // m in 1..=12 and d in 1..=31 by construction.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// How a counter's time is cut into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Never resets.
    Lifetime,
    /// Fixed length windows aligned to the epoch (shifted by the offset): minute, hour, day, `15m`…
    Fixed {
        /// Window length in microseconds.
        len: Micros,
        /// Offset from UTC in microseconds (e.g. +05:30).
        offset: Micros,
    },
    /// ISO weeks starting Monday 00:00 local time.
    Week {
        /// Offset from UTC in microseconds.
        offset: Micros,
    },
    /// Calendar months, starting on the 1st at 00:00 local time.
    Month {
        /// Offset from UTC in microseconds.
        offset: Micros,
    },
    /// Calendar years, starting on January 1st at 00:00 local time.
    Year {
        /// Offset from UTC in microseconds.
        offset: Micros,
    },
}

impl Window {
    /// The window containing `now`, as `(id, start, end)`; `end` is exclusive.
    /// `Lifetime` gives `(0, i64::MIN, i64::MAX)`.
    #[must_use]
    pub fn at(&self, now: Micros) -> (i64, Micros, Micros) {
        match *self {
            Self::Lifetime => (0, i64::MIN, i64::MAX),
            Self::Fixed { len, offset } => {
                let local = now + offset;
                let id = local.div_euclid(len);
                let start = id * len - offset;
                (id, start, start + len)
            }
            Self::Week { offset } => {
                // 1970-01-01 was a Thursday; day 4 (1970-01-05) is a Monday.
                let day = (now + offset).div_euclid(DAY_US);
                let id = (day - 4).div_euclid(7);
                let start = (id * 7 + 4) * DAY_US - offset;
                (id, start, start + 7 * DAY_US)
            }
            Self::Month { offset } => {
                let (y, m, _) = civil_from_days((now + offset).div_euclid(DAY_US));
                let id = y * 12 + i64::from(m) - 1;
                let start = days_from_civil(y, m, 1) * DAY_US - offset;
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1) * DAY_US - offset;
                (id, start, end)
            }
            Self::Year { offset } => {
                let (y, _, _) = civil_from_days((now + offset).div_euclid(DAY_US));
                let start = days_from_civil(y, 1, 1) * DAY_US - offset;
                let end = days_from_civil(y + 1, 1, 1) * DAY_US - offset;
                (y, start, end)
            }
        }
    }

    /// Nominal window length in seconds (months count 30 days), for `RateLimit-Policy` `w=`.
    #[must_use]
    pub fn nominal_secs(&self) -> Option<i64> {
        match *self {
            Self::Lifetime => None,
            Self::Fixed { len, .. } => Some(len / SECOND_US),
            Self::Week { .. } => Some(7 * 86_400),
            Self::Month { .. } => Some(30 * 86_400),
            Self::Year { .. } => Some(365 * 86_400),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_roundtrip_over_four_centuries() {
        for z in (-200_000..200_000).step_by(7) {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        assert_eq!(
            days_from_civil(1900, 3, 1) - days_from_civil(1900, 2, 28),
            1
        );
    }
}
