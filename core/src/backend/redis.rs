//! The Redis / Valkey backend: one standalone server or a Redis Cluster.
//!
//! Every operation is one `EVALSHA` of a Lua script (`core/lua/`) that
//! evaluates and charges every limit of the request atomically; `NOSCRIPT`
//! after a restart or `SCRIPT FLUSH` is answered by loading the script and
//! retrying, transparently. A check or acquire whose limits are all rates (and
//! whose caller is not a tracked background one) runs the lean `rate.lua`;
//! everything else runs `decide.lua`, whose rate formulas are the same. Time
//! is the server's `TIME`, so client clocks never matter;
//! [`RedisBackend::with_clock`] replaces it for deterministic tests
//! only. Connections are multiplexed: concurrent callers pipeline over one
//! socket per server, which reconnects by itself.
//!
//! Keys: `<namespace>:{<tag>}:<scope prefix>#<limit>` where the hash tag is the
//! first scope segment (`{tenant:acme}`), or the whole key for a shared pool;
//! reservation records are `<namespace>:{<slot tag>}:res:<id>`, where the id
//! carries the cluster slot of the limits it holds and the slot tag is a short
//! string hashing to that slot; delegation grants are `<scope>#@grant` keys
//! beside the limits they cover. Scope ids are percent-encoded, so no user id
//! can contain `{`, `}` or `#` and move a key to another tag or tenant.
//!
//! # Redis Cluster
//! A request whose limits all live on its scope tree's slot is still one
//! `EVALSHA`. A request that also touches a shared pool on another slot is
//! decided in steps: its own slot is reserved first (and, if denied, nothing
//! else happens), then the other slots are reserved in parallel under a lease,
//! then everything is committed — or, if any step is refused or fails, every
//! hold taken is released. A process dying between steps leaves holds that
//! expire with their lease (30 s for an `acquire`, the reservation's lease
//! otherwise), so nothing leaks and nothing is ever over-admitted; while such
//! holds exist, other requests may be refused capacity that is about to come
//! back (transient under-admission). Delegations hold only limits on the
//! scope tree's slot; pools elsewhere are checked when delegating and charged
//! as the sub-agent spends.

use std::sync::Arc;

use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use smallvec::SmallVec;

mod conn;
mod slots;

use conn::{Conn, Target};
use slots::{id_in_slot, id_slot, slot_tag, tag_slot};

use std::sync::atomic::{AtomicI64, Ordering};

use super::{Backend, Mode, Pending, poll_ready};
use crate::calendar::Window;
use crate::clock::{Clock, Micros, SystemClock};
use crate::decision::{
    Charge, CommitReceipt, Decision, OperationId, ReservationId, ReservationInfo,
};
use crate::error::{Error, Result};
use crate::eval::{ItemEval, assemble};
use crate::plan::{KeyRef, Plan};
use crate::policy::{LimitKind, Overage, Policy};
use crate::priority::Priority;
use crate::scope::Scope;

const COMMON: &str = include_str!("../../lua/common.lua");
const DECIDE: &str = include_str!("../../lua/decide.lua");
const SETTLE: &str = include_str!("../../lua/settle.lua");
const RATE: &str = include_str!("../../lua/rate.lua");
/// How long an ended reservation is remembered (idempotent commit / release).
const TOMBSTONE_US: i64 = 10 * 60 * 1_000_000;
/// Default command timeout.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);
/// Lease of the holds an `acquire` spanning several cluster slots takes between
/// its steps: what a process dying mid-request holds back, at most this long.
const STEP_LEASE_US: i64 = 30 * 1_000_000;

/// What a decision script is asked to do (`ARGV` mode of `decide.lua` /
/// `rate.lua`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepMode {
    Check,
    Acquire,
    Reserve,
    Delegate,
}

impl StepMode {
    const fn arg(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::Acquire => "acquire",
            Self::Reserve => "reserve",
            Self::Delegate => "delegate",
        }
    }
}

/// What the settle script is asked to do (`settle.lua` ARGV[2]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SettleMode {
    Commit,
    Release,
    Extend,
}

impl SettleMode {
    const fn arg(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Release => "release",
            Self::Extend => "extend",
        }
    }
}

/// One decision for the scripts: the plan, what to do, what reserving or
/// delegating needs, and the operation id it is remembered under.
#[derive(Clone, Copy)]
struct Call<'a> {
    plan: &'a Plan<'a>,
    mode: StepMode,
    id: Option<ReservationId>,
    lease: Micros,
    delegate: Option<(&'a Scope, Option<ReservationId>)>,
    /// The operation id and how long its answer is remembered (ms); only for
    /// state-changing decisions on one slot.
    op: Option<(OperationId, i64)>,
}

impl<'a> Call<'a> {
    fn of(plan: &'a Plan<'a>, mode: Mode<'a>) -> Self {
        let (step, id, lease, delegate) = match mode {
            Mode::Check => (StepMode::Check, None, 0, None),
            Mode::Acquire => (StepMode::Acquire, None, 0, None),
            Mode::Reserve { id, lease } => (StepMode::Reserve, Some(id), lease, None),
            Mode::Delegate {
                child,
                from,
                id,
                lease,
            } => (StepMode::Delegate, Some(id), lease, Some((child, from))),
        };
        Self {
            plan,
            mode: step,
            id,
            lease,
            delegate,
            op: None,
        }
    }
}

/// How long a decision's answer is remembered under an operation id the caller
/// gave ([`crate::Request::operation`]).
pub const OPERATION_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);
/// How long under an id the backend made up (long enough for its own resend
/// after a dropped connection, and a prompt retry of an `unconfirmed` one).
pub const IMPLICIT_OPERATION_MEMORY: std::time::Duration = std::time::Duration::from_secs(10);

/// A backend on one Redis or Valkey server, or on a Redis Cluster. Cheap to
/// clone. It reports failures as errors; compose it with
/// [`super::Fallback`] for `on_backend_error`.
#[derive(Clone)]
pub struct RedisBackend {
    conn: Conn,
    cluster: bool,
    namespace: Arc<str>,
    decide: Arc<Script>,
    /// `rate.lua`: check / acquire of rate limits only, no starvation tracker.
    rate: Arc<Script>,
    /// Whether `rate.lua` serves the requests it can (tests turn it off to run
    /// the conformance suites through `decide.lua` alone).
    use_rate_script: bool,
    settle: Arc<Script>,
    clock: Option<Arc<dyn Clock>>,
    timeout: std::time::Duration,
    /// Per slot (one entry for a standalone server): after a timeout, decisions
    /// on that slot do not wait on Redis again before this time (µs).
    skip_until: Arc<[AtomicI64]>,
}

/// After a command times out, how long decisions on its slot skip Redis
/// before trying again.
const PROBE_AFTER_TIMEOUT_US: i64 = 1_000_000;

/// How long a connection waits for a response before reaping it. Callers give
/// up earlier (their `timeout`); this only bounds what nobody waits for any more.
const ABANDONED_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn backend_err(e: impl std::fmt::Display) -> Error {
    Error::Backend {
        message: e.to_string(),
    }
}

