//! `ratewarden simulate`: N agents with mixed priorities share one upstream
//! quota, on a simulated clock. The same seeded workload runs twice:
//!
//! - **naive**: every agent calls the upstream directly and, on a 429, sleeps
//!   the provider's `Retry-After` plus jitter — independent retry logic;
//! - **governed**: every agent first `wait`s on a shared ratewarden ledger that
//!   mirrors the upstream quota, with priority floors and promotion;
//! - **coordinated**: no quota is configured — every agent reports each
//!   response's rate-limit headers (`Warden::report`), waits on the
//!   upstream's traffic light, and retries in its priority's band
//!   (`RetryBands`): N agents as one client of the upstream's real state.
//!
//! The upstream is GitHub-like: a fixed per-minute quota announced in
//! `x-ratelimit-limit` / `-remaining` / `-used` / `-reset` headers, 429 with
//! `Retry-After` when it is spent, and a 60 s lockout (secondary limit) after
//! more than 10 over-quota calls in one window. Time is a `ManualClock`
//! advanced from event to event, so a 30-minute run takes milliseconds and
//! every run with the same seed prints the same numbers.

use std::fmt::Write as _;

use crate::plot;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot_shim::Mutex;
use ratewarden::calendar::{MINUTE_US, SECOND_US};
use ratewarden::clock::Micros;
use ratewarden::{Clock, ManualClock, Policy, Priority, Request, Scope, WaitFor, Warden};

/// A std mutex that ignores poisoning (the simulation is single-threaded).
mod parking_lot_shim {
    pub struct Mutex<T>(std::sync::Mutex<T>);
    impl<T> Mutex<T> {
        pub fn new(v: T) -> Self {
            Self(std::sync::Mutex::new(v))
        }
        pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}

/// Options of `ratewarden simulate`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Number of agents (about 2/9 critical, 3/9 background, the rest standard).
    #[arg(long, default_value_t = 9)]
    pub agents: usize,
    /// The upstream's quota: requests per minute, shared by every agent.
    #[arg(long, default_value_t = 120)]
    pub quota: u32,
    /// Total demand as a multiple of the quota (above 1 the upstream is oversubscribed).
    #[arg(long, default_value_t = 1.2)]
    pub demand: f64,
    /// Simulated minutes.
    #[arg(long, default_value_t = 30)]
    pub minutes: u32,
    /// Random seed for arrivals and jitter.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Also draw the four variants into FILE, PNG or SVG by its extension:
    /// successes, 429s and quota remaining over time, and each tier's wait.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print the results as one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Backend for the governed run (only the embedded `memory` engine in this version).
    #[arg(long, default_value = "memory")]
    pub backend: String,
}

/// The simulated upstream provider.
struct Upstream {
    quota: u32,
    /// Where the run started, and when the next sample of `remaining` is due.
    start: Micros,
    next_sample: Micros,
    window: i64,
    used: u32,
    over_in_window: u32,
    locked_until: Micros,
    stats: UpstreamStats,
}

#[derive(Default, Clone)]
struct UpstreamStats {
    sent: u64,
    ok: u64,
    rejected: u64,
    over_quota: u64,
    lockout_rejects: u64,
    ok_per_minute: Vec<u64>,
    rejected_per_minute: Vec<u64>,
    /// Requests left in the current window, every [`SAMPLE_US`] from the start.
    remaining: Vec<u64>,
}

/// How often the upstream's remaining quota is sampled (for the plot).
const SAMPLE_US: Micros = 2 * SECOND_US;

enum Answer {
    Ok,
    TooMany { retry_after: Micros },
}

impl Upstream {
    fn new(quota: u32, minutes: u32, start: Micros) -> Self {
        let n = usize::try_from(minutes).unwrap_or(0).max(1);
        Self {
            quota,
            start,
            next_sample: start,
            window: i64::MIN,
            used: 0,
            over_in_window: 0,
            locked_until: 0,
            stats: UpstreamStats {
                ok_per_minute: vec![0; n],
                rejected_per_minute: vec![0; n],
                ..UpstreamStats::default()
            },
        }
    }

