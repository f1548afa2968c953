//! `simulate --backend redis://…`: the governed and coordinated variants with
//! their agents spread over several OS processes (this binary's hidden
//! `simulate-agents` subcommand) sharing one Redis. Simulated time cannot be
//! shared between processes, so these runs are in real time, every duration
//! of the scenario divided by `--time-scale` (20: a one-minute window lasts
//! 3 s). The upstream is one place every process calls: a tiny HTTP server on
//! 127.0.0.1 in the parent, answering 200 or 429 with the scenario's header
//! style.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::calendar::MINUTE_US;
use ratewarden::clock::Micros;
use ratewarden::{Clock, SystemClock, WaitFor, Warden};

use super::upstream::{Answer, Upstream};
use super::{
    Args, Mutex, Outcome, Variant, coordinated_policy, finish_outcome, invalid, policy, requests,
    scenario, table, workload,
};
use crate::scenario::Scenario;

/// Options of the hidden `simulate-agents` subcommand: some agents of one variant.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The parent's options (scenario, flags, backend, time scale).
    #[command(flatten)]
    pub sim: Args,
    /// The simulated upstream, `host:port`.
    #[arg(long)]
    pub upstream: String,
    /// `governed` or `coordinated`.
    #[arg(long)]
    pub variant: String,
    /// Key namespace of this variant's run.
    #[arg(long)]
    pub namespace: String,
    /// When the run starts, µs since the epoch.
    #[arg(long)]
    pub start_us: i64,
    /// The agents (indices) this process runs, comma-separated.
    #[arg(long)]
    pub only: String,
}

/// The scenario with every duration divided by `scale`.
fn scaled(sc: &Scenario, scale: f64) -> ratewarden::Result<Scenario> {
    let mut s = sc.clone();
    #[allow(clippy::cast_possible_truncation)]
    let div = |us: Micros| (us as f64 / scale).round() as Micros;
    for u in &mut s.upstreams {
        u.window = div(u.window);
        if u.window < 1_000_000 {
            return Err(invalid(
                "time-scale",
                format!(
                    "upstream `{}`'s window would last {} ms in real time; windows need at least 1 s (use a smaller --time-scale)",
                    u.name,
                    u.window / 1000
                ),
            ));
        }
        if let Some(l) = &mut u.secondary {
            l.lockout = div(l.lockout);
        }
    }
    for a in &mut s.agents {
        if let Some(b) = &mut a.burst {
            b.every = div(b.every);
        }
    }
    Ok(s)
}

/// The run's real length and its agents' tasks on the real clock.
fn real_workload(sc: &Scenario, scale: f64, start: Micros) -> (Micros, Vec<super::Agent>) {
    #[allow(clippy::cast_possible_truncation)]
    let div = |us: Micros| (us as f64 / scale).round() as Micros;
    let mut agents = workload(sc, 0);
    for a in &mut agents {
        for t in &mut a.tasks {
            t.arrival = start + div(t.arrival);
        }
    }
    (div(i64::from(sc.minutes) * MINUTE_US), agents)
}

