//! The async bridge: native futures as `asyncio` awaitables (`spawn_async`),
//! already-completed ones (`Ready`), cancellation (`Canceller`) and the give-back
//! of an answer nobody received (`Held`, `Undo`).

#[allow(clippy::wildcard_imports)]
use crate::*;

/// An awaitable that is already complete: awaiting it returns (or raises) at
/// once, without suspending or touching the event loop.
#[pyclass(module = "ratewarden._native")]
pub(crate) struct Ready {
    pub(crate) value: Option<PyResult<Py<PyAny>>>,
}

#[pymethods]
impl Ready {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self) -> PyResult<Py<PyAny>> {
        match self.value.take() {
            Some(Ok(v)) => Err(PyStopIteration::new_err((v,))),
            Some(Err(e)) => Err(e),
            None => Err(PyTypeError::new_err("this awaitable was already awaited")),
        }
    }

    fn send(&mut self, _value: Py<PyAny>) -> PyResult<Py<PyAny>> {
        self.__next__()
    }

    #[pyo3(signature = (exc, *_rest))]
    fn throw(
        &mut self,
        exc: Bound<'_, PyAny>,
        _rest: Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<Py<PyAny>> {
        self.value = None;
        Err(PyErr::from_value(exc))
    }

    fn close(&mut self) {
        self.value = None;
    }
}

/// Aborts the Tokio task behind an asyncio future when that future is cancelled.
#[pyclass(frozen, module = "ratewarden._native")]
pub(crate) struct Canceller {
    /// A wait to stop at its next waiting point; other operations run to the
    /// end (one backend call, bounded by its timeout): dropping one mid-call
    /// could apply it with nobody to see the answer. An answer nobody receives
    /// gives back what it holds (`_bridge.complete`, `Undo`).
    pub(crate) wait: Option<Arc<WaitCancel>>,
}

#[pymethods]
impl Canceller {
    fn __call__(&self, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        if fut.call_method0("cancelled")?.is_truthy()? {
            if let Some(w) = &self.wait {
                w.cancel();
            }
        }
        Ok(())
    }
}

/// An already-completed awaitable holding `value`.
pub(crate) fn ready(py: Python<'_>, value: PyResult<Py<PyAny>>) -> PyResult<Py<PyAny>> {
    Ok(Py::new(py, Ready { value: Some(value) })?.into_any())
}

/// Runs `f` on the runtime and returns an asyncio future of the running loop
/// that completes with its converted result; cancelling the future aborts `f`.
/// What an async answer holds that must be given back when nobody receives
/// it (the awaiting task was cancelled as the answer arrived): a reservation,
/// or a resource's ordered lock.
pub(crate) trait Held {
    fn held(&self) -> Option<Hold> {
        None
    }
}

/// Something an undelivered answer holds.
pub(crate) enum Hold {
    /// A reservation (or a held concurrency slot).
    Reservation(ReservationId),
    /// A turn at a resource's ordered lock.
    Turn(ratewarden::Turn),
}

impl Held for CoreDecision {
    fn held(&self) -> Option<Hold> {
        self.reservation.as_ref().map(|r| Hold::Reservation(r.id))
    }
}
impl Held for CommitReceipt {}
impl Held for bool {}
impl Held for i64 {}
impl Held for Settlement {}
impl Held for Vec<Balance> {}
impl Held for ratewarden::decision::TopUp {}
impl Held for ratewarden::UpstreamView {}
impl Held for usize {}
// An allocation nobody learnt of lapses by itself: idle after its lease, gone
// one lease later.
impl Held for ratewarden::Allocation {}
impl Held for Option<ratewarden::Turn> {
    fn held(&self) -> Option<Hold> {
        self.clone().map(Hold::Turn)
    }
}

