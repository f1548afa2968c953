//! The audit log: every decision (check, acquire, reserve, delegate — an
//! allow or a deny), commit, release, extend and expiry as one [`Record`],
//! to a callback ([`crate::Warden::on_audit`]), a JSON-lines file or a Redis
//! Stream (`audit:` in the policy).
//!
//! Off by default, and then it costs one relaxed load per operation. When
//! on, the record is built on the caller's thread and handed over without
//! waiting (a bounded channel: a consumer more than [`CAPACITY`] records
//! behind loses the oldest, counted); files and streams are written on a
//! thread of their own, in batches.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::backend::Backend;
use crate::clock::Micros;

/// Records kept per consumer before the oldest are dropped.
pub const CAPACITY: usize = 16_384;
/// How long the sinks' writer pauses between batches while records flow.
const PAUSE: std::time::Duration = crate::events::PAUSE;

/// The stream's key under the namespace when `audit.stream` names none.
pub const DEFAULT_STREAM: &str = "audit";

/// One audited operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When (µs since the epoch, the warden's clock).
    pub at: Micros,
    /// `check`, `acquire`, `reserve`, `delegate`, `commit`, `release`,
    /// `extend`, `expire` or `top_up`.
    pub action: &'static str,
    /// The reservation's id (reserve, delegate, commit, release, extend,
    /// expire), else the caller's operation id, else a fresh id — 128 bits,
    /// written as 32 hex digits.
    pub request_id: u128,
    /// The request's scope (decisions).
    pub scope: Option<String>,
    /// The resource (decisions).
    pub resource: Option<String>,
    /// The policy action (`send_email`), for a decision that named one.
    pub policy_action: Option<String>,
    /// Amounts per unit: what a decision asked for, or what a commit charged.
    pub amounts: smallvec::SmallVec<[UnitAmount; 2]>,
    /// `allow`, `allow_with_caps`, `deny` (decisions), `ok` (a commit,
    /// release or extend that went through), `error` (one that did not),
    /// `expired`.
    pub outcome: &'static str,
    /// Why (a denial's reason, an error).
    pub reason: Option<String>,
    /// The decision's priority tier.
    pub priority: Option<&'static str>,
    /// The backend's name (`memory`, `redis`).
    pub backend: &'static str,
    /// The fallback that decided without the shared backend, if one did.
    pub degraded: Option<&'static str>,
}

/// An amount of a unit, in base units; the unit and its decimals are read
/// off the limit that counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitAmount {
    /// A limit counting the unit.
    pub def: Arc<crate::policy::LimitDef>,
    /// Base units.
    pub amount: i64,
}

/// One amount per unit, the first of each unit (the limits of a unit all
/// count the same amount of it).
pub(crate) fn per_unit<'a>(
    items: impl IntoIterator<Item = (&'a Arc<crate::policy::LimitDef>, i64)>,
) -> smallvec::SmallVec<[UnitAmount; 2]> {
    let mut out: smallvec::SmallVec<[UnitAmount; 2]> = smallvec::SmallVec::new();
    for (def, amount) in items {
        if !out.iter().any(|a| a.def.unit == def.unit) {
            out.push(UnitAmount {
                def: Arc::clone(def),
                amount,
            });
        }
    }
    out
}

impl UnitAmount {
    /// The unit.
    #[must_use]
    pub fn unit(&self) -> &str {
        &self.def.unit
    }

    /// As decimal text (`1.5`).
    #[must_use]
    pub fn text(&self) -> String {
        crate::amount::format_base(self.amount, self.def.decimals)
    }
}

/// A record as its JSON object borrows it (serialized without building a
/// `serde_json::Value`).
#[derive(serde::Serialize)]
struct Line<'a> {
    at: Micros,
    timestamp: String,
    request_id: String,
    action: &'static str,
    scope: Option<&'a str>,
    resource: Option<&'a str>,
    policy_action: Option<&'a str>,
    amounts: Amounts<'a>,
    amounts_base: AmountsBase<'a>,
    outcome: &'static str,
    reason: Option<&'a str>,
    priority: Option<&'static str>,
    backend: &'static str,
    degraded: Option<&'static str>,
}

struct Amounts<'a>(&'a [UnitAmount]);
struct AmountsBase<'a>(&'a [UnitAmount]);

impl serde::Serialize for Amounts<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for a in self.0 {
            m.serialize_entry(a.unit(), &a.text())?;
        }
        m.end()
    }
}

