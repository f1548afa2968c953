//! How long a caller should wait before retrying a refused upstream call, so
//! that retries by agents of different priorities never collide: after the
//! base delay (the upstream's `Retry-After` when known, else an exponential
//! backoff), each tier draws a uniformly jittered offset from its own band, and
//! the bands do not overlap — every critical retry lands before every standard
//! one, every standard before every background one, for the same base.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::priority::Priority;

/// Longest exponential base (when the upstream gave no `Retry-After`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The exponential base of the first retry; it doubles per attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// A half-open interval `[from, to)` of offsets after the base delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    /// Shortest offset.
    pub from: Duration,
    /// Offsets stay below this.
    pub to: Duration,
}

/// One band per priority tier, ordered and disjoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBands {
    critical: Band,
    standard: Band,
    background: Band,
}

impl Default for RetryBands {
    /// Critical 0–0.5 s, standard 0.5–3.5 s, background 3.5–9.5 s.
    fn default() -> Self {
        let ms = Duration::from_millis;
        Self {
            critical: Band {
                from: ms(0),
                to: ms(500),
            },
            standard: Band {
                from: ms(500),
                to: ms(3500),
            },
            background: Band {
                from: ms(3500),
                to: ms(9500),
            },
        }
    }
}

impl RetryBands {
    /// Bands for critical, standard and background callers.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`retry bands`) unless each band is non-empty
    /// and each starts at or after the end of the one before.
    pub fn new(critical: Band, standard: Band, background: Band) -> Result<Self> {
        for (name, b) in [
            ("critical", critical),
            ("standard", standard),
            ("background", background),
        ] {
            if b.to <= b.from {
                return Err(Error::invalid(
                    "retry bands",
                    format!(
                        "the {name} band ends ({:?}) before it starts ({:?})",
                        b.to, b.from
                    ),
                ));
            }
        }
        if standard.from < critical.to || background.from < standard.to {
            return Err(Error::invalid(
                "retry bands",
                "bands must not overlap: critical, then standard, then background",
            ));
        }
        Ok(Self {
            critical,
            standard,
            background,
        })
    }

    /// The band of `priority`.
    #[must_use]
    pub const fn band(&self, priority: Priority) -> Band {
        match priority {
            Priority::Critical => self.critical,
            Priority::Standard => self.standard,
            Priority::Background => self.background,
        }
    }

    /// The delay before retry number `attempt` (1 for the first retry) of a
    /// `priority` caller: the base — `retry_after` when the upstream said,
    /// else [`FIRST_BACKOFF`] doubled per attempt up to [`MAX_BACKOFF`] — plus
    /// an offset drawn uniformly from the tier's band with `unit`, a number
    /// in `[0, 1)` (a random one: [`RetryBands::retry_delay`]).
    #[must_use]
    pub fn delay_with(
        &self,
        attempt: u32,
        priority: Priority,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Duration {
        let base = retry_after.unwrap_or_else(|| {
            let doublings = attempt.saturating_sub(1).min(16);
            FIRST_BACKOFF
                .saturating_mul(1 << doublings)
                .min(MAX_BACKOFF)
        });
        let band = self.band(priority);
        let width = band.to - band.from;
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        // Stay strictly inside [from, to).
        let offset = width
            .mul_f64(unit)
            .min(width.saturating_sub(Duration::from_nanos(1)));
        base.saturating_add(band.from).saturating_add(offset)
    }

    /// [`RetryBands::delay_with`] with a random draw.
    #[must_use]
    pub fn retry_delay(
        &self,
        attempt: u32,
        priority: Priority,
        retry_after: Option<Duration>,
    ) -> Duration {
        self.delay_with(attempt, priority, retry_after, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_are_validated() {
        let ms = Duration::from_millis;
        let b = |a, z| Band {
            from: ms(a),
            to: ms(z),
        };
        assert!(RetryBands::new(b(0, 100), b(100, 200), b(200, 300)).is_ok());
        assert!(RetryBands::new(b(0, 100), b(50, 200), b(200, 300)).is_err());
        assert!(RetryBands::new(b(0, 0), b(100, 200), b(200, 300)).is_err());
        assert!(RetryBands::new(b(0, 100), b(100, 200), b(150, 300)).is_err());
    }

    #[test]
    fn the_base_is_retry_after_or_a_capped_doubling() {
        let bands = RetryBands::default();
        let d = |a, r| bands.delay_with(a, Priority::Critical, r, 0.0);
        assert_eq!(d(1, None), FIRST_BACKOFF);
        assert_eq!(d(3, None), FIRST_BACKOFF * 4);
        assert_eq!(d(60, None), MAX_BACKOFF);
        assert_eq!(d(u32::MAX, None), MAX_BACKOFF);
        assert_eq!(d(5, Some(Duration::from_secs(20))), Duration::from_secs(20));
        let bg = bands.delay_with(
            1,
            Priority::Background,
            Some(Duration::from_secs(20)),
            0.999_999,
        );
        assert!(bg < Duration::from_millis(29_500) && bg >= Duration::from_millis(23_500));
    }
}