/// A round trip that did not answer as asked, by whether the command may have
/// been applied on the server.
#[derive(Debug)]
enum Sent {
    /// Certainly not applied: a refused connection, an error reply — or not a
    /// backend failure at all (a delegation the script refused).
    Never(Error),
    /// The connection failed with the command in flight: it may have been
    /// applied. Safe to send again only under an operation id (or when
    /// idempotent).
    Lost(Error),
    /// No answer within the timeout: it may have been (or may yet be) applied.
    Late(Error),
}

impl Sent {
    /// The error a caller sees: a state-changing decision remembered under
    /// `op` that may have been applied is [`Error::Unconfirmed`].
    fn into_error(self, op: Option<OperationId>) -> Error {
        match (self, op) {
            (Self::Lost(e) | Self::Late(e), Some(operation)) => Error::Unconfirmed {
                message: match e {
                    Error::Backend { message } => message,
                    other => other.to_string(),
                },
                operation,
            },
            (Self::Never(e) | Self::Lost(e) | Self::Late(e), _) => e,
        }
    }
}

/// Classifies a failed Redis call.
fn failed(e: &redis::RedisError) -> Sent {
    let err = backend_err(e);
    if e.is_connection_refusal() {
        Sent::Never(err)
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
        Sent::Lost(err)
    } else {
        Sent::Never(err)
    }
}

