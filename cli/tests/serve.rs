//! `ratewarden serve` over real HTTP (its own port, a plain HTTP/1.1 client):
//! decisions and settlements as the core makes them with the `RateLimit`
//! headers, bad input refused with a 400 naming it and nothing charged,
//! concurrent clients admitted exactly up to the limit (embedded, Redis,
//! Redis Cluster), and SIGTERM under load losing nothing acknowledged.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use common::{PolicyFile, Redis, bin};
use serde_json::{Value, json};

const POLICY: &str = "
scopes:
  tenant:
    limits:
      - { name: tenant-usd, kind: budget, unit: usd, limit: \"10\", per: month }
      - { name: tenant-daily, kind: quota, limit: 100, per: day }
units:
  usd: { decimals: 6 }
";

/// A `ratewarden serve` process on a free port, stopped on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(policy: &PolicyFile, extra: &[&str]) -> Self {
        let mut child = bin()
            .args(["serve", "--policy"])
            .arg(policy.0.join("policy.yaml"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("first line: {line:?}"))
            .to_owned();
        Self { child, addr }
    }

    /// One request (`Connection: close`): status, headers (lowercase names), body.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Vec<(String, String)>, String) {
        raw(&self.addr, method, path, body, "application/json")
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, text) = self.call(method, path, Some(&body.to_string()));
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status} {text}")),
        )
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    content_type: &str,
) -> (u16, Vec<(String, String)>, String) {
    raw_with(addr, method, path, body, content_type, "")
}

