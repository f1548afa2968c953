//! `ratewarden serve`: the governor over HTTP, for agents in any language.
//!
//! One warden (the embedded engine, or Redis / Redis Cluster with
//! `--backend`) behind a small JSON API; every decision is the core's, this
//! module only converts. Every response carries an `X-Request-Id`, every
//! decision the IETF `RateLimit` headers. Bad input is a 400 naming what was
//! wrong and changes nothing; a body over `--max-body` is a 413; a request
//! past `--timeout` a 503. SIGTERM or SIGINT stop accepting connections and
//! let requests in flight finish.
//!
//! The API (JSON bodies, snake case, amounts as numbers or decimal strings):
//! - `POST /rw/v1/check`, `/rw/v1/acquire`, `/rw/v1/reserve` — `{scope, resource?,
//!   action?, cost?, usage?, priority?, lease_ms?, operation?}` → the
//!   decision ([`ratewarden::http::decision_json`]), 200 whether allowed or
//!   not; an `Idempotency-Key` header makes a retry answer as the first;
//! - `POST /rw/v1/wait` — the same with `max_wait_ms` (≤ an hour) and
//!   `reserve`: answered once admitted or when the wait is over (the last
//!   denial);
//! - `POST /rw/v1/reservations/{id}/commit` (`{actual?}` or `{usage, resource}`),
//!   `/release`, `/extend` (`{lease_ms}`);
//! - `GET /rw/v1/balances?scope=…&resource=…`;
//! - `GET /healthz` (the process answers), `GET /readyz` (the backend
//!   answers), `GET /metrics` (Prometheus text), `GET /openapi.json` (this
//!   API as an OpenAPI 3.1 document);
//! - the Cycles runtime protocol under `/v1` ([`cycles`]).
//!
//! With `--api-keys`, every `/v1` and `/rw/v1` request needs an
//! `X-Cycles-API-Key` and acts for that key's tenant only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request as HttpRequest, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ratewarden::decision::{Decision, ReservationId};
use ratewarden::http::{HeaderStyle, rate_limit_headers};
use ratewarden::{Amount, Cost, Error, ErrorKind, Policy, Warden};
use serde::Deserialize;
use serde_json::{Value, json};

mod cycles;
pub(crate) use cycles::new_key;

/// `ratewarden serve`'s flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The policy file (YAML, JSON or TOML).
    #[arg(long)]
    pub policy: PathBuf,
    /// A Redis URL (`redis://…`, `redis+cluster://…`); the embedded engine when not given.
    #[arg(long)]
    pub backend: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, default_value = "rw")]
    pub namespace: String,
    /// Where to listen (`127.0.0.1:0` picks a free port; the address is printed first).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The largest request body, bytes (larger: 413).
    #[arg(long, default_value_t = 65_536)]
    pub max_body: usize,
    /// Each request's deadline, seconds (past it: 503).
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// API keys (lines `<tenant> sha256:<hex>`, made by `ratewarden api-key`):
    /// every `/v1` and `/rw/v1` request then needs an `X-Cycles-API-Key`
    /// and acts for its tenant only. Without it, requests are trusted.
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// Threads answering requests (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

/// What every handler shares.
struct Served {
    warden: Warden,
    timeout: Duration,
    metrics: Metrics,
    cycles: cycles::Cycles,
    log: AccessLog,
}

/// The access log: one JSON line per request on stderr, written by a
/// thread of its own through a buffer flushed whenever no line is waiting
/// (one write per burst, not several per line). Lines past a full queue
/// (stderr blocked) are dropped and counted, never waited for.
struct AccessLog {
    lines: std::sync::mpsc::SyncSender<String>,
    dropped: AtomicU64,
}

impl AccessLog {
    fn start() -> (Self, std::thread::JoinHandle<()>) {
        let (lines, rx) = std::sync::mpsc::sync_channel::<String>(65_536);
        let writer = std::thread::spawn(move || {
            use std::io::Write as _;
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
            while let Ok(line) = rx.recv() {
                let _ = out.write_all(line.as_bytes());
                while let Ok(more) = rx.try_recv() {
                    let _ = out.write_all(more.as_bytes());
                }
                let _ = out.flush();
            }
        });
        (
            Self {
                lines,
                dropped: AtomicU64::new(0),
            },
            writer,
        )
    }

