//! `ratewarden serve` under load, over loopback HTTP/1.1 keep-alive
//! connections: reserve latency (p50 / p99) and reserve + commit operations
//! per second at 1, 32 and 64 clients, on the embedded engine and (with a
//! Redis URL) on Redis. Each variant runs for a bounded time; the variants are
//! interleaved over `ROUNDS` rounds and the table gives the median round with
//! the spread.
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
      - { name: tenant-usd, kind: budget, unit: usd, limit: \"1000000000\", per: month }
units:
  usd: { decimals: 6 }
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

/// `clients` connections reserving and committing for `secs` (every
/// reservation ends: live holds would pile up on the tenant's budget and
/// slow every later decision): reserve + commit pairs per second and the
/// reserve latencies.
fn run(addr: &str, clients: usize, secs: f64) -> (f64, Vec<Duration>) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let results: Vec<(u64, Vec<Duration>)> = std::thread::scope(|t| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                t.spawn(move || {
                    let mut c = Conn::open(addr);
                    let body = format!(r#"{{"scope": "tenant:t{i}", "cost": {{"usd": "0.01"}}}}"#);
                    let (mut ops, mut lat) = (0_u64, Vec::new());
                    while Instant::now() < until {
                        let start = Instant::now();
                        let r = c.post("/rw/v1/reserve", &body);
                        lat.push(start.elapsed());
                        let id = r
                            .split("\"id\":\"")
                            .nth(1)
                            .unwrap()
                            .split('"')
                            .next()
                            .unwrap();
                        c.post(&format!("/rw/v1/reservations/{id}/commit"), "{}");
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
        "| backend | clients | reserve p50 | reserve p99 | reserve+commit ops/s (median, spread of {ROUNDS}) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (name, backend) in backends {
        let server = serve(&policy, backend);
        for clients in [1, 32, 64] {
            let (mut p50, mut p99, mut rates) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let (rate, mut lat) = run(&server.1, clients, secs);
                lat.sort();
                p50.push(percentile(&lat, 0.5));
                p99.push(percentile(&lat, 0.99));
                rates.push(rate);
            }
            p50.sort();
            p99.sort();
            rates.sort_by(f64::total_cmp);
            println!(
                "| {name} | {clients} | {:.0} µs | {:.0} µs | {:.0} ({:.0}–{:.0}) |",
                p50[ROUNDS / 2].as_secs_f64() * 1e6,
                p99[ROUNDS / 2].as_secs_f64() * 1e6,
                rates[ROUNDS / 2],
                rates[0],
                rates[ROUNDS - 1],
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
