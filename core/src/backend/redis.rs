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

use super::{Backend, MemoryBackend, Op, Pending, Reply, poll_ready};
use crate::calendar::Window;
use crate::clock::SystemClock;
use crate::clock::{Clock, Micros};
use crate::decision::{Caps, Decision, Degraded, Outcome};
use crate::decision::{Charge, CommitReceipt, ReservationId, ReservationInfo};
use crate::error::ErrorKind;
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

/// One decision for the scripts: the plan, the mode (`check`, `acquire`,
/// `reserve`, `delegate`) and what reserving or delegating needs.
#[derive(Clone, Copy)]
struct Call<'a> {
    plan: &'a Plan<'a>,
    mode: &'a str,
    id: Option<ReservationId>,
    lease: Micros,
    delegate: Option<(&'a Scope, Option<ReservationId>)>,
}

impl<'a> Call<'a> {
    fn new(plan: &'a Plan<'a>, mode: &'a str) -> Self {
        Self {
            plan,
            mode,
            id: None,
            lease: 0,
            delegate: None,
        }
    }
}

/// What a decision does when Redis cannot be asked (refused, dropped, timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBackendError {
    /// Deny, marked [`Degraded::Deny`] (fail closed). The default.
    #[default]
    Deny,
    /// Allow without limits, marked [`Degraded::Allow`] (fail open).
    Allow,
    /// Decide on this process's embedded engine with `1/share` of every limit
    /// (e.g. `share: 4` when four nodes share the limits), marked
    /// [`Degraded::Local`]; Redis is asked again on the next decision.
    Local {
        /// Number of nodes the limits are split between (≥ 1).
        share: u32,
    },
}

/// A backend on one Redis or Valkey server, or on a Redis Cluster. Cheap to clone.
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
    on_error: OnBackendError,
    timeout: std::time::Duration,
    /// Reservations made while degraded live here, and are settled here.
    local: Arc<MemoryBackend>,
    /// After a timeout, Redis is not waited on again before this time (µs).
    skip_until: Arc<AtomicI64>,
}

