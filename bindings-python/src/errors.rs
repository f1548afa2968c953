//! Core errors as the `ratewarden` exception classes, with their data as
//! attributes, and the one extension trait that maps them (`OrRaise`).

#[allow(clippy::wildcard_imports)]
use crate::*;

/// Raises the `ratewarden` exception matching `e` (classes live in
/// `ratewarden/_errors.py`, so they can inherit from built-in exceptions too).
/// The exception carries the error's data as attributes: `kind`, `code`,
/// `path` / `source` (policy errors), `argument`, `unit`, `reservation`,
/// `operation` (None when not about one).
pub(crate) fn to_py(e: &Error) -> PyErr {
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

pub(crate) fn error_class(class: &str, message: String) -> PyErr {
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

pub(crate) fn invalid(what: &str, why: impl std::fmt::Display) -> PyErr {
    error_class("InvalidInput", format!("invalid {what}: {why}"))
}

/// A core result as a Python one: the error raised as its `ratewarden`
/// exception class (`to_py`). The one way errors cross into Python.
pub(crate) trait OrRaise<T> {
    fn or_raise(self) -> PyResult<T>;
}

impl<T> OrRaise<T> for ratewarden::Result<T> {
    fn or_raise(self) -> PyResult<T> {
        self.map_err(|e| to_py(&e))
    }
}
