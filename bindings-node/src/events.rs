//! `NativeListener`: a JS function receiving a warden's events (core
//! `events::Listener`). The core's listener thread queues each event's
//! envelope (JSON text) for the event loop through a weak threadsafe function
//! (it never keeps the process alive); the JS layer parses it and catches
//! whatever the user's callback throws, so nothing reaches the host.

#[allow(clippy::wildcard_imports)]
use crate::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};

/// Events queued for the event loop before the listener thread waits (and
/// the core drops the oldest for a listener that falls further behind).
const QUEUED: usize = 1024;

/// The JS side of a listener: called with an event's JSON text.
pub type EventCallback =
    ThreadsafeFunction<String, Unknown<'static>, String, Status, false, true, QUEUED>;

/// What a listener's native half did so far.
#[napi(object)]
pub struct NativeListenerStats {
    /// Events queued for the callback.
    pub delivered: f64,
    /// Events it never saw: it fell more than 1024 behind.
    pub dropped: f64,
}

/// What a warden's Redis outlets (`events:` in the policy) did so far.
#[napi(object)]
pub struct OutletStats {
    /// Entries appended to the stream.
    pub appended: f64,
    /// Messages published.
    pub published: f64,
    /// Events lost because the outlets fell more than 1024 behind.
    pub dropped: f64,
    /// Events not written after every attempt (Redis unreachable).
    pub failed: f64,
    /// The last write error, one line.
    pub last_error: Option<String>,
}

/// What a warden's audit sinks (`audit:` in the policy) did so far.
#[napi(object)]
pub struct AuditStats {
    /// Records written to the file.
    pub written: f64,
    /// Records appended to the stream.
    pub appended: f64,
    /// Records lost because a sink fell behind.
    pub dropped: f64,
    /// Records not written (the file or Redis failed).
    pub failed: f64,
    /// The last failure, one line.
    pub last_error: Option<String>,
}

/// A callback receiving a warden's events; `close()` stops it.
#[napi]
pub struct NativeListener {
    inner: std::sync::Mutex<Option<ratewarden::events::Listener>>,
}

impl NativeListener {
    pub(crate) fn start(
        warden: &Warden,
        callback: EventCallback,
        events: Option<Vec<String>>,
    ) -> Result<Self> {
        let filter = ratewarden::events::Filter::new(events.unwrap_or_default()).or_throw()?;
        let listener = warden
            .listen(filter, move |event| {
                queue(
                    &callback,
                    event.envelope(&ratewarden::events::new_id()).to_string(),
                )
            })
            .or_throw()?;
        Ok(Self {
            inner: std::sync::Mutex::new(Some(listener)),
        })
    }

    /// Queues each audit record's JSON text for `callback`.
    pub(crate) fn audit(warden: &Warden, callback: EventCallback) -> Result<Self> {
        let listener = warden
            .on_audit(move |record| queue(&callback, record.to_json().to_string()))
            .or_throw()?;
        Ok(Self {
            inner: std::sync::Mutex::new(Some(listener)),
        })
    }

    fn current(&self) -> ratewarden::events::ListenerStats {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(ratewarden::events::Listener::stats)
            .unwrap_or_default()
    }
}

/// Queues `text` for the JS callback. Blocking: waits while the event loop is
/// 1024 behind (never on a decision's path); fails only once the environment
/// is gone.
fn queue(callback: &EventCallback, text: String) -> ratewarden::events::Handled {
    match callback.call(text, ThreadsafeFunctionCallMode::Blocking) {
        Status::Ok => Ok(()),
        status => Err(format!("the event loop did not take it: {status}")),
    }
}

#[napi]
impl NativeListener {
    /// Stops it without waiting (the event loop may be what its thread waits
    /// for); the JS layer ignores events still queued. Idempotent.
    #[napi]
    pub fn close(&self) {
        if let Some(l) = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            l.stop();
        }
    }

    /// Whether it still listens (not closed, and its warden lives).
    #[napi(getter)]
    pub fn is_open(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(ratewarden::events::Listener::is_open)
    }

    /// Events queued for the callback and events dropped so far.
    #[napi]
    #[allow(clippy::cast_precision_loss)]
    pub fn stats(&self) -> NativeListenerStats {
        let s = self.current();
        NativeListenerStats {
            delivered: s.delivered as f64,
            dropped: s.dropped as f64,
        }
    }
}