/// Releases a reservation (or an ordered lock's turn) whose answer was never received (its future was
/// cancelled as it arrived, or its loop closed first): when called, or when
/// dropped without `keep()` — an answer that never reached anyone is given
/// back whichever way it was lost. The release runs on the runtime, never
/// blocking the event loop.
#[pyclass(frozen, module = "ratewarden._native")]
pub(crate) struct Undo {
    pub(crate) warden: Warden,
    pub(crate) hold: Hold,
    pub(crate) pending: std::sync::atomic::AtomicBool,
}

impl Undo {
    fn new(warden: Warden, hold: Hold) -> Self {
        Self {
            warden,
            hold,
            pending: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn release(&self) {
        if self.pending.swap(false, Ordering::AcqRel) {
            let w = self.warden.clone();
            match &self.hold {
                Hold::Reservation(id) => {
                    let id = *id;
                    if w.backend_name() == "memory" {
                        // Answers at once: given back before this returns.
                        let _ = at_once(w.release(id));
                        return;
                    }
                    runtime().spawn(async move {
                        // Released, already ended or lapsed: either way nothing stays held.
                        let _ = w.release(id).await;
                    });
                }
                Hold::Turn(turn) => {
                    let turn = turn.clone();
                    runtime().spawn(async move {
                        let _ = w.release_turn(&turn).await;
                    });
                }
            }
        }
    }
}

#[pymethods]
impl Undo {
    /// Gives the reservation back now.
    fn __call__(&self) {
        self.release();
    }

    /// The answer was delivered: the reservation is the receiver's.
    fn keep(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        self.release();
    }
}

pub(crate) fn spawn_async<T, Fut, C>(
    py: Python<'_>,
    f: Fut,
    convert: C,
    warden: Warden,
    wait: Option<Arc<WaitCancel>>,
) -> PyResult<Py<PyAny>>
where
    T: Held + Send + 'static,
    Fut: std::future::Future<Output = ratewarden::Result<T>> + Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    static GET_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static COMPLETE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let get_loop = GET_LOOP.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("asyncio")?.getattr("get_running_loop")?.unbind())
    })?;
    let complete = COMPLETE
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("ratewarden._bridge")?
                    .getattr("complete")?
                    .unbind(),
            )
        })?
        .clone_ref(py);
    let event_loop = get_loop.call0(py)?;
    let fut = event_loop.call_method0(py, "create_future")?;
    let (loop2, fut2) = (event_loop.clone_ref(py), fut.clone_ref(py));
    runtime().spawn(async move {
        let result = f.await;
        // Never wait for the GIL on a runtime thread: that would stall every
        // other operation in flight. The completer thread takes it instead.
        let job: Job = Box::new(move |py| {
            // What the answer holds, to give back if nobody receives it.
            let undo = match result.as_ref().ok().and_then(Held::held) {
                Some(hold) => Py::new(py, Undo::new(warden, hold)).ok().map(Py::into_any),
                None => None,
            };
            let give_back = |py: Python<'_>, undo: &Option<Py<PyAny>>| {
                if let Some(u) = undo {
                    let _ = u.call0(py);
                }
            };
            // Cancelled already: nobody will receive it.
            if fut2
                .bind(py)
                .call_method0("cancelled")
                .is_ok_and(|c| c.is_truthy().unwrap_or(false))
            {
                give_back(py, &undo);
                return;
            }
            let (ok, value) = match result {
                Ok(v) => match convert(py, v) {
                    Ok(obj) => (true, obj),
                    Err(e) => (false, e.into_value(py).into_any()),
                },
                Err(e) => (false, to_py(&e).into_value(py).into_any()),
            };
            let late = undo.as_ref().map_or_else(|| py.None(), |u| u.clone_ref(py));
            // `complete` gives it back if the future is cancelled before it
            // runs; if the loop is closed, nobody is left to receive it.
            if loop2
                .call_method1(
                    py,
                    "call_soon_threadsafe",
                    (complete, fut2, ok, value, late),
                )
                .is_err()
            {
                give_back(py, &undo);
            }
        });
        let _ = completer().send(job);
    });
    let canceller = Py::new(py, Canceller { wait })?;
    fut.call_method1(py, "add_done_callback", (canceller,))?;
    Ok(fut)
}