    /// Records the samples due up to `now` (inclusive), before a call at `now`.
    fn sample_until(&mut self, now: Micros) {
        while self.next_sample <= now {
            let left = if self.next_sample.div_euclid(MINUTE_US) == self.window {
                self.quota.saturating_sub(self.used)
            } else {
                self.quota // a window nobody has called in yet
            };
            self.stats.remaining.push(u64::from(left));
            self.next_sample += SAMPLE_US;
        }
    }

    fn call(&mut self, now: Micros) -> Answer {
        self.sample_until(now);
        let minute = usize::try_from((now - self.start) / MINUTE_US).unwrap_or(0);
        let slot = minute.min(self.stats.ok_per_minute.len() - 1);
        self.stats.sent += 1;
        let window = now.div_euclid(MINUTE_US);
        if window != self.window {
            self.window = window;
            self.used = 0;
            self.over_in_window = 0;
        }
        let reset = (window + 1) * MINUTE_US;
        if now < self.locked_until {
            self.stats.rejected += 1;
            self.stats.lockout_rejects += 1;
            self.stats.rejected_per_minute[slot] += 1;
            return Answer::TooMany {
                retry_after: self.locked_until - now,
            };
        }
        if self.used < self.quota {
            self.used += 1;
            self.stats.ok += 1;
            self.stats.ok_per_minute[slot] += 1;
            return Answer::Ok;
        }
        self.stats.rejected += 1;
        self.stats.over_quota += 1;
        self.stats.rejected_per_minute[slot] += 1;
        self.over_in_window += 1;
        if self.over_in_window > 10 {
            // Secondary limit: hammering a spent quota locks the caller out for a minute.
            self.locked_until = now + MINUTE_US;
            return Answer::TooMany {
                retry_after: MINUTE_US,
            };
        }
        Answer::TooMany {
            retry_after: reset - now,
        }
    }
}

impl Upstream {
    /// The GitHub-style rate-limit headers of an answer given at `now`.
    fn headers(&self, now: Micros, answer: &Answer) -> Vec<(String, String)> {
        let reset_epoch = (self.window + 1) * MINUTE_US / SECOND_US;
        let mut h = vec![
            ("x-ratelimit-limit".to_owned(), self.quota.to_string()),
            (
                "x-ratelimit-remaining".to_owned(),
                self.quota.saturating_sub(self.used).to_string(),
            ),
            ("x-ratelimit-used".to_owned(), self.used.to_string()),
            ("x-ratelimit-reset".to_owned(), reset_epoch.to_string()),
            ("x-ratelimit-resource".to_owned(), "core".to_owned()),
        ];
        if let Answer::TooMany { retry_after } = answer {
            let secs = (retry_after + SECOND_US - 1) / SECOND_US;
            h.push(("retry-after".to_owned(), secs.max(1).to_string()));
        }
        let _ = now;
        h
    }
}

#[derive(Clone, Copy)]
struct Task {
    arrival: Micros,
}

struct Agent {
    priority: Priority,
    tasks: Vec<Task>,
}

/// Per agent: `(arrival, completion)` of each finished task, in order.
type Completions = Vec<Mutex<Vec<(Micros, Micros)>>>;

#[derive(Default, Clone)]
struct Outcome {
    /// Per tier: waits (µs) of completed tasks.
    waits: [Vec<Micros>; 3],
    /// Per tier: tasks that never completed within the run.
    unfinished: [usize; 3],
    /// Per tier: the longest an agent was blocked at the head of its queue (starvation).
    blocked: [Micros; 3],
    upstream: UpstreamStats,
}

