//! What the ASGI middleware needs from core `http`: client identity and header styles.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// The canonical name of a rate-limit header style (`draft-11`, `draft-7`,
/// `draft-6`, `off`); `InvalidInput` for anything else.
#[pyfunction]
pub(crate) fn header_style(style: &str) -> PyResult<&'static str> {
    style
        .parse::<HeaderStyle>()
        .map(HeaderStyle::as_str)
        .or_raise()
}

/// Who the client of an HTTP request is (core `http::ClientIdentity`): the
/// proxies trusted — `False`, `True` (one hop), a hop count, or networks (a
/// comma-separated string or a list) — and the IPv6 subnet clients are keyed by.
#[pyclass(frozen, module = "ratewarden._native")]
pub(crate) struct ClientIdentity {
    pub(crate) inner: ratewarden::http::ClientIdentity,
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
        let trust = ratewarden::http::TrustProxy::from_json(&setting).or_raise()?;
        let subnet = u8::try_from(ipv6_subnet).map_err(|_| {
            invalid(
                "ipv6_subnet",
                format!("{ipv6_subnet} is not a prefix length from 1 to 128"),
            )
        })?;
        let inner = ratewarden::http::ClientIdentity::new(trust, subnet).or_raise()?;
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
        self.inner.scope(peer, forwarded_for).or_raise()
    }
}
