//! The answer to every check, acquire and reserve: a [`Decision`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::policy::{LimitDef, LimitKind};
use crate::priority::Priority;

/// Allow, allow with caps, or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Go ahead.
    Allow,
    /// Go ahead, honouring [`Decision::caps`].
    AllowWithCaps,
    /// Do not spend; retry after [`Decision::retry_after`] if it is set.
    Deny,
}

impl Outcome {
    /// `allow`, `allow_with_caps` or `deny`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::AllowWithCaps => "allow_with_caps",
            Self::Deny => "deny",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Restrictions the caller must honour with [`Outcome::AllowWithCaps`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    /// Wait this long before calling (pacing).
    pub delay_ms: Option<u64>,
    /// Ask the model for at most this many tokens.
    pub max_tokens: Option<u64>,
    /// Use this (fallback) model instead.
    pub model: Option<Arc<str>>,
    /// Take the resource's ordered lock (cascade mode).
    pub sequential: bool,
    /// Stages before this one in a workflow whose resources are limited
    /// right now (`workflows:` in the policy): what this stage would work on
    /// is held up there, so spending here can wait.
    pub backpressure: Backpressure,
}

/// The workflow stages (`workflow/stage`) a decision's `caps.backpressure`
/// names, in policy order; empty when none is limited. One pointer wide, so
/// decisions that name none pay nothing for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(clippy::box_collection)] // the box keeps it one pointer wide (a Vec is three)
pub struct Backpressure(Option<Box<Vec<Box<str>>>>);

impl Backpressure {
    /// The stages (`workflow/stage`), in policy order.
    #[must_use]
    pub fn stages(&self) -> &[Box<str>] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    /// Whether no stage is named.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.stages().is_empty()
    }

    /// Names `stage` too (once).
    pub fn add(&mut self, stage: &str) {
        let v = self.0.get_or_insert_with(Box::default);
        if !v.iter().any(|s| &**s == stage) {
            v.push(stage.into());
        }
    }
}

impl Caps {
    /// Whether no cap is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.delay_ms.is_none()
            && self.max_tokens.is_none()
            && self.model.is_none()
            && !self.sequential
            && self.backpressure.is_empty()
    }

    /// Combines two sets of caps, keeping the stricter value of each field
    /// (longest delay, fewest tokens, the first fallback model).
    pub fn merge(&mut self, other: &Self) {
        self.delay_ms = match (self.delay_ms, other.delay_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.max_tokens = match (self.max_tokens, other.max_tokens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.model.is_none() {
            self.model.clone_from(&other.model);
        }
        self.sequential |= other.sequential;
        for s in other.backpressure.stages() {
            self.backpressure.add(s);
        }
    }
}

/// The state of one limit involved in a decision, after the decision.
///
/// Cheap to produce: it shares the policy's [`LimitDef`] (name, kind, unit,
/// capacity) and adds the numbers of this decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    /// The limit as the policy defines it.
    pub def: Arc<LimitDef>,
    /// How many segments of the request's scope key this counter (`tenant:a/user:1`
    /// with depth 1 is `tenant:a`); `None` for a shared pool.
    pub scope_depth: Option<u8>,
    /// What remains now, base units (never negative). For an admitted request, after it.
    pub remaining: i64,
    /// Time until the limit is fully available again (rate: bucket full; quota/budget:
    /// window end; lifetime budgets and concurrency: zero).
    pub reset: Duration,
    /// Whether this limit denied the request.
    pub denied: bool,
    /// Amount this request takes (or would take) from the limit, base units.
    pub amount: i64,
    /// Held now by live reservations, delegations and concurrency slots, base
    /// units (part of what is not `remaining`; 0 for rates, whose
    /// reservations charge at once).
    pub held: i64,
}

