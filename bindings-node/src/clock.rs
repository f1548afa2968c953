//! `ManualClock`: deterministic time for users' tests.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// A clock that moves only when told to, for deterministic tests.
#[napi]
pub struct ManualClock {
    pub(crate) inner: ratewarden::ManualClock,
}

#[napi]
impl ManualClock {
    /// Starts at `start` seconds since the epoch (default 2026-01-01T00:00:00Z).
    #[napi(constructor)]
    pub fn new(start: Option<f64>) -> Result<Self> {
        ratewarden::ManualClock::from_secs(
            start.unwrap_or(ratewarden::ManualClock::DEFAULT_START_SECS),
        )
        .map(|inner| Self { inner })
        .or_throw()
    }

    /// Moves time forward by `seconds`.
    #[napi]
    pub fn advance(&self, seconds: f64) -> Result<()> {
        let d = self::seconds(seconds, "seconds")?;
        self.inner.advance(d);
        Ok(())
    }

    /// The current time, seconds since the epoch.
    #[napi]
    #[allow(clippy::cast_precision_loss)]
    pub fn now(&self) -> f64 {
        ratewarden::Clock::now(&self.inner) as f64 / 1e6
    }
}
