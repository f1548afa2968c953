//! The guard decorator's native half: prepared requests, the call's usage
//! (`actual`) and the logging of settlement problems.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// A guard's request converted once (scope parsed, cost resolved): reserving it
/// again costs no conversion.
#[pyclass(frozen, module = "ratewarden._native")]
pub(crate) struct Prepared {
    pub(crate) request: Request,
    pub(crate) lease: Option<Duration>,
    /// Wait up to this long for capacity (`None`: reserve or deny at once).
    pub(crate) max_wait: Option<Duration>,
}

impl Prepared {
    /// The resource whose prices turn the call's reported usage into its
    /// cost, when the guard reserves by usage (`usage=`).
    pub(crate) fn priced(&self) -> Option<&str> {
        self.request
            .usage
            .as_ref()
            .and(self.request.resource.as_deref())
    }

    /// Reserves it (waiting first when `max_wait` is set), as an owned future.
    pub(crate) fn hold(
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

/// Logs a settlement's problem through `ratewarden._settlement_problem`.
pub(crate) fn log_problem(py: Python<'_>, func: &Bound<'_, PyAny>, s: &Settlement) -> PyResult<()> {
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
pub(crate) fn usage_of(
    py: Python<'_>,
    actual: Option<&Bound<'_, PyAny>>,
    result: &Bound<'_, PyAny>,
    priced: Option<&str>,
) -> Usage {
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
            "actual() returned {t}, not a mapping of {}",
            if priced.is_some() {
                "usage"
            } else {
                "unit to amount"
            }
        ));
    };
    // A guard that reserves by usage reads its actual as usage, priced by core.
    if let Some(resource) = priced {
        return match pricing_usage_of(&mapping, "actual") {
            Ok(usage) => Usage::Priced {
                resource: resource.to_owned(),
                usage,
            },
            Err(e) => Usage::Unreadable(describe_error(py, &e)),
        };
    }
    match cost_of(Some(&mapping), "actual") {
        Ok(c) => Usage::Actual(c),
        Err(e) => Usage::Unreadable(describe_error(py, &e)),
    }
}
