//! `ratewarden simulate`: N agents with mixed priorities share upstream
//! quotas, on a simulated clock. The same seeded workload runs four times:
//!
//! - **naive: backoff** and **naive: Retry-After**: every agent calls the
//!   upstream directly and, on a 429, backs off exponentially or sleeps the
//!   provider's `Retry-After` plus jitter — independent retry logic;
//! - **governed**: every agent first `wait`s on a shared ratewarden ledger that
//!   mirrors the upstream quotas, with priority floors and promotion;
//! - **coordinated**: no quota is configured — every agent reports each
//!   response's rate-limit headers (`Warden::report`), waits on the
//!   upstream's traffic light, and retries in its priority's band
//!   (`RetryBands`): N agents as one client of the upstream's real state.
//!
//! Without `--scenario`, the upstream is GitHub-like: a fixed per-minute
//! quota announced in `x-ratelimit-*` headers, 429 with `Retry-After` when it
//! is spent, and a 60 s lockout (secondary limit) after more than 10
//! over-quota calls in one window. A scenario file (see [`crate::scenario`])
//! describes other upstreams, header styles, agents and workflows. Time is a
//! `ManualClock` advanced from event to event, so a 30-minute run takes
//! milliseconds and every run with the same seed prints the same numbers.

pub mod procs;
mod upstream;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot_shim::Mutex;
use ratewarden::calendar::{MINUTE_US, SECOND_US};
use ratewarden::clock::Micros;
use ratewarden::{Clock, ManualClock, Policy, Priority, Request, Scope, WaitFor, Warden};

use crate::plot;
use crate::scenario::{AgentSpec, Scenario, Secondary, Style, UpstreamSpec};
use upstream::{Answer, SAMPLE_US, Upstream, UpstreamStats};

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
    /// A scenario file (YAML): upstreams, agents, workflows, minutes, seed.
    /// Without it, `--agents`, `--quota` and `--demand` describe one
    /// GitHub-like upstream.
    #[arg(long, conflicts_with_all = ["agents", "quota", "demand"])]
    pub scenario: Option<PathBuf>,
    /// Number of agents (about 2/9 critical, 3/9 background, the rest standard).
    #[arg(long, default_value_t = 9)]
    pub agents: usize,
    /// The upstream's quota: requests per minute, shared by every agent.
    #[arg(long, default_value_t = 120)]
    pub quota: u32,
    /// Total demand as a multiple of the quota (above 1 the upstream is oversubscribed).
    #[arg(long, default_value_t = 1.2)]
    pub demand: f64,
    /// Simulated minutes [default: 30, or the scenario's].
    #[arg(long)]
    pub minutes: Option<u32>,
    /// Random seed for arrivals and jitter [default: 7, or the scenario's].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also draw the four variants into FILE, PNG or SVG by its extension:
    /// successes, 429s and quota remaining over time, and each tier's wait.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print the results as one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// `memory` (the embedded engine, simulated time), or `redis://host:port`:
    /// the governed and coordinated variants with their agents in
    /// `--processes` OS processes sharing that Redis, in real time.
    #[arg(long, default_value = "memory")]
    pub backend: String,
    /// With `--backend redis://…`: how many OS processes run the agents.
    #[arg(long, default_value_t = 2)]
    pub processes: usize,
    /// With `--backend redis://…`: simulated time runs this many times faster
    /// than real time (20: a one-minute window lasts 3 s).
    #[arg(long, default_value_t = 20.0)]
    pub time_scale: f64,
}

#[derive(Clone, Copy)]
struct Task {
    arrival: Micros,
}