impl RedisBackend {
    /// Connects to `url`; every key is prefixed by `namespace` (e.g. `rw`).
    ///
    /// URLs: `redis://[user:pass@]host:port[/db]` (or `valkey://`), `rediss://…`
    /// for TLS, `unix:///path`, and `redis+cluster://host:port,host:port…` (or
    /// `rediss+cluster://`) for a Redis Cluster given one or more seed nodes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad URL or namespace, [`Error::Backend`] if
    /// the server cannot be reached.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        Self::open(url, namespace, false).await
    }

    /// Like [`RedisBackend::connect`], but does not wait for Redis: it returns at
    /// once and connects in the background, so a process can start while Redis
    /// is down — its decisions follow `on_backend_error` until Redis answers.
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad URL or namespace (never unreachability).
    pub fn connect_lazy(url: &str, namespace: &str) -> Result<Self> {
        poll_ready(Self::open(url, namespace, true))
            .unwrap_or_else(|| Err(backend_err("a lazy connection waited")))
    }

    async fn open(url: &str, namespace: &str, lazy: bool) -> Result<Self> {
        if namespace.is_empty()
            || !namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(Error::invalid(
                "namespace",
                format!(
                    "`{}` must be 1+ of a-z A-Z 0-9 `_ - .`",
                    crate::error::truncate(namespace)
                ),
            ));
        }
        let bad_url = |e: redis::RedisError| {
            Error::invalid(
                "redis url",
                format!("`{}`: {e}", crate::error::truncate(url)),
            )
        };
        let connect_timeout = DEFAULT_TIMEOUT * 20;
        let unreachable = |e: &dyn std::fmt::Display| {
            backend_err(format!(
                "cannot connect to {}: {e}",
                crate::error::truncate(url)
            ))
        };
        let (conn, cluster) = match conn::target(url)? {
            Target::Single(u) => {
                let client = redis::Client::open(u.as_str()).map_err(bad_url)?;
                // Few retries with a bounded attempt, so a refused connection or a
                // bad certificate is reported as such rather than as a timeout.
                // Responses are bounded per call by `timeout` (configurable, per
                // warden); the connection's own limit only reaps the abandoned.
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(1)
                    .set_connection_timeout(Some(connect_timeout / 2))
                    .set_response_timeout(Some(ABANDONED_RESPONSE_TIMEOUT));
                let conn = if lazy {
                    ConnectionManager::new_lazy_with_config(client, config).map_err(bad_url)?
                } else {
                    tokio::time::timeout(
                        connect_timeout,
                        ConnectionManager::new_with_config(client, config),
                    )
                    .await
                    .map_err(|_| unreachable(&"timed out"))?
                    .map_err(|e| unreachable(&e))?
                };
                (Conn::Single(conn), false)
            }
            Target::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes)
                    .connection_timeout(connect_timeout)
                    .response_timeout(ABANDONED_RESPONSE_TIMEOUT)
                    .build()
                    .map_err(bad_url)?;
                let conn = if lazy {
                    client.get_pending_async_connection_with_config(
                        redis::cluster::ClusterConfig::default(),
                    )
                } else {
                    tokio::time::timeout(connect_timeout, client.get_async_connection())
                        .await
                        .map_err(|_| unreachable(&"timed out"))?
                        .map_err(|e| unreachable(&e))?
                };
                (Conn::Cluster(conn), true)
            }
        };
        Ok(Self {
            conn,
            cluster,
            namespace: namespace.into(),
            decide: Arc::new(Script::new(&format!("{COMMON}\n{DECIDE}"))),
            rate: Arc::new(Script::new(&format!("{COMMON}\n{RATE}"))),
            use_rate_script: true,
            settle: Arc::new(Script::new(&format!("{COMMON}\n{SETTLE}"))),
            clock: None,
            timeout: DEFAULT_TIMEOUT,
            skip_until: (0..if cluster { slots::SLOTS } else { 1 })
                .map(|_| AtomicI64::new(0))
                .collect(),
        })
    }

    /// How long one command may take before it counts as a backend failure
    /// (default 250 ms).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for zero or more than a minute.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Result<Self> {
        if timeout.is_zero() || timeout > std::time::Duration::from_secs(60) {
            return Err(Error::invalid(
                "timeout",
                format!("{timeout:?} is not within (0, 60 s]"),
            ));
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// This process's time for the pause after a timeout: the test clock when
    /// one is set (so tests step over the pause), else the system clock.
    fn local_now(&self) -> Micros {
        self.clock
            .as_ref()
            .map_or_else(|| SystemClock.now(), |c| c.now())
    }

    fn health(&self, slot: u16) -> &AtomicI64 {
        &self.skip_until[usize::from(slot) % self.skip_until.len()]
    }

    /// Whether a recent timeout on `slot` says not to wait on Redis for it now.
    fn skipping(&self, slot: u16) -> Option<Error> {
        (self.local_now() < self.health(slot).load(Ordering::Relaxed)).then(|| {
            backend_err(if self.cluster {
                "the Redis node of this key's slot timed out recently; not asked again yet"
            } else {
                "Redis timed out recently; not asked again yet"
            })
        })
    }

    /// Runs one Redis round trip on `slot` under the command timeout. A
    /// timeout makes the next decisions on that slot skip Redis for a moment
    /// instead of each waiting it out; other slots are not affected.
    async fn bounded<T>(
        &self,
        slot: u16,
        call: impl std::future::Future<Output = Result<T, Sent>>,
    ) -> Result<T, Sent> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                self.health(slot)
                    .store(self.local_now() + PROBE_AFTER_TIMEOUT_US, Ordering::Relaxed);
                Err(Sent::Late(backend_err(format!(
                    "Redis did not answer within {:?}",
                    self.timeout
                ))))
            }
        }
    }

    /// Runs `attempt` and, if the connection failed under it, once more at
    /// once (the connection reconnects by itself; an idle connection a server
    /// or proxy closed fails only its first command). Callers pass only
    /// attempts that are safe to repeat: checks, settles (idempotent by
    /// reservation id) and decisions remembered under an operation id.
    async fn resent<T, F, Fut>(&self, slot: u16, attempt: F) -> Result<T, Sent>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Sent>>,
    {
        self.bounded(slot, async {
            match attempt().await {
                Err(Sent::Lost(_)) => attempt().await,
                other => other,
            }
        })
        .await
    }

    /// Uses `clock` instead of the server's `TIME` — for deterministic tests only:
    /// in production, time must come from the server so client clocks never matter.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Sends every decision through `decide.lua`, never `rate.lua`: for the
    /// test suites, which run once each way so both scripts' rate formulas are
    /// pinned by the same expectations.
    #[doc(hidden)]
    #[must_use]
    pub fn without_rate_script(mut self) -> Self {
        self.use_rate_script = false;
        self
    }

    fn now_arg(&self) -> Micros {
        self.clock.as_ref().map_or(-1, |c| c.now())
    }

    /// The hash tag of a limit instance: the first scope segment, or the whole
    /// key for a shared pool (so pools spread over the cluster).
    fn tag<'k>(k: &KeyRef<'k>) -> std::borrow::Cow<'k, str> {
        if k.prefix.starts_with('@') {
            std::borrow::Cow::Owned(format!("{}#{}", k.prefix, k.name))
        } else {
            std::borrow::Cow::Borrowed(&k.prefix[..k.prefix.find('/').unwrap_or(k.prefix.len())])
        }
    }

    /// The Redis key of a limit instance.
    fn key(&self, k: KeyRef<'_>) -> String {
        format!(
            "{}:{{{}}}:{}#{}",
            self.namespace,
            Self::tag(&k),
            k.prefix,
            k.name
        )
    }

    /// The record of a reservation, on the slot its id carries.
    fn record_key(&self, id: ReservationId) -> String {
        format!("{}:{{{}}}:res:{id}", self.namespace, slot_tag(id_slot(id)))
    }

    /// Where the answer of operation `op` is remembered: on the slot of the
    /// decision's keys.
    /// (An id is scoped to the request's scope tree, whose hash the key
    /// carries, so it means the same on every backend and every slot.)
    fn op_key(&self, op: OperationId, slot: u16, plan: &Plan<'_>) -> String {
        format!(
            "{}:{{{}}}:op:{op}:{:x}",
            self.namespace,
            slot_tag(slot),
            plan.operation_tree()
        )
    }

    /// A key on `slot` that is never written: the scripts' placeholder for an
    /// unused KEYS entry (a cluster refuses keys of another slot).
    fn spare_key(&self, slot: u16) -> String {
        format!("{}:{{{}}}:none", self.namespace, slot_tag(slot))
    }

    /// The starvation tracker of the plan's caller, if any.
    fn caller_key(&self, plan: &Plan<'_>) -> Option<String> {
        plan.caller_key().map(|k| {
            let tag = &k[..k.find(['/', '#']).unwrap_or(k.len())];
            format!("{}:{{{tag}}}:{k}", self.namespace)
        })
    }

    /// Splits a plan by cluster slot. The first part is the primary one: it holds
    /// the request's own keys (record, starvation tracker, delegation grants) and
    /// sits on the scope tree's slot whenever the request has limits there, a
    /// caller to track or a delegation to make; a standalone server is one part.
    fn parts(&self, call: Call<'_>) -> SmallVec<[Part; 2]> {
        let plan = call.plan;
        let home = tag_slot(plan.scope().prefix(1));
        if !self.cluster {
            return smallvec::smallvec![Part {
                slot: home,
                items: (0..plan.len()).collect(),
                primary: true,
            }];
        }
        let slots: SmallVec<[u16; 8]> = plan
            .limits()
            .map(|l| tag_slot(&Self::tag(&l.key)))
            .collect();
        let needs_home = slots.is_empty()
            || slots.contains(&home)
            || plan.caller_key().is_some()
            || call.delegate.is_some();
        let first = if needs_home { home } else { slots[0] };
        let mut parts: SmallVec<[Part; 2]> = smallvec::smallvec![Part {
            slot: first,
            items: SmallVec::new(),
            primary: true,
        }];
        for (i, &slot) in slots.iter().enumerate() {
            match parts.iter_mut().find(|p| p.slot == slot) {
                Some(p) => p.items.push(i),
                None => parts.push(Part {
                    slot,
                    items: smallvec::smallvec![i],
                    primary: false,
                }),
            }
        }
        parts
    }

    /// KEYS and ARGV of the decision script for one part of a call (see
    /// `core/lua/decide.lua`).
    fn decide_args(
        &self,
        call: Call<'_>,
        part: &Part,
        step: &Step<'_>,
    ) -> (Vec<String>, Vec<String>) {
        let Call { plan, delegate, .. } = call;
        let n = part.items.len();
        let mut keys: Vec<String> = Vec::with_capacity(n + 8);
        let mut args: Vec<String> = Vec::with_capacity(16 + 13 * n);
        for &i in &part.items {
            keys.push(self.key(plan.get(i).key));
        }
        let caller = self.caller_key(plan).filter(|_| part.primary);
        let has_caller = caller.is_some();
        keys.push(caller.unwrap_or_else(|| self.spare_key(part.slot)));
        keys.push(
            step.id
                .map_or_else(|| self.spare_key(part.slot), |id| self.record_key(id)),
        );
        let scope = plan.scope();
        // Grants cover limits of the scope tree's slot only, so only a primary
        // part on that slot reads them; and they cover only holding limits
        // (quota, budget, concurrency), so a part made of rate limits alone
        // skips the lookups (one HMGET per scope level).
        let grants =
            if !rates_only(plan, part) && part.primary && part.slot == tag_slot(scope.prefix(1)) {
                scope.depth()
            } else {
                0
            };
        for d in 1..=grants {
            keys.push(self.key(KeyRef {
                prefix: scope.prefix(d),
                name: "@grant",
            }));
        }
        let (child, parent) = match delegate.filter(|_| step.mode == StepMode::Delegate) {
            Some((c, p)) => (Some(c), p),
            None => (None, None),
        };
        keys.push(child.map_or_else(
            || self.spare_key(part.slot),
            |c| {
                self.key(KeyRef {
                    prefix: c.as_str(),
                    name: "@grant",
                })
            },
        ));
        keys.push(parent.map_or_else(|| self.spare_key(part.slot), |p| self.record_key(p)));
        keys.push(step.op.map_or_else(
            || self.spare_key(part.slot),
            |(op, _)| self.op_key(op, part.slot, plan),
        ));
        args.extend([
            self.now_arg().to_string(),
            step.mode.arg().to_owned(),
            n.to_string(),
            step.rank.to_string(),
            plan.promote_after().to_string(),
            u8::from(has_caller).to_string(),
            step.id.map_or_else(String::new, |i| i.to_string()),
            step.lease.to_string(),
            TOMBSTONE_US.to_string(),
            child.map_or(scope.as_str(), Scope::as_str).to_owned(),
            grants.to_string(),
            parent.map_or_else(String::new, |p| p.to_string()),
            u8::from(step.first_of_many).to_string(),
            step.links.to_owned(),
            step.op.map_or_else(String::new, |(op, _)| op.to_string()),
            step.op.map_or(0, |(_, ms)| ms).to_string(),
            step.op.map_or_else(String::new, |_| {
                format!("{:016x}", plan.fingerprint(step.mode.arg()))
            }),
        ]);
        for &i in &part.items {
            let item = plan.get(i);
            let def = &**item.def;
            let (kind, cap, p, l) = match &def.kind {
                LimitKind::Rate(r) => ("r", r.burst, r.p, r.l),
                LimitKind::Concurrency => ("s", def.limit, 1, 1),
                _ => ("c", def.limit, 1, 1),
            };
            let (wk, wlen, woff) = match def.kind.window() {
                None => ("n", 0, 0),
                Some(Window::Lifetime) => ("l", 0, 0),
                Some(Window::Fixed { len, offset }) => ("f", len, offset),
                Some(Window::Week { offset }) => ("w", 0, offset),
                Some(Window::Month { offset }) => ("m", 0, offset),
                Some(Window::Year { offset }) => ("y", 0, offset),
            };
            args.extend([kind.to_owned(), item.amount.to_string(), cap.to_string()]);
            for p in Priority::ALL {
                args.push(def.floors.usable(cap, p).to_string());
            }
            args.extend([
                p.to_string(),
                l.to_string(),
                wk.to_owned(),
                wlen.to_string(),
                woff.to_string(),
                def.unit.clone(),
            ]);
            args.push(
                match def.overage {
                    Overage::Charge => "charge",
                    Overage::Cap => "cap",
                }
                .to_owned(),
            );
        }
        (keys, args)
    }

    /// The script for one part and its keys and arguments: `rate.lua` for a
    /// check or acquire of rate limits only with no starvation tracker (the
    /// common case: a third of the arguments, no grant, record or window
    /// work), `decide.lua` for everything else.
    fn script_for(
        &self,
        call: Call<'_>,
        part: &Part,
        step: &Step<'_>,
    ) -> (&Script, Vec<String>, Vec<String>) {
        let plan = call.plan;
        // check / acquire hold nothing and make no record; a starvation tracker
        // lives on the primary part only.
        let lean = self.use_rate_script
            && matches!(step.mode, StepMode::Check | StepMode::Acquire)
            && (plan.caller_key().is_none() || !part.primary)
            && rates_only(plan, part);
        if !lean {
            let (keys, args) = self.decide_args(call, part, step);
            return (&self.decide, keys, args);
        }
        let rank = usize::from(step.rank.min(2));
        let mut keys = Vec::with_capacity(part.items.len());
        let mut args = Vec::with_capacity(5 + 5 * part.items.len());
        args.extend([
            self.now_arg().to_string(),
            step.mode.arg().to_owned(),
            step.rank.to_string(),
            step.op.map_or_else(String::new, |(op, _)| op.to_string()),
            step.op.map_or(0, |(_, ms)| ms).to_string(),
            step.op.map_or_else(String::new, |_| {
                format!("{:016x}", plan.fingerprint(step.mode.arg()))
            }),
        ]);
        for &i in &part.items {
            let item = plan.get(i);
            keys.push(self.key(item.key));
            if let LimitKind::Rate(r) = &item.def.kind {
                args.extend([
                    item.amount.to_string(),
                    r.burst.to_string(),
                    item.def
                        .floors
                        .usable(r.burst, Priority::ALL[rank])
                        .to_string(),
                    r.p.to_string(),
                    r.l.to_string(),
                ]);
            }
        }
        if let Some((op, _)) = step.op {
            keys.push(self.op_key(op, part.slot, plan));
        }
        (&self.rate, keys, args)
    }

    /// The exact command one `acquire` of `plan` sends — `EVALSHA <sha> <numkeys>
    /// <keys…> <args…>` — so benchmarks can replay it with `redis-benchmark`.
    /// For a plan on one slot (every plan on a standalone server); without an
    /// operation id (what the benchmark replays is the same command each time).
    #[doc(hidden)]
    #[must_use]
    pub fn acquire_command(&self, plan: &Plan<'_>) -> Vec<String> {
        let call = Call::of(plan, Mode::Acquire);
        let part = &self.parts(call)[0];
        let step = Step::new(StepMode::Acquire, plan);
        let (script, keys, args) = self.script_for(call, part, &step);
        let mut out = vec![
            "EVALSHA".to_owned(),
            script.get_hash().to_owned(),
            keys.len().to_string(),
        ];
        out.extend(keys);
        out.extend(args);
        out
    }

    /// Runs one script with `keys` and `args` on the slot's node.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, Sent> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(|e| failed(&e))
    }

    /// Runs the decision script for one part, sending it once more if the
    /// connection failed under a step that is safe to repeat (a check, or a
    /// decision remembered under an operation id).
    async fn run_part(
        &self,
        call: Call<'_>,
        part: &Part,
        step: &Step<'_>,
    ) -> Result<PartOut, Sent> {
        let (script, keys, args) = self.script_for(call, part, step);
        let repeatable = step.mode == StepMode::Check || step.op.is_some();
        let out: Vec<i64> = if repeatable {
            self.resent(part.slot, || self.invoke(script, &keys, &args))
                .await?
        } else {
            self.bounded(part.slot, self.invoke(script, &keys, &args))
                .await?
        };
        if let (Some(-7), Some((op, _))) = (out.first(), step.op) {
            return Err(Sent::Never(reused(op)));
        }
        if let (Some(&code), Some((c, parent))) = (out.first(), call.delegate) {
            if code < 0 {
                return Err(Sent::Never(self.refused_delegation(code, c, parent).await));
            }
        }
        if out.len() != 3 + 4 * part.items.len() {
            return Err(Sent::Never(Error::Internal {
                message: format!(
                    "decide script answered {} values for {} limits",
                    out.len(),
                    part.items.len()
                ),
            }));
        }
        Ok(PartOut {
            rank: u8::try_from(out[0].clamp(0, 2)).unwrap_or(2),
            expires_at: out[1],
            tracker_left: out[2] == 1,
            evals: out[3..]
                .chunks_exact(4)
                .map(|c| ItemEval {
                    allowed: c[0] == 1,
                    remaining: c[1],
                    reset: c[2],
                    retry: (c[3] >= 0).then_some(c[3]),
                })
                .collect(),
        })
    }

    /// The error for a delegation the script refused (`code` < 0, see
    /// decide.lua), worded as the embedded engine words it.
    async fn refused_delegation(
        &self,
        code: i64,
        child: &Scope,
        parent: Option<ReservationId>,
    ) -> Error {
        let pid = || parent.map(|p| p.to_string()).unwrap_or_default();
        match code {
            -1 => Error::invalid(
                "delegation",
                format!("scope `{child}` already has an open delegation; release it first"),
            ),
            -2 => Error::ReservationNotFound { id: pid() },
            -3 => Error::ReservationExpired { id: pid() },
            -4 => closed(pid(), "committed"),
            -5 => closed(pid(), "released"),
            -6 => self.not_under(child, parent).await,
            other => Error::Internal {
                message: format!("decide script refused a delegation with code {other}"),
            },
        }
    }

    /// "child scope is not under the reservation's scope", naming that scope.
    async fn not_under(&self, child: &Scope, parent: Option<ReservationId>) -> Error {
        let scope = match parent {
            Some(p) => {
                let mut conn = self.conn.clone();
                let get = redis::cmd("HGET")
                    .arg(self.record_key(p))
                    .arg("scope")
                    .clone();
                self.bounded(id_slot(p), async {
                    get.query_async::<Option<String>>(&mut conn)
                        .await
                        .map_err(|e| failed(&e))
                })
                .await
                .ok()
                .flatten()
            }
            None => None,
        };
        Error::invalid(
            "delegation",
            format!(
                "child scope `{child}` is not under the reservation's scope `{}`",
                scope.unwrap_or_default()
            ),
        )
    }

    /// On a cluster, a delegation from a reservation whose records live on
    /// another slot than the child's scope tree: says why, as the embedded
    /// engine would (not found, expired, settled, not under its scope), by
    /// reading the record; a live record whose scope is a parent of the child
    /// holds only shared pools, which cannot be carved from on a cluster.
    async fn foreign_parent(&self, parent: ReservationId, child: &Scope) -> Error {
        let mut conn = self.conn.clone();
        let get = redis::cmd("HMGET")
            .arg(self.record_key(parent))
            .arg(&["st", "exp", "scope"])
            .clone();
        let rec: Result<RecordHead, Sent> = self
            .bounded(id_slot(parent), async {
                get.query_async(&mut conn).await.map_err(|e| failed(&e))
            })
            .await;
        let now = match self.now_arg() {
            n if n >= 0 => Some(n),
            _ => self.server_now(id_slot(parent)).await,
        };
        let id = parent.to_string();
        match rec {
            Err(e) => e.into_error(None),
            Ok((None, ..)) => Error::ReservationNotFound { id },
            Ok((Some(st), _, _)) if st == "c" => closed(id, "committed"),
            Ok((Some(st), _, _)) if st == "r" => closed(id, "released"),
            // A record kept past its lease (its tombstone) has expired.
            Ok((Some(_), Some(exp), _)) if now.is_some_and(|now| exp <= now) => {
                Error::ReservationExpired { id }
            }
            Ok((Some(_), _, Some(scope))) if !child.as_str().starts_with(&format!("{scope}/")) => {
                Error::invalid(
                    "delegation",
                    format!("child scope `{child}` is not under the reservation's scope `{scope}`"),
                )
            }
            Ok(_) => Error::invalid(
                "delegation",
                format!(
                    "in a Redis Cluster a delegation carves from a reservation on its scope tree's limits; {parent} holds only shared pools"
                ),
            ),
        }
    }

    /// The server's clock (µs) as seen from `slot`'s node, if it answers.
    async fn server_now(&self, slot: u16) -> Option<Micros> {
        let mut conn = self.conn.clone();
        let time = redis::cmd("TIME");
        let (secs, us): (i64, i64) = self
            .bounded(slot, async {
                time.query_async(&mut conn).await.map_err(|e| failed(&e))
            })
            .await
            .ok()?;
        Some(secs * 1_000_000 + us)
    }

    /// Decides a call: one script run when its limits share a slot, the
    /// reserve-then-commit steps described in the module docs otherwise.
    async fn decide_call(&self, call: Call<'_>) -> Result<Decision, Sent> {
        let plan = call.plan;
        let parts = self.parts(call);
        let primary = &parts[0];
        for p in parts.iter() {
            if let Some(e) = self.skipping(p.slot) {
                return Err(Sent::Never(e));
            }
        }
        // A random reservation id is stored in Redis, which processes forked
        // from one share: mix the process in (an id from an operation id
        // stays as it is, so a repeated request names the same reservation).
        let id = call.id.map(|id| match plan.operation() {
            Some(_) => id_in_slot(id, primary.slot),
            None => id_in_slot(
                ReservationId(id.0 ^ u128::from(std::process::id())),
                primary.slot,
            ),
        });
        if let (Some((child, Some(parent))), true) = (call.delegate, self.cluster) {
            if id_slot(parent) != primary.slot {
                return Err(Sent::Never(self.foreign_parent(parent, child).await));
            }
        }
        let step = Step {
            id,
            lease: call.lease,
            op: call.op,
            ..Step::new(call.mode, plan)
        };
        if parts.len() == 1 {
            let out = self.run_part(call, primary, &step).await?;
            return Ok(self.finish(call, &parts, &[out], id));
        }
        let foreign = &parts[1..];
        let check = Step::new(StepMode::Check, plan);
        match call.mode {
            StepMode::Check => {
                let outs = self.run_parts(call, &parts, &check).await?;
                Ok(self.finish(call, &parts, &outs, None))
            }
            StepMode::Delegate => {
                let mut outs = self.run_parts(call, foreign, &check).await?;
                let all = outs.iter().all(PartOut::allowed);
                let home = self
                    .run_part(call, primary, if all { &step } else { &check })
                    .await?;
                outs.insert(0, home);
                Ok(self.finish(call, &parts, &outs, id.filter(|_| all)))
            }
            StepMode::Acquire | StepMode::Reserve => self.hold_then_commit(call, &parts, id).await,
        }
    }

    /// Acquire or reserve across several slots: hold the primary slot (step 1),
    /// then every other slot in parallel at the priority served (step 2), then
    /// commit everything for an acquire — or release everything taken if any
    /// step is refused or fails (step 3). See the module docs.
    async fn hold_then_commit(
        &self,
        call: Call<'_>,
        parts: &[Part],
        id: Option<ReservationId>,
    ) -> Result<Decision, Sent> {
        let plan = call.plan;
        let (primary, foreign) = (&parts[0], &parts[1..]);
        let acquire = call.mode == StepMode::Acquire;
        let lease = if acquire { STEP_LEASE_US } else { call.lease };
        let home_id =
            id.unwrap_or_else(|| id_in_slot(ReservationId::random_in_process(), primary.slot));
        let sub: Vec<ReservationId> = foreign
            .iter()
            .map(|p| id_in_slot(ReservationId::random_in_process(), p.slot))
            .collect();
        let all_ids = || std::iter::once(home_id).chain(sub.iter().copied());
        let links = sub
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // If this future is dropped before the last step (the caller cancelled),
        // hand back at once whatever was taken — even by a step whose answer
        // never arrived — instead of waiting out the lease.
        let mut undo = Undo {
            backend: Some(self.clone()),
            ids: all_ids().collect(),
        };

        // Step 1: the primary slot; the starvation tracker is left open.
        let first = Step {
            id: Some(home_id),
            lease,
            first_of_many: true,
            links: &links,
            ..Step::new(StepMode::Reserve, plan)
        };
        let home = self.run_part(call, primary, &first).await?;
        if !home.allowed() {
            undo.backend = None;
            let served = Step {
                rank: home.rank,
                ..Step::new(StepMode::Check, plan)
            };
            let mut outs = self.run_parts(call, foreign, &served).await?;
            outs.insert(0, home);
            return Ok(self.finish(call, parts, &outs, None));
        }

        // Step 2: every other slot, in parallel, at the rank served.
        let steps: Vec<Step<'_>> = sub
            .iter()
            .map(|&sid| Step {
                id: Some(sid),
                lease,
                rank: home.rank,
                ..Step::new(StepMode::Reserve, plan)
            })
            .collect();
        let results = join_all(
            foreign
                .iter()
                .zip(&steps)
                .map(|(p, s)| self.run_part(call, p, s)),
        )
        .await;
        let tracker = self.caller_key(plan);
        let tracker_left = home.tracker_left;
        let mut outs = vec![home];
        let mut failure = None;
        for r in results {
            match r {
                Ok(o) => outs.push(o),
                Err(e) => failure = Some(e),
            }
        }
        let all = failure.is_none() && outs.iter().all(PartOut::allowed);

        // Step 3: a reservation that got everything stands as it is (its
        // starvation tracker cleared); otherwise commit (acquire) or release.
        if all && !acquire {
            undo.backend = None;
            if let Some(t) = tracker.filter(|_| tracker_left) {
                let mut conn = self.conn.clone();
                let del = redis::cmd("DEL").arg(t).clone();
                let _: () = self
                    .bounded(primary.slot, async {
                        del.query_async(&mut conn).await.map_err(|e| failed(&e))
                    })
                    .await?;
            }
            return Ok(self.finish(call, parts, &outs, id));
        }
        let (mode, starve) = if all {
            (SettleMode::Commit, "clear")
        } else {
            (SettleMode::Release, "deny")
        };
        let home_tracker = tracker.as_deref().map(|t| (t, starve));
        let ended = join_all(all_ids().map(|rid| {
            let tracker = home_tracker.filter(|_| rid == home_id);
            self.settle_one(rid, mode, 0, &[], tracker, plan.promote_after())
        }))
        .await;
        undo.backend = None;
        if let Some(e) = failure {
            return Err(e);
        }
        if let (true, Some(Err(e))) = (all, ended.into_iter().find(Result::is_err)) {
            // Parts already committed stay charged (under-admission, never
            // over); the rest is released and the request reported as failed.
            for rid in all_ids() {
                let _ = self
                    .settle_one(rid, SettleMode::Release, 0, &[], None, 0)
                    .await;
            }
            return Err(e);
        }
        Ok(self.finish(call, parts, &outs, None))
    }

    /// Runs one step on several parts in parallel.
    async fn run_parts(
        &self,
        call: Call<'_>,
        parts: &[Part],
        step: &Step<'_>,
    ) -> Result<Vec<PartOut>, Sent> {
        join_all(parts.iter().map(|p| self.run_part(call, p, step)))
            .await
            .into_iter()
            .collect()
    }

    /// Puts the parts' answers back in plan order and assembles the decision.
    fn finish(
        &self,
        call: Call<'_>,
        parts: &[Part],
        outs: &[PartOut],
        reservation: Option<ReservationId>,
    ) -> Decision {
        let plan = call.plan;
        let mut evals = vec![
            ItemEval {
                allowed: true,
                remaining: 0,
                reset: 0,
                retry: None,
            };
            plan.len()
        ];
        for (part, out) in parts.iter().zip(outs) {
            for (&i, e) in part.items.iter().zip(&out.evals) {
                evals[i] = *e;
            }
        }
        let served = match outs.first().map_or(2, |o| o.rank) {
            0 => Priority::Critical,
            1 => Priority::Standard,
            _ => Priority::Background,
        };
        let info = reservation.and_then(|id| {
            let expires_at = outs.first().map_or(0, |o| o.expires_at);
            (expires_at > 0).then_some(ReservationInfo { id, expires_at })
        });
        assemble(plan, &evals, served, info)
    }

    /// Commits a reservation, then the reservations it links to on other
    /// cluster slots (made by the same request); the receipt lists every
    /// charge in plan order, as the embedded engine does.
    async fn commit_all(
        &self,
        policy: &Policy,
        id: ReservationId,
        actual: &[(&str, i64)],
    ) -> Result<CommitReceipt, Sent> {
        let out = self
            .resent(id_slot(id), || {
                self.settle_one(id, SettleMode::Commit, 0, actual, None, 0)
            })
            .await?;
        let mut receipt = receipt_of(policy, id, &out)?;
        for (l, more) in self
            .settle_links(&out.links, SettleMode::Commit, 0, actual)
            .await?
        {
            receipt
                .charges
                .extend(receipt_of(policy, l, &more)?.charges);
        }
        receipt.charges.sort_by_key(plan_order);
        Ok(receipt)
    }

    /// Releases a reservation and the ones it links to.
    async fn release_all(&self, id: ReservationId) -> Result<bool, Sent> {
        let out = self
            .resent(id_slot(id), || {
                self.settle_one(id, SettleMode::Release, 0, &[], None, 0)
            })
            .await?;
        self.settle_links(&out.links, SettleMode::Release, 0, &[])
            .await?;
        match (out.status.as_str(), out.rest.first()) {
            ("released", Some(v)) => Ok(int(v) == 1),
            _ => Err(out.unexpected()),
        }
    }

    /// Renews a reservation's lease and the leases of the ones it links to.
    async fn extend_all(&self, id: ReservationId, lease: Micros) -> Result<Micros, Sent> {
        let out = self
            .resent(id_slot(id), || {
                self.settle_one(id, SettleMode::Extend, lease, &[], None, 0)
            })
            .await?;
        self.settle_links(&out.links, SettleMode::Extend, lease, &[])
            .await?;
        match (out.status.as_str(), out.rest.first()) {
            ("extended", Some(v)) => Ok(int(v)),
            _ => Err(out.unexpected()),
        }
    }

    /// Settles the linked reservations of a multi-slot request the same way,
    /// in parallel. A linked record gone (its lease ran out, or it was never
    /// written because its step failed) holds nothing any more and is skipped.
    async fn settle_links(
        &self,
        links: &[ReservationId],
        mode: SettleMode,
        lease: Micros,
        actual: &[(&str, i64)],
    ) -> Result<Vec<(ReservationId, SettleOut)>, Sent> {
        let linked = join_all(links.iter().map(|&l| async move {
            let r = self
                .resent(id_slot(l), || {
                    self.settle_one(l, mode, lease, actual, None, 0)
                })
                .await;
            (l, r)
        }))
        .await;
        let mut outs = Vec::new();
        for (l, r) in linked {
            match r {
                Ok(out) => outs.push((l, out)),
                Err(Sent::Never(
                    Error::ReservationNotFound { .. } | Error::ReservationExpired { .. },
                )) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(outs)
    }

    /// One run of the settle script on one record. The statuses every mode
    /// shares (not found, expired, closed, a delegation committed) become
    /// errors; the rest is returned for the mode's own reading.
    async fn settle_one(
        &self,
        id: ReservationId,
        mode: SettleMode,
        lease: Micros,
        actual: &[(&str, i64)],
        starve: Option<(&str, &str)>,
        promote_after: Micros,
    ) -> Result<SettleOut, Sent> {
        let rec = self.record_key(id);
        let keys = [rec.clone(), starve.map_or(rec, |(k, _)| k.to_owned())];
        let mut args = vec![
            self.now_arg().to_string(),
            mode.arg().to_owned(),
            lease.to_string(),
            TOMBSTONE_US.to_string(),
            starve.map_or("", |(_, op)| op).to_owned(),
            promote_after.to_string(),
        ];
        for (unit, amount) in actual {
            args.extend([(*unit).to_owned(), amount.to_string()]);
        }
        let out: Vec<Value> = self.invoke(&self.settle, &keys, &args).await?;
        let status = out.first().map(text).unwrap_or_default();
        let links: Vec<ReservationId> = out
            .get(1)
            .map(text)
            .unwrap_or_default()
            .split(',')
            .filter_map(|l| ReservationId::parse(l).ok())
            .collect();
        let id_s = || id.to_string();
        let refused = match status.as_str() {
            "nf" => Error::ReservationNotFound { id: id_s() },
            "expired" => Error::ReservationExpired { id: id_s() },
            "closed" if out.get(2).map(text).as_deref() == Some("committed") => {
                closed(id_s(), "committed")
            }
            "closed" => closed(id_s(), "released"),
            "delegation" => Error::invalid(
                "commit",
                format!("{id} is a delegation; release it to close the sub-budget"),
            ),
            _ => {
                return Ok(SettleOut {
                    status,
                    rest: out.into_iter().skip(2).collect(),
                    links,
                });
            }
        };
        Err(Sent::Never(refused))
    }
}

/// A reservation record's state, lease end and scope (`HMGET st exp scope`).
type RecordHead = (Option<String>, Option<i64>, Option<String>);

/// What the settle script answered besides the shared statuses.
struct SettleOut {
    /// `ok` / `dup` (commit), `released`, `extended`.
    status: String,
    /// The values after the status and the links.
    rest: Vec<Value>,
    /// Reservations of the same request on other cluster slots.
    links: Vec<ReservationId>,
}

impl SettleOut {
    fn unexpected(&self) -> Sent {
        Sent::Never(Error::Internal {
            message: format!("settle script answered `{}`", self.status),
        })
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => text(other).parse().unwrap_or(0),
    }
}

/// An operation id sent again with another request.
pub(crate) fn reused(op: OperationId) -> Error {
    Error::invalid(
        "operation",
        format!("{op} already answered a different request; give each request its own id"),
    )
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn closed(id: String, state: &'static str) -> Error {
    Error::ReservationClosed { id, state }
}

/// The receipt in a commit's answer: `ok` / `dup`, n, then per limit key,
/// reserved, charged, actual.
fn receipt_of(policy: &Policy, id: ReservationId, out: &SettleOut) -> Result<CommitReceipt, Sent> {
    if !matches!(out.status.as_str(), "ok" | "dup") {
        return Err(out.unexpected());
    }
    let mut charges = Vec::new();
    for c in out.rest.get(1..).unwrap_or_default().chunks_exact(4) {
        let key = text(&c[0]);
        let local = key.split_once("}:").map_or(key.as_str(), |(_, k)| k);
        let name = KeyRef::split(local).name;
        let def = policy.limit(name).ok_or_else(|| {
            Sent::Never(Error::invalid(
                "commit",
                format!("limit `{name}` of reservation {id} is not in the policy in force"),
            ))
        })?;
        let (reserved, charged, actual) = (int(&c[1]), int(&c[2]), int(&c[3]));
        charges.push(Charge {
            def: Arc::clone(def),
            key: local.into(),
            reserved,
            charged,
            uncharged: actual - charged,
        });
    }
    Ok(CommitReceipt {
        id,
        charges,
        duplicate: out.status == "dup",
    })
}

/// A charge's place in plan order: the scope chain's own limits by depth,
/// then resource and action limits as the policy declares them.
fn plan_order(c: &Charge) -> (u8, usize, u32) {
    match c.def.attach {
        crate::policy::Attach::Scope(_) => {
            let prefix = KeyRef::split(&c.key).prefix;
            (0, prefix.split('/').count(), c.def.id)
        }
        _ => (1, 0, c.def.id),
    }
}

/// Releases reservations when dropped while armed (`backend` set): a
/// multi-slot decision cancelled between its steps hands back what it took at
/// once instead of leaving it held until the lease runs out.
struct Undo {
    backend: Option<RedisBackend>,
    ids: Vec<ReservationId>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        let (Some(backend), Ok(rt)) = (self.backend.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let ids = std::mem::take(&mut self.ids);
        rt.spawn(async move {
            for id in ids {
                let _ = backend
                    .settle_one(id, SettleMode::Release, 0, &[], None, 0)
                    .await;
            }
        });
    }
}

/// A plan's limits on one cluster slot.
struct Part {
    slot: u16,
    /// Plan indices.
    items: SmallVec<[usize; 8]>,
    /// Whether this part carries the request's own keys (see [`RedisBackend::parts`]).
    primary: bool,
}

/// Whether every limit of `part` is a rate (no holds, windows or grants).
fn rates_only(plan: &Plan<'_>, part: &Part) -> bool {
    part.items
        .iter()
        .all(|&i| matches!(plan.get(i).def.kind, LimitKind::Rate(_)))
}

/// What one script run on one part is asked to do.
struct Step<'s> {
    mode: StepMode,
    id: Option<ReservationId>,
    lease: Micros,
    /// Priority rank to decide at (the served rank, on later steps).
    rank: u8,
    /// First step of a multi-slot decision: leave the starvation tracker.
    first_of_many: bool,
    /// Reservations on other slots to record as links.
    links: &'s str,
    /// The operation id its answer is remembered under, and for how long (ms).
    op: Option<(OperationId, i64)>,
}

impl Step<'_> {
    fn new(mode: StepMode, plan: &Plan<'_>) -> Self {
        Self {
            mode,
            id: None,
            lease: 0,
            rank: plan.priority().rank(),
            first_of_many: false,
            links: "",
            op: None,
        }
    }
}

