//! Core errors as JS errors: the kind, code and details travel as JSON after
//! a marker (`to_js`), which `index.cjs` turns into typed error classes; `OrThrow`
//! is the one way a core result crosses.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// The marker that starts the reason of every error this addon raises: the
/// rest is a JSON object (`kind`, `code`, `message` and the error's details)
/// that the JS layer turns into a typed error with `err.code` and fields —
/// nothing is parsed out of a message.
pub(crate) const ERROR_MARK: &str = "ratewarden\u{1f}";

pub(crate) fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Policy => "Policy",
        ErrorKind::InvalidInput => "InvalidInput",
        ErrorKind::NotFound => "NotFound",
        ErrorKind::Conflict => "Conflict",
        ErrorKind::Backend => "Backend",
        // A bug of ours: the base WardenError, never a degraded-mode trigger.
        ErrorKind::Internal => "Internal",
    }
}

pub(crate) fn to_js(e: &ratewarden::Error) -> Error {
    let d = e.details();
    let data = serde_json::json!({
        "kind": kind_name(e.kind()),
        "code": e.code(),
        "message": e.to_string(),
        "path": d.path,
        "source": d.source,
        "argument": d.argument,
        "unit": d.unit,
        "reservation": d.reservation,
        "operation": d.operation.map(|o| o.to_string()),
    });
    Error::new(Status::GenericFailure, format!("{ERROR_MARK}{data}"))
}

/// The message of an error made by `to_js` (for a problem text).
pub(crate) fn message_of(e: &Error) -> String {
    e.reason
        .strip_prefix(ERROR_MARK)
        .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| e.reason.clone())
}

pub(crate) fn invalid(what: &str, why: impl std::fmt::Display) -> Error {
    let data = serde_json::json!({
        "kind": "InvalidInput",
        "code": "invalid_argument",
        "message": format!("invalid {what}: {why}"),
        "argument": what,
    });
    Error::new(Status::InvalidArg, format!("{ERROR_MARK}{data}"))
}

/// A core result as a napi one: the error made by `to_js`. The one way a core
/// result crosses into JS.
pub(crate) trait OrThrow<T> {
    fn or_throw(self) -> Result<T>;
}

impl<T> OrThrow<T> for ratewarden::Result<T> {
    fn or_throw(self) -> Result<T> {
        self.map_err(|e| to_js(&e))
    }
}
