//! Decisions, receipts and balances as Python values.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// The answer to check / acquire / reserve / delegate / wait (see `Decision` in
/// the `ratewarden` package docs). Values are plain Python types.
#[pyclass(frozen, module = "ratewarden._native")]
pub(crate) struct Decision {
    pub(crate) inner: CoreDecision,
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
    /// `sequential`, `backpressure` (the limited workflow stages before this
    /// one, `workflow/stage`) — only those set.
    #[getter]
    fn caps<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        caps_dict(py, &self.inner.caps)
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

    /// The traffic light of the request's resource when it coordinates on
    /// its upstream (`upstream:` in the policy): `{"zone": "unknown" |
    /// "green" | "amber" | "red", "left": share of the tightest dimension
    /// (0-1) or None, "dimension": its name or None, "breaker": the circuit
    /// breaker's state, "sequential": whether calls go one at a time}`;
    /// else `None`.
    #[getter]
    fn light<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.inner
            .light
            .as_ref()
            .map(|l| light_dict(py, l))
            .transpose()
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
        let style = style.parse::<HeaderStyle>().or_raise()?;
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
        d.set_item("light", self.light(py)?)?;
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

pub(crate) fn receipt_dict(py: Python<'_>, r: &CommitReceipt) -> PyResult<Py<PyAny>> {
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
        cd.set_item("debt", c.debt)?;
        charges.append(cd)?;
    }
    d.set_item("charges", charges)?;
    Ok(d.into_any().unbind())
}

/// How an answer of type `T` becomes a Python value.
pub(crate) type Convert<T> = fn(Python<'_>, T) -> PyResult<Py<PyAny>>;

pub(crate) fn decision_to_py(py: Python<'_>, d: CoreDecision) -> PyResult<Py<PyAny>> {
    Ok(Py::new(py, Decision { inner: d })?.into_any())
}

/// What `hold` answers: the reservation id as an `int` when admitted, else the
/// (denying) decision.
pub(crate) fn held_to_py(py: Python<'_>, d: CoreDecision) -> PyResult<Py<PyAny>> {
    match &d.reservation {
        Some(r) if d.caps.is_empty() => Ok(r.id.0.into_pyobject(py)?.into_any().unbind()),
        // Allowed with caps: the guarded call is told them (`current_caps()`).
        Some(r) => Ok({
            CAPS_SEEN.store(true, Ordering::Relaxed);
            (r.id.0, caps_dict(py, &d.caps)?)
        }
        .into_pyobject(py)?
        .into_any()
        .unbind()),
        None => decision_to_py(py, d),
    }
}

/// Whether a guarded call in this process was ever allowed with caps: until
/// then a guarded call need not look for an enclosing one's caps to hide.
pub(crate) static CAPS_SEEN: AtomicBool = AtomicBool::new(false);

/// A decision's caps as a dict: only those set.
pub(crate) fn caps_dict<'py>(
    py: Python<'py>,
    c: &ratewarden::decision::Caps,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    if let Some(v) = c.delay_ms {
        d.set_item("delay_ms", v)?;
    }
    if let Some(v) = c.max_tokens {
        d.set_item("max_tokens", v)?;
    }
    if let Some(v) = &c.model {
        d.set_item("model", &**v)?;
    }
    if c.sequential {
        d.set_item("sequential", true)?;
    }
    if !c.backpressure.is_empty() {
        let stages: Vec<&str> = c.backpressure.stages().iter().map(|s| &**s).collect();
        d.set_item("backpressure", stages)?;
    }
    Ok(d)
}

pub(crate) fn receipt_to_py(py: Python<'_>, r: CommitReceipt) -> PyResult<Py<PyAny>> {
    receipt_dict(py, &r)
}

/// An allocation as a dict: `pools` (limit name → amount per window, in the
/// unit's decimals) and `active_until` (seconds since the epoch).
#[allow(clippy::cast_precision_loss)]
pub(crate) fn allocation_to_py(py: Python<'_>, a: ratewarden::Allocation) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    let pools = PyDict::new(py);
    for (name, amount) in &a.pools {
        pools.set_item(name, amount)?;
    }
    d.set_item("pools", pools)?;
    d.set_item("active_until", a.active_until as f64 / 1e6)?;
    Ok(d.into_any().unbind())
}

