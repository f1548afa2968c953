//! Python bindings for `ratewarden`, imported from Python as `ratewarden._native`.
//!
//! The public Python API lives in `python/ratewarden/__init__.py`; this module
//! converts, bridges async and maps errors — every decision is made by the core.
//! Keep `python/ratewarden/_native.pyi` in sync (CI runs `mypy.stubtest`).
//!
//! Runtime discipline:
//! - one Tokio runtime per process, shared by every warden, rebuilt in a child
//!   after `fork()` (the parent's threads do not exist there);
//! - on the embedded engine every call, sync or async, is decided on the calling
//!   thread; an async call returns an already-completed awaitable;
//! - on Redis, sync calls release the GIL while they wait, async calls run on
//!   the runtime and complete an `asyncio` future through
//!   `loop.call_soon_threadsafe`; cancelling that future aborts the operation
//!   (a multi-step cluster decision hands back what it took);
//! - a warden used in a forked child reconnects its backend there.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::{PyStopIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use ratewarden::backend::{at_once, poll_ready};
use ratewarden::decision::ReservationInfo;
use ratewarden::http::{HeaderStyle, denial_body, rate_limit_headers};
use ratewarden::ops::{self, Setup, Source};
use ratewarden::{
    Amount, Balance, CallOutcome, CommitReceipt, Cost, Decision as CoreDecision, Error, ErrorKind,
    Policy, Request, ReservationId, Scope, Settlement, Usage, WaitCancel, WaitFor, Warden,
};

/// Return the version of the ratewarden core library.
#[pyfunction]
fn version() -> &'static str {
    ratewarden::VERSION
}

// ---------------------------------------------------------------------------
// Runtime

/// Forks survived so far in this process's ancestry: bumped in the child by the
/// `os.register_at_fork` hook installed when the module loads (`os.fork()` and
/// `multiprocessing`'s fork start method both run it). Cheaper than asking the
/// kernel for the pid on every call.
static FORKS: AtomicU32 = AtomicU32::new(0);

/// Which process this is, as far as fork-sensitive state is concerned.
fn process_generation() -> u32 {
    FORKS.load(Ordering::Acquire)
}

/// Runs in the child after `os.fork()`.
#[pyfunction]
fn _after_fork_in_child() {
    // A thread that held one of these at fork() (making the process's first
    // Redis call starts the runtime under RT) does not exist in the child: the
    // lock would never be released and the child's first call would hang.
    RT.store(Arc::default());
    TX.store(Arc::default());
    FORKS.fetch_add(1, Ordering::AcqRel);
    // The parent's random state was copied: ids must not repeat across processes.
    ratewarden::decision::reseed_ids_after_fork();
}

/// The process's Tokio runtime; a fresh one in a forked child.
/// A process-wide slot that a forked child gets afresh: the hook after
/// `fork()` swaps in a new, unlocked mutex (never locking the old one, which a
/// thread that does not exist in the child may have held at fork time).
type ForkSlot<T> = std::sync::LazyLock<arc_swap::ArcSwap<Mutex<Option<(u32, T)>>>>;

/// The process's runtime, by fork generation (see `runtime`).
static RT: ForkSlot<&'static tokio::runtime::Runtime> = std::sync::LazyLock::new(Default::default);
/// The completer thread's queue, by fork generation (see `completer`).
static TX: ForkSlot<std::sync::mpsc::Sender<Job>> = std::sync::LazyLock::new(Default::default);

fn runtime() -> &'static tokio::runtime::Runtime {
    let generation = process_generation();
    let rt_slot = RT.load();
    let mut slot = rt_slot.lock();
    if let Some((owner, rt)) = *slot {
        if owner == generation {
            return rt;
        }
        // Forked: the old runtime's threads are gone; it is leaked, never dropped.
    }
    let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ratewarden")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("ratewarden: cannot start a Tokio runtime: {e}")),
    ));
    *slot = Some((generation, rt));
    rt
}

// ---------------------------------------------------------------------------
// Errors

/// Raises the `ratewarden` exception matching `e` (classes live in
/// `ratewarden/_errors.py`, so they can inherit from built-in exceptions too).
/// The exception carries the error's data as attributes: `kind`, `code`,
/// `path` / `source` (policy errors), `argument`, `unit`, `reservation`,
/// `operation` (None when not about one).
fn to_py(e: &Error) -> PyErr {
    let class = match e.kind() {
        ErrorKind::Policy => "PolicyError",
        ErrorKind::InvalidInput => "InvalidInput",
        ErrorKind::NotFound if e.code() == "reservation_expired" => "ReservationExpired",
        ErrorKind::NotFound => "ReservationNotFound",
        ErrorKind::Conflict => "ReservationConflict",
        ErrorKind::Backend => "BackendError",
        ErrorKind::Internal => "WardenError",
    };
    let err = error_class(class, e.to_string());
    Python::attach(|py| {
        let v = err.value(py);
        let d = e.details();
        let operation = d.operation.map(|o| o.to_string());
        let attrs: [(&str, Option<&str>); 8] = [
            ("kind", Some(&e.kind().to_string())),
            ("code", Some(e.code())),
            ("path", d.path),
            ("source", d.source),
            ("argument", d.argument),
            ("unit", d.unit),
            ("reservation", d.reservation),
            ("operation", operation.as_deref()),
        ];
        for (name, value) in attrs {
            // An exception instance takes attributes; nothing to do if one refuses.
            let _ = v.setattr(name, value);
        }
    });
    err
}

fn error_class(class: &str, message: String) -> PyErr {
    Python::attach(|py| {
        match py
            .import("ratewarden._errors")
            .and_then(|m| m.getattr(class))
        {
            Ok(cls) => match cls.call1((message.clone(),)) {
                Ok(inst) => PyErr::from_value(inst),
                Err(err) => err,
            },
            Err(err) => err,
        }
    })
}

fn invalid(what: &str, why: impl std::fmt::Display) -> PyErr {
    error_class("InvalidInput", format!("invalid {what}: {why}"))
}

// ---------------------------------------------------------------------------
// Conversions

