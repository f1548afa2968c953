//! `ratewarden serve` under load, over loopback HTTP/1.1 keep-alive
//! connections: reserve latency (p50 / p99) and reserve + commit operations
//! per second at 1, 32 and 64 clients, through our own API (`/rw/v1`) and
//! the Cycles protocol (`/v1/reservations`), on the embedded engine and (with
//! a Redis URL) on Redis. Each variant runs for a bounded time; the two APIs
//! are interleaved within each of `ROUNDS` rounds and the table gives the
//! median round with the spread.
//!
//! `cargo build --release -p ratewarden-cli --bin ratewarden --example serve_load`
//! then `target/release/examples/serve_load [SECONDS] [redis://…]`.
#![allow(clippy::disallowed_methods, clippy::unwrap_used, missing_docs)] // a benchmark times itself

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 3;

const POLICY: &str = "
scopes:
  tenant:
    limits:
      - { name: tenant-usd, kind: budget, unit: usd, limit: \"10000000\", per: month }
units:
  usd: { decimals: 8 }
";

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(policy: &std::path::Path, backend: Option<&str>) -> Server {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("ratewarden");
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--policy"])
        .arg(policy)
        .args(["--listen", "127.0.0.1:0"])
        .args(
            std::env::var("SERVE_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(url) = backend {
        cmd.args([
            "--backend",
            url,
            "--namespace",
            &format!("load{}", std::process::id()),
        ]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .trim_start_matches("listening on http://")
        .to_owned();
    Server(child, addr)
}

/// One keep-alive connection.
struct Conn {
    out: TcpStream,
    input: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: &str) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        Self {
            out: s.try_clone().unwrap(),
            input: BufReader::new(s),
        }
    }

    /// POSTs `body` to `path`; the response body.
    fn post(&mut self, path: &str, body: &str) -> String {
        // One write: a request in several segments would measure the client.
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.out.write_all(request.as_bytes()).unwrap();
        let mut len = 0;
        let mut line = String::new();
        loop {
            line.clear();
            self.input.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut buf = vec![0; len];
        self.input.read_exact(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }
}

#[derive(Clone, Copy)]
enum Api {
    Own,
    Cycles,
}

impl Api {
    const fn name(self) -> &'static str {
        match self {
            Self::Own => "/rw/v1",
            Self::Cycles => "Cycles",
        }
    }

    /// One reserve + commit by client `i` (its `n`-th); the reserve's latency.
    fn pair(self, c: &mut Conn, i: usize, n: u64) -> Duration {
        let start = Instant::now();
        let (r, id_field) = match self {
            Self::Own => (
                c.post(
                    "/rw/v1/reserve",
                    &format!(r#"{{"scope": "tenant:t{i}", "cost": {{"usd": "0.01"}}}}"#),
                ),
                "\"id\":\"",
            ),
            Self::Cycles => (
                c.post(
                    "/v1/reservations",
                    &format!(
                        r#"{{"idempotency_key": "{i}-{n}", "subject": {{"tenant": "t{i}"}}, "action": {{"kind": "llm.completion", "name": "m"}}, "estimate": {{"unit": "USD_MICROCENTS", "amount": 1000000}}}}"#
                    ),
                ),
                "\"reservation_id\":\"",
            ),
        };
        let took = start.elapsed();
        let id = r
            .split(id_field)
            .nth(1)
            .unwrap_or_else(|| panic!("no reservation in {r}"))
            .split('"')
            .next()
            .unwrap();
        match self {
            Self::Own => c.post(&format!("/rw/v1/reservations/{id}/commit"), "{}"),
            Self::Cycles => c.post(
                &format!("/v1/reservations/{id}/commit"),
                &format!(
                    r#"{{"idempotency_key": "{i}-{n}-c", "actual": {{"unit": "USD_MICROCENTS", "amount": 600000}}}}"#
                ),
            ),
        };
        took
    }
}

/// `clients` connections reserving and committing for `secs` (every
/// reservation ends: live holds would pile up on the tenant's budget and
/// slow every later decision): reserve + commit pairs per second and the
/// reserve latencies.
fn run(addr: &str, api: Api, round: usize, clients: usize, secs: f64) -> (f64, Vec<Duration>) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let results: Vec<(u64, Vec<Duration>)> = std::thread::scope(|t| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                t.spawn(move || {
                    let mut c = Conn::open(addr);
                    let (mut ops, mut lat) = (0_u64, Vec::new());
                    while Instant::now() < until {
                        // Keys unique across rounds and client counts.
                        let n = (round as u64) << 40 | (clients as u64) << 32 | ops;
                        lat.push(api.pair(&mut c, i, n));
                        ops += 1;
                    }
                    (ops, lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ops: u64 = results.iter().map(|r| r.0).sum();
    #[allow(clippy::cast_precision_loss)]
    let rate = ops as f64 / secs;
    (rate, results.into_iter().flat_map(|r| r.1).collect())
}

/// CPU time the server process has used so far (user + system), from
/// `/proc` (clock ticks of 10 ms); zero where there is no `/proc`.
fn cpu(server: &Server) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.0.id())).unwrap_or_default();
    // Fields after the command (which may hold spaces) end with `)`.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after `)`.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).map_or(2.0, |s| s.parse().unwrap());
    let redis = args.get(2).cloned();
    let dir = std::env::temp_dir().join(format!("rw-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut backends = vec![("embedded", None)];
    if let Some(url) = redis.as_deref() {
        backends.push(("redis", Some(url)));
    }
    println!(
        "| backend | API | clients | reserve p50 | reserve p99 | reserve+commit ops/s (median, spread of {ROUNDS}) | server CPU per pair |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, backend) in backends {
        let server = serve(&policy, backend);
        for clients in [1, 32, 64] {
            let apis = [Api::Own, Api::Cycles];
            #[allow(clippy::type_complexity)]
            let mut seen: Vec<(Vec<Duration>, Vec<Duration>, Vec<f64>, Vec<f64>)> =
                vec![(Vec::new(), Vec::new(), Vec::new(), Vec::new()); apis.len()];
            for round in 0..ROUNDS {
                for (k, api) in apis.iter().enumerate() {
                    let before = cpu(&server);
                    let (rate, mut lat) = run(&server.1, *api, round, clients, secs);
                    let used = cpu(&server).saturating_sub(before);
                    lat.sort();
                    seen[k].0.push(percentile(&lat, 0.5));
                    seen[k].1.push(percentile(&lat, 0.99));
                    seen[k].2.push(rate);
                    #[allow(clippy::cast_precision_loss)]
                    seen[k]
                        .3
                        .push(used.as_secs_f64() * 1e6 / (rate * secs).max(1.0));
                }
            }
            for (api, (mut p50, mut p99, mut rates, mut cpus)) in apis.iter().zip(seen) {
                p50.sort();
                p99.sort();
                rates.sort_by(f64::total_cmp);
                cpus.sort_by(f64::total_cmp);
                println!(
                    "| {name} | {} | {clients} | {:.0} µs | {:.0} µs | {:.0} ({:.0}–{:.0}) | {:.0} µs |",
                    api.name(),
                    p50[ROUNDS / 2].as_secs_f64() * 1e6,
                    p99[ROUNDS / 2].as_secs_f64() * 1e6,
                    rates[ROUNDS / 2],
                    rates[0],
                    rates[ROUNDS - 1],
                    cpus[ROUNDS / 2],
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