/// After a command times out, how long decisions skip Redis before trying again.
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
            on_error: OnBackendError::default(),
            timeout: DEFAULT_TIMEOUT,
            local: Arc::new(MemoryBackend::new(Arc::new(SystemClock))),
            skip_until: Arc::new(AtomicI64::new(0)),
        })
    }

    /// What decisions do when Redis cannot be asked (default: deny).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `Local { share: 0 }`.
    pub fn on_backend_error(mut self, mode: OnBackendError) -> Result<Self> {
        if mode == (OnBackendError::Local { share: 0 }) {
            return Err(Error::invalid(
                "on_backend_error",
                "local share must be at least 1",
            ));
        }
        self.on_error = mode;
        Ok(self)
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

    /// Whether a recent timeout says not to wait on Redis right now.
    fn skipping(&self) -> Option<Error> {
        (self.local_now() < self.skip_until.load(Ordering::Relaxed))
            .then(|| backend_err("Redis timed out recently; not asked again yet"))
    }

    /// Runs one Redis round trip under the command timeout; a timeout makes the
    /// next decisions skip Redis for a moment instead of each waiting it out.
    async fn bounded<T>(&self, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                self.skip_until
                    .store(self.local_now() + PROBE_AFTER_TIMEOUT_US, Ordering::Relaxed);
                Err(backend_err(format!(
                    "Redis did not answer within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// A settle operation, unless Redis is being skipped after a timeout.
    async fn guarded<T>(&self, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match self.skipping() {
            Some(e) => Err(e),
            None => call.await,
        }
    }

    /// A decision made without Redis, following `on_backend_error`.
    fn degraded(&self, call: Call<'_>, err: &Error) -> Result<Reply> {
        let Call {
            plan,
            mode,
            id,
            lease,
            delegate,
        } = call;
        let (local_plan, marker, share) = match self.on_error {
            OnBackendError::Deny => {
                return Ok(Reply::Decision(Decision {
                    outcome: Outcome::Deny,
                    caps: Caps::default(),
                    retry_after: Some(std::time::Duration::from_secs(1)),
                    limits: Vec::new(),
                    reason: Some(format!(
                        "the shared backend is unavailable ({err}); on_backend_error = deny"
                    )),
                    reservation: None,
                    priority: plan.priority(),
                    degraded: Some(Degraded::Deny),
                }));
            }
            OnBackendError::Allow => (plan.unlimited(), Degraded::Allow, 1),
            OnBackendError::Local { share } => (
                plan.scaled(i64::from(share)),
                Degraded::Local,
                i64::from(share),
            ),
        };
        let op = match (mode, id, delegate) {
            ("reserve", Some(id), _) => Op::Reserve {
                plan: &local_plan,
                id,
                lease,
            },
            ("delegate", Some(id), Some((child, from))) => Op::Delegate {
                plan: &local_plan,
                from,
                child,
                id,
                lease,
            },
            ("check", ..) => Op::Check(&local_plan),
            _ => Op::Acquire(&local_plan),
        };
        match self.local.execute(op) {
            Pending::Ready(Ok(Reply::Decision(mut d))) => {
                for l in &mut d.limits {
                    l.remaining /= share;
                    l.amount /= share;
                }
                d.degraded = Some(marker);
                let why = format!(
                    "decided without the shared backend ({err}); on_backend_error = {}",
                    marker.as_str()
                );
                d.reason = Some(d.reason.map_or(why.clone(), |r| format!("{r}; {why}")));
                Ok(Reply::Decision(d))
            }
            Pending::Ready(other) => other,
            Pending::Future(_) => Err(backend_err("the local engine answered asynchronously")),
        }
    }

    async fn decide_or_degrade(&self, call: Call<'_>) -> Result<Reply> {
        let answer = match self.skipping() {
            Some(e) => Err(e),
            None => self.decide(call).await,
        };
        match answer {
            Err(e) if e.kind() == ErrorKind::Backend => self.degraded(call, &e),
            other => other,
        }
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
        let mut args: Vec<String> = Vec::with_capacity(14 + 13 * n);
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
        let (child, parent) = match delegate.filter(|_| step.mode == "delegate") {
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
        args.extend([
            self.now_arg().to_string(),
            step.mode.to_owned(),
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
            && matches!(step.mode, "check" | "acquire")
            && (plan.caller_key().is_none() || !part.primary)
            && rates_only(plan, part);
        if !lean {
            let (keys, args) = self.decide_args(call, part, step);
            return (&self.decide, keys, args);
        }
        let rank = usize::from(step.rank.min(2));
        let mut keys = Vec::with_capacity(part.items.len());
        let mut args = Vec::with_capacity(3 + 5 * part.items.len());
        args.extend([
            self.now_arg().to_string(),
            step.mode.to_owned(),
            step.rank.to_string(),
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
        (&self.rate, keys, args)
    }

    /// The exact command one `acquire` of `plan` sends — `EVALSHA <sha> <numkeys>
    /// <keys…> <args…>` — so benchmarks can replay it with `redis-benchmark`.
    /// For a plan on one slot (every plan on a standalone server).
    #[doc(hidden)]
    #[must_use]
    pub fn acquire_command(&self, plan: &Plan<'_>) -> Vec<String> {
        let call = Call::new(plan, "acquire");
        let part = &self.parts(call)[0];
        let (script, keys, args) = self.script_for(call, part, &Step::new("acquire", plan));
        let mut out = vec![
            "EVALSHA".to_owned(),
            script.get_hash().to_owned(),
            keys.len().to_string(),
        ];
        out.extend(keys);
        out.extend(args);
        out
    }

    /// Runs the decision script for one part.
    async fn run_part(&self, call: Call<'_>, part: &Part, step: &Step<'_>) -> Result<PartOut> {
        let (script, keys, args) = self.script_for(call, part, step);
        let mut inv = script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for a in &args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        let out: Vec<i64> = self
            .bounded(async { inv.invoke_async(&mut conn).await.map_err(backend_err) })
            .await?;
        if let (Some(&code), Some((c, parent))) = (out.first(), call.delegate) {
            let pid = || parent.map(|p| p.to_string()).unwrap_or_default();
            match code {
                -1 => {
                    return Err(Error::invalid(
                        "delegation",
                        format!("scope `{c}` already has an open delegation; release it first"),
                    ));
                }
                -2 => return Err(Error::ReservationNotFound { id: pid() }),
                -3 => return Err(Error::ReservationExpired { id: pid() }),
                -4 => {
                    return Err(Error::ReservationClosed {
                        id: pid(),
                        state: "committed",
                    });
                }
                -5 => {
                    return Err(Error::ReservationClosed {
                        id: pid(),
                        state: "released",
                    });
                }
                -6 => {
                    return Err(Error::invalid(
                        "delegation",
                        format!("child scope `{c}` is not under the reservation's scope"),
                    ));
                }
                _ => {}
            }
        }
        if out.len() != 3 + 4 * part.items.len() {
            return Err(backend_err(format!(
                "decide script answered {} values",
                out.len()
            )));
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

    /// Decides a call: one script run when its limits share a slot, the
    /// reserve-then-commit steps described in the module docs otherwise.
    async fn decide(&self, call: Call<'_>) -> Result<Reply> {
        let plan = call.plan;
        let parts = self.parts(call);
        let primary = &parts[0];
        let id = call.id.map(|id| id_in_slot(id, primary.slot));
        if let (Some((_, Some(parent))), true) = (call.delegate, self.cluster) {
            if id_slot(parent) != primary.slot {
                return Err(Error::invalid(
                    "delegation",
                    format!(
                        "in a Redis Cluster a delegation carves from a reservation on its scope tree's limits; {parent} holds only shared pools"
                    ),
                ));
            }
        }
        let step = Step {
            id,
            lease: call.lease,
            ..Step::new(call.mode, plan)
        };
        if parts.len() == 1 {
            let out = self.run_part(call, primary, &step).await?;
            return Ok(self.finish(call, &parts, &[out], id));
        }
        let foreign = &parts[1..];
        let check = Step::new("check", plan);
        match call.mode {
            "check" => {
                let outs = self.run_parts(call, &parts, &check).await?;
                Ok(self.finish(call, &parts, &outs, None))
            }
            "delegate" => {
                let mut outs = self.run_parts(call, foreign, &check).await?;
                let all = outs.iter().all(PartOut::allowed);
                let home = self
                    .run_part(call, primary, if all { &step } else { &check })
                    .await?;
                outs.insert(0, home);
                Ok(self.finish(call, &parts, &outs, id.filter(|_| all)))
            }
            _ => self.hold_then_commit(call, &parts, id).await,
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
    ) -> Result<Reply> {
        let plan = call.plan;
        let (primary, foreign) = (&parts[0], &parts[1..]);
        let acquire = call.mode == "acquire";
        let lease = if acquire { STEP_LEASE_US } else { call.lease };
        let home_id = id.unwrap_or_else(|| id_in_slot(ReservationId::random(), primary.slot));
        let sub: Vec<ReservationId> = foreign
            .iter()
            .map(|p| id_in_slot(ReservationId::random(), p.slot))
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
            ..Step::new("reserve", plan)
        };
        let home = self.run_part(call, primary, &first).await?;
        if !home.allowed() {
            undo.backend = None;
            let served = Step {
                rank: home.rank,
                ..Step::new("check", plan)
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
                ..Step::new("reserve", plan)
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
                    .bounded(async { del.query_async(&mut conn).await.map_err(backend_err) })
                    .await?;
            }
            return Ok(self.finish(call, parts, &outs, id));
        }
        let (mode, starve) = if all {
            ("commit", "clear")
        } else {
            ("release", "deny")
        };
        let home_tracker = tracker.as_deref().map(|t| (t, starve));
        let ended = join_all(all_ids().map(|rid| {
            let tracker = home_tracker.filter(|_| rid == home_id);
            self.settle_one(rid, mode, 0, &[], None, tracker, plan.promote_after())
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
                let _ = self.settle_one(rid, "release", 0, &[], None, None, 0).await;
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
    ) -> Result<Vec<PartOut>> {
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
    ) -> Reply {
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
        Reply::Decision(assemble(plan, &evals, served, info))
    }

    /// Commit, release or extend a reservation, then the reservations it links
    /// to on other cluster slots (made by the same request), merging their answers.
    async fn settle(
        &self,
        id: ReservationId,
        mode: &str,
        lease: Micros,
        actual: &[(&str, i64)],
        policy: Option<&Policy>,
    ) -> Result<Reply> {
        let (reply, links) = self
            .settle_one(id, mode, lease, actual, policy, None, 0)
            .await?;
        if links.is_empty() {
            return Ok(reply);
        }
        let linked = join_all(
            links
                .iter()
                .map(|&l| self.settle_one(l, mode, lease, actual, policy, None, 0)),
        )
        .await;
        let mut reply = reply;
        for r in linked {
            match (r, &mut reply) {
                (Ok((Reply::Committed(more), _)), Reply::Committed(receipt)) => {
                    receipt.charges.extend(more.charges);
                }
                // A linked record gone (its lease ran out, or it was never
                // written because its step failed) holds nothing any more.
                (
                    Ok(_)
                    | Err(Error::ReservationNotFound { .. } | Error::ReservationExpired { .. }),
                    _,
                ) => {}
                (Err(e), _) => return Err(e),
            }
        }
        Ok(reply)
    }

    /// One run of the settle script on one record; also returns its links.
    #[allow(clippy::too_many_arguments)]
    async fn settle_one(
        &self,
        id: ReservationId,
        mode: &str,
        lease: Micros,
        actual: &[(&str, i64)],
        policy: Option<&Policy>,
        starve: Option<(&str, &str)>,
        promote_after: Micros,
    ) -> Result<(Reply, Vec<ReservationId>)> {
        let rec = self.record_key(id);
        let mut inv = self.settle.prepare_invoke();
        inv.key(&rec);
        inv.key(starve.map_or(rec.as_str(), |(k, _)| k));
        inv.arg(self.now_arg())
            .arg(mode)
            .arg(lease)
            .arg(TOMBSTONE_US)
            .arg(starve.map_or("", |(_, op)| op))
            .arg(promote_after);
        for (unit, amount) in actual {
            inv.arg(*unit).arg(*amount);
        }
        let mut conn = self.conn.clone();
        let out: Vec<Value> = self
            .bounded(async { inv.invoke_async(&mut conn).await.map_err(backend_err) })
            .await?;
        let text = |v: &Value| -> String {
            match v {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => format!("{other:?}"),
            }
        };
        let int = |v: &Value| -> i64 {
            match v {
                Value::Int(i) => *i,
                other => text(other).parse().unwrap_or(0),
            }
        };
        let status = out.first().map(text).unwrap_or_default();
        let links: Vec<ReservationId> = out
            .get(1)
            .map(text)
            .unwrap_or_default()
            .split(',')
            .filter_map(|l| ReservationId::parse(l).ok())
            .collect();
        let reply = match status.as_str() {
            "nf" => Err(Error::ReservationNotFound { id: id.to_string() }),
            "expired" => Err(Error::ReservationExpired { id: id.to_string() }),
            "closed" => Err(Error::ReservationClosed {
                id: id.to_string(),
                state: if out.get(2).map(text).as_deref() == Some("committed") {
                    "committed"
                } else {
                    "released"
                },
            }),
            "released" => Ok(Reply::Released(out.get(2).map(int) == Some(1))),
            "delegation" => Err(Error::invalid(
                "commit",
                format!("{id} is a delegation; release it to close the sub-budget"),
            )),
            "extended" => Ok(Reply::Extended(out.get(2).map_or(0, int))),
            "ok" | "dup" => {
                let mut charges = Vec::new();
                if let Some(policy) = policy {
                    for c in out.get(3..).unwrap_or_default().chunks_exact(4) {
                        let key = text(&c[0]);
                        let local = key.split_once("}:").map_or(key.as_str(), |(_, k)| k);
                        let name = KeyRef::split(local).name;
                        let def = policy.limit(name).ok_or_else(|| {
                            backend_err(format!(
                                "limit `{name}` of reservation {id} is not in the policy"
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
                }
                Ok(Reply::Committed(CommitReceipt {
                    id,
                    charges,
                    duplicate: status == "dup",
                }))
            }
            other => Err(backend_err(format!("settle script answered `{other}`"))),
        };
        reply.map(|r| (r, links))
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
                    .settle_one(id, "release", 0, &[], None, None, 0)
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
    mode: &'s str,
    id: Option<ReservationId>,
    lease: Micros,
    /// Priority rank to decide at (the served rank, on later steps).
    rank: u8,
    /// First step of a multi-slot decision: leave the starvation tracker.
    first_of_many: bool,
    /// Reservations on other slots to record as links.
    links: &'s str,
}

impl<'s> Step<'s> {
    fn new(mode: &'s str, plan: &Plan<'_>) -> Self {
        Self {
            mode,
            id: None,
            lease: 0,
            rank: plan.priority().rank(),
            first_of_many: false,
            links: "",
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
    fn execute<'a>(&'a self, op: Op<'a>) -> Pending<'a> {
        Pending::Future(Box::pin(async move {
            match op {
                Op::Check(plan) => self.decide_or_degrade(Call::new(plan, "check")).await,
                Op::Acquire(plan) => self.decide_or_degrade(Call::new(plan, "acquire")).await,
                Op::Reserve { plan, id, lease } => {
                    self.decide_or_degrade(Call {
                        id: Some(id),
                        lease,
                        ..Call::new(plan, "reserve")
                    })
                    .await
                }
                Op::Delegate {
                    plan,
                    from,
                    child,
                    id,
                    lease,
                } => {
                    self.decide_or_degrade(Call {
                        id: Some(id),
                        lease,
                        delegate: Some((child, from)),
                        ..Call::new(plan, "delegate")
                    })
                    .await
                }
                // Reservations made while degraded are settled where they were made.
                Op::Commit { id, .. } | Op::Release { id } | Op::Extend { id, .. }
                    if self.local.knows(id) =>
                {
                    self.local.execute(op).resolve().await
                }
                Op::Commit { policy, id, actual } => {
                    self.guarded(self.settle(id, "commit", 0, actual, Some(policy)))
                        .await
                }
                Op::Release { id } => self.guarded(self.settle(id, "release", 0, &[], None)).await,
                Op::Extend { id, lease } => {
                    self.guarded(self.settle(id, "extend", lease, &[], None))
                        .await
                }
            }
        }))
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
