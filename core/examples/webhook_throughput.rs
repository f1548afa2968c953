//! Webhook delivery throughput, and decisions beside a slow receiver
//! (bench/README.md):
//!
//! ```bash
//! cargo run --release -p ratewarden --example webhook_throughput -- 3000
//! ```
//!
//! A receiver on a loopback port answers `204` to each signed POST. First
//! `N` exhaustion events (one per tenant, a decision each) are delivered in
//! rounds of 500 (under the event buffer), timed from the first decision to
//! the last delivery: deliveries per second. Then 200 000 decisions — each
//! exhausting a tenant's budget, so each emits an event — run with a
//! receiver answering at once, with one taking 200 ms per message
//! (interleaved), and with no webhook (no event is built): decisions per
//! second of each; with the slow receiver they must go on at the same pace
//! while deliveries fall behind.

#![allow(clippy::disallowed_methods)] // a benchmark times itself with Instant

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ratewarden::{Policy, Request, Warden};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves 204s; `delay` before each answer. Returns its port.
async fn receiver(got: Arc<AtomicU64>, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let got = Arc::clone(&got);
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(2048);
                let mut chunk = [0u8; 2048];
                // Headers, then the body by its length.
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                got.fetch_add(1, Ordering::Relaxed);
                let _ = s
                    .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    port
}

fn policy(port: Option<u16>) -> Policy {
    let mut doc = json!({"scopes": {"tenant": {"limits": [
        {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month",
         "thresholds": ["100%"]}
    ]}}});
    if let Some(port) = port {
        doc["webhooks"] = json!([{
            "url": format!("http://127.0.0.1:{port}/hooks"),
            "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "events": ["limit.exhausted"],
            "max_attempts": 1
        }]);
    }
    Policy::from_value(&doc).expect("policy")
}

fn exhaust(w: &Warden, tenant: u64) -> bool {
    let req = Request::parse(&format!("tenant:t{tenant}"))
        .expect("scope")
        .spend("usd", 10);
    ratewarden::backend::at_once(w.acquire(&req))
        .expect("decision")
        .allowed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);

    // Throughput: N deliveries, in rounds under the event buffer.
    let got = Arc::new(AtomicU64::new(0));
    let port = receiver(Arc::clone(&got), Duration::ZERO).await;
    let w = Warden::new(policy(Some(port)));
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let round = (n - sent).min(500);
        for t in sent..sent + round {
            assert!(exhaust(&w, t));
        }
        sent += round;
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.load(Ordering::Relaxed) < sent {
            assert!(
                Instant::now() < deadline,
                "{} of {sent} delivered; log: dropped {}",
                got.load(Ordering::Relaxed),
                w.webhook_log().dropped
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = n as f64 / secs;
    println!("webhook deliveries: {n} in {secs:.3} s = {rate:.0}/s (one connection each)");

    // Decisions beside a receiver taking 200 ms per message, vs none.
    let decisions = 200_000u64;
    let slow = Arc::new(AtomicU64::new(0));
    let slow_port = receiver(Arc::clone(&slow), Duration::from_millis(200)).await;
    for (name, w) in [
        ("fast receiver", Warden::new(policy(Some(port)))),
        ("slow receiver", Warden::new(policy(Some(slow_port)))),
        ("fast receiver", Warden::new(policy(Some(port)))),
        ("slow receiver", Warden::new(policy(Some(slow_port)))),
        ("no webhook", Warden::new(policy(None))),
    ] {
        let start = Instant::now();
        let mut allowed = 0u64;
        for t in 0..decisions {
            allowed += u64::from(exhaust(&w, t));
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(allowed, decisions, "decisions continue");
        #[allow(clippy::cast_precision_loss)]
        let per = decisions as f64 / secs;
        let log = w.webhook_log();
        println!(
            "{name}: {decisions} decisions in {secs:.3} s = {per:.0}/s; deliveries so far {}, events dropped {}",
            log.deliveries.len(),
            log.dropped
        );
    }
}
