//! The one error type of ratewarden.
//!
//! Every fallible operation returns [`Error`]. Each variant names what was
//! wrong and where, and [`Error::kind`] gives a stable category that the
//! Python and Node bindings map to typed exceptions. Denials are *not* errors:
//! a denied request is an ordinary [`crate::Decision`].

use std::fmt;

/// Stable category of an [`Error`], used by the bindings to pick an exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The policy (file or in-code) is invalid.
    Policy,
    /// An argument of a call is invalid (scope, cost, duration, name…).
    InvalidInput,
    /// A reservation, delegation or other handle does not exist (or no longer exists).
    NotFound,
    /// The operation conflicts with the state of its target (e.g. commit after release).
    Conflict,
    /// The storage backend failed (connection, timeout, protocol).
    Backend,
    /// ratewarden broke one of its own invariants (a bug to report, never a
    /// reason to degrade decisions).
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Policy => "policy",
            Self::InvalidInput => "invalid_input",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Backend => "backend",
            Self::Internal => "internal",
        })
    }
}

/// Everything that can go wrong in ratewarden, each with the data needed to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A policy failed to load or validate.
    #[error("invalid policy {source_name}: at `{path}`: {message}")]
    Policy {
        /// The file the policy came from, or `<inline>`.
        source_name: String,
        /// The path inside the document, e.g. `scopes.tenant.limits[2].per`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A policy file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    PolicyIo {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A scope string or segment is malformed.
    #[error("invalid scope `{input}`: {message}")]
    InvalidScope {
        /// The offending input (truncated when very long).
        input: String,
        /// What is wrong with it.
        message: String,
    },
    /// An amount in a cost map is invalid.
    #[error("invalid amount{}: {message}", for_unit(.unit))]
    InvalidAmount {
        /// The unit the amount was given for.
        unit: String,
        /// What is wrong with it.
        message: String,
    },
    /// Any other invalid argument.
    #[error("invalid {what}: {message}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The request names a scope kind, resource, action or unit the policy does not define.
    #[error("unknown {what} `{name}`{hint}")]
    Unknown {
        /// `scope kind`, `resource`, `action` or `unit`.
        what: &'static str,
        /// The name that was not found.
        name: String,
        /// A hint listing what is known (may be empty).
        hint: String,
    },
    /// No reservation with this id is known (never existed, or forgotten long after it ended).
    #[error("reservation {id} not found")]
    ReservationNotFound {
        /// The reservation id.
        id: String,
    },
    /// The reservation's lease ran out before this call; its holds were already returned.
    #[error("reservation {id} expired before this call; its capacity was already returned")]
    ReservationExpired {
        /// The reservation id.
        id: String,
    },
    /// The reservation was already ended in a way that conflicts with this call.
    #[error("reservation {id} was already {state}")]
    ReservationClosed {
        /// The reservation id.
        id: String,
        /// `committed` or `released`.
        state: &'static str,
    },
    /// A commit's actual usage exceeds its reservation on a limit whose
    /// overage rule is `reject`: nothing was charged and the reservation is
    /// still live (commit within it, or release it).
    #[error(
        "reservation {id}: the actual {actual} {unit} exceeds the {reserved} reserved on a limit whose overage rule is `reject`; nothing was charged"
    )]
    OverageRejected {
        /// The reservation id.
        id: String,
        /// The unit.
        unit: String,
        /// What was reserved, as a decimal of the unit.
        reserved: String,
        /// The actual usage given, as a decimal of the unit.
        actual: String,
    },
    /// The storage backend failed.
    #[error("backend error: {message}")]
    Backend {
        /// What failed.
        message: String,
    },
    /// A state-changing request was sent to the backend but its answer was
    /// lost: it may or may not have been applied. Asking again with the same
    /// [`crate::OperationId`] returns what happened, applied at most once.
    #[error("backend error: {message}; whether operation {operation} was applied is unknown")]
    Unconfirmed {
        /// What failed.
        message: String,
        /// The operation to ask about again.
        operation: crate::OperationId,
    },
    /// ratewarden broke one of its own invariants: a bug, reported as such.
    #[error("internal error (please report): {message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// The stable category of this error.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Policy { .. } | Self::PolicyIo { .. } => ErrorKind::Policy,
            Self::InvalidScope { .. }
            | Self::InvalidAmount { .. }
            | Self::InvalidArgument { .. }
            | Self::Unknown { .. } => ErrorKind::InvalidInput,
            Self::ReservationNotFound { .. } | Self::ReservationExpired { .. } => {
                ErrorKind::NotFound
            }
            Self::ReservationClosed { .. } | Self::OverageRejected { .. } => ErrorKind::Conflict,
            Self::Backend { .. } | Self::Unconfirmed { .. } => ErrorKind::Backend,
            Self::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// The stable code of this error, finer than [`Error::kind`]: the
    /// bindings carry it as `.code` (`reservation_expired` vs
    /// `reservation_not_found`, `unknown` vs `invalid_amount`…).
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            Self::Policy { .. } => "policy",
            Self::PolicyIo { .. } => "policy_io",
            Self::InvalidScope { .. } => "invalid_scope",
            Self::InvalidAmount { .. } => "invalid_amount",
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::Unknown { .. } => "unknown",
            Self::ReservationNotFound { .. } => "reservation_not_found",
            Self::ReservationExpired { .. } => "reservation_expired",
            Self::ReservationClosed { .. } => "reservation_closed",
            Self::OverageRejected { .. } => "overage_rejected",
            Self::Backend { .. } => "backend",
            Self::Unconfirmed { .. } => "unconfirmed",
            Self::Internal { .. } => "internal",
        }
    }

    /// What the error is about, for the bindings' exception attributes: the
    /// policy path (`scopes.tenant.limits[2].per`) or file, the argument or
    /// unit, the reservation id, the operation id. Empty fields are `None`.
    #[must_use]
    pub fn details(&self) -> ErrorDetails<'_> {
        let mut d = ErrorDetails::default();
        match self {
            Self::Policy {
                source_name, path, ..
            } => {
                d.path = Some(path);
                d.source = Some(source_name);
            }
            Self::PolicyIo { path, .. } => d.source = Some(path),
            Self::InvalidScope { .. } => d.argument = Some("scope"),
            Self::InvalidAmount { unit, .. } => {
                d.argument = Some("cost");
                d.unit = Some(unit.as_str()).filter(|u| !u.is_empty());
            }
            Self::InvalidArgument { what, .. } | Self::Unknown { what, .. } => {
                d.argument = Some(what);
            }
            Self::ReservationNotFound { id }
            | Self::ReservationExpired { id }
            | Self::ReservationClosed { id, .. } => d.reservation = Some(id),
            Self::OverageRejected { id, unit, .. } => {
                d.reservation = Some(id);
                d.unit = Some(unit);
            }
            Self::Unconfirmed { operation, .. } => d.operation = Some(*operation),
            Self::Backend { .. } | Self::Internal { .. } => {}
        }
        d
    }

    /// [`Error::InvalidArgument`]: `what` (the argument) and what is wrong with it.
    pub fn invalid(what: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            what,
            message: message.into(),
        }
    }

    pub(crate) fn unknown<'a>(
        what: &'static str,
        name: &str,
        known: impl Iterator<Item = &'a str>,
    ) -> Self {
        let mut known: Vec<&str> = known.collect();
        known.sort_unstable();
        let hint = if known.is_empty() {
            " (the policy defines none)".to_owned()
        } else {
            format!(" (the policy defines: {})", known.join(", "))
        };
        Self::Unknown {
            what,
            name: truncate(name),
            hint,
        }
    }
}

/// What an [`Error`] is about ([`Error::details`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorDetails<'a> {
    /// Where in the policy document (`scopes.tenant.limits[2].per`).
    pub path: Option<&'a str>,
    /// The policy's file (or `<inline>`).
    pub source: Option<&'a str>,
    /// The argument that was wrong (`scope`, `cost`, `lease`, `resource`…).
    pub argument: Option<&'a str>,
    /// The unit of a wrong amount.
    pub unit: Option<&'a str>,
    /// The reservation the error is about.
    pub reservation: Option<&'a str>,
    /// The operation whose outcome is unknown ([`Error::Unconfirmed`]).
    pub operation: Option<crate::OperationId>,
}

/// ` for unit `usd``, or nothing when the amount was not yet given for a unit.
fn for_unit(unit: &str) -> String {
    if unit.is_empty() {
        String::new()
    } else {
        format!(" for unit `{unit}`")
    }
}

/// Shortens user input quoted in error messages so a huge id cannot flood logs.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.escape_debug().to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", s[..end].escape_debug(), s.len())
}

/// Result alias used throughout ratewarden.
pub type Result<T, E = Error> = std::result::Result<T, E>;
