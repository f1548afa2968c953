//! Redis backend throughput and latency through the Rust API, side by side with
//! `redis-benchmark` replaying the very same `EVALSHA` (same script, keys and
//! arguments) at the same concurrency: the physical limit of one server. Also
//! counts script calls per decision with `INFO commandstats`.
//!
//! cargo bench -p ratewarden --bench redis      (needs redis-server, redis-benchmark)
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::plan::Plan;
use ratewarden::{Amount, Policy, Request, SystemClock, Warden};
use serde_json::json;

const RUN: Duration = Duration::from_secs(3);

fn harness(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/redis_harness.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn cli(port: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", port])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn evalsha_calls(port: &str) -> u64 {
    let stats = cli(port, &["INFO", "commandstats"]);
    stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Row {
    ops_s: f64,
    p50_us: f64,
    p99_us: f64,
    scripts_per_decision: f64,
}

async fn ours(w: &Warden, req: &Request, callers: usize, port: &str) -> Row {
    let before = evalsha_calls(port);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (w, req) = (w.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            while start.elapsed() < RUN {
                let t = Instant::now();
                let d = w.acquire(&req).await.expect("acquire");
                assert!(d.allowed());
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    let calls = evalsha_calls(port) - before;
    Row {
        ops_s: lat.len() as f64 / secs,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        scripts_per_decision: calls as f64 / lat.len() as f64,
    }
}

fn redis_benchmark(port: &str, callers: usize, command: &[String], expect_ops_s: f64) -> f64 {
    let n = ((expect_ops_s * RUN.as_secs_f64()) as u64).max(5_000);
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            port,
            "-c",
            &callers.to_string(),
            "-n",
            &n.to_string(),
            "--csv",
        ])
        .args(command)
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps",...  then  "EVALSHA ...","12345.67",...
    text.lines()
        .nth(1)
        .and_then(|l| l.split("\",\"").nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or(0.0)
}

fn main() {
    if Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("redis-benchmark not found: install redis-tools");
        return;
    }
    let info: serde_json::Value = serde_json::from_str(&harness(&["start"])).unwrap();
    let url = info["url"].as_str().unwrap().to_owned();
    let port = url.rsplit(':').next().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let scenarios = [
        (
            "1 limit",
            json!({"scopes": {"user": {"limits": [{"name": "r", "kind": "rate", "limit": 1_000_000_000u64, "per": "1s"}]}}}),
            Request::parse("user:42").unwrap(),
        ),
        (
            "6 limits",
            json!({
                "scopes": {
                    "tenant": {"limits": [
                        {"name": "t-usd", "kind": "budget", "unit": "usd", "limit": "1000000000", "per": "month"},
                        {"name": "t-rps", "kind": "rate", "limit": 1_000_000_000u64, "per": "1s"}]},
                    "user": {"limits": [{"name": "u-rpm", "kind": "rate", "limit": 1_000_000_000u64, "per": "1m"}]},
                    "run": {"limits": [{"name": "r-usd", "kind": "budget", "unit": "usd", "limit": "1000000000"}]}
                },
                "resources": {"openai": {"limits": [{"name": "tpm", "kind": "rate", "unit": "tokens", "limit": 1_000_000_000_000u64, "per": "1m"}]}},
                "actions": {"llm.completion": {"limits": [{"name": "calls", "kind": "quota", "limit": 1_000_000_000u64, "per": "day", "scope": "tenant"}]}}
            }),
            Request::parse("tenant:t1/user:42/run:r9")
                .unwrap()
                .resource("openai")
                .action("llm.completion")
                .spend("tokens", 800)
                .spend("usd", Amount::parse("0.0125").unwrap()),
        ),
    ];
    println!(
        "| request | callers | ratewarden decisions/s | p50 | p99 | redis-benchmark EVALSHA/s | ratio | EVALSHA per decision |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, (name, policy, req)) in scenarios.iter().enumerate() {
        let policy = Policy::from_value(policy).unwrap();
        let backend = rt
            .block_on(RedisBackend::connect(&url, &format!("b{i}")))
            .unwrap();
        let plan = Plan::build(&policy, req).unwrap();
        let command = backend.acquire_command(&plan);
        let w = Warden::with_backend(
            policy.clone(),
            Arc::new(backend) as Arc<dyn Backend>,
            Arc::new(SystemClock),
        );
        rt.block_on(async { w.acquire(req).await.unwrap() }); // loads the script
        for callers in [1usize, 16, 64] {
            let row = rt.block_on(ours(&w, req, callers, &port));
            let raw = redis_benchmark(&port, callers, &command, row.ops_s);
            println!(
                "| {name} | {callers} | {:.0} | {:.0} µs | {:.0} µs | {raw:.0} | {:.0}% | {:.2} |",
                row.ops_s,
                row.p50_us,
                row.p99_us,
                100.0 * row.ops_s / raw.max(1.0),
                row.scripts_per_decision
            );
        }
    }
    harness(&["stop", info["dir"].as_str().unwrap()]);
}