    fn write(&self, mut line: String) {
        line.push('\n');
        if self.lines.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The ids of one request, set by [`around`]: `X-Request-Id` and the trace
/// id (`X-Cycles-Trace-Id`: an inbound W3C `traceparent`'s, else an inbound
/// `X-Cycles-Trace-Id`, else new).
#[derive(Clone)]
struct RequestId {
    id: String,
    trace: String,
}

impl RequestId {
    fn of(headers: &HeaderMap) -> Self {
        let hex32 = |t: &str| {
            t.len() == 32
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                && t.bytes().any(|b| b != b'0')
        };
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        // traceparent: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>
        let parent = header("traceparent").and_then(|tp| {
            let parts: Vec<&str> = tp.trim().split('-').collect();
            match parts.as_slice() {
                ["00", trace, span, flags]
                    if hex32(trace)
                        && span.len() == 16
                        && span.bytes().all(|b| b.is_ascii_hexdigit())
                        && span.bytes().any(|b| b != b'0')
                        && flags.len() == 2 =>
                {
                    Some((*trace).to_owned())
                }
                _ => None,
            }
        });
        let trace = parent
            .or_else(|| {
                header("x-cycles-trace-id")
                    .filter(|t| hex32(t))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| format!("{:032x}", fastrand::u128(1..)));
        Self {
            id: format!("{:032x}", fastrand::u128(..)),
            trace,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
struct Metrics {
    allowed: AtomicU64,
    capped: AtomicU64,
    denied: AtomicU64,
    degraded: AtomicU64,
    errors: AtomicU64,
    /// Request latency histogram: counts per bucket of [`BUCKETS`] (µs), and the sum.
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// The longest `/rw/v1/wait`.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Upper bounds of the latency buckets, µs.
const BUCKETS: [u64; 10] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
];

impl Metrics {
    fn decided(&self, d: &Decision) {
        let counter = match d.outcome {
            ratewarden::Outcome::Allow => &self.allowed,
            ratewarden::Outcome::AllowWithCaps => &self.capped,
            ratewarden::Outcome::Deny => &self.denied,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if d.degraded.is_some() {
            self.degraded.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn took(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        for (i, bound) in BUCKETS.iter().enumerate() {
            if us <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self) -> String {
        use std::fmt::Write as _;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        out.push_str("# HELP ratewarden_decisions_total Decisions made, by outcome.\n");
        out.push_str("# TYPE ratewarden_decisions_total counter\n");
        for (outcome, n) in [
            ("allow", get(&self.allowed)),
            ("allow_with_caps", get(&self.capped)),
            ("deny", get(&self.denied)),
        ] {
            let _ = writeln!(
                out,
                "ratewarden_decisions_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        out.push_str("# HELP ratewarden_degraded_decisions_total Decisions made without the shared backend.\n");
        out.push_str("# TYPE ratewarden_degraded_decisions_total counter\n");
        let _ = writeln!(
            out,
            "ratewarden_degraded_decisions_total {}",
            get(&self.degraded)
        );
        out.push_str("# HELP ratewarden_errors_total Requests answered with an error.\n");
        out.push_str("# TYPE ratewarden_errors_total counter\n");
        let _ = writeln!(out, "ratewarden_errors_total {}", get(&self.errors));
        out.push_str("# HELP ratewarden_request_seconds Time to answer an API request.\n");
        out.push_str("# TYPE ratewarden_request_seconds histogram\n");
        for (i, bound) in BUCKETS.iter().enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "ratewarden_request_seconds_bucket{{le=\"{le}\"}} {}",
                get(&self.buckets[i])
            );
        }
        let count = get(&self.count);
        let _ = writeln!(
            out,
            "ratewarden_request_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        #[allow(clippy::cast_precision_loss)]
        let sum = get(&self.sum_us) as f64 / 1e6;
        let _ = writeln!(out, "ratewarden_request_seconds_sum {sum}");
        let _ = writeln!(out, "ratewarden_request_seconds_count {count}");
        out
    }
}

/// Runs the server until SIGTERM or SIGINT.
///
/// # Errors
/// The policy cannot be read, the backend cannot be reached, or the address
/// cannot be bound.
pub fn run(args: &Args) -> Result<(), String> {
    let policy = Policy::from_file(&args.policy).map_err(|e| e.to_string())?;
    let timeout = ratewarden::ops::seconds(args.timeout, "timeout").map_err(|e| e.to_string())?;
    let cycles = cycles::Cycles::new(args.api_keys.as_deref())?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.workers > 0 {
        rt.worker_threads(args.workers);
    }
    let rt = rt
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let setup = ratewarden::ops::Setup::new(args.backend.as_deref(), &args.namespace);
        let warden = setup.connect(policy).await.map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let bound = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        // First line of stdout: where it listens (tests and scripts read it).
        println!("listening on http://{bound}");
        let (log, writer) = AccessLog::start();
        let served = Arc::new(Served {
            warden,
            timeout,
            metrics: Metrics::default(),
            cycles,
            log,
        });
        // Answers go out at once (no Nagle delay behind a client's ACK).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router(served, args.max_body))
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(|e| format!("server error: {e}"))?;
        // Every handle on the log is gone with the server: its last lines
        // are written before the process says it stopped.
        let _ = writer.join();
        eprintln!("ratewarden serve: stopped");
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown() {
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn router(served: Arc<Served>, max_body: usize) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { axum::Json(openapi()) }))
        .route("/rw/v1/{op}", post(decision))
        .route("/rw/v1/reservations/{id}/commit", post(commit))
        .route("/rw/v1/reservations/{id}/release", post(release))
        .route("/rw/v1/reservations/{id}/extend", post(extend))
        .route("/rw/v1/balances", get(balances))
        // The Cycles runtime protocol.
        .route(
            "/v1/reservations",
            post(cycles::reserve).get(cycles::list_reservations),
        )
        .route("/v1/reservations/{id}", get(cycles::get_reservation))
        .route("/v1/reservations/{id}/commit", post(cycles::commit))
        .route("/v1/reservations/{id}/release", post(cycles::release))
        .route("/v1/reservations/{id}/extend", post(cycles::extend))
        .route("/v1/decide", post(cycles::decide))
        .route("/v1/events", post(cycles::event))
        .route("/v1/balances", get(cycles::balances))
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(middleware::from_fn_with_state(Arc::clone(&served), around))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(served)
}

/// Around every request: its deadline, an `X-Request-Id`, an access log line
/// (JSON on stderr) and the latency histogram.
async fn around(
    State(s): State<Arc<Served>>,
    req: HttpRequest<axum::body::Body>,
    next: Next,
) -> Response {
    // Latency is wall time on this host, not the warden's (test) clock.
    #[allow(clippy::disallowed_methods)]
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let ids = RequestId::of(req.headers());
    let mut req = req;
    req.extensions_mut().insert(ids.clone());
    let id = ids.id;
    // A wait is bounded by its own `max_wait_ms` (at most an hour), not the deadline.
    let deadline = if path == "/rw/v1/wait" {
        MAX_WAIT + s.timeout
    } else {
        s.timeout
    };
    let mut res = match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(r) => r,
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the request took longer than the server's --timeout",
        ),
    };
    let elapsed = started.elapsed();
    if path.starts_with("/rw/v1/") || path.starts_with("/v1/") {
        s.metrics.took(elapsed);
    }
    if res.status().is_client_error() || res.status().is_server_error() {
        s.metrics.errors.fetch_add(1, Ordering::Relaxed);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&ids.trace) {
        res.headers_mut().insert("x-cycles-trace-id", v);
    }
    s.log.write(
        json!({
            "request_id": id, "trace_id": ids.trace, "method": method.as_str(), "path": path,
            "status": res.status().as_u16(), "micros": u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        })
        .to_string(),
    );
    res
}

/// An error response: `{"error": code, "message": …}`.
fn problem(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": code, "message": message})),
    )
        .into_response()
}

/// The response for a core error: bad input 400, unknown reservation 404,
/// conflicts 409, expired 410, backend 503, anything else 500.
fn failed(e: &Error) -> Response {
    let status = match e.kind() {
        ErrorKind::InvalidInput | ErrorKind::Policy => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound if e.code() == "reservation_expired" => StatusCode::GONE,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Backend => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    problem(status, e.code(), &e.to_string())
}

/// A JSON body, or the 400 / 413 / 415 naming what is wrong with it.
#[allow(clippy::result_large_err)] // the error is the response itself
fn body<T>(parsed: Result<axum::Json<T>, JsonRejection>) -> Result<T, Response> {
    parsed.map(|axum::Json(v)| v).map_err(|r| {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_request"
        };
        problem(status, code, &r.body_text())
    })
}

/// With API keys (`--api-keys`), a request of our own API needs a key, and
/// a scope it names must be under the key's tenant (`tenant:<t>/…`): else
/// the 401 / 403, nothing done.
#[allow(clippy::result_large_err)] // the error is the response itself
fn authorized(s: &Served, headers: &HeaderMap, scope: Option<&str>) -> Result<(), Response> {
    let tenant = s
        .cycles
        .tenant(headers)
        .map_err(|p| problem(p.status(), "unauthorized", p.message()))?;
    if let (Some(t), Some(scope)) = (tenant, scope) {
        let own = ratewarden::Scope::parse(scope)
            .is_ok_and(|sc| sc.depth() > 0 && sc.kind(0) == "tenant" && sc.id(0) == t);
        if !own {
            return Err(problem(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!("the API key acts for `tenant:{t}`; the scope `{scope}` is not under it"),
            ));
        }
    }
    Ok(())
}

/// A decision request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    scope: String,
    resource: Option<String>,
    action: Option<String>,
    cost: Option<BTreeMap<String, Value>>,
    usage: Option<BTreeMap<String, Value>>,
    priority: Option<String>,
    lease_ms: Option<u64>,
    /// The operation (32 hex digits) a retry repeats; or the
    /// `Idempotency-Key` header.
    operation: Option<String>,
    /// `/rw/v1/wait` only: how long to wait for capacity, ms.
    max_wait_ms: Option<u64>,
    /// `/rw/v1/wait` only: hold a reservation (else acquire) once admitted.
    reserve: Option<bool>,
}

/// An amount given as a JSON number or a decimal string.
fn amount(v: &Value, what: &'static str, at: &str) -> Result<Amount, Error> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => {
            return Err(Error::invalid(
                what,
                format!("`{at}`: expected a number or a decimal string, got {other}"),
            ));
        }
    };
    Amount::parse(&text).map_err(|e| Error::invalid(what, format!("`{at}`: {e}")))
}

fn cost_of(c: &BTreeMap<String, Value>, field: &'static str) -> Result<Cost, Error> {
    let mut cost = Cost::new();
    for (unit, v) in c {
        cost.set(unit, amount(v, field, &format!("{field}.{unit}"))?);
    }
    Ok(cost)
}

fn usage_of(u: &BTreeMap<String, Value>) -> Result<ratewarden::pricing::Usage, Error> {
    let mut fields = Vec::with_capacity(u.len());
    for (k, v) in u {
        fields.push((k.as_str(), amount(v, "usage", &format!("usage.{k}"))?));
    }
    ratewarden::pricing::Usage::from_fields(fields)
}

impl Ask {
    fn request(&self, key: Option<&str>) -> Result<ratewarden::Request, Error> {
        let cost = self.cost.as_ref().map(|c| cost_of(c, "cost")).transpose()?;
        let mut r = ratewarden::ops::request(
            &self.scope,
            self.resource.as_deref(),
            self.action.as_deref(),
            cost,
            self.priority.as_deref(),
        )?;
        if let Some(u) = &self.usage {
            r = r.usage(usage_of(u)?);
        }
        let op = match (&self.operation, key) {
            (Some(id), None) => Some(ratewarden::OperationId::parse(id)?),
            (None, Some(k)) => Some(ratewarden::OperationId::of_key(k)?),
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "operation",
                    "give `operation` in the body or an `Idempotency-Key` header, not both",
                ));
            }
            (None, None) => None,
        };
        if let Some(op) = op {
            r = r.operation(op);
        }
        Ok(r)
    }

    fn lease(&self) -> Result<Option<Duration>, Error> {
        match self.lease_ms {
            None => Ok(None),
            Some(0) => Err(Error::invalid("lease_ms", "a lease is longer than zero")),
            Some(ms) => Ok(Some(Duration::from_millis(ms))),
        }
    }
}

/// A decision with its `RateLimit` headers.
fn decided(s: &Served, d: &Decision) -> Response {
    s.metrics.decided(d);
    let mut res = (
        StatusCode::OK,
        axum::Json(ratewarden::http::decision_json(d)),
    )
        .into_response();
    for (name, value) in rate_limit_headers(d, HeaderStyle::Draft11) {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            res.headers_mut().append(n, v);
        }
    }
    res
}