/// [`raw`] with `extra` header lines (each ending in `\r\n`).
fn raw_with(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    content_type: &str,
    extra: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn remaining(v: &Value, limit: &str) -> i64 {
    v["limits"]
        .as_array()
        .or_else(|| v["balances"].as_array())
        .unwrap()
        .iter()
        .find(|l| l["name"] == limit)
        .unwrap_or_else(|| panic!("no {limit} in {v}"))["remaining"]
        .as_i64()
        .unwrap()
}

#[test]
fn decisions_and_settlements_over_http_are_the_cores_with_ratelimit_headers() {
    let policy = PolicyFile::new("serve-api", POLICY);
    let s = Server::start(&policy, &[]);
    let (status, headers, text) = s.call(
        "POST",
        "/rw/v1/acquire",
        Some(r#"{"scope": "tenant:acme", "cost": {"usd": "0.25"}}"#),
    );
    assert_eq!(status, 200, "{text}");
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (d["allowed"].clone(), d["outcome"].clone()),
        (json!(true), json!("allow"))
    );
    assert_eq!(remaining(&d, "tenant-usd"), 9_750_000);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert!(
        header("ratelimit")
            .unwrap()
            .contains("\"tenant-usd\";r=9750000"),
        "{headers:?}"
    );
    assert!(header("ratelimit-policy").is_some());
    assert_eq!(header("x-request-id").unwrap().len(), 32);
    // Reserve, commit less than held: the rest comes back.
    let (status, r) = s.json(
        "POST",
        "/rw/v1/reserve",
        &json!({"scope": "tenant:acme", "cost": {"usd": 2}, "lease_ms": 60000}),
    );
    assert_eq!(status, 200, "{r}");
    let id = r["reservation"]["id"].as_str().unwrap().to_owned();
    assert!(r["reservation"]["expires_at_ms"].as_i64().unwrap() > 0);
    let (status, ext) = s.json(
        "POST",
        &format!("/rw/v1/reservations/{id}/extend"),
        &json!({"lease_ms": 120000}),
    );
    assert_eq!(status, 200, "{ext}");
    let (status, receipt) = s.json(
        "POST",
        &format!("/rw/v1/reservations/{id}/commit"),
        &json!({"actual": {"usd": "0.5"}}),
    );
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(receipt["charges"][0]["charged_text"], "0.5");
    // Committing again is a duplicate: charged once.
    let (_, again) = s.json(
        "POST",
        &format!("/rw/v1/reservations/{id}/commit"),
        &json!({"actual": {"usd": "0.5"}}),
    );
    assert_eq!(again["duplicate"], true);
    // Released: everything back.
    let (_, r2) = s.json(
        "POST",
        "/rw/v1/reserve",
        &json!({"scope": "tenant:acme", "cost": {"usd": 1}}),
    );
    let id2 = r2["reservation"]["id"].as_str().unwrap().to_owned();
    let (status, rel) = s.json(
        "POST",
        &format!("/rw/v1/reservations/{id2}/release"),
        &json!({}),
    );
    assert_eq!((status, rel), (200, json!({"released": true})));
    let (status, _, text) = s.call("GET", "/rw/v1/balances?scope=tenant:acme", None);
    assert_eq!(status, 200, "{text}");
    let b: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(remaining(&b, "tenant-usd"), 10_000_000 - 250_000 - 500_000);
    assert_eq!(
        remaining(&b, "tenant-daily"),
        100 - 2,
        "the released one came back"
    );
    // A denial is an answer (200, allowed: false) with a Retry-After.
    let (status, headers, text) = s.call(
        "POST",
        "/rw/v1/check",
        Some(r#"{"scope": "tenant:acme", "cost": {"usd": 11}}"#),
    );
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (status, d["allowed"].clone()),
        (200, json!(false)),
        "{text}"
    );
    assert!(d["reason"].as_str().unwrap().contains("tenant-usd"), "{d}");
    assert!(headers.iter().any(|(k, _)| k == "ratelimit"));
    // Unknown reservations and endpoints.
    let (status, e) = s.json(
        "POST",
        "/rw/v1/reservations/00000000000000000000000000000001/commit",
        &json!({}),
    );
    assert_eq!(
        (status, e["error"].clone()),
        (404, json!("reservation_not_found")),
        "{e}"
    );
    let (status, _, _) = s.call("GET", "/v2/nothing", None);
    assert_eq!(status, 404);
    // Health, readiness, metrics.
    assert_eq!(s.call("GET", "/healthz", None).0, 200);
    assert_eq!(s.call("GET", "/readyz", None).0, 200);
    let (_, _, metrics) = s.call("GET", "/metrics", None);
    assert!(
        metrics.contains("ratewarden_decisions_total{outcome=\"allow\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ratewarden_decisions_total{outcome=\"deny\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ratewarden_request_seconds_count"),
        "{metrics}"
    );
}

#[test]
fn bad_input_is_a_400_naming_what_and_charges_nothing() {
    let policy = PolicyFile::new("serve-bad", POLICY);
    let s = Server::start(&policy, &["--max-body", "1024"]);
    let cases: Vec<(&str, u16, &str)> = vec![
        ("{not json", 400, "invalid_request"),
        (r#"{"scope": 7}"#, 422, "invalid_request"),
        (
            r#"{"scope": "tenant:acme", "bogus": 1}"#,
            422,
            "unknown field `bogus`",
        ),
        (
            r#"{"scope": "tenant:acme", "cost": {"usd": "x"}}"#,
            400,
            "`cost.usd`",
        ),
        (
            r#"{"scope": "tenant:acme", "cost": {"usd": -1}}"#,
            400,
            "`cost.usd`",
        ),
        (
            r#"{"scope": "tenant:acme", "cost": {"usd": [1]}}"#,
            400,
            "expected a number or a decimal string",
        ),
        (
            r#"{"scope": "tenant:acme", "cost": {"euros": 1}}"#,
            400,
            "euros",
        ),
        (
            r#"{"scope": "tenant:acme", "cost": {"usd": "0.0000001"}}"#,
            400,
            "usd",
        ),
        (
            r#"{"scope": "tenant:acme", "cost": {"usd": 99999999999999999999999}}"#,
            400,
            "usd",
        ),
        (r#"{"scope": "nope::", "cost": {"usd": 1}}"#, 400, "scope"),
        (
            r#"{"scope": "tenant:acme", "priority": "urgent"}"#,
            400,
            "urgent",
        ),
        (
            r#"{"scope": "tenant:acme", "lease_ms": 0}"#,
            400,
            "lease_ms",
        ),
        (
            r#"{"scope": "tenant:acme", "lease_ms": -5}"#,
            422,
            "lease_ms",
        ),
        (
            r#"{"scope": "tenant:acme", "lease_ms": 18446744073709551615}"#,
            400,
            "lease",
        ),
        (
            r#"{"scope": "tenant:acme", "lease_ms": 18446744073709551616}"#,
            422,
            "lease_ms",
        ),
        (
            r#"{"scope": "tenant:acme", "operation": "xyz"}"#,
            400,
            "operation",
        ),
    ];
    for (body, status, says) in cases {
        for path in ["/rw/v1/acquire", "/rw/v1/reserve"] {
            let (got, _, text) = s.call("POST", path, Some(body));
            assert_eq!(got, status, "{path} {body}: {text}");
            assert!(text.contains(says), "{path} {body}: {text}");
            let e: Value = serde_json::from_str(&text).unwrap();
            assert!(e["error"].is_string() && e["message"].is_string(), "{text}");
        }
    }
    // Too large: 413. No JSON content type: 415.
    let big = format!(
        r#"{{"scope": "tenant:acme", "resource": "{}"}}"#,
        "x".repeat(2000)
    );
    assert_eq!(s.call("POST", "/rw/v1/acquire", Some(&big)).0, 413);
    let (status, _, _) = raw(
        &s.addr,
        "POST",
        "/rw/v1/acquire",
        Some(r#"{"scope": "tenant:acme"}"#),
        "text/plain",
    );
    assert_eq!(status, 415);
    assert_eq!(
        s.call("POST", "/rw/v1/reservations/not-an-id/release", None)
            .0,
        400
    );
    assert_eq!(s.call("GET", "/rw/v1/balances", None).0, 400);
    // Extending a live reservation: 1 ms is a lease; 0 and more than the
    // longest lease are refused. Released after: nothing stays charged.
    let (_, r) = s.json(
        "POST",
        "/rw/v1/reserve",
        &json!({"scope": "tenant:acme", "cost": {"usd": 1}}),
    );
    let id = r["reservation"]["id"].as_str().unwrap().to_owned();
    for (lease, status) in [(0_u64, 400), (u64::MAX, 400), (1, 200)] {
        let (got, e) = s.json(
            "POST",
            &format!("/rw/v1/reservations/{id}/extend"),
            &json!({"lease_ms": lease}),
        );
        assert_eq!(got, status, "lease_ms {lease}: {e}");
    }
    let (status, rel) = s.json(
        "POST",
        &format!("/rw/v1/reservations/{id}/release"),
        &json!({}),
    );
    assert_eq!(status, 200, "{rel}");
    // Nothing was charged by any of it.
    let (_, _, text) = s.call("GET", "/rw/v1/balances?scope=tenant:acme", None);
    let b: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(remaining(&b, "tenant-usd"), 10_000_000, "{b}");
    assert_eq!(remaining(&b, "tenant-daily"), 100, "{b}");
}

/// 16 clients race for a quota of 100 with 160 acquires: exactly 100 pass.
fn exactly_the_limit(s: &Server) {
    let admitted = AtomicU64::new(0);
    std::thread::scope(|t| {
        for _ in 0..16 {
            t.spawn(|| {
                for _ in 0..10 {
                    let (status, d) =
                        s.json("POST", "/rw/v1/acquire", &json!({"scope": "tenant:race"}));
                    assert_eq!(status, 200, "{d}");
                    if d["allowed"] == true {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.into_inner(), 100);
}

#[test]
fn concurrent_clients_admit_exactly_the_limit_embedded() {
    let policy = PolicyFile::new("serve-race", POLICY);
    exactly_the_limit(&Server::start(&policy, &[]));
}

#[test]
fn concurrent_clients_admit_exactly_the_limit_on_redis_and_a_cluster() {
    let policy = PolicyFile::new("serve-race-redis", POLICY);
    let redis = Redis::start_with(&["--cluster"]);
    for which in ["url", "cluster_url"] {
        let url = redis.0[which].as_str().unwrap();
        let s = Server::start(&policy, &["--backend", url, "--namespace", "serve-race"]);
        assert_eq!(s.call("GET", "/readyz", None).0, 200);
        exactly_the_limit(&s);
    }
}

#[test]
fn sigterm_under_load_loses_nothing_acknowledged() {
    let policy = PolicyFile::new("serve-term", POLICY);
    let redis = Redis::start();
    let args = ["--backend", redis.url(), "--namespace", "serve-term"];
    let s = Server::start(&policy, &args);
    let acked = AtomicU64::new(0);
    let addr = s.addr.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let status = std::thread::scope(|t| {
        for _ in 0..8 {
            let tx = tx.clone();
            let (addr, acked) = (&addr, &acked);
            t.spawn(move || {
                // Until the server stops answering.
                loop {
                    let Ok(mut conn) = TcpStream::connect(addr) else { break };
                    let body = r#"{"scope": "tenant:term"}"#;
                    let sent = write!(
                        conn,
                        "POST /rw/v1/acquire HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let mut out = String::new();
                    if sent.is_err() || conn.read_to_string(&mut out).is_err() || out.is_empty() {
                        break;
                    }
                    if out.contains("\"allowed\":true") {
                        acked.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(());
                    }
                }
            });
        }
        // Let 20 acquires through, then stop the server in the middle of the load.
        for _ in 0..20 {
            rx.recv_timeout(std::time::Duration::from_secs(60))
                .expect("the load reaches the server");
        }
        s.terminate()
    });
    assert!(status.success(), "{status:?}");
    let acked = acked.into_inner();
    assert!((20..=100).contains(&acked), "{acked}");
    // A fresh server on the same Redis: what was counted is what was acknowledged.
    let again = Server::start(&policy, &args);
    let (_, _, text) = again.call("GET", "/rw/v1/balances?scope=tenant:term", None);
    let b: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        100 - remaining(&b, "tenant-daily"),
        i64::try_from(acked).unwrap(),
        "{b}"
    );
}

#[test]
fn a_retry_with_the_same_idempotency_key_is_answered_as_the_first_and_charged_once() {
    let policy = PolicyFile::new("serve-idem", POLICY);
    let s = Server::start(&policy, &[]);
    let post = |path: &str, body: &str, key: &str| {
        let (status, _, text) = raw_with(
            &s.addr,
            "POST",
            path,
            Some(body),
            "application/json",
            &format!("Idempotency-Key: {key}\r\n"),
        );
        (status, serde_json::from_str::<Value>(&text).unwrap())
    };
    let one = r#"{"scope": "tenant:acme", "cost": {"usd": 1}}"#;
    let (status, first) = post("/rw/v1/acquire", one, "order-7");
    assert_eq!(status, 200, "{first}");
    let (_, again) = post("/rw/v1/acquire", one, "order-7");
    assert_eq!(again["limits"], first["limits"], "the first answer, again");
    let (_, r1) = post("/rw/v1/reserve", one, "order-8");
    let (_, r2) = post("/rw/v1/reserve", one, "order-8");
    assert_eq!(r1["reservation"]["id"], r2["reservation"]["id"]);
    // The key names one request: another request under it is refused.
    let (status, e) = post(
        "/rw/v1/acquire",
        r#"{"scope": "tenant:acme", "cost": {"usd": 2}}"#,
        "order-7",
    );
    assert_eq!(status, 400, "{e}");
    let (status, e) = post(
        "/rw/v1/acquire",
        &format!(
            r#"{{"scope": "tenant:acme", "operation": "{}"}}"#,
            "a".repeat(32)
        ),
        "k",
    );
    assert_eq!(
        (status, e["error"].clone()),
        (400, json!("invalid_argument")),
        "{e}"
    );
    let (status, e) = post("/rw/v1/acquire", one, &"k".repeat(257));
    assert_eq!(status, 400, "{e}");
    // Charged once each: $1 acquired, $1 held.
    let (_, _, text) = s.call("GET", "/rw/v1/balances?scope=tenant:acme", None);
    let b: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(remaining(&b, "tenant-usd"), 8_000_000, "{b}");
    assert_eq!(remaining(&b, "tenant-daily"), 98, "{b}");
}

#[test]
fn a_wait_is_answered_once_admitted_or_with_its_last_denial() {
    let policy = PolicyFile::new(
        "serve-wait",
        "scopes:\n  tenant:\n    limits:\n      - { name: rps, kind: rate, limit: 2, per: 1s }\n",
    );
    let s = Server::start(&policy, &[]);
    for _ in 0..2 {
        let (_, d) = s.json("POST", "/rw/v1/acquire", &json!({"scope": "tenant:w"}));
        assert_eq!(d["allowed"], true, "{d}");
    }
    // Spent: no wait denies at once, with when to come back.
    let (status, d) = s.json(
        "POST",
        "/rw/v1/wait",
        &json!({"scope": "tenant:w", "max_wait_ms": 0}),
    );
    assert_eq!((status, d["allowed"].clone()), (200, json!(false)), "{d}");
    assert!(d["retry_after"].as_f64().unwrap() > 0.0, "{d}");
    // A wait longer than the refill is answered once a unit is back, and
    // holds it as a reservation.
    let (status, d) = s.json(
        "POST",
        "/rw/v1/wait",
        &json!({"scope": "tenant:w", "max_wait_ms": 5000, "reserve": true}),
    );
    assert_eq!((status, d["allowed"].clone()), (200, json!(true)), "{d}");
    assert!(d["reservation"]["id"].is_string(), "{d}");
    // Wait-only fields elsewhere, and an over-long wait, are refused.
    let (status, e) = s.json(
        "POST",
        "/rw/v1/acquire",
        &json!({"scope": "tenant:w", "max_wait_ms": 5}),
    );
    assert_eq!(status, 400, "{e}");
    let (status, e) = s.json(
        "POST",
        "/rw/v1/wait",
        &json!({"scope": "tenant:w", "max_wait_ms": 3_600_001}),
    );
    assert_eq!(status, 400, "{e}");
    // A lease on a wait that acquires would be ignored: refused instead.
    let (status, e) = s.json(
        "POST",
        "/rw/v1/wait",
        &json!({"scope": "tenant:w", "max_wait_ms": 0, "lease_ms": 1000}),
    );
    assert_eq!(
        (status, e["error"].clone()),
        (400, json!("invalid_argument")),
        "{e}"
    );
}

#[test]
fn the_openapi_document_names_every_route_the_server_answers() {
    let policy = PolicyFile::new("serve-openapi", POLICY);
    let s = Server::start(&policy, &[]);
    let (status, _, text) = s.call("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 20, "{:?}", paths.keys());
    let id = "00000000000000000000000000000001";
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", id);
            let concrete = match concrete.as_str() {
                "/rw/v1/balances" => "/rw/v1/balances?scope=tenant:a".to_owned(),
                "/v1/balances" => "/v1/balances?tenant=a".to_owned(),
                _ => concrete,
            };
            let body = (method == "post").then_some(r#"{"scope": "tenant:a", "lease_ms": 1000}"#);
            let (status, _, text) = s.call(&method.to_uppercase(), &concrete, body);
            // Served (any answer but "no such endpoint" / "method not allowed").
            assert!(
                status != 405 && !(status == 404 && text.contains("no such endpoint")),
                "{method} {path}: {status} {text}"
            );
        }
    }
    // Every `$ref` resolves.
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap();
        assert!(doc["components"]["schemas"][name].is_object(), "{name}");
    }
}