fn tiers(n: usize) -> Vec<Priority> {
    let critical = (n * 2).div_ceil(9).max(1);
    let background = (n * 3) / 9;
    (0..n)
        .map(|i| {
            if i < critical {
                Priority::Critical
            } else if i >= n - background {
                Priority::Background
            } else {
                Priority::Standard
            }
        })
        .collect()
}

fn workload(args: &Args, start: Micros) -> Vec<Agent> {
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let total = f64::from(args.quota) * f64::from(args.minutes) * args.demand;
    let per_agent = total / args.agents as f64;
    let span = i64::from(args.minutes) * MINUTE_US;
    tiers(args.agents)
        .into_iter()
        .map(|priority| {
            // Poisson arrivals at a constant rate over the run.
            let mean_gap = span as f64 / per_agent.max(1.0);
            let mut t = 0.0;
            let mut tasks = Vec::new();
            loop {
                t += -mean_gap * (1.0 - rng.f64()).ln();
                if t >= span as f64 {
                    break;
                }
                #[allow(clippy::cast_possible_truncation)]
                tasks.push(Task {
                    arrival: start + t as i64,
                });
            }
            Agent { priority, tasks }
        })
        .collect()
}

fn policy(quota: u32) -> ratewarden::Result<Policy> {
    Policy::from_value(&serde_json::json!({
        "scopes": {"agent": {}},
        "resources": {"upstream": {"limits": [
            {"name": "upstream-quota", "kind": "quota", "limit": quota, "per": "minute"}
        ]}}
    }))
}