#[derive(Clone, Copy)]
enum Op {
    Check,
    Acquire,
    Reserve,
    Wait,
}

async fn decide(
    s: Arc<Served>,
    headers: &HeaderMap,
    parsed: Result<axum::Json<Ask>, JsonRejection>,
    op: Op,
) -> Response {
    let ask = match body(parsed) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = authorized(&s, headers, Some(&ask.scope)) {
        return r;
    }
    let key = match headers.get("idempotency-key").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(_)) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                "the Idempotency-Key header is not visible ASCII",
            );
        }
    };
    let (request, lease) = match (ask.request(key), ask.lease()) {
        (Ok(r), Ok(l)) => (r, l),
        (Err(e), _) | (_, Err(e)) => return failed(&e),
    };
    let holds = matches!(op, Op::Reserve) || (matches!(op, Op::Wait) && ask.reserve == Some(true));
    if !holds && ask.lease_ms.is_some() {
        return failed(&Error::invalid(
            "lease_ms",
            "only a reservation has a lease: `lease_ms` belongs to /rw/v1/reserve and to /rw/v1/wait with `reserve: true`",
        ));
    }
    if !matches!(op, Op::Wait) && (ask.max_wait_ms.is_some() || ask.reserve.is_some()) {
        return failed(&Error::invalid(
            "max_wait_ms",
            "`max_wait_ms` and `reserve` belong to /rw/v1/wait",
        ));
    }
    let d = match op {
        Op::Check => s.warden.check(&request).await,
        Op::Acquire => s.warden.acquire(&request).await,
        Op::Reserve => s.warden.reserve(&request, lease).await,
        Op::Wait => {
            let what = if ask.reserve.unwrap_or(false) {
                ratewarden::WaitFor::Reserve(lease)
            } else {
                ratewarden::WaitFor::Acquire
            };
            let max_wait = Duration::from_millis(ask.max_wait_ms.unwrap_or(0));
            if max_wait > MAX_WAIT {
                return failed(&Error::invalid(
                    "max_wait_ms",
                    "wait at most an hour (3600000)",
                ));
            }
            waited(&s, request, what, max_wait).await
        }
    };
    match d {
        Ok(d) => decided(&s, &d),
        Err(e) => failed(&e),
    }
}