pub(crate) fn released_to_py(py: Python<'_>, b: bool) -> PyResult<Py<PyAny>> {
    Ok(pyo3::types::PyBool::new(py, b)
        .to_owned()
        .into_any()
        .unbind())
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn expiry_to_py(py: Python<'_>, at: i64) -> PyResult<Py<PyAny>> {
    Ok(pyo3::types::PyFloat::new(py, at as f64 / 1e6)
        .into_any()
        .unbind())
}

/// `None`: the guard does not look at the answer.
/// A top-up as a dict: `limit`, `unit`, `credited` and `spent` in base units
/// with their `*_text` decimals.
pub(crate) fn top_up_to_py(py: Python<'_>, t: ratewarden::decision::TopUp) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("limit", &t.limit)?;
    d.set_item("unit", &t.unit)?;
    d.set_item("credited", t.credited)?;
    d.set_item(
        "credited_text",
        ratewarden::amount::format_base(t.credited, t.decimals),
    )?;
    d.set_item("spent", t.spent)?;
    d.set_item(
        "spent_text",
        ratewarden::amount::format_base(t.spent, t.decimals),
    )?;
    Ok(d.into_any().unbind())
}

/// Balances as a list of dicts: amounts in integer base units, their decimal
/// text in the unit beside them, `reset` in seconds (None: never resets).
pub(crate) fn balances_to_py(py: Python<'_>, balances: Vec<Balance>) -> PyResult<Py<PyAny>> {
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
pub(crate) fn problem_to_py(py: Python<'_>, s: Settlement) -> PyResult<Py<PyAny>> {
    Ok(match s.problem() {
        Some(p) => PyString::new(py, &p).into_any().unbind(),
        None => py.None(),
    })
}

fn share(permille: Option<u16>) -> Option<f64> {
    permille.map(|p| f64::from(p) / 1000.0)
}

fn light_dict<'py>(
    py: Python<'py>,
    l: &ratewarden::upstream::Light,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("zone", l.zone.as_str())?;
    d.set_item("left", share(l.left))?;
    d.set_item(
        "dimension",
        l.dimension.map(ratewarden::upstream::Dimension::as_str),
    )?;
    d.set_item("breaker", l.breaker.as_str())?;
    d.set_item("sequential", l.sequential)?;
    Ok(d)
}

/// An upstream's state as a dict: `resource`, `zone`, `previous` (the zone
/// before this response), `left` (0-1), `blocked` (seconds everyone still
/// waits, or None), `breaker` (`closed`, `pre_emptive_open`, `open`,
/// `half_open`), `sequential` (seconds of sequential mode left, or None),
/// `quotas` (fresh dimensions: `dimension`, `limit`,
/// `remaining` — observed less admitted since —, `observed`, `reset` and
/// `age` in seconds, `burn` per second) and `warnings`.
pub(crate) fn upstream_to_py(py: Python<'_>, v: ratewarden::UpstreamView) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("resource", &v.resource)?;
    d.set_item("zone", v.zone.as_str())?;
    d.set_item("previous", v.previous.as_str())?;
    d.set_item("left", share(v.left))?;
    d.set_item("blocked", v.blocked.map(|b| b.as_secs_f64()))?;
    d.set_item("breaker", v.breaker.as_str())?;
    d.set_item("sequential", v.sequential.map(|t| t.as_secs_f64()))?;
    let quotas = PyList::empty(py);
    for q in &v.quotas {
        let qd = PyDict::new(py);
        qd.set_item("dimension", q.dimension.as_str())?;
        qd.set_item("limit", q.limit)?;
        qd.set_item("remaining", q.remaining)?;
        qd.set_item("observed", q.observed)?;
        qd.set_item("reset", q.reset.map(|r| r.as_secs_f64()))?;
        qd.set_item("age", q.age.as_secs_f64())?;
        qd.set_item("burn", q.burn)?;
        quotas.append(qd)?;
    }
    d.set_item("quotas", quotas)?;
    d.set_item("warnings", v.warnings)?;
    Ok(d.into_any().unbind())
}

/// A turn taken at an ordered lock as its id (32 hex digits), or `None`.
pub(crate) fn turn_to_py(py: Python<'_>, v: Option<ratewarden::Turn>) -> PyResult<Py<PyAny>> {
    let id = v.map(|t| format!("{:032x}", t.id()));
    Ok(id.into_pyobject(py)?.into_any().unbind())
}

/// A priced usage as a dict: `unit`, `amount` (base units), `amount_text`
/// (the decimal in the unit), `decimals`, `input_tokens`, `output_tokens`,
/// and `cost` — the unit → amount mapping a decision charges (decimal text
/// for the money unit, ints for token counts), usable as a `cost=` again.
pub(crate) fn priced_to_py(py: Python<'_>, p: &Priced, cost: &Cost) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("unit", &*p.unit)?;
    d.set_item("amount", p.amount)?;
    d.set_item("amount_text", p.money().to_string())?;
    d.set_item("decimals", p.decimals)?;
    d.set_item("input_tokens", p.input_tokens)?;
    d.set_item("output_tokens", p.output_tokens)?;
    let c = PyDict::new(py);
    for (unit, amount) in cost.iter() {
        match amount.parts() {
            (v, 0) => c.set_item(unit, v)?,
            _ => c.set_item(unit, amount.to_string())?,
        }
    }
    d.set_item("cost", c)?;
    Ok(d.into_any().unbind())
}
