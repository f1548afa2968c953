//! Redis backend throughput and latency through the Rust API, side by side with
//! `redis-benchmark` replaying the very same `EVALSHA` (same script, keys and
//! arguments) at the same concurrency: the physical limit of one server. Also
//! counts script calls per decision with `INFO commandstats`.
//!
//! Then the same engine on a 3-master Redis Cluster against the standalone
//! server, with requests spread over many tenants (so over every shard).
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

fn evalsha_calls(ports: &[String]) -> u64 {
    ports
        .iter()
        .map(|port| {
            let stats = cli(port, &["INFO", "commandstats"]);
            stats
                .lines()
                .find(|l| l.starts_with("cmdstat_evalsha:"))
                .and_then(|l| l.split("calls=").nth(1))
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

struct Row {
    ops_s: f64,
    p50_us: f64,
    p99_us: f64,
    scripts_per_decision: f64,
}

/// `callers` tasks acquiring for `RUN`; each cycles through `reqs` from its own offset.
async fn ours(w: &Warden, reqs: &[Request], callers: usize, ports: &[String]) -> Row {
    let before = evalsha_calls(ports);
    let start = Instant::now();
    let reqs: Arc<Vec<Request>> = Arc::new(reqs.to_vec());
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (w, reqs) = (w.clone(), Arc::clone(&reqs));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut i = c * 7919;
            while start.elapsed() < RUN {
                let req = &reqs[i % reqs.len()];
                i += 1;
                let t = Instant::now();
                let d = w.acquire(req).await.expect("acquire");
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
    let calls = evalsha_calls(ports) - before;
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
    let info: serde_json::Value = serde_json::from_str(&harness(&["start", "--cluster"])).unwrap();
    let url = info["url"].as_str().unwrap().to_owned();
    let port = url.rsplit(':').next().unwrap().to_owned();
    let cluster_url = info["cluster_url"].as_str().unwrap().to_owned();
    let cluster_ports: Vec<String> = info["cluster"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().rsplit(':').next().unwrap().to_owned())
        .collect();
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
    // Each request with the default operation memory (every admitted decision
    // remembered under an id, so lost replies are safe to resend), then
    // without it (`remember_operations(false)`): its cost, side by side.
    let variants = scenarios
        .iter()
        .flat_map(|s| [(s, true), (s, false)])
        .enumerate();
    for (i, ((name, policy, req), remember)) in variants {
        let name = if remember {
            (*name).to_owned()
        } else {
            format!("{name}, no op memory")
        };
        let policy = Policy::from_value(policy).unwrap();
        let backend = rt
            .block_on(RedisBackend::connect(&url, &format!("b{i}")))
            .unwrap()
            .remember_operations(remember);
        let plan = Plan::build(&policy, req).unwrap();
        let command = backend.acquire_command(&plan);
        let w = Warden::with_backend(
            policy.clone(),
            Arc::new(backend) as Arc<dyn Backend>,
            Arc::new(SystemClock),
        );
        rt.block_on(async { w.acquire(req).await.unwrap() }); // loads the script
        for callers in [1usize, 16, 64] {
            let row = rt.block_on(ours(
                &w,
                std::slice::from_ref(req),
                callers,
                std::slice::from_ref(&port),
            ));
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
    cluster(&rt, &url, &port, &cluster_url, &cluster_ports);
    harness(&["stop", info["dir"].as_str().unwrap()]);
}

/// Standalone against the 3-master cluster: 1 000 tenants, 64 callers; a
/// request on its tenant's own limits (one slot) and one that also takes a
/// shared provider pool (several slots: reserve, then commit).
fn cluster(
    rt: &tokio::runtime::Runtime,
    url: &str,
    port: &str,
    cluster_url: &str,
    cluster_ports: &[String],
) {
    let big = 1_000_000_000_000u64;
    let policy = Policy::from_value(&json!({
        "scopes": {
            "tenant": {"limits": [
                {"name": "t-usd", "kind": "budget", "unit": "usd", "limit": "1000000000", "per": "month"},
                {"name": "t-rps", "kind": "rate", "limit": big, "per": "1s"}]},
            "user": {"limits": [{"name": "u-rpm", "kind": "rate", "limit": big, "per": "1m"}]}
        },
        "resources": {"openai": {"limits": [{"name": "tpm", "kind": "rate", "unit": "tokens", "limit": big, "per": "1m"}]}}
    }))
    .unwrap();
    let tenants = |resource: bool| -> Vec<Request> {
        (0..1000)
            .map(|t| {
                let r = Request::parse(&format!("tenant:t{t}/user:u{}", t % 7))
                    .unwrap()
                    .spend("usd", Amount::parse("0.0125").unwrap());
                if resource {
                    r.resource("openai").spend("tokens", 800)
                } else {
                    r
                }
            })
            .collect()
    };
    let mut shares = Vec::new();
    println!();
    println!(
        "| requests (1 000 tenants, 64 callers) | standalone decisions/s | cluster decisions/s | cluster / standalone | cluster p50 | cluster p99 | EVALSHA per decision (cluster) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, reqs) in [
        ("3 limits on the tenant's slot", tenants(false)),
        ("+ a shared provider pool on another slot", tenants(true)),
    ] {
        let mut rows = Vec::new();
        for (target, ports) in [
            (url, vec![port.to_owned()]),
            (cluster_url, cluster_ports.to_vec()),
        ] {
            let backend = rt.block_on(RedisBackend::connect(target, "cl")).unwrap();
            let w = Warden::with_backend(
                policy.clone(),
                Arc::new(backend) as Arc<dyn Backend>,
                Arc::new(SystemClock),
            );
            rt.block_on(async {
                for r in &reqs {
                    w.acquire(r).await.unwrap(); // scripts loaded on every node
                }
            });
            let per_node: Vec<u64> = ports
                .iter()
                .map(|p| evalsha_calls(std::slice::from_ref(p)))
                .collect();
            rows.push(rt.block_on(ours(&w, &reqs, 64, &ports)));
            if ports.len() > 1 {
                let after: Vec<u64> = ports
                    .iter()
                    .map(|p| evalsha_calls(std::slice::from_ref(p)))
                    .collect();
                let d: Vec<u64> = after.iter().zip(&per_node).map(|(a, b)| a - b).collect();
                let total = d.iter().sum::<u64>().max(1) as f64;
                shares.push(
                    d.iter()
                        .map(|x| format!("{:.0}%", 100.0 * *x as f64 / total))
                        .collect::<Vec<_>>()
                        .join(" / "),
                );
            }
        }
        println!(
            "| {name} | {:.0} | {:.0} | {:.2}× | {:.0} µs | {:.0} µs | {:.2} |",
            rows[0].ops_s,
            rows[1].ops_s,
            rows[1].ops_s / rows[0].ops_s,
            rows[1].p50_us,
            rows[1].p99_us,
            rows[1].scripts_per_decision
        );
    }
    println!();
    println!("EVALSHA calls per cluster master: {}", shares.join("; "));
}