struct Agent {
    priority: Priority,
    /// Upstream indices each task calls, in order.
    route: Vec<usize>,
    tokens: u64,
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
    /// Per agent: tasks completed.
    completed: Vec<usize>,
    /// Every upstream together.
    upstream: UpstreamStats,
    /// Each upstream.
    upstreams: Vec<UpstreamStats>,
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

/// The scenario of the flags: one GitHub-like upstream, `agents` agents in
/// the default tier mix, `demand` × the quota spread evenly over them.
fn default_scenario(args: &Args) -> Scenario {
    let minutes = args.minutes.unwrap_or(30);
    let total = f64::from(args.quota) * f64::from(minutes) * args.demand;
    let per_agent = total / args.agents as f64;
    Scenario {
        name: None,
        minutes,
        seed: args.seed.unwrap_or(7),
        upstreams: vec![UpstreamSpec {
            name: "upstream".into(),
            style: Style::Github,
            requests: args.quota,
            tokens: None,
            window: MINUTE_US,
            secondary: Some(Secondary {
                after: 10,
                lockout: MINUTE_US,
            }),
        }],
        agents: tiers(args.agents)
            .into_iter()
            .enumerate()
            .map(|(i, priority)| AgentSpec {
                name: format!("agent-{i}"),
                priority,
                route: vec![0],
                workflow: None,
                tasks: per_agent,
                tokens_per_call: 0,
                burst: None,
            })
            .collect(),
        workflows: Vec::new(),
    }
}

fn workload(sc: &Scenario, start: Micros) -> Vec<Agent> {
    let mut rng = fastrand::Rng::with_seed(sc.seed);
    let span = i64::from(sc.minutes) * MINUTE_US;
    sc.agents
        .iter()
        .map(|a| {
            // Poisson arrivals at a constant rate over the run.
            let mean_gap = span as f64 / a.tasks.max(1.0);
            let mut t = 0.0;
            let mut tasks = Vec::new();
            if a.tasks > 0.0 {
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
            }
            if let Some(b) = a.burst {
                let mut at = b.every;
                while at < span {
                    tasks.extend((0..b.tasks).map(|_| Task {
                        arrival: start + at,
                    }));
                    at += b.every;
                }
                tasks.sort_by_key(|t| t.arrival);
            }
            Agent {
                priority: a.priority,
                route: a.route.clone(),
                tokens: a.tokens_per_call,
                tasks,
            }
        })
        .collect()
}

/// `per:` of a window: `minute` for a minute, else seconds or milliseconds.
fn per(window: Micros) -> String {
    if window == MINUTE_US {
        "minute".into()
    } else if window % SECOND_US == 0 {
        format!("{}s", window / SECOND_US)
    } else {
        format!("{}ms", window / 1000)
    }
}

/// The governed variant's policy: each upstream a resource whose limits mirror its quotas.
fn policy(sc: &Scenario) -> ratewarden::Result<Policy> {
    let resources: serde_json::Map<String, serde_json::Value> = sc
        .upstreams
        .iter()
        .map(|u| {
            let mut limits = vec![serde_json::json!({
                "name": if sc.name.is_none() { "upstream-quota".to_owned() } else { format!("{}-requests", u.name) },
                "kind": "quota", "limit": u.requests, "per": per(u.window)
            })];
            if let Some(t) = u.tokens {
                limits.push(serde_json::json!({
                    "name": format!("{}-tokens", u.name),
                    "kind": "quota", "unit": "tokens", "limit": t, "per": per(u.window)
                }));
            }
            (u.name.clone(), serde_json::json!({"limits": limits}))
        })
        .collect();
    Policy::from_value(&serde_json::json!({"scopes": {"agent": {}}, "resources": resources}))
}

/// The coordinated variant's policy: each upstream a resource with `upstream: {}`, no limits.
fn coordinated_policy(sc: &Scenario) -> ratewarden::Result<Policy> {
    let resources: serde_json::Map<String, serde_json::Value> = sc
        .upstreams
        .iter()
        .map(|u| (u.name.clone(), serde_json::json!({"upstream": {}})))
        .collect();
    Policy::from_value(&serde_json::json!({"scopes": {"agent": {}}, "resources": resources}))
}

/// Agent `i`'s request for each upstream of its route.
fn requests(sc: &Scenario, i: usize, agent: &Agent) -> ratewarden::Result<Vec<Request>> {
    let scope = Scope::parse(&format!("agent:{i}"))?;
    Ok(agent
        .route
        .iter()
        .map(|&u| {
            let r = Request::new(scope.clone())
                .resource(sc.upstreams[u].name.as_str())
                .priority(agent.priority);
            if agent.tokens > 0 {
                r.spend("tokens", i64::try_from(agent.tokens).unwrap_or(i64::MAX))
            } else {
                r
            }
        })
        .collect())
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
    upstreams: &[Mutex<Upstream>],
    end: Micros,
) -> Outcome {
    let mut out = Outcome::default();
    for (a, d) in agents.iter().zip(done) {
        let completed = d.lock();
        let t = usize::from(a.priority.rank());
        out.completed.push(completed.len());
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
    for u in upstreams {
        let mut up = u.lock();
        up.sample_until(end - 1);
        out.upstream.add(&up.stats);
        out.upstreams.push(up.stats.clone());
    }
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

/// What every simulated agent shares: the clock, the upstreams and the books.
#[derive(Clone)]
struct World {
    clock: ManualClock,
    upstreams: Arc<Vec<Mutex<Upstream>>>,
    done: Arc<Completions>,
    progress: Arc<AtomicU64>,
}

impl World {
    fn new(sc: &Scenario, agents: usize, start: Micros) -> Self {
        Self {
            clock: ManualClock::new(start),
            upstreams: Arc::new(
                sc.upstreams
                    .iter()
                    .map(|u| Mutex::new(Upstream::new(u.clone(), sc.minutes, start, MINUTE_US)))
                    .collect(),
            ),
            done: Arc::new((0..agents).map(|_| Mutex::new(Vec::new())).collect()),
            progress: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One call to upstream `u` now, spending `tokens`.
    fn call(&self, u: usize, tokens: u64) -> Answer {
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.upstreams[u].lock().call(self.clock.now(), tokens)
    }

    /// One call to upstream `u` now, with the response's rate-limit headers.
    fn call_with_headers(&self, u: usize, tokens: u64) -> (Answer, Vec<(String, String)>) {
        self.progress.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now();
        let mut up = self.upstreams[u].lock();
        let answer = up.call(now, tokens);
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
        Ok(finish_outcome(agents, &self.done, &self.upstreams, end))
    }
}

fn run_naive(
    sc: &Scenario,
    agents: &[Agent],
    start: Micros,
    strategy: Naive,
    end: Micros,
) -> ratewarden::Result<Outcome> {
    let world = World::new(sc, agents.len(), start);
    world.run(agents, end, |i, agent, world| {
        let tasks = agent.tasks.clone();
        let (route, tokens) = (agent.route.clone(), agent.tokens);
        let mut rng = fastrand::Rng::with_seed(sc.seed ^ ((i as u64 + 1) * 0x9E37));
        async move {
            for task in tasks {
                world.clock.sleep_until(task.arrival).await;
                for &u in &route {
                    let mut attempt = 0u32;
                    while let Answer::TooMany { retry_after } = world.call(u, tokens) {
                        let pause = match strategy {
                            Naive::Backoff => rng.i64(0..=(SECOND_US << attempt.min(5))),
                            Naive::RetryAfter => retry_after + rng.i64(0..SECOND_US),
                        };
                        attempt += 1;
                        world.clock.sleep_until(world.clock.now() + pause).await;
                    }
                }
                world.finished(i, task.arrival);
            }
        }
    })
}

fn run_governed(
    sc: &Scenario,
    agents: &[Agent],
    start: Micros,
    end: Micros,
) -> ratewarden::Result<Outcome> {
    let world = World::new(sc, agents.len(), start);
    let warden = Warden::with_clock(policy(sc)?, Arc::new(world.clock.clone()));
    let requests = agents
        .iter()
        .enumerate()
        .map(|(i, a)| requests(sc, i, a))
        .collect::<ratewarden::Result<Vec<_>>>()?;
    world.run(agents, end, |i, agent, world| {
        let tasks = agent.tasks.clone();
        let (route, tokens) = (agent.route.clone(), agent.tokens);
        let warden = warden.clone();
        let requests = requests[i].clone();
        async move {
            for task in tasks {
                world.clock.sleep_until(task.arrival).await;
                for (&u, request) in route.iter().zip(&requests) {
                    loop {
                        world.progress.fetch_add(1, Ordering::Relaxed);
                        let Ok(d) = warden
                            .wait(request, WaitFor::Acquire, Duration::from_secs(60))
                            .await
                        else {
                            return;
                        };
                        if !d.allowed() {
                            continue;
                        }
                        match world.call(u, tokens) {
                            Answer::Ok => break,
                            Answer::TooMany { retry_after } => {
                                world
                                    .clock
                                    .sleep_until(world.clock.now() + retry_after)
                                    .await;
                            }
                        }
                    }
                }
                world.finished(i, task.arrival);
            }
        }
    })
}

fn run_coordinated(
    sc: &Scenario,
    agents: &[Agent],
    start: Micros,
    end: Micros,
) -> ratewarden::Result<Outcome> {
    let world = World::new(sc, agents.len(), start);
    let warden = Warden::with_clock(coordinated_policy(sc)?, Arc::new(world.clock.clone()));
    let bands = ratewarden::retry::RetryBands::default();
    let requests = agents
        .iter()
        .enumerate()
        .map(|(i, a)| requests(sc, i, a))
        .collect::<ratewarden::Result<Vec<_>>>()?;
    let names: Arc<Vec<String>> = Arc::new(sc.upstreams.iter().map(|u| u.name.clone()).collect());
    world.run(agents, end, |i, agent, world| {
        let tasks = agent.tasks.clone();
        let (route, tokens) = (agent.route.clone(), agent.tokens);
        let warden = warden.clone();
        let priority = agent.priority;
        let requests = requests[i].clone();
        let names = Arc::clone(&names);
        let mut rng = fastrand::Rng::with_seed(sc.seed ^ ((i as u64 + 1) * 0x51ED));
        async move {
            for task in tasks {
                world.clock.sleep_until(task.arrival).await;
                for (&u, request) in route.iter().zip(&requests) {
                    let mut attempt = 0u32;
                    loop {
                        world.progress.fetch_add(1, Ordering::Relaxed);
                        let Ok(d) = warden
                            .wait(request, WaitFor::Acquire, Duration::from_secs(60))
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
                        let (answer, headers) = world.call_with_headers(u, tokens);
                        let pairs: Vec<(&str, &str)> = headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        let status = if matches!(answer, Answer::Ok) {
                            200
                        } else {
                            429
                        };
                        let _ = warden.report(&names[u], status, &pairs).await;
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

fn invalid(what: &'static str, message: String) -> ratewarden::Error {
    ratewarden::Error::InvalidArgument { what, message }
}

/// The scenario `args` ask for: the file's, or the flags'.
fn scenario(args: &Args) -> ratewarden::Result<Scenario> {
    let Some(path) = &args.scenario else {
        let minutes = args.minutes.unwrap_or(30);
        if args.agents == 0
            || args.agents > crate::scenario::MAX_AGENTS
            || args.quota == 0
            || minutes == 0
            || minutes > 24 * 60
            || !(args.demand > 0.0 && args.demand <= 100.0)
        {
            return Err(invalid(
                "simulate options",
                "need 1 ≤ agents ≤ 1000, quota ≥ 1, 1 ≤ minutes ≤ 1440, 0 < demand ≤ 100".into(),
            ));
        }
        return Ok(default_scenario(args));
    };
    let mut sc = Scenario::from_file(path).map_err(|m| invalid("scenario", m))?;
    if let Some(m) = args.minutes {
        if !(1..=24 * 60).contains(&m) {
            return Err(invalid("minutes", format!("{m} is not between 1 and 1440")));
        }
        // Rates are per minute: the expected task count scales with the run.
        let scale = f64::from(m) / f64::from(sc.minutes);
        for a in &mut sc.agents {
            a.tasks *= scale;
        }
        sc.minutes = m;
    }
    if let Some(seed) = args.seed {
        sc.seed = seed;
    }
    Ok(sc)
}

/// One variant: its name, results and colour.
type Variant<'a> = (&'static str, &'a Outcome, (u8, u8, u8));

/// Runs the four variants and prints the comparison.
///
/// # Errors
/// Invalid options or scenario, a plot that cannot be drawn, or a failure
/// building a warden.
pub fn run(args: &Args) -> ratewarden::Result<()> {
    if args.backend.starts_with("redis://") || args.backend.starts_with("rediss://") {
        return procs::run(args);
    }
    if args.backend != "memory" {
        return Err(invalid(
            "backend",
            format!(
                "`{}`: not `memory` (the embedded engine) or a `redis://` URL",
                args.backend
            ),
        ));
    }
    let sc = scenario(args)?;
    if let Some(path) = &args.plot {
        // A bad extension is an error before minutes of simulation, not after.
        plot::Format::of(path).map_err(|m| invalid("plot", m))?;
    }
    let start = ratewarden::calendar::days_from_civil(2026, 1, 5) * ratewarden::calendar::DAY_US;
    let agents = workload(&sc, start);
    let tasks: usize = agents.iter().map(|a| a.tasks.len()).sum();
    let end = start + i64::from(sc.minutes) * MINUTE_US;
    let backoff = run_naive(&sc, &agents, start, Naive::Backoff, end)?;
    let retry_after = run_naive(&sc, &agents, start, Naive::RetryAfter, end)?;
    let governed = run_governed(&sc, &agents, start, end)?;
    let coordinated = run_coordinated(&sc, &agents, start, end)?;
    let variants: [Variant<'_>; 4] = [
        ("naive: backoff", &backoff, (214, 39, 40)),
        ("naive: Retry-After", &retry_after, (255, 127, 14)),
        ("governed", &governed, (31, 119, 180)),
        ("coordinated", &coordinated, (44, 160, 44)),
    ];
    if let Some(path) = &args.plot {
        plot::write(path, &figure(&sc, args, &variants)).map_err(|m| invalid("plot", m))?;
    }
    let mix = |p: Priority| sc.agents.iter().filter(|a| a.priority == p).count();
    if args.json {
        let mut out = serde_json::json!({
            "agents": {"critical": mix(Priority::Critical), "standard": mix(Priority::Standard), "background": mix(Priority::Background)},
        });
        if let Some(name) = &sc.name {
            out["scenario"] = name.as_str().into();
        } else {
            out["quota_per_minute"] = args.quota.into();
        }
        out["minutes"] = sc.minutes.into();
        if sc.name.is_none() {
            out["demand"] = args.demand.into();
        }
        out["seed"] = sc.seed.into();
        out["tasks"] = tasks.into();
        out["upstreams"] = sc
            .upstreams
            .iter()
            .map(|u| {
                serde_json::json!({
                    "name": u.name, "style": u.style.as_str(), "quota": u.requests,
                    "window_s": u.window as f64 / 1e6, "tokens": u.tokens,
                    "secondary_limit": u.secondary.map(|s| serde_json::json!({"after": s.after, "lockout_s": s.lockout as f64 / 1e6})),
                })
            })
            .collect();
        out["variants"] = variants
            .iter()
            .map(|(name, o, _)| json_of(name, o, &sc))
            .collect();
        println!("{out:#}");
        return Ok(());
    }
    print!("{}", header(&sc, args, tasks));
    print!("{}", table(&variants, &sc));
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

/// The lines above the table.
fn header(sc: &Scenario, args: &Args, tasks: usize) -> String {
    let mix = |p: Priority| sc.agents.iter().filter(|a| a.priority == p).count();
    let agents = format!(
        "{} agents ({} critical, {} standard, {} background)",
        sc.agents.len(),
        mix(Priority::Critical),
        mix(Priority::Standard),
        mix(Priority::Background)
    );
    let mut s = String::new();
    let Some(name) = &sc.name else {
        let _ = writeln!(
            s,
            "ratewarden simulate: {agents} share an upstream quota of {}/min",
            args.quota
        );
        let _ = writeln!(
            s,
            "{} tasks over {} simulated minutes (demand {:.1}x the quota), seed {}; upstream locks a caller out for 60 s after 10 over-quota calls in a minute\n",
            tasks, sc.minutes, args.demand, sc.seed
        );
        return s;
    };
    let _ = writeln!(s, "ratewarden simulate: scenario {name}: {agents}");
    for u in &sc.upstreams {
        let window = ratewarden::policy::fmt_duration(u.window);
        let _ = write!(s, "  upstream {}: {} requests", u.name, u.requests);
        if let Some(t) = u.tokens {
            let _ = write!(s, " and {t} tokens");
        }
        let _ = write!(s, " per {window}, {}", u.style.describe());
        match u.secondary {
            Some(l) => {
                let _ = writeln!(
                    s,
                    "; locks callers out for {} after {} over-quota calls in a window",
                    ratewarden::policy::fmt_duration(l.lockout),
                    l.after
                );
            }
            None => {
                let _ = writeln!(s, "; no secondary limit");
            }
        }
    }
    for w in &sc.workflows {
        let stages: Vec<String> = w
            .stages
            .iter()
            .map(|(stage, u)| format!("{stage} → {}", sc.upstreams[*u].name))
            .collect();
        let _ = writeln!(s, "  workflow {}: {}", w.name, stages.join(", "));
    }
    let _ = writeln!(
        s,
        "{tasks} tasks over {} simulated minutes, seed {}\n",
        sc.minutes, sc.seed
    );
    s
}

/// Calls the upstreams could have answered 200 over the run (tokens aside).
fn capacity(sc: &Scenario) -> u64 {
    let span = i64::from(sc.minutes) * MINUTE_US;
    sc.upstreams
        .iter()
        .map(|u| {
            u64::from(u.requests) * u64::try_from((span + u.window - 1) / u.window).unwrap_or(0)
        })
        .sum()
}

fn figure<'a>(sc: &Scenario, args: &Args, variants: &[Variant<'a>]) -> plot::Figure<'a> {
    let title = match &sc.name {
        Some(name) => format!("ratewarden simulate: scenario {name}, seed {}", sc.seed),
        None => format!(
            "ratewarden simulate: {} agents share {}/min, demand {:.1}x, seed {}",
            args.agents, args.quota, args.demand, sc.seed
        ),
    };
    plot::Figure {
        title,
        minutes: sc.minutes,
        quota_per_minute: sc.upstreams.iter().map(UpstreamSpec::per_minute).sum(),
        quota_per_window: sc.upstreams.iter().map(|u| u64::from(u.requests)).sum(),
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
    }
}

/// One variant's results as JSON (waits in seconds).
fn json_of(name: &str, o: &Outcome, sc: &Scenario) -> serde_json::Value {
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
    let per_upstream: Vec<serde_json::Value> = sc
        .upstreams
        .iter()
        .zip(&o.upstreams)
        .map(|(u, st)| {
            serde_json::json!({
                "name": u.name,
                "sent": st.sent,
                "succeeded": st.ok,
                "rejected_429": st.rejected,
                "over_quota": st.over_quota,
                "lockout_rejects": st.lockout_rejects,
                "most_in_a_window": st.most_in_a_window,
                "most_tokens_in_a_window": st.most_tokens_in_a_window,
            })
        })
        .collect();
    let workflows: Vec<serde_json::Value> = sc
        .workflows
        .iter()
        .enumerate()
        .map(|(k, w)| {
            let members = sc
                .agents
                .iter()
                .enumerate()
                .filter(|(_, a)| a.workflow == Some(k));
            let completed: usize = members.map(|(i, _)| o.completed[i]).sum();
            serde_json::json!({"name": w.name, "completed": completed})
        })
        .collect();
    serde_json::json!({
        "name": name,
        "sent": o.upstream.sent,
        "succeeded": o.upstream.ok,
        "share_of_capacity": o.upstream.ok as f64 / capacity(sc) as f64,
        "rejected_429": o.upstream.rejected,
        "over_quota": o.upstream.over_quota,
        "lockout_rejects": o.upstream.lockout_rejects,
        "tiers": tiers,
        "upstreams": per_upstream,
        "workflows": workflows,
        "completed_per_agent": sc.agents.iter().zip(&o.completed).map(|(a, n)| (a.name.clone(), serde_json::Value::from(*n))).collect::<serde_json::Map<_, _>>(),
        "ok_per_minute": o.upstream.ok_per_minute,
        "rejected_per_minute": o.upstream.rejected_per_minute,
        "remaining_every_2s": o.upstream.remaining,
    })
}

fn table(columns: &[Variant<'_>], sc: &Scenario) -> String {
    let capacity = capacity(sc);
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&Outcome) -> String| {
        rows.push((
            name.to_owned(),
            columns.iter().map(|(_, o, _)| f(o)).collect(),
        ));
    };
    row("requests sent upstream", &|o| o.upstream.sent.to_string());
    let share = if sc.upstreams.iter().any(|u| u.tokens.is_some()) {
        "succeeded (share of request capacity)"
    } else {
        "succeeded (share of capacity)"
    };
    row(share, &|o| {
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
    if sc.upstreams.len() > 1 {
        for (k, u) in sc.upstreams.iter().enumerate() {
            row(&format!("  429 responses from {}", u.name), &|o| {
                o.upstreams[k].rejected.to_string()
            });
        }
    }
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
    for (k, w) in sc.workflows.iter().enumerate() {
        row(&format!("workflow {} tasks completed", w.name), &|o| {
            sc.agents
                .iter()
                .enumerate()
                .filter(|(_, a)| a.workflow == Some(k))
                .map(|(i, _)| o.completed[i])
                .sum::<usize>()
                .to_string()
        });
    }
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
    for ((name, _, _), w) in columns.iter().zip(&widths) {
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