fn amount_of(v: &Bound<'_, PyAny>, at: &str) -> PyResult<Amount> {
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(at, "a bool is not an amount"));
    }
    if let Ok(i) = v.extract::<i64>() {
        return Ok(Amount::from(i));
    }
    if let Ok(f) = v.extract::<f64>() {
        return Amount::from_f64(f).map_err(|e| invalid(at, e));
    }
    if v.is_instance_of::<PyString>() {
        let text: String = v.extract()?;
        return Amount::parse(&text).map_err(|e| invalid(at, e));
    }
    // decimal.Decimal and friends: their exact decimal text.
    if v.hasattr("as_tuple")? {
        return Amount::parse(&v.str()?.extract::<String>()?).map_err(|e| invalid(at, e));
    }
    Err(invalid(
        at,
        format!(
            "expected an int, float, str or Decimal, got {}",
            v.get_type().name()?
        ),
    ))
}

fn cost_of(cost: Option<&Bound<'_, PyDict>>, what: &str) -> PyResult<Cost> {
    let mut out = Cost::new();
    if let Some(d) = cost {
        for (k, v) in d.iter() {
            let unit: String = k
                .extract()
                .map_err(|_| invalid(what, "units must be strings"))?;
            let amount = amount_of(&v, &format!("{what}[{unit:?}]"))?;
            out.set(&unit, amount);
        }
    }
    Ok(out)
}

fn request_of(
    scope: &str,
    resource: Option<&str>,
    action: Option<&str>,
    cost: Option<&Bound<'_, PyDict>>,
    priority: Option<&str>,
) -> PyResult<Request> {
    let cost = cost.map(|c| cost_of(Some(c), "cost")).transpose()?;
    ops::request(scope, resource, action, cost, priority).map_err(|e| to_py(&e))
}

/// `request_of` repeated under an operation id (32 hex digits), if given.
fn operation_of(req: PyResult<Request>, operation: Option<&str>) -> PyResult<Request> {
    match operation {
        None => req,
        Some(op) => Ok(req?.operation(ratewarden::OperationId::parse(op).map_err(|e| to_py(&e))?)),
    }
}

fn seconds(s: f64, what: &'static str) -> PyResult<Duration> {
    ops::seconds(s, what).map_err(|e| to_py(&e))
}

fn optional_seconds(v: Option<f64>, what: &'static str) -> PyResult<Option<Duration>> {
    ops::optional_seconds(v, what).map_err(|e| to_py(&e))
}

fn reservation_id(id: &str) -> PyResult<ReservationId> {
    ReservationId::parse(id).map_err(|e| to_py(&e))
}

// ---------------------------------------------------------------------------
// Decision

/// The answer to check / acquire / reserve / delegate / wait (see `Decision` in
/// the `ratewarden` package docs). Values are plain Python types.
#[pyclass(frozen, module = "ratewarden._native")]
struct Decision {
    inner: CoreDecision,
}

#[pymethods]
impl Decision {
    /// Whether the caller may go ahead (`allow` or `allow_with_caps`).
    #[getter]
    fn allowed(&self) -> bool {
        self.inner.allowed()
    }

