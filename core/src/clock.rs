//! Time for the engine: a [`Clock`] trait with the system clock and a manual
//! clock that tests (and the simulator) advance by hand.
//!
//! Time is wall-clock microseconds since the Unix epoch (`i64`), the same
//! resolution Redis `TIME` gives, so calendar windows (months, days) line up
//! on every backend. This module is the only place that reads the system time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;

/// Microseconds since the Unix epoch.
pub type Micros = i64;

/// A boxed future returned by [`Clock::sleep_until`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of time the engine reads and sleeps on.
pub trait Clock: Send + Sync + 'static {
    /// The current time, microseconds since the Unix epoch.
    fn now(&self) -> Micros;
    /// A future that completes once [`Clock::now`] is at or after `deadline`.
    fn sleep_until(&self, deadline: Micros) -> Sleep;
}

/// The real wall clock; sleeping uses tokio timers (needs a tokio runtime).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place that reads the system time
    fn now(&self) -> Micros {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
    }

    fn sleep_until(&self, deadline: Micros) -> Sleep {
        let wait = deadline.saturating_sub(self.now()).max(0);
        Box::pin(tokio::time::sleep(Duration::from_micros(
            wait.unsigned_abs(),
        )))
    }
}

/// A clock that only moves when told to. Sleepers wake when [`ManualClock::advance`]
/// or [`ManualClock::set`] moves time past their deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

#[derive(Debug)]
struct ManualInner {
    now: AtomicI64,
    sleepers: Mutex<Vec<(Micros, Waker)>>,
}

impl ManualClock {
    /// A manual clock starting at `start` microseconds since the epoch.
    #[must_use]
    pub fn new(start: Micros) -> Self {
        Self {
            inner: Arc::new(ManualInner {
                now: AtomicI64::new(start),
                sleepers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Where a binding's manual clock starts unless told: 2026-01-01T00:00:00Z,
    /// in seconds since the epoch.
    pub const DEFAULT_START_SECS: f64 = 1_767_225_600.0;

    /// A manual clock starting at `secs` seconds since the epoch (how the
    /// language bindings take it), rounded to the microsecond.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] for NaN, infinities, negatives and times
    /// past the year 2286.
    pub fn from_secs(secs: f64) -> crate::Result<Self> {
        if !secs.is_finite() || !(0.0..=1e10).contains(&secs) {
            return Err(crate::Error::invalid(
                "start",
                format!("{secs} is not a time in seconds since the epoch"),
            ));
        }
        #[allow(clippy::cast_possible_truncation)]
        Ok(Self::new((secs * 1e6).round() as Micros))
    }

    /// A manual clock starting at an RFC 3339-like UTC date `YYYY-MM-DD`, midnight.
    ///
    /// # Panics
    /// Never for valid dates; invalid ones give the epoch. Intended for tests.
    #[must_use]
    pub fn at_date(year: i64, month: u32, day: u32) -> Self {
        Self::new(crate::calendar::days_from_civil(year, month, day) * crate::calendar::DAY_US)
    }

    /// Moves time forward by `by` and wakes every sleeper whose deadline passed.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        let now = self
            .inner
            .now
            .fetch_add(by, Ordering::SeqCst)
            .saturating_add(by);
        self.wake(now);
    }

    /// Sets the time (it may move backwards, to test clock steps) and wakes due sleepers.
    pub fn set(&self, now: Micros) {
        self.inner.now.store(now, Ordering::SeqCst);
        self.wake(now);
    }

    /// The earliest deadline any sleeper waits for, if any.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Micros> {
        self.inner.sleepers.lock().iter().map(|(d, _)| *d).min()
    }

    /// How many sleepers are currently registered (tests use it to know waiters parked).
    #[must_use]
    pub fn sleepers(&self) -> usize {
        self.inner.sleepers.lock().len()
    }

    fn wake(&self, now: Micros) {
        let due: Vec<Waker> = {
            let mut sleepers = self.inner.sleepers.lock();
            let mut due = Vec::new();
            sleepers.retain(|(deadline, waker)| {
                if *deadline <= now {
                    due.push(waker.clone());
                    false
                } else {
                    true
                }
            });
            due
        };
        for w in due {
            w.wake();
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.inner.now.load(Ordering::SeqCst)
    }

    fn sleep_until(&self, deadline: Micros) -> Sleep {
        Box::pin(ManualSleep {
            inner: Arc::clone(&self.inner),
            deadline,
        })
    }
}

struct ManualSleep {
    inner: Arc<ManualInner>,
    deadline: Micros,
}

impl Future for ManualSleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.now.load(Ordering::SeqCst) >= self.deadline {
            return Poll::Ready(());
        }
        let mut sleepers = self.inner.sleepers.lock();
        // Re-check under the lock so an advance() between the load and the push is not lost.
        if self.inner.now.load(Ordering::SeqCst) >= self.deadline {
            return Poll::Ready(());
        }
        sleepers.push((self.deadline, cx.waker().clone()));
        Poll::Pending
    }
}

/// Converts a [`Duration`] to whole microseconds, saturating.
#[must_use]
pub fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Converts non-negative microseconds to a [`Duration`] (negative gives zero).
#[must_use]
pub fn duration(us: Micros) -> Duration {
    Duration::from_micros(us.max(0).unsigned_abs())
}