/// Runs `agents` to completion on the manual clock, advancing it event to event.
async fn drive(
    clock: &ManualClock,
    end: Micros,
    handles: Vec<tokio::task::JoinHandle<()>>,
    progress: &AtomicU64,
) {
    loop {
        // Let every runnable agent run until nothing moves.
        let mut last = u64::MAX;
        loop {
            for _ in 0..32 {
                tokio::task::yield_now().await;
            }
            let now = progress.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        if handles.iter().all(tokio::task::JoinHandle::is_finished) {
            break;
        }
        match clock.next_deadline() {
            Some(d) if d < end => clock.set(d.max(clock.now())),
            _ => break,
        }
    }
    for h in &handles {
        h.abort();
    }
}

fn finish_outcome(
    agents: &[Agent],
    done: &[Mutex<Vec<(Micros, Micros)>>],
    upstream: &Mutex<Upstream>,
    end: Micros,
) -> Outcome {
    let mut out = Outcome::default();
    for (a, d) in agents.iter().zip(done) {
        let completed = d.lock();
        let t = usize::from(a.priority.rank());
        out.waits[t].extend(completed.iter().map(|(arrival, at)| at - arrival));
        out.unfinished[t] += a.tasks.len() - completed.len();
        // Blocked: how long a task sat at the head of its agent's queue, trying and
        // refused (from max(arrival, previous completion) to its own completion).
        let mut prev = i64::MIN;
        for &(arrival, at) in completed.iter() {
            out.blocked[t] = out.blocked[t].max(at - arrival.max(prev));
            prev = at;
        }
        if let Some(task) = a.tasks.get(completed.len()) {
            out.blocked[t] = out.blocked[t].max(end - task.arrival.max(prev));
        }
    }
    let mut up = upstream.lock();
    up.sample_until(end - 1);
    out.upstream = up.stats.clone();
    out
}

/// How a naive agent retries after a 429.
#[derive(Clone, Copy)]
enum Naive {
    /// Exponential backoff with full jitter from 1 s, capped at 32 s, ignoring `Retry-After`
    /// (the default of common retry decorators).
    Backoff,
    /// Sleep `Retry-After` plus up to 1 s of jitter (what provider SDKs do).
    RetryAfter,
}

/// What every simulated agent shares: the clock, the upstream and the books.
#[derive(Clone)]
struct World {
    clock: ManualClock,
    upstream: Arc<Mutex<Upstream>>,
    done: Arc<Completions>,
    progress: Arc<AtomicU64>,
}

impl World {
    fn new(args: &Args, agents: usize, start: Micros) -> Self {
        Self {
            clock: ManualClock::new(start),
            upstream: Arc::new(Mutex::new(Upstream::new(args.quota, args.minutes, start))),
            done: Arc::new((0..agents).map(|_| Mutex::new(Vec::new())).collect()),
            progress: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One upstream call now.
    fn call(&self) -> Answer {
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.upstream.lock().call(self.clock.now())
    }

    /// One upstream call now, with the response's rate-limit headers.
    fn call_with_headers(&self) -> (Answer, Vec<(String, String)>) {
        self.progress.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now();
        let mut up = self.upstream.lock();
        let answer = up.call(now);
        let headers = up.headers(now, &answer);
        (answer, headers)
    }

    /// Records that agent `i` finished a task that arrived at `arrival`.
    fn finished(&self, i: usize, arrival: Micros) {
        self.done[i].lock().push((arrival, self.clock.now()));
    }

    /// Runs one task per agent (`agent(i, agent, world)`) until `end`.
    fn run<F, Fut>(&self, agents: &[Agent], end: Micros, agent: F) -> ratewarden::Result<Outcome>
    where
        F: Fn(usize, &Agent, Self) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| ratewarden::Error::Backend {
                message: format!("cannot start a runtime: {e}"),
            })?;
        rt.block_on(async {
            let handles = agents
                .iter()
                .enumerate()
                .map(|(i, a)| tokio::spawn(agent(i, a, self.clone())))
                .collect();
            drive(&self.clock, end, handles, &self.progress).await;
        });
        Ok(finish_outcome(agents, &self.done, &self.upstream, end))
    }
}

fn run_naive(
    args: &Args,
    agents: &[Agent],
    start: Micros,
    strategy: Naive,
    end: Micros,
) -> ratewarden::Result<Outcome> {
    let world = World::new(args, agents.len(), start);
    world.run(agents, end, |i, agent, world| {
        let tasks = agent.tasks.clone();
        let mut rng = fastrand::Rng::with_seed(args.seed ^ ((i as u64 + 1) * 0x9E37));
        async move {
            for task in tasks {
                world.clock.sleep_until(task.arrival).await;
                let mut attempt = 0u32;
                while let Answer::TooMany { retry_after } = world.call() {
                    let pause = match strategy {
                        Naive::Backoff => rng.i64(0..=(SECOND_US << attempt.min(5))),
                        Naive::RetryAfter => retry_after + rng.i64(0..SECOND_US),
                    };
                    attempt += 1;
                    world.clock.sleep_until(world.clock.now() + pause).await;
                }
                world.finished(i, task.arrival);
            }
        }
    })
}

fn run_governed(
    args: &Args,
    agents: &[Agent],
    start: Micros,
    end: Micros,
) -> ratewarden::Result<Outcome> {
    let world = World::new(args, agents.len(), start);
    let warden = Warden::with_clock(policy(args.quota)?, Arc::new(world.clock.clone()));
    world.run(agents, end, |i, agent, world| {
        let tasks = agent.tasks.clone();
        let warden = warden.clone();
        let request = Scope::parse(&format!("agent:{i}")).map(|s| {
            Request::new(s)
                .resource("upstream")
                .priority(agent.priority)
        });
        async move {
            let Ok(request) = request else { return };
            for task in tasks {
                world.clock.sleep_until(task.arrival).await;
                loop {
                    world.progress.fetch_add(1, Ordering::Relaxed);
                    let Ok(d) = warden
                        .wait(&request, WaitFor::Acquire, Duration::from_secs(60))
                        .await
                    else {
                        return;
                    };
                    if !d.allowed() {
                        continue;
                    }
                    match world.call() {
                        Answer::Ok => break,
                        Answer::TooMany { retry_after } => {
                            world
                                .clock
                                .sleep_until(world.clock.now() + retry_after)
                                .await
                        }
                    }
                }
                world.finished(i, task.arrival);
            }
        }
    })
}

fn coordinated_policy() -> ratewarden::Result<Policy> {
    Policy::from_value(&serde_json::json!({
        "scopes": {"agent": {}},
        "resources": {"upstream": {"upstream": {}}}
    }))
}

fn run_coordinated(
    args: &Args,
    agents: &[Agent],
    start: Micros,
    end: Micros,
) -> ratewarden::Result<Outcome> {
    let world = World::new(args, agents.len(), start);
    let warden = Warden::with_clock(coordinated_policy()?, Arc::new(world.clock.clone()));
    let bands = ratewarden::retry::RetryBands::default();
    world.run(agents, end, |i, agent, world| {
        let tasks = agent.tasks.clone();
        let warden = warden.clone();
        let priority = agent.priority;
        let mut rng = fastrand::Rng::with_seed(args.seed ^ ((i as u64 + 1) * 0x51ED));
        let request = Scope::parse(&format!("agent:{i}"))
            .map(|s| Request::new(s).resource("upstream").priority(priority));
        async move {
            let Ok(request) = request else { return };
            for task in tasks {
                world.clock.sleep_until(task.arrival).await;
                let mut attempt = 0u32;
                loop {
                    world.progress.fetch_add(1, Ordering::Relaxed);
                    let Ok(d) = warden
                        .wait(&request, WaitFor::Acquire, Duration::from_secs(60))
                        .await
                    else {
                        return;
                    };
                    if !d.allowed() {
                        continue;
                    }
                    if let Some(ms) = d.caps.delay_ms {
                        let pause = i64::try_from(ms).unwrap_or(i64::MAX / 1000) * 1000;
                        world.clock.sleep_until(world.clock.now() + pause).await;
                    }
                    let (answer, headers) = world.call_with_headers();
                    let pairs: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let status = if matches!(answer, Answer::Ok) {
                        200
                    } else {
                        429
                    };
                    let _ = warden.report("upstream", status, &pairs).await;
                    match answer {
                        Answer::Ok => break,
                        Answer::TooMany { retry_after } => {
                            attempt += 1;
                            let wait = bands.delay_with(
                                attempt,
                                priority,
                                Some(Duration::from_micros(
                                    u64::try_from(retry_after).unwrap_or(0),
                                )),
                                rng.f64(),
                            );
                            let us = i64::try_from(wait.as_micros()).unwrap_or(i64::MAX / 2);
                            world.clock.sleep_until(world.clock.now() + us).await;
                        }
                    }
                }
                world.finished(i, task.arrival);
            }
        }
    })
}

fn percentile(sorted: &[Micros], p: f64) -> Option<Micros> {
    if sorted.is_empty() {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[idx.min(sorted.len() - 1)])
}

fn secs(us: Option<Micros>) -> String {
    us.map_or_else(|| "-".to_owned(), |v| format!("{:.1} s", v as f64 / 1e6))
}

/// Runs both variants and prints the comparison.
///
/// # Errors
/// Invalid options or a failure building the governed warden.
pub fn run(args: &Args) -> ratewarden::Result<()> {
    if args.backend != "memory" {
        return Err(ratewarden::Error::InvalidArgument {
            what: "backend",
            message: format!(
                "`{}`: this version simulates on the embedded `memory` engine only",
                args.backend
            ),
        });
    }
    if args.agents == 0
        || args.agents > 1000
        || args.quota == 0
        || args.minutes == 0
        || args.minutes > 24 * 60
        || !(args.demand > 0.0 && args.demand <= 100.0)
    {
        return Err(ratewarden::Error::InvalidArgument {
            what: "simulate options",
            message: "need 1 ≤ agents ≤ 1000, quota ≥ 1, 1 ≤ minutes ≤ 1440, 0 < demand ≤ 100"
                .into(),
        });
    }
    if let Some(path) = &args.plot {
        // A bad extension is an error before minutes of simulation, not after.
        plot::Format::of(path).map_err(|message| ratewarden::Error::InvalidArgument {
            what: "plot",
            message,
        })?;
    }
    let start = ratewarden::calendar::days_from_civil(2026, 1, 5) * ratewarden::calendar::DAY_US;
    let agents = workload(args, start);
    let tasks: usize = agents.iter().map(|a| a.tasks.len()).sum();
    let end = start + i64::from(args.minutes) * MINUTE_US;
    let backoff = run_naive(args, &agents, start, Naive::Backoff, end)?;
    let retry_after = run_naive(args, &agents, start, Naive::RetryAfter, end)?;
    let governed = run_governed(args, &agents, start, end)?;
    let coordinated = run_coordinated(args, &agents, start, end)?;
    let mix = |p: Priority| agents.iter().filter(|a| a.priority == p).count();
    let variants = [
        ("naive: backoff", &backoff, (214, 39, 40)),
        ("naive: Retry-After", &retry_after, (255, 127, 14)),
        ("governed", &governed, (31, 119, 180)),
        ("coordinated", &coordinated, (44, 160, 44)),
    ];
    if let Some(path) = &args.plot {
        let figure = plot::Figure {
            title: format!(
                "ratewarden simulate: {} agents share {}/min, demand {:.1}x, seed {}",
                args.agents, args.quota, args.demand, args.seed
            ),
            minutes: args.minutes,
            quota_per_minute: f64::from(args.quota),
            quota_per_window: u64::from(args.quota),
            sample_secs: (SAMPLE_US / SECOND_US) as f64,
            variants: variants
                .iter()
                .map(|(name, o, color)| plot::Series {
                    name,
                    color: *color,
                    ok_per_minute: &o.upstream.ok_per_minute,
                    rejected_per_minute: &o.upstream.rejected_per_minute,
                    remaining: &o.upstream.remaining,
                    waits: [0, 1, 2].map(|t| {
                        let mut v = o.waits[t].clone();
                        v.sort_unstable();
                        let s = |p: f64| percentile(&v, p).map(|us| us as f64 / 1e6);
                        (s(0.5), s(0.95))
                    }),
                })
                .collect(),
        };
        plot::write(path, &figure).map_err(|message| ratewarden::Error::InvalidArgument {
            what: "plot",
            message,
        })?;
    }
    if args.json {
        let out = serde_json::json!({
            "agents": {"critical": mix(Priority::Critical), "standard": mix(Priority::Standard), "background": mix(Priority::Background)},
            "quota_per_minute": args.quota,
            "minutes": args.minutes,
            "demand": args.demand,
            "seed": args.seed,
            "tasks": tasks,
            "variants": variants.iter().map(|(name, o, _)| json_of(name, o, args)).collect::<Vec<_>>(),
        });
        println!("{out:#}");
        return Ok(());
    }
    println!(
        "ratewarden simulate: {} agents ({} critical, {} standard, {} background) share an upstream quota of {}/min",
        args.agents,
        mix(Priority::Critical),
        mix(Priority::Standard),
        mix(Priority::Background),
        args.quota
    );
    println!(
        "{} tasks over {} simulated minutes (demand {:.1}x the quota), seed {}; upstream locks a caller out for 60 s after 10 over-quota calls in a minute\n",
        tasks, args.minutes, args.demand, args.seed
    );
    let rows = table(
        &[
            ("naive: backoff", &backoff),
            ("naive: Retry-After", &retry_after),
            ("governed", &governed),
            ("coordinated", &coordinated),
        ],
        args.quota,
        args.minutes,
    );
    print!("{rows}");
    println!(
        "\nnaive: backoff      each agent calls directly; on 429 it backs off exponentially (1 s .. 32 s, full jitter)"
    );
    println!(
        "naive: Retry-After  each agent calls directly; on 429 it sleeps Retry-After + up to 1 s of jitter"
    );
    println!(
        "governed            each agent awaits warden.wait() on one shared ledger mirroring the quota"
    );
    println!(
        "                    (priority order, background keeps off the last 30%, promoted after 5 min)"
    );
    println!(
        "coordinated         no quota configured: each agent reports every response's headers and awaits"
    );
    println!("                    the upstream's traffic light; retries in its priority's band");
    if let Some(path) = &args.plot {
        println!("plot written to {}", path.display());
    }
    Ok(())
}

/// One variant's results as JSON (waits in seconds).
fn json_of(name: &str, o: &Outcome, args: &Args) -> serde_json::Value {
    let capacity = u64::from(args.quota) * u64::from(args.minutes);
    let tiers: serde_json::Map<String, serde_json::Value> =
        [(0, "critical"), (1, "standard"), (2, "background")]
            .into_iter()
            .map(|(t, tier)| {
                let mut v = o.waits[t].clone();
                v.sort_unstable();
                let s = |p: f64| percentile(&v, p).map(|us| us as f64 / 1e6);
                (
                    tier.to_owned(),
                    serde_json::json!({
                        "wait_p50_s": s(0.5),
                        "wait_p95_s": s(0.95),
                        "unfinished": o.unfinished[t],
                        "longest_blocked_s": o.blocked[t] as f64 / 1e6,
                    }),
                )
            })
            .collect();
    serde_json::json!({
        "name": name,
        "sent": o.upstream.sent,
        "succeeded": o.upstream.ok,
        "share_of_capacity": o.upstream.ok as f64 / capacity as f64,
        "rejected_429": o.upstream.rejected,
        "over_quota": o.upstream.over_quota,
        "lockout_rejects": o.upstream.lockout_rejects,
        "tiers": tiers,
        "ok_per_minute": o.upstream.ok_per_minute,
        "rejected_per_minute": o.upstream.rejected_per_minute,
        "remaining_every_2s": o.upstream.remaining,
    })
}

fn table(columns: &[(&str, &Outcome)], quota: u32, minutes: u32) -> String {
    let capacity = u64::from(quota) * u64::from(minutes);
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&Outcome) -> String| {
        rows.push((name.to_owned(), columns.iter().map(|(_, o)| f(o)).collect()));
    };
    row("requests sent upstream", &|o| o.upstream.sent.to_string());
    row("succeeded (share of capacity)", &|o| {
        format!(
            "{} ({:.0}%)",
            o.upstream.ok,
            o.upstream.ok as f64 * 100.0 / capacity as f64
        )
    });
    row("429 responses", &|o| o.upstream.rejected.to_string());
    row("  quota overrun: calls past the quota", &|o| {
        o.upstream.over_quota.to_string()
    });
    row("  secondary-limit lockout rejects", &|o| {
        o.upstream.lockout_rejects.to_string()
    });
    for (tier, name) in [(0, "critical"), (1, "standard"), (2, "background")] {
        row(&format!("{name} wait p50 / p95"), &|o| {
            let mut v = o.waits[tier].clone();
            v.sort_unstable();
            format!(
                "{} / {}",
                secs(percentile(&v, 0.5)),
                secs(percentile(&v, 0.95))
            )
        });
        row(&format!("{name} tasks unfinished at the end"), &|o| {
            o.unfinished[tier].to_string()
        });
    }
    row("background longest time blocked (starvation)", &|o| {
        secs(Some(o.blocked[2]))
    });
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns.len())
        .map(|c| {
            rows.iter()
                .map(|r| r.1[c].chars().count())
                .chain([columns[c].0.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let _ = write!(out, "{:<w0$}", "");
    for ((name, _), w) in columns.iter().zip(&widths) {
        let _ = write!(out, "  {name:>w$}");
    }
    out.push('\n');
    for (name, cells) in rows {
        let _ = write!(out, "{name:<w0$}");
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "  {cell:>w$}");
        }
        out.push('\n');
    }
    out
}