    /// `"allow"`, `"allow_with_caps"` or `"deny"`.
    #[getter]
    fn outcome(&self) -> &'static str {
        self.inner.outcome.as_str()
    }

    /// Caps to honour when allowed with caps: `delay_ms`, `max_tokens`, `model`,
    /// `sequential` (only those set).
    #[getter]
    fn caps<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let c = &self.inner.caps;
        if let Some(v) = c.delay_ms {
            d.set_item("delay_ms", v)?;
        }
        if let Some(v) = c.max_tokens {
            d.set_item("max_tokens", v)?;
        }
        if let Some(v) = &c.model {
            d.set_item("model", v)?;
        }
        if c.sequential {
            d.set_item("sequential", true)?;
        }
        Ok(d)
    }

    /// Seconds until a retry can succeed when denied; `None` when allowed or
    /// when waiting can never help (e.g. a lifetime budget is spent).
    #[getter]
    fn retry_after(&self) -> Option<f64> {
        self.inner.retry_after.map(|d| d.as_secs_f64())
    }

    /// Every limit the request touched: `name`, `kind`, `unit`, `remaining` and
    /// `amount` (integer base units, e.g. micro-dollars), `remaining_text`
    /// (decimal in the unit), `reset` (seconds until fully available), `denied`.
    #[getter]
    fn limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for l in &self.inner.limits {
            let d = PyDict::new(py);
            d.set_item("name", l.name())?;
            d.set_item("kind", l.kind())?;
            d.set_item("unit", l.unit())?;
            d.set_item("remaining", l.remaining)?;
            d.set_item(
                "remaining_text",
                ratewarden::amount::format_base(l.remaining, l.def.decimals),
            )?;
            d.set_item("amount", l.amount)?;
            d.set_item("reset", l.reset.as_secs_f64())?;
            d.set_item("denied", l.denied)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Why it was denied or capped, in words (`None` for a plain allow).
    #[getter]
    fn reason(&self) -> Option<&str> {
        self.inner.reason.as_deref()
    }

    /// The reservation id (32 hex digits) a reserve / delegate / wait(reserve) holds.
    #[getter]
    fn reservation(&self) -> Option<String> {
        self.inner.reservation.as_ref().map(|r| r.id.to_string())
    }

    /// When that reservation's lease ends, seconds since the epoch.
    #[getter]
    fn expires_at(&self) -> Option<f64> {
        self.inner
            .reservation
            .as_ref()
            .map(|r: &ReservationInfo| r.expires_at as f64 / 1e6)
    }

    /// The priority tier it was served at (a starved background caller is promoted).
    #[getter]
    fn priority(&self) -> &'static str {
        self.inner.priority.as_str()
    }

    /// `None`, or how it was decided while the shared backend was unreachable:
    /// `"deny"`, `"allow"` or `"local"`.
    #[getter]
    fn degraded(&self) -> Option<&'static str> {
        self.inner.degraded.map(ratewarden::Degraded::as_str)
    }

    /// With `degraded`: the operation id of a request that may have reached
    /// the shared backend although its answer was lost (whether it was
    /// charged is unknown). Repeat the request with `operation=` this id to
    /// learn the original decision; it is charged at most once.
    #[getter]
    fn unconfirmed(&self) -> Option<String> {
        self.inner.unconfirmed.map(|op| op.to_string())
    }

    /// The name of the first limit that denied it, if any.
    #[getter]
    fn denied_by(&self) -> Option<&str> {
        self.inner.denied_by().map(|l| l.name())
    }

    /// The kind of that limit (`rate`, `quota`, `concurrency`, `budget`).
    #[getter]
    fn denied_kind(&self) -> Option<&'static str> {
        self.inner.denied_by().map(|l| l.kind())
    }

    /// The standard rate-limit response headers for this decision, as
    /// `(name, value)` pairs: `RateLimit-Policy` / `RateLimit` in the given style
    /// (`draft-11` default, `draft-7`, `draft-6`, `off`) and `Retry-After` when
    /// denied. With `raw=True`, as ASGI servers take them: lowercase names and
    /// values as `bytes`.
    #[pyo3(signature = (style = "draft-11", raw = false))]
    fn headers<'py>(
        &self,
        py: Python<'py>,
        style: &str,
        raw: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let style = style.parse::<HeaderStyle>().map_err(|e| to_py(&e))?;
        let out = PyList::empty(py);
        for (name, value) in rate_limit_headers(&self.inner, style) {
            if raw {
                let name = PyBytes::new(py, name.to_ascii_lowercase().as_bytes());
                out.append((name, PyBytes::new(py, value.as_bytes())))?;
            } else {
                out.append((name, value))?;
            }
        }
        Ok(out)
    }

    /// The JSON body of a 429 response for this decision (`error`, `limit`,
    /// `kind`, `reason`, `retry_after`).
    fn denial_body(&self) -> String {
        denial_body(&self.inner)
    }

    /// Every field as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("allowed", self.allowed())?;
        d.set_item("outcome", self.outcome())?;
        d.set_item("caps", self.caps(py)?)?;
        d.set_item("retry_after", self.retry_after())?;
        d.set_item("limits", self.limits(py)?)?;
        d.set_item("reason", self.reason())?;
        d.set_item("reservation", self.reservation())?;
        d.set_item("expires_at", self.expires_at())?;
        d.set_item("priority", self.priority())?;
        d.set_item("degraded", self.degraded())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let mut s = format!("Decision(outcome={:?}", self.outcome());
        if let Some(r) = self.retry_after() {
            s.push_str(&format!(", retry_after={r}"));
        }
        if let Some(by) = self.denied_by() {
            s.push_str(&format!(", denied_by={by:?}"));
        }
        if let Some(id) = self.reservation() {
            s.push_str(&format!(", reservation={id:?}"));
        }
        if let Some(d) = self.degraded() {
            s.push_str(&format!(", degraded={d:?}"));
        }
        if let Some(r) = self.reason() {
            s.push_str(&format!(", reason={r:?}"));
        }
        s.push(')');
        s
    }
}

fn receipt_dict(py: Python<'_>, r: &CommitReceipt) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("reservation", r.id.to_string())?;
    d.set_item("duplicate", r.duplicate)?;
    let charges = PyList::empty(py);
    for c in &r.charges {
        let cd = PyDict::new(py);
        cd.set_item("name", c.name())?;
        cd.set_item("unit", c.unit())?;
        cd.set_item("reserved", c.reserved)?;
        cd.set_item("charged", c.charged)?;
        cd.set_item("uncharged", c.uncharged)?;
        charges.append(cd)?;
    }
    d.set_item("charges", charges)?;
    Ok(d.into_any().unbind())
}

// ---------------------------------------------------------------------------
// Awaitables