impl serde::Serialize for AmountsBase<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for a in self.0 {
            m.serialize_entry(a.unit(), &a.amount)?;
        }
        m.end()
    }
}

impl Record {
    /// Its request id as 32 hex digits.
    #[must_use]
    pub fn request_id_hex(&self) -> String {
        format!("{:032x}", self.request_id)
    }

    fn line(&self) -> Line<'_> {
        Line {
            at: self.at,
            timestamp: crate::events::rfc3339(self.at),
            request_id: self.request_id_hex(),
            action: self.action,
            scope: self.scope.as_deref(),
            resource: self.resource.as_deref(),
            policy_action: self.policy_action.as_deref(),
            amounts: Amounts(&self.amounts),
            amounts_base: AmountsBase(&self.amounts),
            outcome: self.outcome,
            reason: self.reason.as_deref(),
            priority: self.priority,
            backend: self.backend,
            degraded: self.degraded,
        }
    }

    /// Appends its JSON object (as [`Record::to_json`]) to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Serializing plain fields to a Vec cannot fail.
        let _ = serde_json::to_writer(out, &self.line());
    }

    /// As one JSON object (a line of the file, a stream entry's `body`):
    /// `at` (µs), `timestamp` (RFC 3339), `request_id`, `action`, `scope`,
    /// `resource`, `policy_action`, `amounts` (unit → decimal text),
    /// `amounts_base` (unit → base units), `outcome`, `reason`, `priority`,
    /// `backend`, `degraded`.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.line()).unwrap_or_default()
    }
}

/// `audit:` in the policy: a JSON-lines file and/or a Redis Stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sinks {
    /// A file the records are appended to, one JSON object per line.
    pub file: Option<std::path::PathBuf>,
    /// A stream (`<namespace>:<key>`) and the entries it keeps, about.
    pub stream: Option<(String, u64)>,
}

impl Sinks {
    /// Whether any sink is on.
    #[must_use]
    pub fn any(&self) -> bool {
        self.file.is_some() || self.stream.is_some()
    }
}

/// What the audit sinks did so far ([`crate::Warden::audit_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records written to the file.
    pub written: u64,
    /// Records appended to the stream.
    pub appended: u64,
    /// Records lost because a sink fell more than [`CAPACITY`] behind.
    pub dropped: u64,
    /// Records not written (the file or Redis failed).
    pub failed: u64,
    /// The last failure, one line.
    pub last_error: Option<String>,
}

/// The audit channel of a warden: who consumes, and the sender.
pub(crate) struct Audit {
    tx: tokio::sync::broadcast::Sender<Arc<Record>>,
    /// Consumers alive (sinks and callbacks); 0 = off.
    consumers: Arc<AtomicUsize>,
    pub(crate) stats: Arc<Mutex<Stats>>,
    /// Records sent, and how many of them the sinks handled (`flush`).
    sent: std::sync::atomic::AtomicU64,
    done: tokio::sync::watch::Receiver<u64>,
    done_tx: Mutex<Option<tokio::sync::watch::Sender<u64>>>,
}

/// Decrements the consumer count when its consumer ends.
pub(crate) struct Consumer(Arc<AtomicUsize>);

impl Drop for Consumer {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Audit {
    pub(crate) fn new() -> Self {
        let (done_tx, done) = tokio::sync::watch::channel(0);
        Self {
            tx: tokio::sync::broadcast::Sender::new(CAPACITY),
            consumers: Arc::new(AtomicUsize::new(0)),
            stats: Arc::new(Mutex::new(Stats::default())),
            sent: std::sync::atomic::AtomicU64::new(0),
            done,
            done_tx: Mutex::new(Some(done_tx)),
        }
    }