impl LimitState {
    /// The limit's name in the policy.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// `rate`, `quota`, `concurrency` or `budget`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        self.def.kind.name()
    }

    /// The unit it counts.
    #[must_use]
    pub fn unit(&self) -> &str {
        &self.def.unit
    }

    /// Decimal places of the unit: amounts here are base units (`usd`: micro-dollars).
    #[must_use]
    pub fn decimals(&self) -> u8 {
        self.def.decimals
    }

    /// Capacity in base units (rate: the bucket size, i.e. the burst).
    #[must_use]
    pub fn limit(&self) -> i64 {
        self.def.capacity()
    }

    /// Nominal window in seconds, for `RateLimit-Policy` `w=` (rate: the period;
    /// months count 30 days; none for lifetime budgets and concurrency).
    #[must_use]
    pub fn window_secs(&self) -> Option<i64> {
        match &self.def.kind {
            LimitKind::Rate(r) => Some(r.period / 1_000_000),
            k => k.window().and_then(|w| w.nominal_secs()),
        }
    }
}

/// What is left of one limit, as [`crate::Warden::balances`] reads it —
/// without a request, charging nothing. Amounts are base units of `unit`
/// (`decimals` places: micro-dollars for `usd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// The limit's name in the policy.
    pub name: String,
    /// `rate`, `quota`, `budget` or `concurrency`.
    pub kind: &'static str,
    /// The unit it counts.
    pub unit: String,
    /// Decimal places of the unit.
    pub decimals: u8,
    /// Whose counter: the scope prefix (`tenant:acme`) it is kept for, or
    /// `None` for a pool shared by everyone (a resource's global limit).
    pub owner: Option<String>,
    /// Capacity (rate: the burst), base units.
    pub limit: i64,
    /// Free now, base units.
    pub remaining: i64,
    /// Held by live reservations, delegations and concurrency slots, base units.
    pub held: i64,
    /// Until it is fully available again (rate: bucket full; quota and budget:
    /// the window's end); `None` for what never resets by itself (lifetime
    /// budgets, concurrency).
    pub reset: Option<Duration>,
}

impl Balance {
    /// The balance of `l`, a limit of a decision on `scope`.
    pub(crate) fn of(l: &LimitState, scope: &crate::Scope) -> Self {
        Self {
            name: l.name().to_owned(),
            kind: l.kind(),
            unit: l.unit().to_owned(),
            decimals: l.decimals(),
            owner: l
                .scope_depth
                .map(|d| scope.prefix(usize::from(d)).to_owned()),
            limit: l.limit(),
            remaining: l.remaining,
            held: l.held,
            reset: l.window_secs().map(|_| l.reset),
        }
    }
}

/// The reservation a `reserve` created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationInfo {
    /// Its id; pass it to commit / release / extend / delegate.
    pub id: ReservationId,
    /// When its lease expires, µs since the epoch (backend clock).
    pub expires_at: i64,
}

impl OperationId {
    /// The operation id an idempotency key names: the first 128 bits of its
    /// SHA-256, the same in every process and language, so a client that
    /// retries with its own key (an HTTP `Idempotency-Key`) is answered as
    /// the first time and charged once.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] for a key that is empty or longer
    /// than 256 bytes.
    pub fn of_key(key: &str) -> crate::Result<Self> {
        if key.is_empty() || key.len() > 256 {
            return Err(crate::Error::invalid(
                "idempotency key",
                format!("it is {} bytes; give 1 to 256", key.len()),
            ));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut first = [0_u8; 16];
        first.copy_from_slice(&digest.as_ref()[..16]);
        Ok(Self(u128::from_be_bytes(first).max(1)))
    }
}

/// An id of 128 random bits, shown as 32 hex digits.
macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u128);

        impl $name {
            /// A fresh random id (never zero).
            #[must_use]
            pub fn random() -> Self {
                Self(fastrand::u128(1..))
            }

            /// A fresh random id that also differs between processes forked
            /// from one another (whose random generators were copied in one
            /// state): the process id is mixed into its low bits. For ids
            /// stored in a shared backend; one system call more than
            /// [`Self::random`].
            #[must_use]
            pub fn random_in_process() -> Self {
                Self(fastrand::u128(1..) ^ u128::from(std::process::id()))
            }

            /// Parses 32 hex digits.
            ///
            /// # Errors
            /// [`crate::Error::InvalidArgument`] if it is not 32 hex digits.
            pub fn parse(s: &str) -> crate::Result<Self> {
                if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    if let Ok(v) = u128::from_str_radix(s, 16) {
                        return Ok(Self(v));
                    }
                }
                Err(crate::Error::invalid(
                    $what,
                    format!("`{}` is not 32 hex digits", crate::error::truncate(s)),
                ))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:032x}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> crate::Result<Self> {
                Self::parse(s)
            }
        }
    };
}