/// An awaitable that is already complete: awaiting it returns (or raises) at
/// once, without suspending or touching the event loop.
#[pyclass(module = "ratewarden._native")]
struct Ready {
    value: Option<PyResult<Py<PyAny>>>,
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
struct Canceller {
    /// A wait to stop at its next waiting point; other operations run to the
    /// end (one backend call, bounded by its timeout): dropping one mid-call
    /// could apply it with nobody to see the answer. An answer nobody receives
    /// gives back what it holds (`_bridge.complete`, `Undo`).
    wait: Option<Arc<WaitCancel>>,
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

// ---------------------------------------------------------------------------
// Clock

/// A clock that moves only when told to, for deterministic tests of code that
/// uses ratewarden: ``Warden(policy, clock=ManualClock(start))``.
#[pyclass(frozen, module = "ratewarden._native")]
struct ManualClock {
    inner: ratewarden::ManualClock,
}

#[pymethods]
impl ManualClock {
    /// Starts at `start` seconds since the Unix epoch (default: 2026-01-01 UTC).
    #[new]
    #[pyo3(signature = (start=ratewarden::ManualClock::DEFAULT_START_SECS))]
    fn new(start: f64) -> PyResult<Self> {
        ratewarden::ManualClock::from_secs(start)
            .map(|inner| Self { inner })
            .map_err(|e| to_py(&e))
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

// ---------------------------------------------------------------------------
// Warden

/// The native warden behind `ratewarden.Warden`.
#[pyclass(frozen, module = "ratewarden._native")]
struct NativeWarden {
    /// Swapped (never locked) when a forked child reconnects: a lock another
    /// thread held at `fork()` would stay locked in the child forever.
    warden: arc_swap::ArcSwap<Warden>,
    /// The process (fork generation) the backend's connections belong to.
    generation: AtomicU32,
    config: Setup,
}

fn block<F: std::future::Future + Send>(py: Python<'_>, f: F) -> F::Output
where
    F::Output: Send,
{
    py.detach(|| runtime().block_on(f))
}

/// A guard's request converted once (scope parsed, cost resolved): reserving it
/// again costs no conversion.
#[pyclass(frozen, module = "ratewarden._native")]
struct Prepared {
    request: Request,
    lease: Option<Duration>,
    /// Wait up to this long for capacity (`None`: reserve or deny at once).
    max_wait: Option<Duration>,
}

impl Prepared {
    /// Reserves it (waiting first when `max_wait` is set), as an owned future.
    fn hold(
        &self,
        w: Warden,
        cancel: Arc<WaitCancel>,
    ) -> impl std::future::Future<Output = ratewarden::Result<CoreDecision>> + Send + 'static {
        let (request, lease, max_wait) = (self.request.clone(), self.lease, self.max_wait);
        async move {
            match max_wait {
                None => w.reserve(&request, lease).await,
                Some(m) => {
                    w.wait_cancellable(&request, WaitFor::Reserve(lease), m, &cancel)
                        .await
                }
            }
        }
    }
}

/// How an answer of type `T` becomes a Python value.
type Convert<T> = fn(Python<'_>, T) -> PyResult<Py<PyAny>>;

fn decision_to_py(py: Python<'_>, d: CoreDecision) -> PyResult<Py<PyAny>> {
    Ok(Py::new(py, Decision { inner: d })?.into_any())
}

/// What `hold` answers: the reservation id as an `int` when admitted, else the
/// (denying) decision.
fn held_to_py(py: Python<'_>, d: CoreDecision) -> PyResult<Py<PyAny>> {
    match &d.reservation {
        Some(r) => Ok(r.id.0.into_pyobject(py)?.into_any().unbind()),
        None => decision_to_py(py, d),
    }
}

fn receipt_to_py(py: Python<'_>, r: CommitReceipt) -> PyResult<Py<PyAny>> {
    receipt_dict(py, &r)
}

fn released_to_py(py: Python<'_>, b: bool) -> PyResult<Py<PyAny>> {
    Ok(pyo3::types::PyBool::new(py, b)
        .to_owned()
        .into_any()
        .unbind())
}

#[allow(clippy::cast_precision_loss)]
fn expiry_to_py(py: Python<'_>, at: i64) -> PyResult<Py<PyAny>> {
    Ok(pyo3::types::PyFloat::new(py, at as f64 / 1e6)
        .into_any()
        .unbind())
}

/// `None`: the guard does not look at the answer.
/// Balances as a list of dicts: amounts in integer base units, their decimal
/// text in the unit beside them, `reset` in seconds (None: never resets).
fn balances_to_py(py: Python<'_>, balances: Vec<Balance>) -> PyResult<Py<PyAny>> {
    let out = PyList::empty(py);
    for b in &balances {
        let d = PyDict::new(py);
        d.set_item("name", &b.name)?;
        d.set_item("kind", b.kind)?;
        d.set_item("unit", &b.unit)?;
        d.set_item("owner", b.owner.as_deref())?;
        d.set_item("limit", b.limit)?;
        d.set_item("remaining", b.remaining)?;
        d.set_item("held", b.held)?;
        let text = |v: i64| ratewarden::amount::format_base(v, b.decimals);
        d.set_item("limit_text", text(b.limit))?;
        d.set_item("remaining_text", text(b.remaining))?;
        d.set_item("held_text", text(b.held))?;
        d.set_item("reset", b.reset.map(|r| r.as_secs_f64()))?;
        out.append(d)?;
    }
    Ok(out.into_any().unbind())
}

/// What a settlement answers Python: the problem to log, or None.
fn problem_to_py(py: Python<'_>, s: Settlement) -> PyResult<Py<PyAny>> {
    Ok(match s.problem() {
        Some(p) => PyString::new(py, &p).into_any().unbind(),
        None => py.None(),
    })
}

/// Logs a settlement's problem through `ratewarden._settlement_problem`.
fn log_problem(py: Python<'_>, func: &Bound<'_, PyAny>, s: &Settlement) -> PyResult<()> {
    if let Some(problem) = s.problem() {
        static LOG: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        python_fn(py, &LOG, "ratewarden", "_settlement_problem")?.call1(py, (func, problem))?;
    }
    Ok(())
}

/// The usage a guarded call reports: `actual(result)` as a cost, read for the
/// settlement rule — no callable or `None` → the estimate; a callable that
/// raises, or returns what is not a mapping of unit to valid amounts →
/// unreadable (the estimate is charged and the reason logged). Units and
/// precision are judged by core (finer amounts are rounded up there).
fn usage_of(py: Python<'_>, actual: Option<&Bound<'_, PyAny>>, result: &Bound<'_, PyAny>) -> Usage {
    let Some(f) = actual.filter(|f| !f.is_none()) else {
        return Usage::Estimate;
    };
    let reported = match f.call1((result,)) {
        Ok(r) if r.is_none() => return Usage::Estimate,
        Ok(r) => r,
        Err(e) => return Usage::Unreadable(format!("actual() raised {}", describe_error(py, &e))),
    };
    let mapping = py
        .get_type::<PyDict>()
        .call1((&reported,))
        .ok()
        .and_then(|d| d.cast_into::<PyDict>().ok())
        .filter(|_| !reported.is_instance_of::<PyString>());
    let Some(mapping) = mapping else {
        let t = reported
            .get_type()
            .name()
            .map_or_else(|_| "?".to_owned(), |n| n.to_string());
        return Usage::Unreadable(format!(
            "actual() returned {t}, not a mapping of unit to amount"
        ));
    };
    match cost_of(Some(&mapping), "actual") {
        Ok(c) => Usage::Actual(c),
        Err(e) => Usage::Unreadable(describe_error(py, &e)),
    }
}

/// `Type: message` of a Python exception, for a log line.
fn describe_error(py: Python<'_>, e: &PyErr) -> String {
    let t = e
        .get_type(py)
        .name()
        .map_or_else(|_| "Exception".to_owned(), |n| n.to_string());
    format!("{t}: {}", e.value(py))
}

impl NativeWarden {
    fn build(py: Python<'_>, policy: Policy, config: Setup) -> PyResult<Self> {
        let warden = if config.backend.is_none() {
            at_once(config.connect(policy))
        } else {
            block(py, config.connect(policy))
        }
        .map_err(|e| to_py(&e))?;
        Ok(Self {
            warden: arc_swap::ArcSwap::from_pointee(warden),
            generation: AtomicU32::new(process_generation()),
            config,
        })
    }

    fn embedded(&self) -> bool {
        self.config.embedded()
    }

    /// The warden, reconnected first if this is a forked child.
    fn warden(&self, py: Python<'_>) -> PyResult<Warden> {
        let current = Warden::clone(&self.warden.load());
        if self.embedded() {
            return Ok(current);
        }
        let generation = process_generation();
        if self.generation.load(Ordering::Acquire) == generation {
            return Ok(current);
        }
        let fresh =
            block(py, self.config.connect(current.policy().clone())).map_err(|e| to_py(&e))?;
        self.warden.store(std::sync::Arc::new(fresh.clone()));
        self.generation.store(generation, Ordering::Release);
        Ok(fresh)
    }

    /// Runs an operation (`make` builds its future on this process's warden):
    /// decided on the calling thread when the embedded engine answers at once;
    /// otherwise (Redis, a wait) on the runtime with the GIL released.
    fn run<T, Fut>(
        &self,
        py: Python<'_>,
        make: impl FnOnce(Warden) -> Fut,
    ) -> PyResult<ratewarden::Result<T>>
    where
        T: Send,
        Fut: std::future::Future<Output = ratewarden::Result<T>> + Send,
    {
        let mut f = std::pin::pin!(make(self.warden(py)?));
        if self.embedded() {
            if let Some(r) = poll_ready(f.as_mut()) {
                return Ok(r);
            }
        }
        Ok(block(py, f))
    }

    /// A settlement on the calling thread (blocking with the GIL released
    /// when the backend must be asked).
    fn run_settle(
        &self,
        py: Python<'_>,
        id: ReservationId,
        outcome: CallOutcome,
    ) -> PyResult<Settlement> {
        let settled = self.run(py, move |w| async move {
            Ok::<_, ratewarden::Error>(w.finish(id, outcome).await)
        })?;
        settled.map_err(|e| to_py(&e))
    }

    /// The sync form (`run`, converted) or the async form (an awaitable): an
    /// already-completed one when the embedded engine answers at once, else
    /// an asyncio future completed from the runtime.
    /// `answer_with` for an operation that is one backend call (no wait to cancel).
    fn answer<T, Fut>(
        &self,
        py: Python<'_>,
        make: PyResult<impl FnOnce(Warden) -> Fut>,
        asynchronous: bool,
        convert: Convert<T>,
    ) -> PyResult<Py<PyAny>>
    where
        T: Held + Send + 'static,
        Fut: std::future::Future<Output = ratewarden::Result<T>> + Send + 'static,
    {
        self.answer_with(py, make, asynchronous, convert, None)
    }

    fn answer_with<T, Fut>(
        &self,
        py: Python<'_>,
        make: PyResult<impl FnOnce(Warden) -> Fut>,
        asynchronous: bool,
        convert: Convert<T>,
        wait: Option<Arc<WaitCancel>>,
    ) -> PyResult<Py<PyAny>>
    where
        T: Held + Send + 'static,
        Fut: std::future::Future<Output = ratewarden::Result<T>> + Send + 'static,
    {
        let make = make?;
        // A wait may sleep on a Tokio timer even when polled here first (the
        // embedded engine with the system clock): inside the runtime's context.
        let _runtime = wait.as_ref().map(|_| runtime().enter());
        if !asynchronous {
            let v = self.run(py, make)?.map_err(|e| to_py(&e))?;
            return convert(py, v);
        }
        let mut f = Box::pin(make(self.warden(py)?));
        if self.embedded() {
            if let Some(r) = poll_ready(&mut f) {
                return ready(py, r.map_err(|e| to_py(&e)).and_then(|v| convert(py, v)));
            }
        }
        spawn_async(py, f, convert, self.warden(py)?, wait)
    }

    /// Reserves a prepared request (waiting first if it says so); on the
    /// embedded engine without copying the request.
    fn reserve_prepared(&self, py: Python<'_>, p: &Prepared) -> PyResult<CoreDecision> {
        if self.embedded() && p.max_wait.is_none() {
            let w = self.warden(py)?;
            return at_once(w.reserve(&p.request, p.lease)).map_err(|e| to_py(&e));
        }
        // A wait may sleep on a Tokio timer even when polled here first.
        let _runtime = p.max_wait.map(|_| runtime().enter());
        self.run(py, |w| p.hold(w, Arc::default()))?
            .map_err(|e| to_py(&e))
    }
}

/// Work that needs the GIL, handed from runtime threads to the completer.
type Job = Box<dyn FnOnce(Python<'_>) + Send>;

/// The process's completer thread: takes the GIL once per batch of finished
/// operations and completes their asyncio futures. A fresh one after `fork()`.
fn completer() -> std::sync::mpsc::Sender<Job> {
    let generation = process_generation();
    let tx_slot = TX.load();
    let mut slot = tx_slot.lock();
    if let Some((owner, tx)) = &*slot {
        if *owner == generation {
            return tx.clone();
        }
    }
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("ratewarden-completer".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                Python::attach(|py| {
                    first(py);
                    while let Ok(job) = rx.try_recv() {
                        job(py);
                    }
                });
            }
        })
        .unwrap_or_else(|e| panic!("ratewarden: cannot start the completer thread: {e}"));
    *slot = Some((generation, tx.clone()));
    tx
}

/// An already-completed awaitable holding `value`.
fn ready(py: Python<'_>, value: PyResult<Py<PyAny>>) -> PyResult<Py<PyAny>> {
    Ok(Py::new(py, Ready { value: Some(value) })?.into_any())
}

/// Runs `f` on the runtime and returns an asyncio future of the running loop
/// that completes with its converted result; cancelling the future aborts `f`.
/// What an async answer holds that must be given back when nobody receives
/// it (the awaiting task was cancelled as the answer arrived): a reservation.
trait Held {
    fn held(&self) -> Option<ReservationId> {
        None
    }
}

impl Held for CoreDecision {
    fn held(&self) -> Option<ReservationId> {
        self.reservation.as_ref().map(|r| r.id)
    }
}
impl Held for CommitReceipt {}
impl Held for bool {}
impl Held for i64 {}
impl Held for Settlement {}
impl Held for Vec<Balance> {}

/// Releases a reservation whose answer was never received (its future was
/// cancelled as it arrived, or its loop closed first): when called, or when
/// dropped without `keep()` — an answer that never reached anyone is given
/// back whichever way it was lost. The release runs on the runtime, never
/// blocking the event loop.
#[pyclass(frozen, module = "ratewarden._native")]
struct Undo {
    warden: Warden,
    id: ReservationId,
    pending: std::sync::atomic::AtomicBool,
}

impl Undo {
    fn new(warden: Warden, id: ReservationId) -> Self {
        Self {
            warden,
            id,
            pending: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn release(&self) {
        if self.pending.swap(false, Ordering::AcqRel) {
            let (w, id) = (self.warden.clone(), self.id);
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

fn spawn_async<T, Fut, C>(
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
                Some(id) => Py::new(py, Undo::new(warden, id)).ok().map(Py::into_any),
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

fn delegate_args(
    child: &str,
    amounts: &Bound<'_, PyDict>,
    from_scope: Option<&str>,
    from_reservation: Option<&str>,
    lease: Option<f64>,
) -> PyResult<(Scope, Cost, Source, Option<Duration>)> {
    let child = Scope::parse(child).map_err(|e| to_py(&e))?;
    let amounts = cost_of(Some(amounts), "amounts")?;
    let from = Source::pick(
        from_scope,
        from_reservation,
        ["from_scope=", "from_reservation="],
    )
    .map_err(|e| to_py(&e))?;
    Ok((child, amounts, from, optional_seconds(lease, "lease")?))
}

// Every operation converts its arguments, then runs one typed core call on the
// calling thread or the runtime (`asynchronous=False`), or as an awaitable
// (`True`).
#[pymethods]
impl NativeWarden {
    /// Builds a warden from a policy document given as JSON text, or from a
    /// policy file when `path` is given.
    #[new]
    #[pyo3(signature = (json=None, path=None, backend=None, namespace="rw", on_backend_error="deny", local_share=1, timeout=None, clock=None, lazy=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        json: Option<&str>,
        path: Option<PathBuf>,
        backend: Option<String>,
        namespace: &str,
        on_backend_error: &str,
        local_share: u32,
        timeout: Option<f64>,
        clock: Option<PyRef<'_, ManualClock>>,
        lazy: bool,
    ) -> PyResult<Self> {
        let policy = match (json, path) {
            (Some(text), None) => Policy::from_str_as(text, ratewarden::Format::Json, "<dict>")
                .map_err(|e| to_py(&e))?,
            (None, Some(p)) => Policy::from_file(&p).map_err(|e| to_py(&e))?,
            _ => return Err(invalid("policy", "give exactly one of json= or path=")),
        };
        let config = Setup {
            on_error: ratewarden::ops::on_backend_error(on_backend_error, local_share)
                .map_err(|e| to_py(&e))?,
            timeout: optional_seconds(timeout, "timeout")?,
            clock: clock.map(|c| c.inner.clone()),
            lazy,
            ..Setup::new(backend.as_deref(), namespace)
        };
        Self::build(py, policy, config)
    }

    /// `"memory"` or `"redis"`.
    #[getter]
    fn backend(&self) -> &'static str {
        if self.embedded() { "memory" } else { "redis" }
    }

    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, asynchronous=false))]
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        py: Python<'_>,
        scope: &str,
        resource: Option<&str>,
        action: Option<&str>,
        cost: Option<&Bound<'_, PyDict>>,
        priority: Option<&str>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = request_of(scope, resource, action, cost, priority)
            .map(|r| move |w: Warden| async move { w.check(&r).await });
        self.answer(py, op, asynchronous, decision_to_py)
    }

    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, asynchronous=false, operation=None))]
    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &self,
        py: Python<'_>,
        scope: &str,
        resource: Option<&str>,
        action: Option<&str>,
        cost: Option<&Bound<'_, PyDict>>,
        priority: Option<&str>,
        asynchronous: bool,
        operation: Option<&str>,
    ) -> PyResult<Py<PyAny>> {
        let req = request_of(scope, resource, action, cost, priority);
        let op = operation_of(req, operation)
            .map(|r| move |w: Warden| async move { w.acquire(&r).await });
        self.answer(py, op, asynchronous, decision_to_py)
    }

