//! Events out to Redis: appended to a Stream (`XADD … MAXLEN ~`, read with
//! consumer groups, durable across a consumer's restart) and published on a
//! pub/sub channel for live listeners (`events:` in the policy).
//!
//! A thread of its own drains the warden's events in batches (one round trip
//! per batch), never on a decision's path: a slow or unreachable Redis makes
//! it fall behind — past [`crate::events::CAPACITY`] events the oldest are
//! dropped and counted — while decisions go on.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backend::Backend;
use crate::events::{Event, Filter};

/// The stream's key under the namespace when `events.stream` names none.
pub const DEFAULT_STREAM: &str = "events:stream";
/// The pub/sub channel under the namespace when `events.publish` names none.
pub const DEFAULT_CHANNEL: &str = "events:live";
/// Entries a stream keeps (about: trimmed with `MAXLEN ~`) unless set.
pub const DEFAULT_MAX_LEN: u64 = 100_000;
/// Events written in one round trip at most.
pub const BATCH: usize = 256;
/// Attempts at writing a batch before its events count as failed.
const ATTEMPTS: u32 = 4;

/// One outlet: a stream (`name` is its key) or a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlet {
    /// The key or channel, under the backend's namespace (`<ns>:<name>`).
    pub name: String,
    /// Streams: entries kept, about.
    pub max_len: u64,
    /// The events it takes.
    pub events: Filter,
}

/// The policy's `events:`: a stream and a channel, each optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outlets {
    /// `events.stream`.
    pub stream: Option<Outlet>,
    /// `events.publish`.
    pub publish: Option<Outlet>,
}

impl Outlets {
    /// Whether any outlet is on.
    #[must_use]
    pub fn any(&self) -> bool {
        self.stream.is_some() || self.publish.is_some()
    }
}

/// One event as a stream entry or a published message: the fields `id`
/// (`msg_…`, shared with webhooks and callbacks for a crossing), `type` and
/// `body` — the event's JSON envelope (`{"id","type","timestamp","at","data"}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `msg_` and 32 hex digits.
    pub id: String,
    /// The event type.
    pub kind: &'static str,
    /// The JSON envelope.
    pub body: String,
}

impl Entry {
    /// The entry of `event`.
    #[must_use]
    pub fn of(event: &Event) -> Self {
        let envelope = event.envelope(&crate::events::new_id());
        Self {
            id: envelope["id"].as_str().unwrap_or_default().to_owned(),
            kind: event.type_name(),
            body: envelope.to_string(),
        }
    }
}

/// What the outlets did so far ([`crate::Warden::outlet_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutletStats {
    /// Entries appended to the stream.
    pub appended: u64,
    /// Messages published.
    pub published: u64,
    /// Events lost because the outlet fell more than
    /// [`crate::events::CAPACITY`] behind.
    pub dropped: u64,
    /// Events not written after every attempt (Redis unreachable).
    pub failed: u64,
    /// The last write error, one line.
    pub last_error: Option<String>,
}

/// Starts the outlets' thread when the policy has any.
pub(crate) fn start(
    outlets: &Outlets,
    events: &tokio::sync::broadcast::Sender<Event>,
    backend: &Arc<dyn Backend>,
    stats: &Arc<Mutex<OutletStats>>,
    done: tokio::sync::watch::Sender<u64>,
) {
    if !outlets.any() {
        return;
    }
    let (outlets, rx, backend, shared) = (
        outlets.clone(),
        events.subscribe(),
        Arc::clone(backend),
        Arc::clone(stats),
    );
    let spawned = crate::events::worker("ratewarden-outlets", async move {
        run(&outlets, rx, &*backend, &shared, &done).await;
    });
    if let Err(e) = spawned {
        stats.lock().last_error = Some(format!("the outlet thread could not start: {e}"));
    }
}

async fn run(
    outlets: &Outlets,
    mut rx: tokio::sync::broadcast::Receiver<Event>,
    backend: &dyn Backend,
    stats: &Mutex<OutletStats>,
    done: &tokio::sync::watch::Sender<u64>,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut batch: Vec<Event> = Vec::with_capacity(BATCH);
    // Events handled (written, failed or dropped), for `flush_outlets`.
    let mut handled = 0_u64;
    loop {
        let mut lost = 0;
        match rx.recv().await {
            Ok(e) => batch.push(e),
            Err(RecvError::Lagged(n)) => lost += n,
            Err(RecvError::Closed) => return,
        }
        let mut closed = false;
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(TryRecvError::Lagged(n)) => lost += n,
                Err(TryRecvError::Closed) => {
                    closed = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if lost > 0 {
            stats.lock().dropped += lost;
        }
        write(outlets, &batch, backend, stats).await;
        handled += batch.len() as u64 + lost;
        done.send_replace(handled);
        batch.clear();
        if closed {
            return;
        }
    }
}

/// Writes one batch to each outlet that wants some of it, retrying with
/// backoff; what still fails is counted.
async fn write(
    outlets: &Outlets,
    batch: &[Event],
    backend: &dyn Backend,
    stats: &Mutex<OutletStats>,
) {
    let entries: Vec<(Entry, &Event)> = batch.iter().map(|e| (Entry::of(e), e)).collect();
    let pick = |o: &Outlet| -> Vec<Entry> {
        entries
            .iter()
            .filter(|(_, e)| o.events.wants(e.type_name()))
            .map(|(x, _)| x.clone())
            .collect()
    };
    if let Some(o) = &outlets.stream {
        let mine = pick(o);
        if !mine.is_empty() {
            let n = mine.len() as u64;
            match attempt(|| {
                backend
                    .append_events(&o.name, o.max_len, &mine)
                    .into_future()
            })
            .await
            {
                Ok(()) => stats.lock().appended += n,
                Err(e) => fail(stats, n, &e),
            }
        }
    }
    if let Some(o) = &outlets.publish {
        let mine = pick(o);
        if !mine.is_empty() {
            let n = mine.len() as u64;
            match attempt(|| backend.publish_events(&o.name, &mine).into_future()).await {
                Ok(()) => stats.lock().published += n,
                Err(e) => fail(stats, n, &e),
            }
        }
    }
}

fn fail(stats: &Mutex<OutletStats>, n: u64, e: &crate::Error) {
    let mut s = stats.lock();
    s.failed += n;
    s.last_error = Some(e.to_string());
}

async fn attempt<'a, F>(mut call: impl FnMut() -> F) -> crate::Result<()>
where
    F: std::future::Future<Output = crate::Result<()>> + 'a,
{
    let mut wait = Duration::from_millis(50);
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match tokio::time::timeout(Duration::from_secs(5), call()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if e.kind() != crate::ErrorKind::Backend => return Err(e),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(crate::Error::Backend {
                    message: "Redis did not answer within 5s".into(),
                });
            }
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    Err(last.unwrap_or_else(|| crate::Error::Backend {
        message: "not written".into(),
    }))
}