/// Reseeds this thread's generator of random ids: call it in a child right
/// after `fork()` (the Python package does), so the child's ids do not repeat
/// its parent's.
pub fn reseed_ids_after_fork() {
    use crate::clock::Clock as _;
    let now = crate::clock::SystemClock.now().unsigned_abs();
    fastrand::seed(now ^ u64::from(std::process::id()).rotate_left(32));
}

hex_id!(
    /// A reservation id: 128 random bits, shown as 32 hex digits.
    ReservationId,
    "reservation id"
);

hex_id!(
    /// The id of one decision that changes state (acquire, reserve, delegate).
    ///
    /// Every backend remembers an admitted decision made under an id the
    /// caller gave ([`crate::Request::operation`]) for
    /// [`crate::backend::OPERATION_MEMORY`]: asking again with the same id
    /// returns the original decision and charges nothing more. (A denial
    /// changed nothing, so a repeat is decided afresh.) Redis also remembers
    /// every admitted decision under an id of its own for
    /// [`crate::backend::IMPLICIT_OPERATION_MEMORY`], so it can send a
    /// request again after a dropped connection, and names that id in a
    /// decision whose answer was lost ([`Decision::unconfirmed`]). A
    /// reservation made under an operation id takes the same 128 bits as its
    /// [`ReservationId`], so a repeated `reserve` answers the same reservation.
    ///
    /// An id names one request per scope tree (the scope's first segment, as
    /// idempotency keys are per tenant): sent again with a different request
    /// of the same tree it is refused ([`crate::Error::InvalidArgument`]); in
    /// another tree it names another operation.
    OperationId,
    "operation id"
);

/// The answer to `check`, `acquire`, `reserve` and `delegate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow, allow with caps, or deny.
    pub outcome: Outcome,
    /// Restrictions to honour (with `AllowWithCaps`).
    pub caps: Caps,
    /// With `Deny`: how long until the next attempt can succeed for this caller's
    /// priority (exact for rate and quota, best estimate otherwise). `None` with
    /// `Deny` means it can never succeed as asked (the cost exceeds the capacity).
    pub retry_after: Option<Duration>,
    /// Every limit involved, in policy order (scope chain, resource, action).
    pub limits: Vec<LimitState>,
    /// Why it was denied (or capped), for humans.
    pub reason: Option<String>,
    /// The reservation made, for an allowed `reserve` / `delegate`.
    pub reservation: Option<ReservationInfo>,
    /// The priority the request was served at (background may be promoted to standard).
    pub priority: Priority,
    /// Set when the decision was made without the shared backend (it was
    /// unreachable), following `on_backend_error`; `reason` says why.
    pub degraded: Option<Degraded>,
    /// Set (with `degraded`) when the request may have reached the shared
    /// backend but its answer was lost: whether the backend admitted and
    /// charged it is unknown. Asking again with this operation id
    /// ([`crate::Request::operation`]) returns the original decision, charged
    /// at most once.
    pub unconfirmed: Option<OperationId>,
    /// The traffic light of the request's resource, when it coordinates on
    /// its upstream (`upstream:` in the policy): what the upstream's observed
    /// state meant for this request.
    pub light: Option<crate::upstream::Light>,
}

/// How a decision was made while the shared backend was unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Degraded {
    /// Denied because the backend could not be asked (`on_backend_error: deny`).
    Deny,
    /// Allowed without any limit (`on_backend_error: allow`).
    Allow,
    /// Decided by this node's embedded engine on its share of each limit
    /// (`on_backend_error: local`).
    Local,
}