/// Waits on a task of its own, so a client that hangs up mid-wait cancels
/// it cleanly: the wait stops at its next waiting point, and what it was
/// admitted in the meantime is given back (a reservation released; an
/// acquire, already spent, stays spent as the one answer nobody read).
async fn waited(
    s: &Arc<Served>,
    request: ratewarden::Request,
    what: ratewarden::WaitFor,
    max_wait: Duration,
) -> Result<Decision, Error> {
    struct CancelOnDrop(Arc<ratewarden::WaitCancel>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.cancel();
        }
    }
    let cancel = Arc::new(ratewarden::WaitCancel::default());
    let _guard = CancelOnDrop(Arc::clone(&cancel));
    let warden = s.warden.clone();
    let task = tokio::spawn(async move {
        let d = warden
            .wait_cancellable(&request, what, max_wait, &cancel)
            .await;
        if cancel.is_cancelled() {
            if let Ok(Some(r)) = d.as_ref().map(|d| d.reservation.as_ref()) {
                let _ = warden.release(r.id).await;
            }
        }
        d
    });
    task.await.unwrap_or_else(|e| {
        Err(Error::Internal {
            message: format!("the wait failed: {e}"),
        })
    })
}

/// `POST /rw/v1/check`, `/rw/v1/acquire`, `/rw/v1/reserve` and `/rw/v1/wait`.
async fn decision(
    State(s): State<Arc<Served>>,
    Path(op): Path<String>,
    headers: HeaderMap,
    b: Result<axum::Json<Ask>, JsonRejection>,
) -> Response {
    let op = match op.as_str() {
        "check" => Op::Check,
        "acquire" => Op::Acquire,
        "reserve" => Op::Reserve,
        "wait" => Op::Wait,
        _ => return problem(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    };
    decide(s, &headers, b, op).await
}

#[allow(clippy::result_large_err)] // the error is the response itself
fn reservation(id: &str) -> Result<ReservationId, Response> {
    ReservationId::parse(id).map_err(|e| failed(&e))
}

/// A commit: `actual` (a cost), or `usage` priced on `resource`; neither
/// charges what was reserved.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settle {
    actual: Option<BTreeMap<String, Value>>,
    usage: Option<BTreeMap<String, Value>>,
    resource: Option<String>,
}