    /// What is left of every limit `scope` (on `resource`) touches, charging
    /// nothing: a list of dicts (see `ratewarden.Warden.balances`).
    #[pyo3(signature = (scope, resource=None, asynchronous=false))]
    fn balances(
        &self,
        py: Python<'_>,
        scope: &str,
        resource: Option<&str>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let resource = resource.map(str::to_owned);
        let op = Scope::parse(scope)
            .map_err(|e| to_py(&e))
            .map(|s| move |w: Warden| async move { w.balances(&s, resource.as_deref()).await });
        self.answer(py, op, asynchronous, balances_to_py)
    }

    /// `Warden::admit`, for the ASGI middleware: an acquire that holds a
    /// concurrency slot (the decision's reservation) until `finish`.
    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, asynchronous=false))]
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        py: Python<'_>,
        scope: &str,
        resource: Option<&str>,
        action: Option<&str>,
        cost: Option<&Bound<'_, PyDict>>,
        priority: Option<&str>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = request_of(scope, resource, action, cost, priority)
            .map(|r| move |w: Warden| async move { w.admit(&r).await });
        self.answer(py, op, asynchronous, decision_to_py)
    }

    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, lease=None, asynchronous=false, operation=None))]
    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &self,
        py: Python<'_>,
        scope: &str,
        resource: Option<&str>,
        action: Option<&str>,
        cost: Option<&Bound<'_, PyDict>>,
        priority: Option<&str>,
        lease: Option<f64>,
        asynchronous: bool,
        operation: Option<&str>,
    ) -> PyResult<Py<PyAny>> {
        let req = request_of(scope, resource, action, cost, priority);
        let op = operation_of(req, operation).and_then(|r| {
            let lease = optional_seconds(lease, "lease")?;
            Ok(move |w: Warden| async move { w.reserve(&r, lease).await })
        });
        self.answer(py, op, asynchronous, decision_to_py)
    }

    #[pyo3(signature = (reservation, actual=None, asynchronous=false))]
    fn commit(
        &self,
        py: Python<'_>,
        reservation: &str,
        actual: Option<&Bound<'_, PyDict>>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = reservation_id(reservation).and_then(|id| {
            let actual = cost_of(actual, "actual")?;
            Ok(move |w: Warden| async move { w.commit(id, &actual).await })
        });
        self.answer(py, op, asynchronous, receipt_to_py)
    }

    #[pyo3(signature = (reservation, asynchronous=false))]
    fn release(
        &self,
        py: Python<'_>,
        reservation: &str,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = reservation_id(reservation)
            .map(|id| move |w: Warden| async move { w.release(id).await });
        self.answer(py, op, asynchronous, released_to_py)
    }

    #[pyo3(signature = (reservation, lease, asynchronous=false))]
    fn extend(
        &self,
        py: Python<'_>,
        reservation: &str,
        lease: f64,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = reservation_id(reservation).and_then(|id| {
            let lease = seconds(lease, "lease")?;
            Ok(move |w: Warden| async move { w.extend(id, lease).await })
        });
        self.answer(py, op, asynchronous, expiry_to_py)
    }

    #[pyo3(signature = (child, amounts, from_scope=None, from_reservation=None, lease=None, asynchronous=false))]
    #[allow(clippy::too_many_arguments)]
    fn delegate(
        &self,
        py: Python<'_>,
        child: &str,
        amounts: &Bound<'_, PyDict>,
        from_scope: Option<&str>,
        from_reservation: Option<&str>,
        lease: Option<f64>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op =
            delegate_args(child, amounts, from_scope, from_reservation, lease).map(
                |(child, amounts, from, lease)| {
                    move |w: Warden| async move {
                        w.delegate(from.as_from(), &child, &amounts, lease).await
                    }
                },
            );
        self.answer(py, op, asynchronous, decision_to_py)
    }

    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, max_wait=30.0, reserve=false, lease=None, asynchronous=false))]
    #[allow(clippy::too_many_arguments)]
    fn wait(
        &self,
        py: Python<'_>,
        scope: &str,
        resource: Option<&str>,
        action: Option<&str>,
        cost: Option<&Bound<'_, PyDict>>,
        priority: Option<&str>,
        max_wait: f64,
        reserve: bool,
        lease: Option<f64>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let cancel = Arc::new(WaitCancel::default());
        let stop = Arc::clone(&cancel);
        let op = request_of(scope, resource, action, cost, priority).and_then(|r| {
            let what = if reserve {
                WaitFor::Reserve(optional_seconds(lease, "lease")?)
            } else {
                WaitFor::Acquire
            };
            let max_wait = seconds(max_wait, "max_wait")?;
            Ok(move |w: Warden| async move { w.wait_cancellable(&r, what, max_wait, &stop).await })
        });
        self.answer_with(py, op, asynchronous, decision_to_py, Some(cancel))
    }

    /// Converts a guard's request once: reserve (`max_wait` unset) or wait up to
    /// `max_wait` seconds and reserve.
    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, lease=None, max_wait=None))]
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &self,
        scope: &str,
        resource: Option<&str>,
        action: Option<&str>,
        cost: Option<&Bound<'_, PyDict>>,
        priority: Option<&str>,
        lease: Option<f64>,
        max_wait: Option<f64>,
    ) -> PyResult<Prepared> {
        Ok(Prepared {
            request: request_of(scope, resource, action, cost, priority)?,
            lease: optional_seconds(lease, "lease")?,
            max_wait: optional_seconds(max_wait, "max_wait")?,
        })
    }

    /// Reserves a prepared request: the reservation id (an `int`) when admitted,
    /// else the decision that denied it.
    #[pyo3(signature = (prepared, asynchronous=false))]
    fn hold(&self, py: Python<'_>, prepared: &Prepared, asynchronous: bool) -> PyResult<Py<PyAny>> {
        if asynchronous {
            let cancel = Arc::new(WaitCancel::default());
            let stop = Arc::clone(&cancel);
            let op = Ok(move |w: Warden| prepared.hold(w, stop));
            return self.answer_with(py, op, true, held_to_py, Some(cancel));
        }
        let d = self.reserve_prepared(py, prepared)?;
        held_to_py(py, d)
    }

    /// Runs `func(*args, **kwargs)` under a hold of `prepared` — the whole
    /// guard of a sync function in one native call: denied → the
    /// `RateLimited` / `BudgetExceeded` of `_errors.denied`; `func` raises →
    /// released, re-raised; else committed with `actual(result)` (or the
    /// estimate) and its result returned — also when the backend could not
    /// confirm the commit (then `ratewarden._unsettled` logs it).
    #[pyo3(signature = (prepared, func, args, kwargs=None, actual=None))]
    fn guarded_call(
        &self,
        py: Python<'_>,
        prepared: &Prepared,
        func: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        actual: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let d = self.reserve_prepared(py, prepared)?;
        let Some(id) = d.reservation.as_ref().map(|r| r.id) else {
            static DENIED: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            let exc = python_fn(py, &DENIED, "ratewarden._errors", "denied")?
                .call1(py, (Decision { inner: d },))?;
            return Err(PyErr::from_value(exc.into_bound(py)));
        };
        let result = match func.call(args, kwargs) {
            Ok(r) => r,
            Err(e) => {
                // The call failed: released. The user's error propagates
                // unchanged; a release that failed is logged, not raised.
                let s = self.run_settle(py, id, CallOutcome::Failed)?;
                log_problem(py, func, &s)?;
                return Err(e);
            }
        };
        let usage = usage_of(py, actual, &result);
        let s = self.run_settle(py, id, CallOutcome::Ran(usage))?;
        log_problem(py, func, &s)?;
        Ok(result.unbind())
    }

    /// Settles a held reservation (by its `int` id) by the settlement rule of
    /// `ratewarden::settle`: `failed` → released; else committed at
    /// `actual(result)` (rounded up to each unit), or at the estimate when
    /// `actual` is None, raises, or returns something that is not a valid
    /// cost. Returns the problem to log (a `str`), or None; never raises for
    /// the settlement itself.
    #[pyo3(signature = (id, failed, actual=None, result=None, asynchronous=false))]
    fn finish(
        &self,
        py: Python<'_>,
        id: u128,
        failed: bool,
        actual: Option<&Bound<'_, PyAny>>,
        result: Option<&Bound<'_, PyAny>>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let id = ReservationId(id);
        let outcome = if failed {
            CallOutcome::Failed
        } else {
            let none = py.None().into_bound(py);
            CallOutcome::Ran(usage_of(py, actual, result.unwrap_or(&none)))
        };
        let op = Ok(move |w: Warden| async move {
            Ok::<_, ratewarden::Error>(w.finish(id, outcome).await)
        });
        self.answer(py, op, asynchronous, problem_to_py)
    }
}

