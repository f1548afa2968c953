//! The process's Tokio runtime and completer thread, made afresh in a forked
//! child (the parent's threads do not exist there), and `block`.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// Forks survived so far in this process's ancestry: bumped in the child by the
/// `os.register_at_fork` hook installed when the module loads (`os.fork()` and
/// `multiprocessing`'s fork start method both run it). Cheaper than asking the
/// kernel for the pid on every call.
pub(crate) static FORKS: AtomicU32 = AtomicU32::new(0);

/// Which process this is, as far as fork-sensitive state is concerned.
pub(crate) fn process_generation() -> u32 {
    FORKS.load(Ordering::Acquire)
}

/// Runs in the child after `os.fork()`.
#[pyfunction]
pub(crate) fn _after_fork_in_child() {
    // A thread that held one of these at fork() (making the process's first
    // Redis call starts the runtime under RT) does not exist in the child: the
    // lock would never be released and the child's first call would hang.
    RT.store(Arc::default());
    TX.store(Arc::default());
    FORKS.fetch_add(1, Ordering::AcqRel);
    // The parent's random state was copied: ids must not repeat across processes.
    ratewarden::decision::reseed_ids_after_fork();
}

/// The process's Tokio runtime; a fresh one in a forked child.
/// A process-wide slot that a forked child gets afresh: the hook after
/// `fork()` swaps in a new, unlocked mutex (never locking the old one, which a
/// thread that does not exist in the child may have held at fork time).
pub(crate) type ForkSlot<T> = std::sync::LazyLock<arc_swap::ArcSwap<Mutex<Option<(u32, T)>>>>;

/// The process's runtime, by fork generation (see `runtime`).
pub(crate) static RT: ForkSlot<&'static tokio::runtime::Runtime> =
    std::sync::LazyLock::new(Default::default);
/// The completer thread's queue, by fork generation (see `completer`).
pub(crate) static TX: ForkSlot<std::sync::mpsc::Sender<Job>> =
    std::sync::LazyLock::new(Default::default);

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    let generation = process_generation();
    let rt_slot = RT.load();
    let mut slot = rt_slot.lock();
    if let Some((owner, rt)) = *slot {
        if owner == generation {
            return rt;
        }
        // Forked: the old runtime's threads are gone; it is leaked, never dropped.
    }
    let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ratewarden")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("ratewarden: cannot start a Tokio runtime: {e}")),
    ));
    *slot = Some((generation, rt));
    rt
}

pub(crate) fn block<F: std::future::Future + Send>(py: Python<'_>, f: F) -> F::Output
where
    F::Output: Send,
{
    py.detach(|| runtime().block_on(f))
}

/// Work that needs the GIL, handed from runtime threads to the completer.
pub(crate) type Job = Box<dyn FnOnce(Python<'_>) + Send>;

/// The process's completer thread: takes the GIL once per batch of finished
/// operations and completes their asyncio futures. A fresh one after `fork()`.
pub(crate) fn completer() -> std::sync::mpsc::Sender<Job> {
    let generation = process_generation();
    let tx_slot = TX.load();
    let mut slot = tx_slot.lock();
    if let Some((owner, tx)) = &*slot {
        if *owner == generation {
            return tx.clone();
        }
    }
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("ratewarden-completer".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                Python::attach(|py| {
                    first(py);
                    while let Ok(job) = rx.try_recv() {
                        job(py);
                    }
                });
            }
        })
        .unwrap_or_else(|e| panic!("ratewarden: cannot start the completer thread: {e}"));
    *slot = Some((generation, tx.clone()));
    tx
}
