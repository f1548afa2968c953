//! The Redis / Valkey backend (standalone servers).
//!
//! Every operation is one `EVALSHA` of a Lua script (`core/lua/`) that
//! evaluates and charges every limit of the request atomically; `NOSCRIPT`
//! after a restart or `SCRIPT FLUSH` is answered by loading the script and
//! retrying, transparently. Time is the server's `TIME`, so client clocks never
//! matter; [`RedisBackend::with_clock`] replaces it for deterministic tests
//! only. Connections are multiplexed: concurrent callers pipeline over one
//! socket, which reconnects by itself.
//!
//! Keys: `<namespace>:{<tag>}:<scope prefix>#<limit>` where the hash tag is the
//! first scope segment (`{tenant:acme}`), or the whole key for a shared pool;
//! reservation records are `<namespace>:res:<id>`; delegation grants are
//! `<scope>#@grant` keys beside the limits they cover. Not yet here (next steps
//! of the Redis issue): Redis Cluster, degraded modes.

use std::sync::Arc;

use redis::aio::ConnectionManager;
use redis::{Script, Value};

use std::sync::atomic::{AtomicI64, Ordering};

use super::{Backend, MemoryBackend, Op, Pending, Reply};
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
/// How long an ended reservation is remembered (idempotent commit / release).
const TOMBSTONE_US: i64 = 10 * 60 * 1_000_000;
/// Default command timeout.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

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