/// A scope string from `(kind, id)` pairs; ids may hold any text (`/`, `:`,
/// spaces…): they are escaped, never interpreted.
#[pyfunction]
fn scope_of(segments: Vec<(String, String)>) -> PyResult<String> {
    Scope::from_segments(segments.iter().map(|(k, i)| (k.as_str(), i.as_str())))
        .map(|s| s.as_str().to_owned())
        .map_err(|e| to_py(&e))
}

/// The canonical name of a rate-limit header style (`draft-11`, `draft-7`,
/// `draft-6`, `off`); `InvalidInput` for anything else.
#[pyfunction]
fn header_style(style: &str) -> PyResult<&'static str> {
    style
        .parse::<HeaderStyle>()
        .map(HeaderStyle::as_str)
        .map_err(|e| to_py(&e))
}

/// Who the client of an HTTP request is (core `http::ClientIdentity`): the
/// proxies trusted — `False`, `True` (one hop), a hop count, or networks (a
/// comma-separated string or a list) — and the IPv6 subnet clients are keyed by.
#[pyclass(frozen, module = "ratewarden._native")]
struct ClientIdentity {
    inner: ratewarden::http::ClientIdentity,
}

#[pymethods]
impl ClientIdentity {
    #[new]
    #[pyo3(signature = (trust_proxy=None, ipv6_subnet=56))]
    fn new(trust_proxy: Option<&Bound<'_, PyAny>>, ipv6_subnet: i64) -> PyResult<Self> {
        use serde_json::Value;
        let bad = |why: String| invalid("trust_proxy", why);
        let setting = match trust_proxy {
            None => Value::Null,
            Some(v) if v.is_instance_of::<pyo3::types::PyBool>() => Value::Bool(v.is_truthy()?),
            Some(v) if v.is_instance_of::<pyo3::types::PyInt>() => {
                let n: i64 = v
                    .extract()
                    .map_err(|_| bad("the hop count is out of range".into()))?;
                serde_json::json!(n)
            }
            Some(v) if v.is_instance_of::<PyString>() => Value::String(v.extract()?),
            Some(v) if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() => {
                let mut items = Vec::new();
                for item in v.try_iter()? {
                    let item = item?;
                    let text: String = item.extract().map_err(|_| {
                        bad(format!(
                            "expected networks as strings, got {}",
                            type_name(&item)
                        ))
                    })?;
                    items.push(Value::String(text));
                }
                Value::Array(items)
            }
            Some(v) => {
                return Err(bad(format!(
                    "expected a bool, a hop count, or proxy networks, got {}",
                    type_name(v)
                )));
            }
        };
        let trust = ratewarden::http::TrustProxy::from_json(&setting).map_err(|e| to_py(&e))?;
        let subnet = u8::try_from(ipv6_subnet).unwrap_or(0);
        let inner = ratewarden::http::ClientIdentity::new(trust, subnet).map_err(|e| to_py(&e))?;
        Ok(Self { inner })
    }

