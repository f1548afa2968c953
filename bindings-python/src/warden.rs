//! `NativeWarden`: every operation of `ratewarden.Warden`, sync or async.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// The native warden behind `ratewarden.Warden`.
#[pyclass(frozen, module = "ratewarden._native")]
pub(crate) struct NativeWarden {
    /// Swapped (never locked) when a forked child reconnects: a lock another
    /// thread held at `fork()` would stay locked in the child forever.
    pub(crate) warden: arc_swap::ArcSwap<Warden>,
    /// The process (fork generation) the backend's connections belong to.
    pub(crate) generation: AtomicU32,
    pub(crate) config: Setup,
}

impl NativeWarden {
    /// `cost` (`estimate = false`) or `estimate` of `usage` on `resource`.
    fn priced(
        &self,
        py: Python<'_>,
        resource: &str,
        usage: &Bound<'_, PyDict>,
        estimate: bool,
    ) -> PyResult<Py<PyAny>> {
        let usage = pricing_usage_of(usage, "usage")?;
        let w = self.warden(py)?;
        let priced = if estimate {
            w.estimate(resource, &usage)
        } else {
            w.cost(resource, &usage)
        }
        .or_raise()?;
        priced_to_py(py, &priced, &w.charge_of(&priced))
    }

    fn build(py: Python<'_>, policy: Policy, config: Setup) -> PyResult<Self> {
        let warden = if config.backend.is_none() {
            at_once(config.connect(policy))
        } else {
            block(py, config.connect(policy))
        }
        .or_raise()?;
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
        let fresh = block(py, self.config.connect((*current.policy()).clone())).or_raise()?;
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
        settled.or_raise()
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
            let v = self.run(py, make)?.or_raise()?;
            return convert(py, v);
        }
        let mut f = Box::pin(make(self.warden(py)?));
        if self.embedded() {
            if let Some(r) = poll_ready(&mut f) {
                return ready(py, r.or_raise().and_then(|v| convert(py, v)));
            }
        }
        spawn_async(py, f, convert, self.warden(py)?, wait)
    }

    /// Reserves a prepared request (waiting first if it says so); on the
    /// embedded engine without copying the request.
    fn reserve_prepared(&self, py: Python<'_>, p: &Prepared) -> PyResult<CoreDecision> {
        if self.embedded() && p.max_wait.is_none() {
            let w = self.warden(py)?;
            return at_once(w.reserve(&p.request, p.lease)).or_raise();
        }
        // A wait may sleep on a Tokio timer even when polled here first.
        let _runtime = p.max_wait.map(|_| runtime().enter());
        self.run(py, |w| p.hold(w, Arc::default()))?.or_raise()
    }
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
        let policy = policy_of(json, path)?;
        let config = Setup {
            on_error: ratewarden::ops::on_backend_error(on_backend_error, local_share)
                .or_raise()?,
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

    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, asynchronous=false, usage=None))]
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
        usage: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let op = with_usage(request_of(scope, resource, action, cost, priority), usage)
            .map(|r| move |w: Warden| async move { w.check(&r).await });
        self.answer(py, op, asynchronous, decision_to_py)
    }

    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, asynchronous=false, operation=None, usage=None))]
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
        usage: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let req = with_usage(request_of(scope, resource, action, cost, priority), usage);
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
            .or_raise()
            .map(|s| move |w: Warden| async move { w.balances(&s, resource.as_deref()).await });
        self.answer(py, op, asynchronous, balances_to_py)
    }

    /// Tops up `limit` of `scope` (on `resource`) by `amount`: a dict (see
    /// `ratewarden.Warden.top_up`).
    #[pyo3(signature = (scope, limit, amount, resource=None, asynchronous=false))]
    fn top_up(
        &self,
        py: Python<'_>,
        scope: &str,
        limit: String,
        amount: &Bound<'_, PyAny>,
        resource: Option<String>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op =
            Scope::parse(scope).or_raise().and_then(|s| {
                let amount = amount_of(amount, "amount")?;
                Ok(move |w: Warden| async move {
                    w.top_up(&s, resource.as_deref(), &limit, amount).await
                })
            });
        self.answer(py, op, asynchronous, top_up_to_py)
    }

    /// `Warden::observe` (without `status`) or `Warden::report`: records what
    /// one upstream response's headers said about `resource`'s upstream; a
    /// dict of its state after (see `ratewarden.Warden.observe`).
    #[pyo3(signature = (resource, headers, status=None, asynchronous=false))]
    fn observe(
        &self,
        py: Python<'_>,
        resource: String,
        headers: Vec<(String, String)>,
        status: Option<i64>,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let status = match status {
            None => Ok(None),
            Some(s) => u16::try_from(s)
                .map(Some)
                .map_err(|_| ratewarden::Error::InvalidArgument {
                    what: "status",
                    message: format!("{s} is not an HTTP status (100-599)"),
                }),
        };
        let op = status.or_raise().map(|status| {
            move |w: Warden| async move {
                let pairs: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                match status {
                    None => w.observe(&resource, &pairs).await,
                    Some(s) => w.report(&resource, s, &pairs).await,
                }
            }
        });
        self.answer(py, op, asynchronous, upstream_to_py)
    }

    /// Raises unless the request is valid for the policy and its resource
    /// coordinates on its upstream (`upstream:` in the policy); asks no
    /// backend (a governed client checks its options when it is made).
    #[pyo3(signature = (scope, resource, cost=None, priority=None))]
    fn check_governed(
        &self,
        scope: &str,
        resource: &str,
        cost: Option<&Bound<'_, PyDict>>,
        priority: Option<&str>,
    ) -> PyResult<()> {
        let req = request_of(scope, Some(resource), None, cost, priority)?;
        self.warden.load().check_governed(&req).or_raise()
    }

    /// `Warden::allocate`: a soft allocation of `resource`'s pools for the
    /// agent scope `agent` ({"pools": {name: amount}, "active_until": s}).
    #[pyo3(signature = (agent, resource, amounts, lease, asynchronous=false))]
    fn allocate(
        &self,
        py: Python<'_>,
        agent: &str,
        resource: String,
        amounts: &Bound<'_, PyDict>,
        lease: f64,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = Scope::parse(agent).or_raise().and_then(|agent| {
            let amounts = cost_of(Some(amounts), "amounts")?;
            let lease = seconds(lease, "lease")?;
            Ok(move |w: Warden| async move { w.allocate(&agent, &resource, &amounts, lease).await })
        });
        self.answer(py, op, asynchronous, allocation_to_py)
    }

    /// `Warden::heartbeat`: renews every allocation of `agent`; how many.
    #[pyo3(signature = (agent, asynchronous=false))]
    fn heartbeat(&self, py: Python<'_>, agent: &str, asynchronous: bool) -> PyResult<Py<PyAny>> {
        let op = Scope::parse(agent)
            .or_raise()
            .map(|agent| move |w: Warden| async move { w.heartbeat(&agent).await });
        self.answer(py, op, asynchronous, |py, n: usize| {
            Ok(n.into_pyobject(py)?.into_any().unbind())
        })
    }

    /// `Warden::deallocate`: gives up `agent`'s allocation of `resource`.
    #[pyo3(signature = (agent, resource, asynchronous=false))]
    fn deallocate(
        &self,
        py: Python<'_>,
        agent: &str,
        resource: String,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = Scope::parse(agent)
            .or_raise()
            .map(|agent| move |w: Warden| async move { w.deallocate(&agent, &resource).await });
        self.answer(py, op, asynchronous, released_to_py)
    }

    /// `Warden::upstream`: `resource`'s upstream state, changing nothing.
    #[pyo3(signature = (resource, asynchronous=false))]
    fn upstream(
        &self,
        py: Python<'_>,
        resource: String,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = PyResult::Ok(move |w: Warden| async move { w.upstream(&resource).await });
        self.answer(py, op, asynchronous, upstream_to_py)
    }

    /// `Warden::sequential`: takes `resource`'s ordered lock, waiting up to
    /// `max_wait` seconds; the turn's id (32 hex digits), or None when the
    /// time ran out. Held for at most `hold` seconds.
    #[pyo3(signature = (resource, hold, max_wait, asynchronous=false))]
    fn sequential(
        &self,
        py: Python<'_>,
        resource: String,
        hold: f64,
        max_wait: f64,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = seconds(hold, "hold").and_then(|hold| {
            let max_wait = seconds(max_wait, "max_wait")?;
            Ok(move |w: Warden| async move { w.sequential(&resource, hold, max_wait).await })
        });
        let cancel = Some(Arc::new(WaitCancel::default()));
        self.answer_with(py, op, asynchronous, turn_to_py, cancel)
    }

    /// `Warden::release_turn`: whether the turn still held the lock.
    #[pyo3(signature = (resource, turn, asynchronous=false))]
    fn release_turn(
        &self,
        py: Python<'_>,
        resource: String,
        turn: &str,
        asynchronous: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = ratewarden::ReservationId::parse(turn).or_raise().map(|id| {
            move |w: Warden| async move {
                w.release_turn(&ratewarden::Turn::from_parts(&resource, id.0))
                    .await
            }
        });
        self.answer(py, op, asynchronous, released_to_py)
    }

    /// `Warden::admit`, for the ASGI middleware: an acquire that holds a
    /// concurrency slot (the decision's reservation) until `finish`.
    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, asynchronous=false, usage=None))]
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
        usage: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let op = with_usage(request_of(scope, resource, action, cost, priority), usage)
            .map(|r| move |w: Warden| async move { w.admit(&r).await });
        self.answer(py, op, asynchronous, decision_to_py)
    }

    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, lease=None, asynchronous=false, operation=None, usage=None))]
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
        usage: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let req = with_usage(request_of(scope, resource, action, cost, priority), usage);
        let op = operation_of(req, operation).and_then(|r| {
            let lease = optional_seconds(lease, "lease")?;
            Ok(move |w: Warden| async move { w.reserve(&r, lease).await })
        });
        self.answer(py, op, asynchronous, decision_to_py)
    }

    /// Commits at `actual` (a cost), or at the price of `usage` on `resource`.
    #[pyo3(signature = (reservation, actual=None, asynchronous=false, usage=None, resource=None))]
    fn commit(
        &self,
        py: Python<'_>,
        reservation: &str,
        actual: Option<&Bound<'_, PyDict>>,
        asynchronous: bool,
        usage: Option<&Bound<'_, PyDict>>,
        resource: Option<&str>,
    ) -> PyResult<Py<PyAny>> {
        let op = reservation_id(reservation).and_then(|id| {
            let actual = cost_of(actual, "actual")?;
            let priced = match (usage, resource) {
                (None, _) => None,
                (Some(u), Some(r)) => Some((r.to_owned(), pricing_usage_of(u, "usage")?)),
                (Some(_), None) => {
                    return Err(invalid(
                        "resource",
                        "a commit by usage needs the resource whose prices turn it into a cost",
                    ));
                }
            };
            if priced.is_some() && !actual.is_empty() {
                return Err(invalid("actual", "give a cost or a usage, not both"));
            }
            Ok(move |w: Warden| async move {
                match &priced {
                    Some((r, u)) => w.commit_usage(id, r, u).await,
                    None => w.commit(id, &actual).await,
                }
            })
        });
        self.answer(py, op, asynchronous, receipt_to_py)
    }

    /// Calls `callback` with each event (its envelope as JSON text) that
    /// `events` wants (types or prefixes; none: all), on a thread of its own.
    #[pyo3(signature = (callback, events=None))]
    fn listen(
        &self,
        py: Python<'_>,
        callback: Py<PyAny>,
        events: Option<Vec<String>>,
    ) -> PyResult<NativeListener> {
        NativeListener::start(&self.warden(py)?, callback, events)
    }

    /// Waits up to `timeout` seconds until the Redis outlets handled every
    /// event emitted so far; `True` if they did.
    #[pyo3(signature = (timeout=5.0))]
    fn flush_outlets(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let t = seconds(timeout, "timeout")?;
        let w = self.warden(py)?;
        // On the runtime (its timer), with the GIL released.
        Ok(block(py, async move { w.flush_outlets(t).await }))
    }

    /// What the policy's Redis outlets (`events:`) did: a dict of
    /// `appended`, `published`, `dropped`, `failed` and `last_error`.
    fn outlet_stats(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let s = self.warden(py)?.outlet_stats();
        let out = PyDict::new(py);
        out.set_item("appended", s.appended)?;
        out.set_item("published", s.published)?;
        out.set_item("dropped", s.dropped)?;
        out.set_item("failed", s.failed)?;
        out.set_item("last_error", s.last_error)?;
        Ok(out.into_any().unbind())
    }

    /// Calls `callback` with each audit record (JSON text) on a thread of its own.
    fn on_audit(&self, py: Python<'_>, callback: Py<PyAny>) -> PyResult<NativeListener> {
        NativeListener::audit(&self.warden(py)?, callback)
    }

    /// What the policy's audit sinks (`audit:`) did: a dict of `written`,
    /// `appended`, `dropped`, `failed` and `last_error`.
    fn audit_stats(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let s = self.warden(py)?.audit_stats();
        let out = PyDict::new(py);
        out.set_item("written", s.written)?;
        out.set_item("appended", s.appended)?;
        out.set_item("dropped", s.dropped)?;
        out.set_item("failed", s.failed)?;
        out.set_item("last_error", s.last_error)?;
        Ok(out.into_any().unbind())
    }

    /// Puts a new policy (`json=` text or a `path=`) in force; a dict of the
    /// limits `added`, `removed`, `changed` and the resources `repriced`.
    #[pyo3(signature = (json=None, path=None))]
    fn reload(
        &self,
        py: Python<'_>,
        json: Option<&str>,
        path: Option<PathBuf>,
    ) -> PyResult<Py<PyAny>> {
        let policy = policy_of(json, path)?;
        let changes = self.warden(py)?.reload(policy).or_raise()?;
        let out = PyDict::new(py);
        out.set_item("added", changes.added)?;
        out.set_item("removed", changes.removed)?;
        out.set_item("changed", changes.changed)?;
        out.set_item("repriced", changes.repriced)?;
        Ok(out.into_any().unbind())
    }

    /// Waits up to `timeout` seconds until the audit sinks wrote every record so far.
    #[pyo3(signature = (timeout=5.0))]
    fn flush_audit(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let t = seconds(timeout, "timeout")?;
        let w = self.warden(py)?;
        // On the runtime (its timer), with the GIL released.
        Ok(block(py, async move { w.flush_audit(t).await }))
    }

    /// What the policy's `webhooks:` deliveries did: a dict of `deliveries`
    /// (every attempt), `dead_letters` and `dropped`.
    #[allow(clippy::cast_precision_loss)]
    fn webhook_log(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let log = self.warden(py)?.webhook_log();
        let out = PyDict::new(py);
        let deliveries = PyList::empty(py);
        for d in &log.deliveries {
            let x = PyDict::new(py);
            x.set_item("message_id", &d.message_id)?;
            x.set_item("event_type", d.event_type)?;
            x.set_item("url", &d.url)?;
            x.set_item("attempt", d.attempt)?;
            x.set_item("status", d.status)?;
            x.set_item("error", d.error.as_deref())?;
            x.set_item("at", d.at as f64 / 1e6)?;
            deliveries.append(x)?;
        }
        let dead = PyList::empty(py);
        for d in &log.dead_letters {
            let x = PyDict::new(py);
            x.set_item("message_id", &d.message.id)?;
            x.set_item("event_type", d.event_type)?;
            x.set_item("url", &d.url)?;
            x.set_item("attempts", d.attempts)?;
            x.set_item("last", &d.last)?;
            x.set_item("body", &d.message.body)?;
            dead.append(x)?;
        }
        out.set_item("deliveries", deliveries)?;
        out.set_item("dead_letters", dead)?;
        out.set_item("dropped", log.dropped)?;
        Ok(out.into_any().unbind())
    }

    /// What `usage` costs on `resource` at its prices now (the actual bill:
    /// `output_tokens` priced); a dict (see `priced_to_py`).
    #[pyo3(signature = (resource, usage))]
    fn cost(
        &self,
        py: Python<'_>,
        resource: &str,
        usage: &Bound<'_, PyDict>,
    ) -> PyResult<Py<PyAny>> {
        self.priced(py, resource, usage, false)
    }

    /// What a call with `usage` may cost on `resource` now (`max_output_tokens`
    /// priced when given: what a reservation holds).
    #[pyo3(signature = (resource, usage))]
    fn estimate(
        &self,
        py: Python<'_>,
        resource: &str,
        usage: &Bound<'_, PyDict>,
    ) -> PyResult<Py<PyAny>> {
        self.priced(py, resource, usage, true)
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

    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, max_wait=30.0, reserve=false, lease=None, asynchronous=false, usage=None))]
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
        usage: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let cancel = Arc::new(WaitCancel::default());
        let stop = Arc::clone(&cancel);
        let op = with_usage(request_of(scope, resource, action, cost, priority), usage).and_then(|r| {
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
    #[pyo3(signature = (scope, resource=None, action=None, cost=None, priority=None, lease=None, max_wait=None, usage=None))]
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
        usage: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Prepared> {
        Ok(Prepared {
            request: with_usage(request_of(scope, resource, action, cost, priority), usage)?,
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
        // The call sees its caps through `ratewarden.current_caps()`.
        let token = if d.caps.is_empty() && !CAPS_SEEN.load(Ordering::Relaxed) {
            None
        } else {
            let caps = if d.caps.is_empty() {
                None
            } else {
                CAPS_SEEN.store(true, Ordering::Relaxed);
                Some(caps_dict(py, &d.caps)?)
            };
            static ENTER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            Some(python_fn(py, &ENTER, "ratewarden", "_caps_enter")?.call1(py, (caps,))?)
                .filter(|token| !token.is_none(py))
        };
        let called = func.call(args, kwargs);
        if let Some(token) = token {
            static EXIT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            python_fn(py, &EXIT, "ratewarden", "_caps_exit")?.call1(py, (token,))?;
        }
        let result = match called {
            Ok(r) => r,
            Err(e) => {
                // The call failed: released. The user's error propagates
                // unchanged; a release that failed is logged, not raised.
                let s = self.run_settle(py, id, CallOutcome::Failed)?;
                log_problem(py, func, &s)?;
                return Err(e);
            }
        };
        let usage = usage_of(py, actual, &result, prepared.priced());
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
    #[pyo3(signature = (id, failed, actual=None, result=None, asynchronous=false, prepared=None))]
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        py: Python<'_>,
        id: u128,
        failed: bool,
        actual: Option<&Bound<'_, PyAny>>,
        result: Option<&Bound<'_, PyAny>>,
        asynchronous: bool,
        prepared: Option<PyRef<'_, Prepared>>,
    ) -> PyResult<Py<PyAny>> {
        let id = ReservationId(id);
        let outcome = if failed {
            CallOutcome::Failed
        } else {
            let none = py.None().into_bound(py);
            let priced = prepared.as_ref().and_then(|p| p.priced());
            CallOutcome::Ran(usage_of(py, actual, result.unwrap_or(&none), priced))
        };
        let op = Ok(move |w: Warden| async move {
            Ok::<_, ratewarden::Error>(w.finish(id, outcome).await)
        });
        self.answer(py, op, asynchronous, problem_to_py)
    }
}

/// A policy from JSON text (a dict, dumped by the Python layer) or a file.
fn policy_of(json: Option<&str>, path: Option<PathBuf>) -> PyResult<Policy> {
    match (json, path) {
        (Some(text), None) => {
            Policy::from_str_as(text, ratewarden::Format::Json, "<dict>").or_raise()
        }
        (None, Some(p)) => Policy::from_file(&p).or_raise(),
        _ => Err(invalid("policy", "give exactly one of json= or path=")),
    }
}
