//! Breaker transitions other processes publish on `<namespace>:events`
//! (`lua/upstream.lua`): one subscription per process wakes this process's
//! waiters at once, instead of at their next look.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};

/// The subscription of one backend (shared by its clones).
pub(super) struct Changes {
    /// A server to subscribe on (any node of a cluster: its pub/sub is
    /// broadcast to every node); `None`: no subscription.
    url: Option<String>,
    channel: String,
    notify: Arc<Notify>,
    /// The process that started the subscription (0: none yet): a forked
    /// child, which has no copy of that task, starts its own.
    pid: AtomicU32,
    /// Dropped with the backend's last clone: ends the task.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Changes {
    pub(super) fn new(url: Option<String>, channel: String) -> Self {
        Self {
            url,
            channel,
            notify: Arc::new(Notify::new()),
            pid: AtomicU32::new(0),
            stop: Mutex::new(None),
        }
    }

    /// What wakes when a transition is published, subscribing on first use
    /// in this process (on the current Tokio runtime; `None` outside one).
    pub(super) fn watch(&self) -> Option<Arc<Notify>> {
        let url = self.url.as_ref()?;
        let pid = std::process::id();
        if self.pid.load(Ordering::Acquire) != pid {
            let handle = tokio::runtime::Handle::try_current().ok()?;
            if self.pid.swap(pid, Ordering::AcqRel) != pid {
                let (tx, rx) = oneshot::channel();
                // In a forked child the sender replaced belongs to a task that
                // does not exist here; dropping it is harmless.
                *self.stop.lock() = Some(tx);
                handle.spawn(subscribe(
                    url.clone(),
                    self.channel.clone(),
                    Arc::clone(&self.notify),
                    rx,
                ));
            }
        }
        Some(Arc::clone(&self.notify))
    }
}

/// Subscribes and wakes every waiter on each message; reconnects after a
/// second when the connection is lost; ends when `stop` is dropped. Never
/// panics: a failure only means waiters look again at their own pace.
async fn subscribe(
    url: String,
    channel: String,
    notify: Arc<Notify>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let session = async {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut pubsub = client.get_async_pubsub().await.ok()?;
            pubsub.subscribe(&channel).await.ok()?;
            // Whatever was published while (re)connecting: look again now.
            notify.notify_waiters();
            let mut messages = pubsub.on_message();
            while messages.next().await.is_some() {
                notify.notify_waiters();
            }
            Some(())
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = session => {}
        }
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
