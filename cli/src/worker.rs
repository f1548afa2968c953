//! `ratewarden worker` (hidden): one OS process of many hammering a shared
//! backend, for multi-process tests and load generation. Prints one JSON line
//! with what it was granted.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::{Clock, Cost, Policy, Priority, Request, SystemClock, WaitFor, Warden};

/// Options of `ratewarden worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The shared backend.
    #[command(flatten)]
    pub store: crate::BackendArgs,
    /// Policy file.
    #[arg(long)]
    pub policy: PathBuf,
    /// Scope every request is made for; several, comma-separated, are spread
    /// over the tasks (task i uses the i-th, round robin).
    #[arg(long)]
    pub scope: String,
    /// Resource every request uses (its limits, e.g. shared pools, apply too).
    #[arg(long)]
    pub resource: Option<String>,
    /// Concurrent tasks in this process.
    #[arg(long, default_value_t = 16)]
    pub tasks: usize,
    /// Requests per task.
    #[arg(long, default_value_t = 100)]
    pub ops: usize,
    /// `acquire`, `reserve` (then commit the estimate), or `wait` (acquire,
    /// waiting in line up to a minute).
    #[arg(long, default_value = "acquire")]
    pub mode: String,
    /// Priority of every request: `critical`, `standard` or `background`.
    #[arg(long, default_value = "standard")]
    pub priority: String,
    /// Units of `tokens` each request spends (0: none).
    #[arg(long, default_value_t = 0)]
    pub tokens: i64,
    /// With `reserve`: keep the reservations (no commit), print what was held and
    /// wait to be killed — a holder that dies with leases outstanding.
    #[arg(long)]
    pub hold: bool,
    /// Start the requests at this time (µs since the epoch, system clock)
    /// once connected, so several processes begin together.
    #[arg(long)]
    pub start_at: Option<i64>,
    /// Lease of each reservation, seconds (default: the policy's).
    #[arg(long)]
    pub lease_secs: Option<u64>,
}

/// Runs the worker.
///
/// # Errors
/// Bad options, an unreachable backend, or a failed operation.
pub fn run(args: &Args) -> ratewarden::Result<()> {
    let policy = Policy::from_file(&args.policy)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ratewarden::Error::Backend {
            message: format!("cannot start a runtime: {e}"),
        })?;
    rt.block_on(async {
        let backend = RedisBackend::connect(&args.store.backend, &args.store.namespace).await?;
        let warden = Warden::with_backend(
            policy,
            Arc::new(backend) as Arc<dyn Backend>,
            Arc::new(SystemClock),
        );
        let priority: Priority = args.priority.parse()?;
        if let Some(at) = args.start_at {
            SystemClock.sleep_until(at).await;
        }
        let mut requests = Vec::new();
        for scope in args.scope.split(',') {
            let mut request = Request::parse(scope)?.priority(priority);
            if let Some(r) = &args.resource {
                request = request.resource(r);
            }
            if args.tokens > 0 {
                request = request.spend("tokens", args.tokens);
            }
            requests.push(request);
        }
        let admitted = Arc::new(AtomicI64::new(0));
        // When each admission was made (µs, system clock), in order.
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lease = args.lease_secs.map(std::time::Duration::from_secs);
        let mut handles = Vec::new();
        for task in 0..args.tasks {
            let (w, req, admitted, ops, reserve, hold) = (
                warden.clone(),
                requests[task % requests.len()].clone(),
                Arc::clone(&admitted),
                args.ops,
                args.mode == "reserve",
                args.hold,
            );
            let (wait, times) = (args.mode == "wait", Arc::clone(&times));
            handles.push(tokio::spawn(async move {
                for _ in 0..ops {
                    if reserve {
                        let d = w.reserve(&req, lease).await?;
                        if let Some(r) = d.reservation {
                            if !hold {
                                w.commit(r.id, &Cost::new()).await?;
                            }
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if wait {
                        let minute = std::time::Duration::from_secs(60);
                        if w.wait(&req, WaitFor::Acquire, minute).await?.allowed() {
                            let at = SystemClock.now();
                            times.lock().unwrap_or_else(|e| e.into_inner()).push(at);
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if w.acquire(&req).await?.allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok::<(), ratewarden::Error>(())
            }));
        }
        for h in handles {
            h.await.map_err(|e| ratewarden::Error::Backend {
                message: format!("worker task failed: {e}"),
            })??;
        }
        let admitted = admitted.load(Ordering::Relaxed);
        if args.mode == "wait" {
            // When each admission came, for tests of the order across processes.
            let times = std::mem::take(&mut *times.lock().unwrap_or_else(|e| e.into_inner()));
            println!("{}", serde_json::json!({"admitted": admitted, "at": times}));
        } else {
            println!("{{\"admitted\": {admitted}}}");
        }
        if args.hold {
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            // Hold the leases until killed.
            std::future::pending::<()>().await;
        }
        Ok(())
    })
}