    /// Waits until the sinks handled every record sent before this call,
    /// for at most `timeout`; `true` if they did (or there are no sinks).
    pub(crate) async fn flush(&self, sinks: &Sinks, timeout: std::time::Duration) -> bool {
        if !sinks.any() {
            return true;
        }
        let target = self.sent.load(Ordering::SeqCst);
        let mut done = self.done.clone();
        tokio::time::timeout(timeout, done.wait_for(|n| *n >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether anyone consumes records (one relaxed load).
    #[inline]
    pub(crate) fn on(&self) -> bool {
        self.consumers.load(Ordering::Relaxed) > 0
    }

    /// Hands `record` to every consumer, never waiting.
    pub(crate) fn send(&self, record: Record) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        let _ = self.tx.send(Arc::new(record));
    }

    /// A new consumer's receiver and the guard that counts it.
    pub(crate) fn consumer(&self) -> (tokio::sync::broadcast::Receiver<Arc<Record>>, Consumer) {
        self.consumers.fetch_add(1, Ordering::Relaxed);
        (self.tx.subscribe(), Consumer(Arc::clone(&self.consumers)))
    }

    /// Starts the policy's sinks.
    pub(crate) fn start(&self, sinks: &Sinks, backend: &Arc<dyn Backend>) {
        if !sinks.any() {
            return;
        }
        let Some(done) = self.done_tx.lock().take() else {
            return;
        };
        let (rx, guard) = self.consumer();
        let (sinks, backend, stats) = (sinks.clone(), Arc::clone(backend), Arc::clone(&self.stats));
        let spawned = crate::events::worker("ratewarden-audit", async move {
            let _guard = guard;
            run(&sinks, rx, &*backend, &stats, &done).await;
        });
        if let Err(e) = spawned {
            self.stats.lock().last_error = Some(format!("the audit thread could not start: {e}"));
        }
    }
}

async fn run(
    sinks: &Sinks,
    mut rx: tokio::sync::broadcast::Receiver<Arc<Record>>,
    backend: &dyn Backend,
    stats: &Mutex<Stats>,
    done: &tokio::sync::watch::Sender<u64>,
) {
    use std::future::IntoFuture;
    let mut handled = 0_u64;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let open = |path: &std::path::Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(std::io::BufWriter::new)
            .map_err(|e| {
                std::io::Error::other(format!(
                    "the audit file {} cannot be opened: {e}",
                    path.display()
                ))
            })
    };
    let mut file: Option<std::io::BufWriter<std::fs::File>> = None;
    let mut batch: Vec<Arc<Record>> = Vec::with_capacity(crate::sink::BATCH);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let (mut busy, mut full) = (false, false);
    loop {
        let mut lost = 0;
        let mut closed = false;
        if full {
            // More are waiting.
        } else if busy {
            // Records are flowing: look again after a pause rather than be
            // woken by each one (a wake-up per record would cost the
            // deciding threads a system call each).
            tokio::time::sleep(PAUSE).await;
        } else {
            // Idle: wait for the next record.
            match rx.recv().await {
                Ok(r) => batch.push(r),
                Err(RecvError::Lagged(n)) => lost += n,
                Err(RecvError::Closed) => closed = true,
            }
        }
        while !closed && batch.len() < crate::sink::BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(TryRecvError::Lagged(n)) => lost += n,
                Err(TryRecvError::Closed) => closed = true,
                Err(TryRecvError::Empty) => break,
            }
        }
        // Full: more are waiting, so no pause; a few: pause before looking again.
        busy = batch.len() + usize::try_from(lost).unwrap_or(usize::MAX) > 1;
        full = batch.len() >= crate::sink::BATCH;
        if lost > 0 {
            stats.lock().dropped += lost;
        }
        let n = batch.len() as u64;
        if n > 0 {
            if let Some(path) = &sinks.file {
                buf.clear();
                for r in &batch {
                    r.write_json(&mut buf);
                    buf.push(b'\n');
                }
                // Opened at the first record (again after a failure).
                let wrote = match &mut file {
                    Some(f) => Ok(f),
                    empty => open(path).map(|f| empty.insert(f)),
                }
                .and_then(|f| {
                    f.write_all(&buf)?;
                    f.flush()
                });
                let mut s = stats.lock();
                match wrote {
                    Ok(()) => s.written += n,
                    Err(e) => {
                        file = None;
                        s.failed += n;
                        s.last_error = Some(e.to_string());
                    }
                }
            }
            if let Some((key, max_len)) = &sinks.stream {
                let entries: Vec<crate::sink::Entry> = batch
                    .iter()
                    .map(|r| {
                        let mut body = Vec::with_capacity(256);
                        r.write_json(&mut body);
                        crate::sink::Entry {
                            id: r.request_id_hex(),
                            kind: r.action,
                            body: String::from_utf8(body).unwrap_or_default(),
                        }
                    })
                    .collect();
                let wrote = backend
                    .append_events(key, *max_len, &entries)
                    .into_future()
                    .await;
                let mut s = stats.lock();
                match wrote {
                    Ok(()) => s.appended += n,
                    Err(e) => {
                        s.failed += n;
                        s.last_error = Some(e.to_string());
                    }
                }
            }
        }
        handled += n + lost;
        done.send_replace(handled);
        batch.clear();
        if closed {
            return;
        }
    }
}
