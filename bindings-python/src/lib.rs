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
//!   `loop.call_soon_threadsafe`; cancelling that future stops a wait at its
//!   next waiting point, lets a single call finish, and gives back a
//!   reservation nobody received;
//! - a warden used in a forked child reconnects its backend there.
//!
//! Modules, along the seams: `runtime` (Tokio runtime, completer thread, fork),
//! `bridge` (native futures as awaitables, cancellation), `errors` (exception
//! classes, `OrRaise`), `convert` (Python values into core inputs), `decision`
//! (core outputs as Python values), `clock`, `warden` (`NativeWarden`), `events` (`NativeListener`), `guard`
//! (the decorator's native half) and `http` (what the ASGI middleware needs).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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
use ratewarden::pricing::{Priced, Usage as PricedUsage};
use ratewarden::{
    Amount, Balance, CallOutcome, CommitReceipt, Cost, Decision as CoreDecision, Error, ErrorKind,
    Policy, Request, ReservationId, Scope, Settlement, Usage, WaitCancel, WaitFor, Warden,
};

mod bridge;
mod clock;
mod convert;
mod decision;
mod errors;
mod events;
mod guard;
mod http;
mod runtime;
mod warden;

use bridge::*;
use clock::*;
use convert::*;
use decision::*;
use errors::*;
use events::*;
use guard::*;
use http::*;
use runtime::*;
use warden::*;

/// Return the version of the ratewarden core library.
/// The request headers a governed client reads one call's priority and
/// scope from (and removes): `(priority, scope)`.
#[pyfunction]
fn governed_headers() -> (&'static str, &'static str) {
    (
        ratewarden::upstream::PRIORITY_HEADER,
        ratewarden::upstream::SCOPE_HEADER,
    )
}

#[pyfunction]
fn version() -> &'static str {
    ratewarden::VERSION
}

/// An upstream response's rate-limit headers (`(name, value)` pairs) as
/// `ratewarden::upstream::parse` reads them, at `now` (seconds since the
/// epoch; default: this machine's clock): a dict of `quotas` (each with
/// `dimension`, `name`, `limit`, `remaining`, `reset` in seconds),
/// `retry_after` (seconds) and `warnings`.
#[pyfunction]
#[pyo3(signature = (headers, now=None))]
fn parse_headers(
    py: Python<'_>,
    headers: Vec<(String, String)>,
    now: Option<f64>,
) -> PyResult<Py<PyAny>> {
    use ratewarden::Clock as _;
    let now = match now {
        Some(s) if s.is_finite() && s >= 0.0 => {
            #[allow(clippy::cast_possible_truncation)] // finite, non-negative, seconds
            let us = (s * 1e6) as i64;
            us
        }
        Some(s) => {
            return Err(invalid(
                "now",
                format!("{s} is not seconds since the epoch"),
            ));
        }
        None => ratewarden::SystemClock.now(),
    };
    let o = ratewarden::upstream::parse(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())), now);
    let quotas = PyList::empty(py);
    for q in &o.quotas {
        let d = PyDict::new(py);
        d.set_item("dimension", q.dimension.as_str())?;
        d.set_item("name", q.name.as_deref())?;
        d.set_item("limit", q.limit)?;
        d.set_item("remaining", q.remaining)?;
        d.set_item("reset", q.reset.map(|r| r.as_secs_f64()))?;
        quotas.append(d)?;
    }
    let out = PyDict::new(py);
    out.set_item("quotas", quotas)?;
    out.set_item("retry_after", o.retry_after.map(|r| r.as_secs_f64()))?;
    out.set_item("warnings", o.warnings)?;
    Ok(out.into_any().unbind())
}

/// Seconds to wait before retry `attempt` (1 = the first) of a `priority`
/// caller: the upstream's `retry_after` (seconds) or an exponential backoff,
/// plus a jittered offset from the tier's band — critical, standard and
/// background bands never overlap (`ratewarden::retry`).
#[pyfunction]
#[pyo3(signature = (attempt, priority="standard", retry_after=None))]
fn retry_delay(attempt: u32, priority: &str, retry_after: Option<f64>) -> PyResult<f64> {
    let priority: ratewarden::Priority = priority.parse().or_raise()?;
    let retry_after = optional_seconds(retry_after, "retry_after")?;
    Ok(ratewarden::retry::RetryBands::default()
        .retry_delay(attempt, priority, retry_after)
        .as_secs_f64())
}

/// The Standard Webhooks headers of a message (`ratewarden::webhook`):
/// `webhook-id`, `webhook-timestamp`, `webhook-signature`.
#[pyfunction]
fn sign_webhook(
    py: Python<'_>,
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> PyResult<Py<PyAny>> {
    let secret = ratewarden::webhook::Secret::parse(secret).or_raise()?;
    let d = PyDict::new(py);
    for (name, value) in ratewarden::webhook::headers(&secret, msg_id, timestamp, body) {
        d.set_item(name, value)?;
    }
    Ok(d.into_any().unbind())
}

/// A scope string from `(kind, id)` pairs; ids may hold any text (`/`, `:`,
/// spaces…): they are escaped, never interpreted.
#[pyfunction]
fn scope_of(segments: Vec<(String, String)>) -> PyResult<String> {
    Scope::from_segments(segments.iter().map(|(k, i)| (k.as_str(), i.as_str())))
        .map(|s| s.as_str().to_owned())
        .or_raise()
}

/// The `ratewarden._native` extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Made now, by the importing thread: a fork while another thread was
    // initialising them would leave the child waiting for that thread.
    std::sync::LazyLock::force(&RT);
    std::sync::LazyLock::force(&TX);
    ratewarden::backend::prepare_for_fork();
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(governed_headers, m)?)?;
    m.add_function(wrap_pyfunction!(scope_of, m)?)?;
    m.add_function(wrap_pyfunction!(header_style, m)?)?;
    m.add_function(wrap_pyfunction!(retry_delay, m)?)?;
    m.add_function(wrap_pyfunction!(parse_headers, m)?)?;
    m.add_function(wrap_pyfunction!(sign_webhook, m)?)?;
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
    m.add_class::<NativeListener>()?;
    Ok(())
}