/// One part's answer.
struct PartOut {
    rank: u8,
    expires_at: Micros,
    /// A starvation tracker was left for the last step to settle.
    tracker_left: bool,
    evals: Vec<ItemEval>,
}

impl PartOut {
    fn allowed(&self) -> bool {
        self.evals.iter().all(|e| e.allowed)
    }
}

/// One key as `inspect` found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// The key without namespace and hash tag: `<scope prefix>#<limit>`,
    /// `<scope>#@grant`, `…#@starve#…`, or `res:<id>` for a reservation record.
    pub key: String,
    /// What it is, read off the stored fields: `rate`, `counter`, `concurrency`,
    /// `grant`, `starvation`, `reservation`.
    pub what: &'static str,
    /// Stored fields other than holds, as `(field, value)`.
    pub fields: Vec<(String, String)>,
    /// Live holds: `(reservation id, amount, expires at µs)`.
    pub holds: Vec<(String, i64, i64)>,
    /// Milliseconds until Redis drops the key (`None`: no expiry).
    pub ttl_ms: Option<i64>,
}

impl RedisBackend {
    /// Reads the live state under a scope prefix (every scope if `None`), without
    /// changing anything: limit states, holds (leases), delegation grants,
    /// starvation trackers and the reservation records of matching scopes.
    /// Uses `SCAN`, so it is safe on a busy server but not a snapshot.
    ///
    /// # Errors
    /// [`Error::Backend`] if the server cannot be read.
    pub async fn inspect(&self, scope: Option<&Scope>) -> Result<Vec<KeyState>> {
        let mut conn = self.conn.clone();
        let ns = &*self.namespace;
        let pattern = match scope {
            Some(s) => {
                let tag = s.prefix(1);
                format!("{ns}:{{{tag}}}:{}*", glob_escape(s.as_str()))
            }
            None => format!("{ns}:*"),
        };
        // A scope tree (and its reservations) lives on its tag's slot: only
        // that node is scanned.
        let on = scope.map(|s| format!("{{{}}}", s.prefix(1)));
        let mut keys: Vec<String> = self
            .scan(&[pattern, format!("{ns}:{{*}}:res:*")], on.as_deref())
            .await?;
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for full in keys {
            let flat: Vec<String> = redis::cmd("HGETALL")
                .arg(&full)
                .query_async(&mut conn)
                .await
                .map_err(backend_err)?;
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&full)
                .query_async(&mut conn)
                .await
                .map_err(backend_err)?;
            let local = full
                .strip_prefix(ns)
                .map_or(full.as_str(), |r| r.trim_start_matches(':'));
            let local = local.split_once("}:").map_or(local, |(_, k)| k).to_owned();
            let mut fields = Vec::new();
            let mut holds = Vec::new();
            for pair in flat.chunks_exact(2) {
                if let Some(id) = pair[0].strip_prefix("h:") {
                    let mut parts = pair[1].split('|');
                    let amount = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    let expires = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    holds.push((id.to_owned(), amount, expires));
                } else {
                    fields.push((pair[0].clone(), pair[1].clone()));
                }
            }
            let has = |f: &str| fields.iter().any(|(k, _)| k == f);
            let what = if local.starts_with("res:") && !local.contains('#') {
                let scope_ok = scope.is_none_or(|s| {
                    fields.iter().any(|(k, v)| {
                        k == "scope"
                            && (v == s.as_str() || v.starts_with(&format!("{}/", s.as_str())))
                    })
                });
                if !scope_ok {
                    continue;
                }
                "reservation"
            } else if local.contains("#@grant") {
                "grant"
            } else if local.contains("#@starve#") {
                "starvation"
            } else if has("d") {
                "rate"
            } else if has("w") {
                "counter"
            } else {
                "concurrency"
            };
            out.push(KeyState {
                key: local,
                what,
                fields,
                holds,
                ttl_ms: (ttl >= 0).then_some(ttl),
            });
        }
        Ok(out)
    }
}

