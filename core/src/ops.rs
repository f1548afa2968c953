//! What every language binding needs besides conversions: building a warden
//! from a policy and connection settings ([`Setup`]), a request from the
//! fields every binding takes ([`request`]), durations in seconds, the
//! `on_backend_error` mode and a delegation's [`Source`].

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, Fallback, OnBackendError, RedisBackend};
use crate::clock::{Clock, ManualClock, SystemClock};
use crate::decision::ReservationId;
use crate::plan::Request;
use crate::priority::Priority;
use crate::scope::Scope;
use crate::warden::{DelegateFrom, Warden};
use crate::{Cost, Policy, Result};

/// How to build a [`Warden`]: the backend and its settings.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// A Redis URL (`redis://`, `rediss://`, `redis+cluster://…`), or `None` for
    /// the embedded engine (also what `"memory"` means).
    pub backend: Option<String>,
    /// Prefix of every Redis key.
    pub namespace: String,
    /// What decisions do while Redis cannot be asked.
    pub on_error: OnBackendError,
    /// Redis command timeout (the backend's default when `None`).
    pub timeout: Option<Duration>,
    /// A test clock replacing real time (and Redis's `TIME`).
    pub clock: Option<ManualClock>,
    /// Start without waiting for Redis: decisions follow `on_error` until it answers.
    pub lazy: bool,
}

impl Setup {
    /// Settings for `backend` (`None`, `""` or `"memory"`: the embedded engine).
    #[must_use]
    pub fn new(backend: Option<&str>, namespace: &str) -> Self {
        Self {
            backend: backend
                .filter(|b| !b.is_empty() && *b != "memory")
                .map(str::to_owned),
            namespace: namespace.to_owned(),
            ..Self::default()
        }
    }

    /// Whether this is the embedded engine (every decision answers at once).
    #[must_use]
    pub const fn embedded(&self) -> bool {
        self.backend.is_none()
    }

    /// Builds the warden: for Redis, connects (or, with `lazy`, starts
    /// connecting in the background — call within a Tokio runtime then).
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] for bad settings; [`crate::Error::Backend`]
    /// if Redis cannot be reached (never with `lazy`).
    pub async fn connect(&self, policy: Policy) -> Result<Warden> {
        let clock: Arc<dyn Clock> = match &self.clock {
            Some(c) => Arc::new(c.clone()),
            None => Arc::new(SystemClock),
        };
        let Some(url) = &self.backend else {
            if policy.outlets.any() || policy.audit.stream.is_some() {
                return Err(crate::Error::invalid(
                    "backend",
                    "the policy's `events.stream` / `events.publish` / `audit.stream` write to Redis: give a Redis backend, or remove them",
                ));
            }
            return Ok(Warden::with_clock(policy, clock));
        };
        let mut b = if self.lazy {
            RedisBackend::connect_lazy(url, &self.namespace)?
        } else {
            RedisBackend::connect(url, &self.namespace).await?
        };
        if let Some(t) = self.timeout {
            b = b.timeout(t)?;
        }
        if self.clock.is_some() {
            b = b.with_clock(Arc::clone(&clock));
        }
        let backend = Fallback::new(b, self.on_error, Arc::clone(&clock))?;
        Ok(Warden::with_backend(
            policy,
            Arc::new(backend) as Arc<dyn Backend>,
            clock,
        ))
    }
}

/// A request from the fields every binding takes: a scope string, optional
/// resource and action names, a converted cost and a priority name.
///
/// # Errors
/// [`crate::Error::InvalidScope`] / [`crate::Error::InvalidArgument`] naming the
/// bad scope or priority.
pub fn request(
    scope: &str,
    resource: Option<&str>,
    action: Option<&str>,
    cost: Option<Cost>,
    priority: Option<&str>,
) -> Result<Request> {
    let mut r = Request::parse(scope)?;
    if let Some(res) = resource {
        r = r.resource(res);
    }
    if let Some(a) = action {
        r = r.action(a);
    }
    if let Some(c) = cost {
        r = r.cost(c);
    }
    if let Some(p) = priority {
        r = r.priority(p.parse::<Priority>()?);
    }
    Ok(r)
}

/// A duration given in seconds by a binding's caller (`what` names the argument).
///
/// # Errors
/// [`crate::Error::InvalidArgument`] for NaN, infinities, negatives and overflow.
pub fn seconds(value: f64, what: &'static str) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| crate::Error::invalid(what, format!("{value} is not a duration in seconds")))
}

/// [`seconds`] for an optional argument.
///
/// # Errors
/// As [`seconds`].
pub fn optional_seconds(value: Option<f64>, what: &'static str) -> Result<Option<Duration>> {
    value.map(|v| seconds(v, what)).transpose()
}

/// Parses an `on_backend_error` mode: `deny`, `allow`, or `local` with this
/// process's `1/share` of each limit.
///
/// # Errors
/// [`crate::Error::InvalidArgument`] naming the bad mode or share.
pub fn on_backend_error(mode: &str, share: u32) -> Result<OnBackendError> {
    match mode {
        "deny" => Ok(OnBackendError::Deny),
        "allow" => Ok(OnBackendError::Allow),
        "local" if share >= 1 => Ok(OnBackendError::Local { share }),
        "local" => Err(crate::Error::invalid("local_share", "must be at least 1")),
        other => Err(crate::Error::invalid(
            "on_backend_error",
            format!(
                "`{}` is not one of deny, allow, local",
                crate::error::truncate(other)
            ),
        )),
    }
}

/// Where a delegation's amounts come from (owned; see [`Source::as_from`]).
#[derive(Clone, Debug)]
pub enum Source {
    /// A parent scope's free capacity.
    Scope(Scope),
    /// An existing reservation.
    Reservation(ReservationId),
}

impl Source {
    /// The source a caller named: exactly one of a parent scope or a
    /// reservation id. `names` are how the caller's language spells the two
    /// options, for the error.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] when both or neither are given, or
    /// either does not parse.
    pub fn pick(scope: Option<&str>, reservation: Option<&str>, names: [&str; 2]) -> Result<Self> {
        match (scope, reservation) {
            (Some(s), None) => Ok(Self::Scope(Scope::parse(s)?)),
            (None, Some(r)) => Ok(Self::Reservation(ReservationId::parse(r)?)),
            _ => Err(crate::Error::invalid(
                "delegate",
                format!("give exactly one of {} or {}", names[0], names[1]),
            )),
        }
    }

    /// The source as [`Warden::delegate`] takes it.
    #[must_use]
    pub const fn as_from(&self) -> DelegateFrom<'_> {
        match self {
            Self::Scope(s) => DelegateFrom::Scope(s),
            Self::Reservation(id) => DelegateFrom::Reservation(*id),
        }
    }
}
