//! Python values into core inputs: amounts, costs, requests, durations, ids.

#[allow(clippy::wildcard_imports)]
use crate::*;

pub(crate) fn amount_of(v: &Bound<'_, PyAny>, at: &str) -> PyResult<Amount> {
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

pub(crate) fn cost_of(cost: Option<&Bound<'_, PyDict>>, what: &str) -> PyResult<Cost> {
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

pub(crate) fn request_of(
    scope: &str,
    resource: Option<&str>,
    action: Option<&str>,
    cost: Option<&Bound<'_, PyDict>>,
    priority: Option<&str>,
) -> PyResult<Request> {
    let cost = cost.map(|c| cost_of(Some(c), "cost")).transpose()?;
    ops::request(scope, resource, action, cost, priority).or_raise()
}

/// `request_of` repeated under an operation id (32 hex digits), if given.
pub(crate) fn operation_of(req: PyResult<Request>, operation: Option<&str>) -> PyResult<Request> {
    match operation {
        None => req,
        Some(op) => Ok(req?.operation(ratewarden::OperationId::parse(op).or_raise()?)),
    }
}

pub(crate) fn seconds(s: f64, what: &'static str) -> PyResult<Duration> {
    ops::seconds(s, what).or_raise()
}

pub(crate) fn optional_seconds(v: Option<f64>, what: &'static str) -> PyResult<Option<Duration>> {
    ops::optional_seconds(v, what).or_raise()
}

pub(crate) fn reservation_id(id: &str) -> PyResult<ReservationId> {
    ReservationId::parse(id).or_raise()
}

/// `Type: message` of a Python exception, for a log line.
pub(crate) fn describe_error(py: Python<'_>, e: &PyErr) -> String {
    let t = e
        .get_type(py)
        .name()
        .map_or_else(|_| "Exception".to_owned(), |n| n.to_string());
    format!("{t}: {}", e.value(py))
}

pub(crate) fn delegate_args(
    child: &str,
    amounts: &Bound<'_, PyDict>,
    from_scope: Option<&str>,
    from_reservation: Option<&str>,
    lease: Option<f64>,
) -> PyResult<(Scope, Cost, Source, Option<Duration>)> {
    let child = Scope::parse(child).or_raise()?;
    let amounts = cost_of(Some(amounts), "amounts")?;
    let from = Source::pick(
        from_scope,
        from_reservation,
        ["from_scope=", "from_reservation="],
    )
    .or_raise()?;
    Ok((child, amounts, from, optional_seconds(lease, "lease")?))
}

/// A Python value's type name, for messages.
pub(crate) fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// A Python function of the package, looked up once.
pub(crate) fn python_fn<'a>(
    py: Python<'_>,
    cell: &'a PyOnceLock<Py<PyAny>>,
    module: &str,
    name: &str,
) -> PyResult<&'a Py<PyAny>> {
    cell.get_or_try_init(py, || Ok(py.import(module)?.getattr(name)?.unbind()))
}

/// A usage mapping (`{"input_tokens": 1200, "max_output_tokens": 800}`) as
/// core reads it: its field names and counts are judged there.
pub(crate) fn pricing_usage_of(usage: &Bound<'_, PyDict>, what: &str) -> PyResult<PricedUsage> {
    let mut fields = Vec::with_capacity(usage.len());
    for (k, v) in usage.iter() {
        let name: String = k
            .extract()
            .map_err(|_| invalid(what, "field names must be strings"))?;
        let amount = amount_of(&v, &format!("{what}[{name:?}]"))?;
        fields.push((name, amount));
    }
    PricedUsage::from_fields(fields.iter().map(|(n, a)| (n.as_str(), *a))).or_raise()
}

/// `request` with `usage`, if given.
pub(crate) fn with_usage(
    request: PyResult<Request>,
    usage: Option<&Bound<'_, PyDict>>,
) -> PyResult<Request> {
    match usage {
        None => request,
        Some(u) => Ok(request?.usage(pricing_usage_of(u, "usage")?)),
    }
}
