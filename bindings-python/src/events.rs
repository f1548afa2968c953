//! `NativeListener`: a Python callable receiving a warden's events (core
//! `events::Listener`) on a thread of its own.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// A callback receiving events; `close()` stops it.
#[pyclass(frozen, module = "ratewarden._native")]
pub(crate) struct NativeListener {
    inner: Mutex<Option<ratewarden::events::Listener>>,
    /// Its stats when it was closed.
    last: Mutex<Option<ratewarden::events::ListenerStats>>,
    /// Its filter's types, as given.
    events: Vec<String>,
    /// The process (fork generation) its thread runs in: a forked child has
    /// no such thread, so it never waits for it (or locks what a thread of
    /// the parent may have held at `fork()`).
    generation: u32,
}

impl Drop for NativeListener {
    fn drop(&mut self) {
        if process_generation() != self.generation {
            // The thread belongs to the parent: nothing to stop or detach here.
            std::mem::forget(self.inner.get_mut().take());
        }
    }
}

impl NativeListener {
    /// Listens on `warden`: `callback` is called with each event's envelope as
    /// JSON text (the Python wrapper parses it). An exception it raises goes
    /// to `sys.unraisablehook` and is counted; it never reaches the warden.
    pub(crate) fn start(
        warden: &Warden,
        callback: Py<PyAny>,
        events: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let events = events.unwrap_or_default();
        let filter = ratewarden::events::Filter::new(events.clone()).or_raise()?;
        let listener = warden
            .listen(filter, move |event| {
                call(
                    &callback,
                    event.envelope(&ratewarden::events::new_id()).to_string(),
                )
            })
            .or_raise()?;
        Ok(Self {
            inner: Mutex::new(Some(listener)),
            last: Mutex::new(None),
            events,
            generation: process_generation(),
        })
    }
}

impl NativeListener {
    /// Calls `callback` with each audit record as JSON text.
    pub(crate) fn audit(warden: &Warden, callback: Py<PyAny>) -> PyResult<Self> {
        let listener = warden
            .on_audit(move |record| call(&callback, record.to_json().to_string()))
            .or_raise()?;
        Ok(Self {
            inner: Mutex::new(Some(listener)),
            last: Mutex::new(None),
            events: Vec::new(),
            generation: process_generation(),
        })
    }
}

/// Calls `callback(text)` with the GIL; what it raises goes to
/// `sys.unraisablehook` and comes back as the failure's line.
fn call(callback: &Py<PyAny>, text: String) -> ratewarden::events::Handled {
    Python::attach(|py| match callback.call1(py, (text,)) {
        Ok(_) => Ok(()),
        Err(e) => {
            let line = e.to_string();
            e.write_unraisable(py, Some(callback.bind(py)));
            Err(line)
        }
    })
}

#[pymethods]
impl NativeListener {
    /// Stops it: no call starts after this returns (a call under way has
    /// ended, unless this runs inside the callback). Idempotent.
    fn close(&self, py: Python<'_>) {
        if process_generation() != self.generation {
            return; // a forked child: the thread was the parent's
        }
        let taken = self.inner.lock().take();
        if let Some(mut l) = taken {
            *self.last.lock() = Some(l.stats());
            // The listener's thread may be waiting for the GIL to call back.
            let l = py.detach(move || {
                l.close();
                l
            });
            // Kept (closed) so its stats stay exact.
            *self.inner.lock() = Some(l);
        }
    }

    /// Whether it still listens (not closed, and its warden lives).
    #[getter]
    fn is_open(&self) -> bool {
        if process_generation() != self.generation {
            return false;
        }
        self.inner
            .lock()
            .as_ref()
            .is_some_and(ratewarden::events::Listener::is_open)
    }

    /// The event types and prefixes it listens to (empty: all).
    #[getter]
    fn events(&self) -> Vec<String> {
        self.events.clone()
    }

    /// `delivered`, `dropped`, `failed` and `last_error` so far (kept after close).
    fn stats(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let s = if process_generation() == self.generation {
            let live = self
                .inner
                .lock()
                .as_ref()
                .map(ratewarden::events::Listener::stats);
            live.unwrap_or_else(|| self.last.lock().clone().unwrap_or_default())
        } else {
            // A forked child: the parent's listener did nothing here.
            ratewarden::events::ListenerStats::default()
        };
        let out = PyDict::new(py);
        out.set_item("delivered", s.delivered)?;
        out.set_item("dropped", s.dropped)?;
        out.set_item("failed", s.failed)?;
        out.set_item("last_error", s.last_error)?;
        Ok(out.into_any().unbind())
    }
}