/// The upstream server: one thread answering one connection at a time.
struct Server {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `upstreams` until dropped; calls at or after `end` (stragglers
    /// of a finished run) are answered 503 and not counted.
    fn start(upstreams: Arc<Vec<Mutex<Upstream>>>, end: Micros) -> ratewarden::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| invalid("upstream", format!("cannot listen on 127.0.0.1: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| invalid("upstream", format!("no local address: {e}")))?
            .to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, &upstreams, end);
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers `GET /call?u=INDEX&tokens=N`.
fn serve(conn: TcpStream, upstreams: &[Mutex<Upstream>], end: Micros) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let query = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.strip_prefix("/call?"))
        .unwrap_or("");
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let mut out = conn;
    let Some(up) = param("u")
        .and_then(|u| usize::try_from(u).ok())
        .and_then(|u| upstreams.get(u))
    else {
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
    };
    let now = SystemClock.now();
    if now >= end {
        return out.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
    }
    let (answer, headers) = {
        let mut up = up.lock();
        let a = up.call(now, param("tokens").unwrap_or(0));
        let h = up.headers(now, &a);
        (a, h)
    };
    let mut resp = match answer {
        Answer::Ok => "HTTP/1.1 200 OK\r\n".to_owned(),
        Answer::TooMany { .. } => "HTTP/1.1 429 Too Many Requests\r\n".to_owned(),
    };
    for (k, v) in headers {
        resp.push_str(&format!("{k}: {v}\r\n"));
    }
    resp.push_str("content-length: 0\r\nconnection: close\r\n\r\n");
    out.write_all(resp.as_bytes())
}

/// One call to the upstream server: status and headers.
fn call(addr: &str, u: usize, tokens: u64) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /call?u={u}&tokens={tokens} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

/// Runs the hidden `simulate-agents` subcommand: prints one JSON line,
/// `{"done": [[agent, arrival_us, completed_us], …]}`.
///
/// # Errors
/// Bad options or an unreachable backend.
pub fn run_agents(args: &AgentArgs) -> ratewarden::Result<()> {
    let sc = scaled(&scenario(&args.sim)?, args.sim.time_scale)?;
    let (span, agents) = real_workload(&scenario(&args.sim)?, args.sim.time_scale, args.start_us);
    let only: Vec<usize> = args
        .only
        .split(',')
        .filter_map(|i| i.trim().parse().ok())
        .filter(|i| *i < agents.len())
        .collect();
    let coordinated = match args.variant.as_str() {
        "governed" => false,
        "coordinated" => true,
        other => {
            return Err(invalid(
                "variant",
                format!("`{other}` is not governed or coordinated"),
            ));
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ratewarden::Error::Backend {
            message: format!("cannot start a runtime: {e}"),
        })?;
    let done = rt.block_on(async {
        let backend = RedisBackend::connect(&args.sim.backend, &args.namespace).await?;
        let p = if coordinated {
            coordinated_policy(&sc)?
        } else {
            policy(&sc)?
        };
        let warden = Warden::with_backend(
            p,
            Arc::new(backend) as Arc<dyn Backend>,
            Arc::new(SystemClock),
        );
        let bands = ratewarden::retry::RetryBands::default();
        let names: Arc<Vec<String>> =
            Arc::new(sc.upstreams.iter().map(|u| u.name.clone()).collect());
        let done = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for &i in &only {
            let agent = &agents[i];
            let requests = requests(&sc, i, agent)?;
            let (tasks, route, tokens, priority) = (
                agent.tasks.clone(),
                agent.route.clone(),
                agent.tokens,
                agent.priority,
            );
            let (warden, names, done, addr) = (
                warden.clone(),
                Arc::clone(&names),
                Arc::clone(&done),
                args.upstream.clone(),
            );
            let mut rng = fastrand::Rng::with_seed(sc.seed ^ ((i as u64 + 1) * 0x51ED));
            handles.push(tokio::spawn(async move {
                for task in tasks {
                    SystemClock.sleep_until(task.arrival).await;
                    for (&u, request) in route.iter().zip(&requests) {
                        let mut attempt = 0u32;
                        loop {
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
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let addr = addr.clone();
                            let Ok(Ok((status, headers))) =
                                tokio::task::spawn_blocking(move || call(&addr, u, tokens)).await
                            else {
                                return;
                            };
                            if coordinated {
                                let pairs: Vec<(&str, &str)> = headers
                                    .iter()
                                    .map(|(k, v)| (k.as_str(), v.as_str()))
                                    .collect();
                                let _ = warden.report(&names[u], status, &pairs).await;
                            }
                            if status == 200 {
                                break;
                            }
                            attempt += 1;
                            let retry = headers
                                .iter()
                                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                                .and_then(|(_, v)| v.parse::<u64>().ok())
                                .map(Duration::from_secs);
                            let wait = if coordinated {
                                bands.delay_with(attempt, priority, retry, rng.f64())
                            } else {
                                retry.unwrap_or(Duration::from_secs(1))
                            };
                            tokio::time::sleep(wait).await;
                        }
                    }
                    done.lock().push((i, task.arrival, SystemClock.now()));
                }
            }));
        }
        let end = args.start_us + span;
        SystemClock.sleep_until(end).await;
        for h in &handles {
            h.abort();
        }
        let list = done.lock().clone();
        Ok::<_, ratewarden::Error>(list)
    })?;
    let json: Vec<serde_json::Value> = done
        .iter()
        .map(|(i, a, c)| serde_json::json!([i, a, c]))
        .collect();
    println!("{}", serde_json::json!({ "done": json }));
    Ok(())
}

/// The child's command line: the parent's options, plus its part.
fn child(
    args: &Args,
    variant: &str,
    namespace: &str,
    addr: &str,
    start: Micros,
    only: &[usize],
) -> ratewarden::Result<Command> {
    let exe = std::env::current_exe()
        .map_err(|e| invalid("simulate", format!("cannot find this program: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("simulate-agents")
        .args(["--backend", &args.backend])
        .args(["--time-scale", &args.time_scale.to_string()])
        .args([
            "--upstream",
            addr,
            "--variant",
            variant,
            "--namespace",
            namespace,
        ])
        .arg(format!("--start-us={start}"))
        .arg(format!(
            "--only={}",
            only.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ));
    if let Some(s) = &args.scenario {
        cmd.arg("--scenario").arg(s);
    } else {
        cmd.args(["--agents", &args.agents.to_string()])
            .args(["--quota", &args.quota.to_string()])
            .args(["--demand", &args.demand.to_string()]);
    }
    if let Some(m) = args.minutes {
        cmd.args(["--minutes", &m.to_string()]);
    }
    if let Some(s) = args.seed {
        cmd.args(["--seed", &s.to_string()]);
    }
    Ok(cmd)
}

/// Runs the governed and coordinated variants over `--processes` OS
/// processes on the Redis backend, and prints the table.
///
/// # Errors
/// Bad options, a child that fails, or output that cannot be read.
pub fn run(args: &Args) -> ratewarden::Result<()> {
    if args.plot.is_some() || args.json {
        return Err(invalid(
            "backend",
            "--plot and --json are for the embedded simulation; with --backend redis:// the table only".into(),
        ));
    }
    if !(args.time_scale >= 1.0 && args.time_scale <= 600.0)
        || args.processes == 0
        || args.processes > 32
    {
        return Err(invalid(
            "simulate options",
            "need 1 ≤ --time-scale ≤ 600 and 1 ≤ --processes ≤ 32".into(),
        ));
    }
    let sc = scenario(args)?;
    let real = scaled(&sc, args.time_scale)?;
    #[allow(clippy::cast_possible_truncation)]
    let minute = (MINUTE_US as f64 / args.time_scale).round() as Micros;
    let mut outcomes: Vec<Outcome> = Vec::new();
    for variant in ["governed", "coordinated"] {
        // Children need a moment to start: the run begins at the first window
        // boundary a second from now (so the capacity is whole windows).
        let window = real
            .upstreams
            .iter()
            .map(|u| u.window)
            .max()
            .unwrap_or(1_000_000);
        let start = (SystemClock.now() + 1_000_000).div_euclid(window) * window + window;
        let (span, agents) = real_workload(&sc, args.time_scale, start);
        let upstreams: Arc<Vec<Mutex<Upstream>>> = Arc::new(
            real.upstreams
                .iter()
                .map(|u| Mutex::new(Upstream::new(u.clone(), sc.minutes, start, minute)))
                .collect(),
        );
        let server = Server::start(Arc::clone(&upstreams), start + span)?;
        let namespace = format!("rwsim-{}-{variant}-{start}", std::process::id());
        let mut children = Vec::new();
        for p in 0..args.processes {
            let only: Vec<usize> = (0..agents.len())
                .filter(|i| i % args.processes == p)
                .collect();
            if only.is_empty() {
                continue;
            }
            let mut cmd = child(args, variant, &namespace, &server.addr, start, &only)?;
            let c = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| invalid("simulate", format!("cannot start a process: {e}")))?;
            children.push(c);
        }
        let done: Vec<Mutex<Vec<(Micros, Micros)>>> =
            (0..agents.len()).map(|_| Mutex::new(Vec::new())).collect();
        // Every child ends by itself at the run's end: wait for all before judging any.
        let outputs: Vec<_> = children
            .into_iter()
            .map(std::process::Child::wait_with_output)
            .collect();
        for out in outputs {
            let out = out.map_err(|e| invalid("simulate", format!("a process failed: {e}")))?;
            if !out.status.success() {
                return Err(invalid(
                    "simulate",
                    format!(
                        "an agent process failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
                invalid(
                    "simulate",
                    format!("an agent process printed no result: {e}"),
                )
            })?;
            for row in v["done"].as_array().into_iter().flatten() {
                let (Some(i), Some(a), Some(at)) =
                    (row[0].as_u64(), row[1].as_i64(), row[2].as_i64())
                else {
                    continue;
                };
                if let Some(d) = usize::try_from(i).ok().and_then(|i| done.get(i)) {
                    d.lock().push((a, at));
                }
            }
        }
        drop(server);
        for d in &done {
            d.lock().sort_unstable();
        }
        outcomes.push(finish_outcome(&agents, &done, &upstreams, start + span));
    }
    let tasks: usize = real_workload(&sc, args.time_scale, 0)
        .1
        .iter()
        .map(|a| a.tasks.len())
        .sum();
    println!(
        "ratewarden simulate on {}: {} agents in {} processes, real time scaled 1:{} ({} simulated minutes in {:.0} s per variant)",
        args.backend,
        sc.agents.len(),
        args.processes.min(sc.agents.len()),
        args.time_scale,
        sc.minutes,
        f64::from(sc.minutes) * 60.0 / args.time_scale
    );
    for u in &real.upstreams {
        let tokens = u
            .tokens
            .map(|t| format!(" and {t} tokens"))
            .unwrap_or_default();
        println!(
            "  upstream {}: {} requests{tokens} per {} real time, {}",
            u.name,
            u.requests,
            ratewarden::policy::fmt_duration(u.window),
            u.style.describe(),
        );
    }
    println!("{tasks} tasks; waits below in real seconds\n");
    let variants: [Variant<'_>; 2] = [
        ("governed", &outcomes[0], (31, 119, 180)),
        ("coordinated", &outcomes[1], (44, 160, 44)),
    ];
    print!("{}", table(&variants, &sc));
    for (name, o, _) in &variants {
        println!(
            "{name}: most successes in one upstream window {}",
            o.upstreams
                .iter()
                .map(|u| u.most_in_a_window)
                .max()
                .unwrap_or(0)
        );
    }
    Ok(())
}