async fn commit(
    State(s): State<Arc<Served>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<axum::Json<Settle>, JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&s, &headers, None) {
        return r;
    }
    let id = match reservation(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let settle = match b {
        Err(JsonRejection::MissingJsonContentType(_)) => Settle::default(),
        other => match body(other) {
            Ok(v) => v,
            Err(r) => return r,
        },
    };
    let receipt = match (&settle.usage, &settle.resource, &settle.actual) {
        (Some(_), _, Some(_)) => Err(Error::invalid(
            "actual",
            "give `actual` (a cost) or `usage` (priced on `resource`), not both",
        )),
        (Some(u), Some(resource), None) => match usage_of(u) {
            Ok(usage) => s.warden.commit_usage(id, resource, &usage).await,
            Err(e) => Err(e),
        },
        (Some(_), None, None) => Err(Error::invalid(
            "resource",
            "a commit by `usage` needs the `resource` whose prices apply",
        )),
        (None, _, actual) => match actual.as_ref().map(|a| cost_of(a, "actual")).transpose() {
            Ok(cost) => s.warden.commit(id, &cost.unwrap_or_default()).await,
            Err(e) => Err(e),
        },
    };
    match receipt {
        Ok(r) => (
            StatusCode::OK,
            axum::Json(ratewarden::http::receipt_json(&r)),
        )
            .into_response(),
        Err(e) => failed(&e),
    }
}