impl RedisBackend {
    /// Every key matching any of `patterns`, with `SCAN` on the server, on the
    /// master owning `on`'s slot, or on every master of the cluster.
    async fn scan(&self, patterns: &[String], on: Option<&str>) -> Result<Vec<String>> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let nodes: Vec<Option<(String, u16)>> = match &self.conn {
            Conn::Single(_) => vec![None],
            Conn::Cluster(_) if on.is_some() => vec![None],
            Conn::Cluster(c) => {
                let mut c = c.clone();
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut c)
                    .await
                    .map_err(backend_err)?;
                text.lines()
                    .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("master")))
                    .filter_map(|l| {
                        let addr = l.split(' ').nth(1)?.split('@').next()?;
                        let (host, port) = addr.rsplit_once(':')?;
                        Some(Some((host.to_owned(), port.parse().ok()?)))
                    })
                    .collect()
            }
        };
        let mut keys = Vec::new();
        for node in nodes {
            for pattern in patterns {
                let mut cursor: u64 = 0;
                loop {
                    let mut cmd = redis::cmd("SCAN");
                    cmd.arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(500);
                    let value = match &self.conn {
                        Conn::Single(c) => {
                            let mut c = c.clone();
                            cmd.query_async::<Value>(&mut c).await
                        }
                        Conn::Cluster(c) => {
                            let target = match (&node, on) {
                                (Some((host, port)), _) => SingleNodeRoutingInfo::ByAddress {
                                    host: host.clone(),
                                    port: *port,
                                },
                                (None, key) => SingleNodeRoutingInfo::SpecificNode(
                                    Route::with_key(key.unwrap_or_default(), SlotAddr::Master),
                                ),
                            };
                            c.clone()
                                .route_command(cmd, RoutingInfo::SingleNode(target))
                                .await
                        }
                    }
                    .map_err(backend_err)?;
                    let (next, batch): (u64, Vec<String>) =
                        redis::from_redis_value(value).map_err(backend_err)?;
                    keys.extend(batch);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(keys)
    }
}

/// Escapes `SCAN MATCH` glob metacharacters. Encoded scopes never contain them
/// (ids are percent-encoded); this keeps that true even if the encoding changes.
fn glob_escape(s: &str) -> String {
    s.chars().fold(String::with_capacity(s.len()), |mut o, c| {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            o.push('\\');
        }
        o.push(c);
        o
    })
}