/// A backend on one Redis or Valkey server. Cheap to clone.
#[derive(Clone)]
pub struct RedisBackend {
    conn: ConnectionManager,
    namespace: Arc<str>,
    decide: Arc<Script>,
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
    /// Connects to `url` (`redis://host:port[/db]`, `rediss://…`); every key is
    /// prefixed by `namespace` (e.g. `rw`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad URL or namespace, [`Error::Backend`] if
    /// the server cannot be reached.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
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
        let client = redis::Client::open(url).map_err(|e| {
            Error::invalid(
                "redis url",
                format!("`{}`: {e}", crate::error::truncate(url)),
            )
        })?;
        let conn = tokio::time::timeout(DEFAULT_TIMEOUT * 20, ConnectionManager::new(client))
            .await
            .map_err(|_| backend_err(format!("cannot connect to {url}: timed out")))?
            .map_err(|e| backend_err(format!("cannot connect to {url}: {e}")))?;
        Ok(Self {
            conn,
            namespace: namespace.into(),
            decide: Arc::new(Script::new(&format!("{COMMON}\n{DECIDE}"))),
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

    /// Runs one Redis call under the timeout; a timeout makes the next decisions
    /// skip Redis for a moment instead of each waiting out the timeout.
    async fn guarded<T>(&self, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        if SystemClock.now() < self.skip_until.load(Ordering::Relaxed) {
            return Err(backend_err("Redis timed out recently; not asked again yet"));
        }
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                self.skip_until.store(
                    SystemClock.now() + PROBE_AFTER_TIMEOUT_US,
                    Ordering::Relaxed,
                );
                Err(backend_err(format!(
                    "Redis did not answer within {:?}",
                    self.timeout
                )))
            }
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
                    if marker == Degraded::Allow {
                        "allow"
                    } else {
                        "local"
                    }
                );
                d.reason = Some(d.reason.map_or(why.clone(), |r| format!("{r}; {why}")));
                Ok(Reply::Decision(d))
            }
            Pending::Ready(other) => other,
            Pending::Future(_) => Err(backend_err("the local engine answered asynchronously")),
        }
    }

    async fn decide_or_degrade(&self, call: Call<'_>) -> Result<Reply> {
        match self.guarded(self.decide(call)).await {
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

    fn now_arg(&self) -> Micros {
        self.clock.as_ref().map_or(-1, |c| c.now())
    }

    /// The Redis key of a limit instance.
    fn key(&self, k: KeyRef<'_>) -> String {
        let tag = if k.prefix.starts_with('@') {
            format!("{}#{}", k.prefix, k.name)
        } else {
            k.prefix[..k.prefix.find('/').unwrap_or(k.prefix.len())].to_owned()
        };
        format!("{}:{{{tag}}}:{}#{}", self.namespace, k.prefix, k.name)
    }

    fn record_key(&self, id: ReservationId) -> String {
        format!("{}:res:{id}", self.namespace)
    }

    /// KEYS and ARGV of the decision script for `plan` (see `core/lua/decide.lua`).
    fn decide_args(&self, call: Call<'_>) -> (Vec<String>, Vec<String>) {
        let Call {
            plan,
            mode,
            id,
            lease,
            delegate,
        } = call;
        let mut keys: Vec<String> = Vec::with_capacity(plan.len() + 8);
        let mut args: Vec<String> = Vec::with_capacity(12 + 13 * plan.len());
        for item in plan.limits() {
            keys.push(self.key(item.key));
        }
        keys.push(plan.caller_key().map_or_else(
            || format!("{}:none", self.namespace),
            |k| {
                let tag = &k[..k.find(['/', '#']).unwrap_or(k.len())];
                format!("{}:{{{tag}}}:{k}", self.namespace)
            },
        ));
        keys.push(id.map_or_else(
            || format!("{}:none", self.namespace),
            |id| self.record_key(id),
        ));
        let scope = plan.scope();
        let grants = scope.depth();
        for d in 1..=grants {
            keys.push(self.key(KeyRef {
                prefix: scope.prefix(d),
                name: "@grant",
            }));
        }
        let (child, parent) = delegate.map_or((None, None), |(c, p)| (Some(c), p));
        keys.push(child.map_or_else(
            || format!("{}:none", self.namespace),
            |c| {
                self.key(KeyRef {
                    prefix: c.as_str(),
                    name: "@grant",
                })
            },
        ));
        keys.push(parent.map_or_else(
            || format!("{}:none", self.namespace),
            |p| self.record_key(p),
        ));
        args.extend([
            self.now_arg().to_string(),
            mode.to_owned(),
            plan.len().to_string(),
            plan.priority().rank().to_string(),
            plan.promote_after().to_string(),
            u8::from(plan.caller_key().is_some()).to_string(),
            id.map_or_else(String::new, |i| i.to_string()),
            lease.to_string(),
            TOMBSTONE_US.to_string(),
            child.map_or(scope.as_str(), Scope::as_str).to_owned(),
            grants.to_string(),
            parent.map_or_else(String::new, |p| p.to_string()),
        ]);
        for item in plan.limits() {
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

    /// The exact command one `acquire` of `plan` sends — `EVALSHA <sha> <numkeys>
    /// <keys…> <args…>` — so benchmarks can replay it with `redis-benchmark`.
    #[doc(hidden)]
    #[must_use]
    pub fn acquire_command(&self, plan: &Plan<'_>) -> Vec<String> {
        let (keys, args) = self.decide_args(Call::new(plan, "acquire"));
        let mut out = vec![
            "EVALSHA".to_owned(),
            self.decide.get_hash().to_owned(),
            keys.len().to_string(),
        ];
        out.extend(keys);
        out.extend(args);
        out
    }

    async fn decide(&self, call: Call<'_>) -> Result<Reply> {
        let Call {
            plan, id, delegate, ..
        } = call;
        let (keys, args) = self.decide_args(call);
        let mut inv = self.decide.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for a in &args {
            inv.arg(a);
        }
        let (child, parent) = delegate.map_or((None, None), |(c, p)| (Some(c), p));
        let mut conn = self.conn.clone();
        let out: Vec<i64> = inv.invoke_async(&mut conn).await.map_err(backend_err)?;
        if let (Some(&code), Some(c)) = (out.first(), child) {
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
        if out.len() != 2 + 4 * plan.len() {
            return Err(backend_err(format!(
                "decide script answered {} values",
                out.len()
            )));
        }
        let served = match out[0] {
            0 => Priority::Critical,
            1 => Priority::Standard,
            _ => Priority::Background,
        };
        let evals: Vec<ItemEval> = out[2..]
            .chunks_exact(4)
            .map(|c| ItemEval {
                allowed: c[0] == 1,
                remaining: c[1],
                reset: c[2],
                retry: (c[3] >= 0).then_some(c[3]),
            })
            .collect();
        let reservation = id.filter(|_| out[1] > 0).map(|id| ReservationInfo {
            id,
            expires_at: out[1],
        });
        Ok(Reply::Decision(assemble(plan, &evals, served, reservation)))
    }

    async fn settle(
        &self,
        id: ReservationId,
        mode: &str,
        lease: Micros,
        actual: &[(&str, i64)],
        policy: Option<&Policy>,
    ) -> Result<Reply> {
        let mut inv = self.settle.prepare_invoke();
        inv.key(self.record_key(id));
        inv.arg(self.now_arg())
            .arg(mode)
            .arg(lease)
            .arg(TOMBSTONE_US);
        for (unit, amount) in actual {
            inv.arg(*unit).arg(*amount);
        }
        let mut conn = self.conn.clone();
        let out: Vec<Value> = inv.invoke_async(&mut conn).await.map_err(backend_err)?;
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
        match status.as_str() {
            "nf" => Err(Error::ReservationNotFound { id: id.to_string() }),
            "expired" => Err(Error::ReservationExpired { id: id.to_string() }),
            "closed" => Err(Error::ReservationClosed {
                id: id.to_string(),
                state: if out.get(1).map(text).as_deref() == Some("committed") {
                    "committed"
                } else {
                    "released"
                },
            }),
            "released" => Ok(Reply::Released(out.get(1).map(int) == Some(1))),
            "delegation" => Err(Error::invalid(
                "commit",
                format!("{id} is a delegation; release it to close the sub-budget"),
            )),
            "extended" => Ok(Reply::Extended(out.get(1).map_or(0, int))),
            "ok" | "dup" => {
                let policy = policy.ok_or_else(|| backend_err("commit without a policy"))?;
                let mut charges = Vec::new();
                for c in out[2..].chunks_exact(4) {
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
                Ok(Reply::Committed(CommitReceipt {
                    id,
                    charges,
                    duplicate: status == "dup",
                }))
            }
            other => Err(backend_err(format!("settle script answered `{other}`"))),
        }
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
        let mut keys: Vec<String> = scan(&mut conn, &pattern).await?;
        keys.extend(scan(&mut conn, &format!("{ns}:res:*")).await?);
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
            let what = if local.starts_with("res:") {
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

async fn scan(conn: &mut ConnectionManager, pattern: &str) -> Result<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
            .map_err(backend_err)?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
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