async fn release(
    State(s): State<Arc<Served>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorized(&s, &headers, None) {
        return r;
    }
    let id = match reservation(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match s.warden.release(id).await {
        Ok(released) => (StatusCode::OK, axum::Json(json!({"released": released}))).into_response(),
        Err(e) => failed(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Extend {
    lease_ms: u64,
}

async fn extend(
    State(s): State<Arc<Served>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<axum::Json<Extend>, JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&s, &headers, None) {
        return r;
    }
    let id = match reservation(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let ext = match body(b) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match s
        .warden
        .extend(id, Duration::from_millis(ext.lease_ms))
        .await
    {
        Ok(until) => (
            StatusCode::OK,
            axum::Json(json!({"expires_at_ms": until.div_euclid(1000)})),
        )
            .into_response(),
        Err(e) => failed(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalancesQuery {
    scope: String,
    resource: Option<String>,
}

async fn balances(
    State(s): State<Arc<Served>>,
    headers: HeaderMap,
    q: Result<Query<BalancesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(r) => return problem(StatusCode::BAD_REQUEST, "invalid_request", &r.body_text()),
    };
    if let Err(r) = authorized(&s, &headers, Some(&q.scope)) {
        return r;
    }
    let scope = match ratewarden::Scope::parse(&q.scope) {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    match s.warden.balances(&scope, q.resource.as_deref()).await {
        Ok(list) => (
            StatusCode::OK,
            axum::Json(json!({
                "scope": scope.as_str(),
                "balances": list.iter().map(ratewarden::http::balance_json).collect::<Vec<_>>(),
            })),
        )
            .into_response(),
        Err(e) => failed(&e),
    }
}

/// Ready when the backend answers (the embedded engine always does).
async fn ready(State(s): State<Arc<Served>>) -> Response {
    match s.warden.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "not_ready", &e.to_string()),
    }
}

async fn metrics(State(s): State<Arc<Served>>) -> Response {
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        format!(
            "{}# HELP ratewarden_access_log_dropped_total Access-log lines dropped (stderr blocked).\n# TYPE ratewarden_access_log_dropped_total counter\nratewarden_access_log_dropped_total {}\n",
            s.metrics.render(),
            s.log.dropped.load(Ordering::Relaxed)
        ),
    )
        .into_response()
}

/// This API as an OpenAPI 3.1 document (`GET /openapi.json`).
fn openapi() -> Value {
    let amounts = json!({"type": "object", "additionalProperties": {"type": ["number", "string"]},
        "description": "unit → amount (a number or a decimal string, exact to the unit's decimals)"});
    let ask = json!({
        "type": "object", "required": ["scope"], "additionalProperties": false,
        "properties": {
            "scope": {"type": "string", "example": "tenant:acme/user:42"},
            "resource": {"type": "string"}, "action": {"type": "string"},
            "cost": amounts, "usage": {"type": "object", "additionalProperties": {"type": ["integer", "string"]}},
            "priority": {"type": "string", "enum": ["critical", "standard", "background"]},
            "lease_ms": {"type": "integer", "minimum": 1},
            "operation": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
            "max_wait_ms": {"type": "integer", "minimum": 0, "maximum": 3_600_000, "description": "/rw/v1/wait only"},
            "reserve": {"type": "boolean", "description": "/rw/v1/wait only"}
        }
    });
    let error = json!({"type": "object", "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}}});
    let answer = |what: &str, schema: &str| {
        json!({
            "200": {"description": what, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}},
            "400": {"description": "bad input: nothing changed", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "503": {"description": "the backend cannot be asked, or the deadline passed"}
        })
    };
    let decide = |summary: &str| {
        json!({
            "summary": summary,
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 256},
                "description": "a retry with the same key is answered as the first and charged once"}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Request"}}}},
            "responses": answer("the decision (allowed or not), with RateLimit headers", "Decision")
        })
    };
    let id = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}]);
    // The Cycles endpoints: their schemas are the protocol's (named after
    // its OpenAPI document, cycles-protocol-v0.yaml, v0.1.25).
    let cycles_op = |summary: &str, request: &str, response: &str| {
        let mut op = json!({
            "summary": summary,
            "tags": ["cycles"],
            "parameters": [{"name": "X-Cycles-API-Key", "in": "header", "required": false, "schema": {"type": "string"},
                "description": "required when the server has --api-keys: names the tenant"}],
            "responses": {
                "200": {"description": format!("Cycles {response}")},
                "400": {"description": "INVALID_REQUEST or UNIT_MISMATCH: nothing changed", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CyclesError"}}}},
                "401": {"description": "UNAUTHORIZED"}, "403": {"description": "FORBIDDEN: another tenant"},
                "404": {"description": "NOT_FOUND"}, "409": {"description": "BUDGET_EXCEEDED, RESERVATION_FINALIZED, IDEMPOTENCY_MISMATCH"},
                "410": {"description": "RESERVATION_EXPIRED"}, "429": {"description": "LIMIT_EXCEEDED: a rate or concurrency limit (Retry-After)"}
            }
        });
        if !request.is_empty() {
            op["requestBody"] = json!({"required": true, "description": format!("Cycles {request}"),
                "content": {"application/json": {"schema": {"type": "object"}}}});
        }
        op
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "ratewarden serve", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/rw/v1/check": {"post": decide("Evaluate a request without changing anything")},
            "/rw/v1/acquire": {"post": decide("Admit a request and consume its cost")},
            "/rw/v1/reserve": {"post": decide("Admit a request and hold its cost under a lease")},
            "/rw/v1/wait": {"post": decide("Wait up to max_wait_ms to be admitted, then acquire or reserve")},
            "/rw/v1/reservations/{id}/commit": {"post": {"summary": "Charge what was used and end the reservation", "parameters": id,
                "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false,
                    "properties": {"actual": amounts, "usage": {"type": "object"}, "resource": {"type": "string"}}}}}},
                "responses": answer("the receipt", "Receipt")}},
            "/rw/v1/reservations/{id}/release": {"post": {"summary": "End a reservation, returning what it holds", "parameters": id,
                "responses": {"200": {"description": "`{released}`"}}}},
            "/rw/v1/reservations/{id}/extend": {"post": {"summary": "Renew a reservation's lease", "parameters": id,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["lease_ms"],
                    "properties": {"lease_ms": {"type": "integer", "minimum": 1}}}}}},
                "responses": {"200": {"description": "`{expires_at_ms}`"}}}},
            "/rw/v1/balances": {"get": {"summary": "What is left of every limit a scope's requests touch",
                "parameters": [{"name": "scope", "in": "query", "required": true, "schema": {"type": "string"}},
                    {"name": "resource", "in": "query", "required": false, "schema": {"type": "string"}}],
                "responses": answer("`{scope, balances}`", "Balances")}},
            "/v1/reservations": {
                "post": cycles_op("Cycles: reserve an estimate (or evaluate it, dry_run)", "ReservationCreateRequest", "ReservationCreateResponse"),
                "get": cycles_op("Cycles: list the tenant's reservations, newest first", "", "ReservationListResponse")},
            "/v1/reservations/{id}": {"get": cycles_op("Cycles: one reservation (410 once expired)", "", "ReservationDetail")},
            "/v1/reservations/{id}/commit": {"post": cycles_op("Cycles: charge the actual and end the reservation", "CommitRequest", "CommitResponse")},
            "/v1/reservations/{id}/release": {"post": cycles_op("Cycles: end the reservation, returning its hold", "ReleaseRequest", "ReleaseResponse")},
            "/v1/reservations/{id}/extend": {"post": cycles_op("Cycles: move the expiry by extend_by_ms", "ReservationExtendRequest", "ReservationExtendResponse")},
            "/v1/decide": {"post": cycles_op("Cycles: evaluate without reserving", "DecisionRequest", "DecisionResponse")},
            "/v1/events": {"post": cycles_op("Cycles: charge an actual without a reservation (201)", "EventCreateRequest", "EventCreateResponse")},
            "/v1/balances": {"get": cycles_op("Cycles: the budgets of the scope the subject filters name", "", "BalanceResponse")},
            "/healthz": {"get": {"summary": "The process answers", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "The backend answers", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        },
        "components": {"schemas": {
            "Request": ask,
            "Error": error,
            "CyclesError": {"type": "object", "required": ["error", "message", "request_id"], "properties": {
                "error": {"type": "string"}, "message": {"type": "string"}, "request_id": {"type": "string"},
                "trace_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"}, "details": {"type": "object"}}},
            "Decision": {"type": "object", "required": ["allowed", "outcome", "limits"], "properties": {
                "allowed": {"type": "boolean"}, "outcome": {"type": "string", "enum": ["allow", "allow_with_caps", "deny"]},
                "caps": {"type": "object"}, "retry_after": {"type": ["number", "null"]}, "reason": {"type": ["string", "null"]},
                "priority": {"type": "string"}, "degraded": {"type": ["string", "null"]},
                "reservation": {"type": ["object", "null"]}, "limits": {"type": "array", "items": {"type": "object"}}}},
            "Receipt": {"type": "object", "properties": {"reservation": {"type": "string"}, "duplicate": {"type": "boolean"},
                "charges": {"type": "array", "items": {"type": "object"}}}},
            "Balances": {"type": "object", "properties": {"scope": {"type": "string"}, "balances": {"type": "array", "items": {"type": "object"}}}}
        }}
    })
}
