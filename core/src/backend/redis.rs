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

mod args;
mod changes;
mod cluster;
mod conn;
mod health;
mod inspect;
mod keys;
mod settle;
mod slots;
mod upstream;

use args::{Step, StepMode};
use cluster::Part;
pub use inspect::KeyState;
use settle::SettleMode;

use conn::{Conn, Target};
use slots::{id_in_slot, id_slot, slot_tag, tag_slot};

use super::{Backend, Mode, Pending, poll_ready};
use crate::calendar::Window;
use crate::clock::{Clock, Micros, SystemClock};
use crate::decision::{
    Charge, CommitReceipt, Decision, OperationId, ReservationId, ReservationInfo,
};
use crate::error::{Error, Result};
use crate::eval::{ItemEval, assemble};
use crate::plan::{KeyRef, Plan, Waiter};
use crate::policy::{LimitKind, Overage, Policy};
use crate::priority::Priority;
use crate::scope::Scope;
use crate::upstream::Coordination;
use crate::upstream::light::{Ask, Gate, Observed, Sample, Ticket};

const COMMON: &str = include_str!("../../lua/common.lua");
const DECIDE: &str = include_str!("../../lua/decide.lua");
const SETTLE: &str = include_str!("../../lua/settle.lua");
const RATE: &str = include_str!("../../lua/rate.lua");
const UPSTREAM: &str = include_str!("../../lua/upstream.lua");
const LINE: &str = include_str!("../../lua/line.lua");
const ALLOT: &str = include_str!("../../lua/allot.lua");
const CREDIT: &str = include_str!("../../lua/credit.lua");
/// How long an ended reservation is remembered (idempotent commit / release).
const TOMBSTONE_US: i64 = 10 * 60 * 1_000_000;
/// Default command timeout.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);
/// Lease of the holds an `acquire` spanning several cluster slots takes between
/// its steps: what a process dying mid-request holds back, at most this long.
const STEP_LEASE_US: i64 = 30 * 1_000_000;

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
    /// `upstream.lua`: coordinated resources' upstream state.
    upstream: Arc<Script>,
    /// `line.lua`: coordinated resources' ordered locks.
    line: Arc<Script>,
    /// `allot.lua`: soft allocations of pool limits.
    allot: Arc<Script>,
    /// `credit.lua`: top-ups of quota and budget counters.
    credit: Arc<Script>,
    /// The subscription to published breaker transitions.
    changes: Arc<changes::Changes>,
    clock: Option<Arc<dyn Clock>>,
    timeout: std::time::Duration,
    /// After a timeout, the node that timed out is skipped for a moment.
    health: Arc<health::Health>,
    /// Whether decisions without a caller's operation id are remembered under
    /// one of the backend's own (see [`RedisBackend::remember_operations`]).
    remember: bool,
}

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
        let target = conn::target(url)?;
        let pubsub_url = match &target {
            Target::Single(u) => Some(u.clone()),
            Target::Cluster(nodes) => nodes.first().cloned(),
        };
        let (conn, cluster) = match target {
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
        let health = Arc::new(health::Health::new(cluster));
        if cluster && !lazy {
            Arc::clone(&health)
                .refresh(conn.clone(), connect_timeout)
                .await;
        }
        Ok(Self {
            conn,
            cluster,
            namespace: namespace.into(),
            decide: Arc::new(Script::new(&format!("{COMMON}\n{DECIDE}"))),
            rate: Arc::new(Script::new(&format!("{COMMON}\n{RATE}"))),
            use_rate_script: true,
            settle: Arc::new(Script::new(&format!("{COMMON}\n{SETTLE}"))),
            upstream: Arc::new(Script::new(&format!("{COMMON}\n{UPSTREAM}"))),
            line: Arc::new(Script::new(&format!("{COMMON}\n{LINE}"))),
            allot: Arc::new(Script::new(&format!("{COMMON}\n{ALLOT}"))),
            credit: Arc::new(Script::new(&format!("{COMMON}\n{CREDIT}"))),
            changes: Arc::new(changes::Changes::new(
                pubsub_url,
                format!("{namespace}:events"),
            )),
            clock: None,
            timeout: DEFAULT_TIMEOUT,
            health,
            remember: true,
        })
    }

    /// Whether every admitted decision is remembered under an operation id of
    /// the backend's own for [`IMPLICIT_OPERATION_MEMORY`] (default: yes).
    /// That is what lets a decision whose connection dropped be sent again
    /// safely, and a lost answer name the id to ask again with
    /// ([`crate::Decision::unconfirmed`]); it costs one more key written per
    /// decision (about 0.6× the one-limit throughput at 64 callers, see
    /// `bench/README.md`). Turned off, a dropped connection is not retried and
    /// a lost answer is degraded without an id — decisions under an id the
    /// caller gave ([`crate::Request::operation`]) are remembered either way.
    #[must_use]
    pub fn remember_operations(mut self, on: bool) -> Self {
        self.remember = on;
        self
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

    /// Whether a recent timeout of `slot`'s node says not to wait on it now.
    fn skipping(&self, slot: u16) -> Option<Error> {
        self.health.skipping(slot, self.local_now()).then(|| {
            backend_err(if self.cluster {
                "the Redis node of this key's slot timed out recently; not asked again yet"
            } else {
                "Redis timed out recently; not asked again yet"
            })
        })
    }

    /// Runs one Redis round trip on `slot` under the command timeout. A
    /// timeout makes the next decisions on that slot's node skip Redis for a
    /// moment instead of each waiting it out; other nodes are not affected.
    async fn bounded<T>(
        &self,
        slot: u16,
        call: impl std::future::Future<Output = Result<T, Sent>>,
    ) -> Result<T, Sent> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                if self.health.timed_out(slot, self.local_now()) && self.cluster {
                    // Follow failovers: read the slot map again, off this call.
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        let (h, conn) = (Arc::clone(&self.health), self.conn.clone());
                        rt.spawn(h.refresh(conn, self.timeout));
                    }
                }
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
        if out.len() != 3 + 5 * part.items.len() {
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
                .chunks_exact(5)
                .map(|c| ItemEval {
                    allowed: c[0] == 1,
                    remaining: c[1],
                    reset: c[2],
                    retry: (c[3] >= 0).then_some(c[3]),
                    held: c[4],
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
    async fn decide_call(&self, call: Call<'_>, parts: &[Part]) -> Result<Decision, Sent> {
        let plan = call.plan;
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
            return Ok(self.finish(call, parts, &[out], id));
        }
        let foreign = &parts[1..];
        let check = Step::new(StepMode::Check, plan);
        match call.mode {
            StepMode::Check => {
                let outs = self.run_parts(call, parts, &check).await?;
                Ok(self.finish(call, parts, &outs, None))
            }
            StepMode::Delegate => {
                let mut outs = self.run_parts(call, foreign, &check).await?;
                let all = outs.iter().all(PartOut::allowed);
                let home = self
                    .run_part(call, primary, if all { &step } else { &check })
                    .await?;
                outs.insert(0, home);
                Ok(self.finish(call, parts, &outs, id.filter(|_| all)))
            }
            StepMode::Acquire | StepMode::Reserve => self.hold_then_commit(call, parts, id).await,
        }
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
                held: 0,
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
}

/// A reservation record's state, lease end and scope (`HMGET st exp scope`).
type RecordHead = (Option<String>, Option<i64>, Option<String>);

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
/// Computes now the process-wide tables the Redis backend otherwise makes on
/// its first call (the hash tag of every cluster slot). A binding calls it
/// when it loads, before any `fork()`: a child forked while another thread
/// was making them would wait forever for that thread, which the child does
/// not have.
pub fn prepare_for_fork() {
    let _ = slot_tag(0);
}

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

impl Backend for RedisBackend {
    fn decide<'a>(&'a self, plan: &'a Plan<'a>, mode: Mode<'a>) -> Pending<'a, Decision> {
        let mut call = Call::of(plan, mode);
        let parts = self.parts(call);
        // A state-changing decision on one slot is remembered under an
        // operation id, so sending it again (after a lost reply) cannot
        // charge twice; one spanning slots is made of reservations, which
        // are released if any step fails.
        let op = if mode.mutates() && parts.len() == 1 {
            match plan.operation() {
                Some(op) => Some((op, millis(OPERATION_MEMORY))),
                None if self.remember => Some((
                    OperationId::random_in_process(),
                    millis(IMPLICIT_OPERATION_MEMORY),
                )),
                None => None,
            }
        } else {
            None
        };
        call.op = op;
        Pending::Future(Box::pin(async move {
            self.decide_call(call, &parts)
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

    fn observe<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        sample: &'a Sample,
    ) -> Pending<'a, Observed> {
        upstream::observe(self, resource, coordination, sample)
    }

    fn gate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ask: Ask,
    ) -> Pending<'a, Gate> {
        upstream::gate(self, resource, coordination, ask)
    }

    fn changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.changes.watch()
    }

    fn append_events<'a>(
        &'a self,
        key: &'a str,
        max_len: u64,
        entries: &'a [crate::sink::Entry],
    ) -> Pending<'a, ()> {
        Pending::Future(Box::pin(async move {
            let key = format!("{}:{key}", self.namespace);
            let mut pipe = redis::pipe();
            for e in entries {
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(max_len)
                    .arg("*")
                    .arg("id")
                    .arg(&e.id)
                    .arg("type")
                    .arg(e.kind)
                    .arg("body")
                    .arg(&e.body)
                    .ignore();
            }
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| backend_err(&e))
        }))
    }

    fn ping(&self) -> Pending<'_, ()> {
        Pending::Future(Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| backend_err(&e))
        }))
    }

    fn publish_events<'a>(
        &'a self,
        channel: &'a str,
        entries: &'a [crate::sink::Entry],
    ) -> Pending<'a, ()> {
        Pending::Future(Box::pin(async move {
            let channel = format!("{}:{channel}", self.namespace);
            let mut conn = self.conn.clone();
            for e in entries {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(&e.body)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| backend_err(&e))?;
            }
            Ok(())
        }))
    }

    fn allot<'a>(
        &'a self,
        limit: &'a crate::plan::PlannedLimit<'a>,
        op: super::AllotOp<'a>,
    ) -> Pending<'a, i64> {
        Pending::Future(Box::pin(async move {
            let key = self.key(limit.key);
            let slot = tag_slot(&Self::tag(&limit.key));
            if let Some(e) = self.skipping(slot) {
                return Err(e);
            }
            let mut args = vec![self.now_arg().to_string()];
            let (owner, asked) = match op {
                super::AllotOp::Set {
                    owner,
                    amount,
                    lease,
                } => {
                    args.extend([
                        "set".to_owned(),
                        owner.to_owned(),
                        amount.to_string(),
                        lease.to_string(),
                        limit.def.limit.to_string(),
                    ]);
                    (owner, amount)
                }
                super::AllotOp::Beat { owner } => {
                    args.extend(["beat".to_owned(), owner.to_owned()]);
                    (owner, 0)
                }
                super::AllotOp::Drop { owner } => {
                    args.extend(["drop".to_owned(), owner.to_owned()]);
                    (owner, 0)
                }
            };
            let _ = owner;
            let keys = [key];
            // Setting, renewing and dropping are idempotent: safe to send again.
            let attempt = || self.invoke::<Vec<i64>>(&self.allot, &keys, &args);
            let out = self
                .resent(slot, attempt)
                .await
                .map_err(|e| e.into_error(None))?;
            match (op, out.as_slice()) {
                (super::AllotOp::Set { .. }, [0, left]) => Err(crate::pool::over_allocated(
                    &limit.def.name,
                    asked,
                    *left,
                    limit.def.limit,
                )),
                (super::AllotOp::Drop { .. }, [n]) => Ok(*n),
                (_, [1, until]) => Ok(*until),
                (_, [0]) => Ok(0),
                _ => Err(Error::Internal {
                    message: format!("allot script answered {out:?}"),
                }),
            }
        }))
    }

    fn credit<'a>(
        &'a self,
        limit: &'a crate::plan::PlannedLimit<'a>,
        amount: i64,
    ) -> Pending<'a, (i64, i64)> {
        Pending::Future(Box::pin(async move {
            let key = self.key(limit.key);
            let slot = tag_slot(&Self::tag(&limit.key));
            if let Some(e) = self.skipping(slot) {
                return Err(e);
            }
            let (wk, wlen, woff) = args::window_args(&limit.def.kind);
            let args = vec![
                self.now_arg().to_string(),
                amount.to_string(),
                wk.to_owned(),
                wlen.to_string(),
                woff.to_string(),
            ];
            let keys = [key];
            // Not idempotent: sent once (a lost answer is an error, not a retry).
            let out = self
                .bounded(slot, self.invoke::<Vec<i64>>(&self.credit, &keys, &args))
                .await
                .map_err(|e| e.into_error(None))?;
            match out.as_slice() {
                [credited, spent] => Ok((*credited, *spent)),
                _ => Err(Error::Internal {
                    message: format!("credit script answered {out:?}"),
                }),
            }
        }))
    }

    fn line<'a>(&'a self, resource: &'a str, holder: u128, op: super::LineOp) -> Pending<'a, i64> {
        upstream::line(self, resource, holder, op)
    }

    fn ungate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ticket: Ticket,
    ) -> Pending<'a, bool> {
        upstream::ungate(self, resource, coordination, ticket)
    }
}