    /// Whether `X-Forwarded-For` is read at all.
    #[getter]
    fn trusts_proxies(&self) -> bool {
        *self.inner.trust() != ratewarden::http::TrustProxy::Nobody
    }

    /// The default scope of a request, `ip:<client address>`.
    #[pyo3(signature = (peer, forwarded_for=None))]
    fn scope(&self, peer: Option<&str>, forwarded_for: Option<&str>) -> PyResult<String> {
        self.inner.scope(peer, forwarded_for).map_err(|e| to_py(&e))
    }
}

/// A Python value's type name, for messages.
fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// A Python function of the package, looked up once.
fn python_fn<'a>(
    py: Python<'_>,
    cell: &'a PyOnceLock<Py<PyAny>>,
    module: &str,
    name: &str,
) -> PyResult<&'a Py<PyAny>> {
    cell.get_or_try_init(py, || Ok(py.import(module)?.getattr(name)?.unbind()))
}

/// The `ratewarden._native` extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Made now, by the importing thread: a fork while another thread was
    // initialising them would leave the child waiting for that thread.
    std::sync::LazyLock::force(&RT);
    std::sync::LazyLock::force(&TX);
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(scope_of, m)?)?;
    m.add_function(wrap_pyfunction!(header_style, m)?)?;
    let after_fork = wrap_pyfunction!(_after_fork_in_child, m)?;
    let hooks = PyDict::new(m.py());
    hooks.set_item("after_in_child", &after_fork)?;
    m.py()
        .import("os")?
        .call_method("register_at_fork", (), Some(&hooks))?;
    m.add("__version__", ratewarden::VERSION)?;
    m.add_class::<NativeWarden>()?;
    m.add_class::<Decision>()?;
    m.add_class::<Ready>()?;
    m.add_class::<Canceller>()?;
    m.add_class::<ManualClock>()?;
    m.add_class::<Prepared>()?;
    m.add_class::<ClientIdentity>()?;
    m.add_class::<Undo>()?;
    Ok(())
}
