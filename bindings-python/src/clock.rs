//! `ManualClock`: deterministic time for users' tests.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// A clock that moves only when told to, for deterministic tests of code that
/// uses ratewarden: ``Warden(policy, clock=ManualClock(start))``.
#[pyclass(frozen, module = "ratewarden._native")]
pub(crate) struct ManualClock {
    pub(crate) inner: ratewarden::ManualClock,
}

#[pymethods]
impl ManualClock {
    /// Starts at `start` seconds since the Unix epoch (default: 2026-01-01 UTC).
    #[new]
    #[pyo3(signature = (start=ratewarden::ManualClock::DEFAULT_START_SECS))]
    fn new(start: f64) -> PyResult<Self> {
        ratewarden::ManualClock::from_secs(start)
            .map(|inner| Self { inner })
            .or_raise()
    }

    /// Moves time forward by `seconds` (≥ 0), waking whatever waits until then.
    fn advance(&self, seconds: f64) -> PyResult<()> {
        let by = self::seconds(seconds, "seconds")?;
        self.inner.advance(by);
        Ok(())
    }

    /// The current time, seconds since the epoch.
    fn now(&self) -> f64 {
        use ratewarden::Clock as _;
        self.inner.now() as f64 / 1e6
    }
}