impl Backend for RedisBackend {
    fn decide<'a>(&'a self, plan: &'a Plan<'a>, mode: Mode<'a>) -> Pending<'a, Decision> {
        let mut call = Call::of(plan, mode);
        // A state-changing decision on one slot is remembered under an
        // operation id, so sending it again (after a lost reply) cannot
        // charge twice; one spanning slots is made of reservations, which
        // are released if any step fails.
        let op = if mode.mutates() && self.parts(call).len() == 1 {
            Some(match plan.operation() {
                Some(op) => (op, millis(OPERATION_MEMORY)),
                None => (
                    OperationId::random_in_process(),
                    millis(IMPLICIT_OPERATION_MEMORY),
                ),
            })
        } else {
            None
        };
        call.op = op;
        Pending::Future(Box::pin(async move {
            self.decide_call(call)
                .await
                .map_err(|e| e.into_error(op.map(|(id, _)| id)))
        }))
    }

    fn commit<'a>(
        &'a self,
        policy: &'a Policy,
        id: ReservationId,
        actual: &'a [(&'a str, i64)],
    ) -> Pending<'a, CommitReceipt> {
        Pending::Future(Box::pin(async move {
            self.commit_all(policy, id, actual)
                .await
                .map_err(|e| e.into_error(None))
        }))
    }

    fn release(&self, id: ReservationId) -> Pending<'_, bool> {
        Pending::Future(Box::pin(async move {
            self.release_all(id).await.map_err(|e| e.into_error(None))
        }))
    }

    fn extend(&self, id: ReservationId, lease: Micros) -> Pending<'_, Micros> {
        Pending::Future(Box::pin(async move {
            self.extend_all(id, lease)
                .await
                .map_err(|e| e.into_error(None))
        }))
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