impl Degraded {
    /// `deny`, `allow` or `local`: the `on_backend_error` mode that decided.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Allow => "allow",
            Self::Local => "local",
        }
    }
}

impl Decision {
    /// A denial by policy alone (no limit was asked): `reason` says which
    /// rule; no `retry_after`, as waiting does not change it.
    pub(crate) fn refused(reason: String, priority: Priority) -> Self {
        Self {
            outcome: Outcome::Deny,
            caps: Caps::default(),
            retry_after: None,
            limits: Vec::new(),
            reason: Some(reason),
            reservation: None,
            priority,
            degraded: None,
            unconfirmed: None,
            light: None,
        }
    }

    /// Whether the caller may go ahead (`Allow` or `AllowWithCaps`).
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.outcome != Outcome::Deny
    }

    /// The limit that denied the request, if any.
    #[must_use]
    pub fn denied_by(&self) -> Option<&LimitState> {
        self.limits.iter().find(|l| l.denied)
    }
}

/// What a commit charged, per limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The limit as the policy defines it (name, unit, kind).
    pub def: Arc<LimitDef>,
    /// The storage key the limit was counted under: `<scope prefix>#<limit>`
    /// (`tenant:acme#tenant-usd`), or `@#<limit>` for a shared pool.
    pub key: Arc<str>,
    /// What was reserved, base units.
    pub reserved: i64,
    /// What was charged, base units.
    pub charged: i64,
    /// Actual usage beyond what was charged (overage rule `cap`), base units.
    pub uncharged: i64,
    /// How far past its capacity this commit took the limit — the debt it
    /// left, base units (0 within the capacity). Measured on quotas and
    /// budgets when the commit went past its reservation under the rules
    /// that let it (`charge`, `allow_if_available`, `allow_with_overdraft`).
    pub debt: i64,
    /// Spent and held on the limit just before this commit, with its own
    /// hold at what it reserved — measured when [`Charge::debt`] is; the
    /// commit took it to `before + charged − reserved` (thresholds crossed
    /// on the way are reported as events).
    pub before: Option<i64>,
}

impl Charge {
    /// The limit's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The limit's unit.
    #[must_use]
    pub fn unit(&self) -> &str {
        &self.def.unit
    }

    /// Whose counter it charged: the scope prefix of its key
    /// (`tenant:acme`), or `None` for a pool shared by everyone.
    #[must_use]
    pub fn owner(&self) -> Option<&str> {
        self.key
            .split_once('#')
            .map(|(o, _)| o)
            .filter(|o| *o != "@")
    }
}

/// The result of [`crate::Warden::top_up`]; amounts in base units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUp {
    /// The limit topped up, its unit and the unit's decimals.
    pub limit: String,
    /// The unit.
    pub unit: String,
    /// Decimals of `unit`.
    pub decimals: u8,
    /// What was given back (at most what was spent this window).
    pub credited: i64,
    /// What it has spent this window now (past its capacity: in debt).
    pub spent: i64,
}

/// The result of `commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReceipt {
    /// The reservation.
    pub id: ReservationId,
    /// Per limit charges.
    pub charges: Vec<Charge>,
    /// `true` if this id had already been committed: nothing was charged this time.
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::OperationId;

    #[test]
    fn an_idempotency_key_names_the_first_128_bits_of_its_sha256() {
        // Python: hashlib.sha256(b"order-7").hexdigest()[:32]
        let id = OperationId::of_key("order-7").unwrap();
        assert_eq!(id.to_string(), "df8cf80227ec3237922df0ecd88385c5");
        assert_eq!(
            OperationId::of_key(&"k".repeat(256)).unwrap(),
            OperationId::of_key(&"k".repeat(256)).unwrap()
        );
        for bad in [String::new(), "k".repeat(257)] {
            let e = OperationId::of_key(&bad).unwrap_err().to_string();
            assert!(e.contains("idempotency key"), "{e}");
        }
    }
}
