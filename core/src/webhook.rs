//! Signed webhook messages, per the Standard Webhooks specification
//! (<https://www.standardwebhooks.com>), so receivers verify them with the
//! standard libraries (`standardwebhooks` on PyPI and npm, and the others).
//!
//! A message is its JSON body and three headers: `webhook-id` (unique per
//! message; a receiver drops repeats), `webhook-timestamp` (seconds since the
//! epoch; receivers refuse old ones) and `webhook-signature`:
//! `v1,<base64 of HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>`. Secrets
//! are written `whsec_<base64 of the key>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;

use crate::error::{Error, Result};

/// A signing secret: `whsec_` and the base64 of 24 to 64 random bytes.
#[derive(Clone)]
pub struct Secret {
    key: hmac::Key,
    /// The key's HMAC of a fixed label: equal secrets have equal ones, and
    /// it does not give the key away.
    fingerprint: [u8; 32],
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for Secret {}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(whsec_…)")
    }
}

impl Secret {
    /// Reads `whsec_<base64>` (the prefix may be left out).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`secret`) when it is not base64 of 24 to
    /// 64 bytes; the message never repeats the secret.
    pub fn parse(secret: &str) -> Result<Self> {
        let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
        let bytes = STANDARD
            .decode(b64.trim())
            .map_err(|_| Error::InvalidArgument {
                what: "secret",
                message: "expected `whsec_` and base64 (a Standard Webhooks secret)".into(),
            })?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(Error::InvalidArgument {
                what: "secret",
                message: format!(
                    "its key is {} bytes; a Standard Webhooks key is 24 to 64",
                    bytes.len()
                ),
            });
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(hmac::sign(&key, b"ratewarden secret fingerprint").as_ref());
        Ok(Self { key, fingerprint })
    }

    /// The `webhook-signature` header value of a message: `v1,<base64>`.
    #[must_use]
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(id.as_bytes());
        ctx.update(b".");
        ctx.update(timestamp.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
    }

    /// Verifies a message as a receiver does: one of the space-separated
    /// `v1,` signatures matches (compared in constant time), and the
    /// timestamp is within `tolerance` seconds of `now`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`signature`) naming what did not hold.
    pub fn verify(
        &self,
        id: &str,
        timestamp: i64,
        signatures: &str,
        body: &[u8],
        now: i64,
        tolerance: i64,
    ) -> Result<()> {
        let bad = |message: &str| Error::InvalidArgument {
            what: "signature",
            message: message.to_owned(),
        };
        if (now - timestamp).abs() > tolerance {
            return Err(bad("the message's timestamp is too far from now"));
        }
        let mut signed = format!("{id}.{timestamp}.").into_bytes();
        signed.extend_from_slice(body);
        for sig in signatures.split(' ') {
            let Some(b64) = sig.strip_prefix("v1,") else {
                continue;
            };
            let Ok(given) = STANDARD.decode(b64) else {
                continue;
            };
            // Constant-time comparison.
            if hmac::verify(&self.key, &signed, &given).is_ok() {
                return Ok(());
            }
        }
        Err(bad("no v1 signature matches"))
    }
}

/// The three headers of a signed message, in order: `webhook-id`,
/// `webhook-timestamp`, `webhook-signature`.
#[must_use]
pub fn headers(
    secret: &Secret,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    [
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", secret.sign(id, timestamp, body)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_what_it_verifies_and_nothing_else() {
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"type":"limit.exhausted"}"#;
        let sig = s.sign("msg_1", 1_700_000_000, body);
        assert!(sig.starts_with("v1,"));
        s.verify("msg_1", 1_700_000_000, &sig, body, 1_700_000_100, 300)
            .unwrap();
        let both = format!("v1,AAAA {sig}");
        s.verify("msg_1", 1_700_000_000, &both, body, 1_700_000_000, 300)
            .unwrap();
        assert!(
            s.verify("msg_2", 1_700_000_000, &sig, body, 1_700_000_000, 300)
                .is_err()
        );
        assert!(
            s.verify("msg_1", 1_700_000_001, &sig, body, 1_700_000_000, 300)
                .is_err()
        );
        assert!(
            s.verify("msg_1", 1_700_000_000, &sig, b"{}", 1_700_000_000, 300)
                .is_err()
        );
        assert!(
            s.verify("msg_1", 1_700_000_000, &sig, body, 1_700_001_000, 300)
                .is_err()
        );
        for bad in ["whsec_!!", "whsec_AAAA", ""] {
            let e = Secret::parse(bad).unwrap_err().to_string();
            assert!(e.contains("secret") && !e.contains("!!"), "{e}");
        }
    }
}

/// One event as a webhook message: its id, timestamp and JSON body
/// `{"type", "timestamp", "data"}` (the shape the specification suggests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `msg_` and 32 hex digits: the event's own id when it has one (a
    /// threshold crossing), else random. Retries send the same id.
    pub id: String,
    /// Seconds since the epoch, when it happened.
    pub timestamp: i64,
    /// The JSON body, exactly as signed.
    pub body: String,
}

impl Message {
    /// The message of `event`.
    #[must_use]
    pub fn of(event: &crate::Event) -> Self {
        let id = event
            .id()
            .map_or_else(crate::events::new_id, |id| format!("msg_{id}"));
        let at = event.at();
        let body = serde_json::json!({
            "type": event.type_name(),
            "timestamp": crate::events::rfc3339(at),
            "data": event.data(),
        })
        .to_string();
        Self {
            id,
            timestamp: at.div_euclid(1_000_000),
            body,
        }
    }

    /// Its three signed headers ([`headers`]).
    #[must_use]
    pub fn headers(&self, secret: &Secret) -> [(&'static str, String); 3] {
        headers(secret, &self.id, self.timestamp, self.body.as_bytes())
    }
}

#[cfg(test)]
mod message_tests {
    use super::*;

    #[test]
    fn an_event_is_a_signed_message_with_its_type_time_and_data() {
        let c = crate::events::Crossing {
            id: "0123456789abcdef0123456789abcdef".into(),
            owner: Some("tenant:acme".into()),
            limit: "usd".into(),
            unit: "usd".into(),
            decimals: 6,
            threshold: 800,
            capacity: 10_000_000,
            before: 7_990_000,
            after: 8_000_000,
            at: 1_768_435_200_123_456,
        };
        let m = Message::of(&crate::Event::ThresholdCrossed(Box::new(c)));
        assert_eq!(m.id, "msg_0123456789abcdef0123456789abcdef");
        assert_eq!(m.timestamp, 1_768_435_200);
        let body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
        assert_eq!(body["type"], "limit.threshold_crossed");
        assert_eq!(body["timestamp"], "2026-01-15T00:00:00.123Z");
        assert_eq!(body["data"]["after_text"], "8");
        assert_eq!(body["data"]["threshold"], 0.8);
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let [(_, id), (_, ts), (_, sig)] = m.headers(&s);
        s.verify(
            &id,
            ts.parse().unwrap(),
            &sig,
            m.body.as_bytes(),
            m.timestamp,
            300,
        )
        .unwrap();
    }
}

// ------------------------------------------------------------------ delivery

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Deliveries and dead letters kept per warden (the oldest go first).
pub const LOG_CAPACITY: usize = 1000;

/// Where events are delivered (`webhooks:` in the policy): an HTTP(S)
/// endpoint, its signing secret, the event types it wants, and how hard to
/// try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL, as given.
    pub url: String,
    tls: bool,
    host: String,
    port: u16,
    path: String,
    /// The signing secret.
    pub secret: Secret,
    /// Event types (`limit.exhausted`) or prefixes (`limit.`) it wants;
    /// empty: every event.
    pub events: crate::events::Filter,
    /// Attempts per message before it becomes a dead letter.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each after (at most an hour).
    pub backoff: Duration,
    /// Each attempt's deadline (connect, send, and the status line back).
    pub timeout: Duration,
}

impl Endpoint {
    /// An endpoint for `url` (`http://` or `https://`, no user info).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a URL that is not one, no attempts or
    /// more than 100, or a backoff or timeout of zero or over an hour.
    pub fn new(
        url: &str,
        secret: Secret,
        events: crate::events::Filter,
        max_attempts: u32,
        backoff: Duration,
        timeout: Duration,
    ) -> Result<Self> {
        let bad = |what: &'static str, message: String| Error::InvalidArgument { what, message };
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad(
                "url",
                format!(
                    "`{}` is not an http:// or https:// URL",
                    crate::error::truncate(url)
                ),
            ));
        };
        let (authority, path) = rest
            .find('/')
            .map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        if authority.is_empty() || authority.contains('@') {
            return Err(bad(
                "url",
                format!(
                    "`{}` needs a host (and no user info)",
                    crate::error::truncate(url)
                ),
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("url", "an unclosed `[` in its host".into()))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p
                    .parse()
                    .map_err(|_| bad("url", format!("port `{p}` is not a number")))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("url", "text after its `]`".into())),
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse()
                        .map_err(|_| bad("url", format!("port `{p}` is not a number")))?,
                ),
                None => (authority.to_owned(), default_port),
            }
        };
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad(
                "url",
                "its path holds spaces or control characters".into(),
            ));
        }
        if !(1..=100).contains(&max_attempts) {
            return Err(bad(
                "max_attempts",
                format!("{max_attempts} is not from 1 to 100"),
            ));
        }
        let hour = Duration::from_secs(3600);
        for (what, d) in [("backoff", backoff), ("timeout", timeout)] {
            if d.is_zero() || d > hour {
                return Err(bad(what, format!("{d:?} is not from 1ms to an hour")));
            }
        }
        Ok(Self {
            url: url.to_owned(),
            tls,
            host,
            port,
            path: path.to_owned(),
            secret,
            events,
            max_attempts,
            backoff,
            timeout,
        })
    }

    /// Whether it wants events of `type_name`.
    #[must_use]
    pub fn wants(&self, type_name: &str) -> bool {
        self.events.wants(type_name)
    }
}

/// One attempt to deliver a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message (`webhook-id`).
    pub message_id: String,
    /// Its event type.
    pub event_type: &'static str,
    /// The endpoint's URL.
    pub url: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The HTTP status answered, if any.
    pub status: Option<u16>,
    /// Why it failed, when no status came back.
    pub error: Option<String>,
    /// When it ended, µs since the epoch (the system clock).
    pub at: crate::clock::Micros,
}

/// A message every attempt failed to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message, as it was sent.
    pub message: Message,
    /// Its event type.
    pub event_type: &'static str,
    /// The endpoint's URL.
    pub url: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's status or error.
    pub last: String,
}

/// What a warden's webhook deliveries did: the latest [`LOG_CAPACITY`]
/// attempts and dead letters, and how many events were dropped because an
/// endpoint fell more than [`crate::events::CAPACITY`] events behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Log {
    /// Attempts, oldest first.
    pub deliveries: VecDeque<Delivery>,
    /// Dead letters, oldest first.
    pub dead_letters: VecDeque<DeadLetter>,
    /// Events an endpoint never saw (it fell behind).
    pub dropped: u64,
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == LOG_CAPACITY {
        q.pop_front();
    }
    q.push_back(v);
}

/// Starts one delivery thread per endpoint, each with its own subscription
/// to `events`: messages to one endpoint go in order, one at a time, at least
/// once (retried with backoff until answered 2xx or dead-lettered). The
/// threads end when `events`' last sender (the warden) is dropped. Nothing
/// here can block or fail a decision.
pub(crate) fn start(
    endpoints: &[Arc<Endpoint>],
    events: &tokio::sync::broadcast::Sender<crate::Event>,
    log: &Arc<Mutex<Log>>,
) {
    for ep in endpoints {
        let (endpoint, rx, sink) = (Arc::clone(ep), events.subscribe(), Arc::clone(log));
        let spawned = crate::events::worker("ratewarden-webhooks", async move {
            run(&endpoint, rx, &sink).await;
        });
        if let Err(e) = spawned {
            push(
                &mut log.lock().dead_letters,
                DeadLetter {
                    message: Message {
                        id: String::new(),
                        timestamp: 0,
                        body: String::new(),
                    },
                    event_type: "",
                    url: ep.url.clone(),
                    attempts: 0,
                    last: format!("the delivery thread could not start: {e}"),
                },
            );
        }
    }
}

async fn run(
    ep: &Endpoint,
    mut rx: tokio::sync::broadcast::Receiver<crate::Event>,
    log: &Mutex<Log>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match rx.recv().await {
            Ok(event) if ep.wants(event.type_name()) => deliver(ep, &event, log).await,
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => log.lock().dropped += n,
            Err(RecvError::Closed) => return,
        }
    }
}

fn now_us() -> crate::clock::Micros {
    use crate::clock::Clock;
    crate::clock::SystemClock.now()
}

async fn deliver(ep: &Endpoint, event: &crate::Event, log: &Mutex<Log>) {
    let message = Message::of(event);
    let kind = event.type_name();
    let mut last = String::new();
    for attempt in 1..=ep.max_attempts {
        // Signed at each attempt: receivers refuse old timestamps.
        let ts = now_us().div_euclid(1_000_000);
        let headers = headers(&ep.secret, &message.id, ts, message.body.as_bytes());
        let outcome = tokio::time::timeout(ep.timeout, post(ep, &headers, &message.body)).await;
        let (status, error) = match outcome {
            Ok(Ok(code)) => (Some(code), None),
            Ok(Err(e)) => (None, Some(e)),
            Err(_) => (None, Some(format!("no answer within {:?}", ep.timeout))),
        };
        last = match (&status, &error) {
            (Some(s), _) => format!("HTTP {s}"),
            (None, Some(e)) => e.clone(),
            (None, None) => String::new(),
        };
        push(
            &mut log.lock().deliveries,
            Delivery {
                message_id: message.id.clone(),
                event_type: kind,
                url: ep.url.clone(),
                attempt,
                status,
                error,
                at: now_us(),
            },
        );
        if status.is_some_and(|s| (200..300).contains(&s)) {
            return;
        }
        if attempt < ep.max_attempts {
            let factor = 1u32 << (attempt - 1).min(20);
            let wait = ep
                .backoff
                .saturating_mul(factor)
                .min(Duration::from_secs(3600));
            tokio::time::sleep(wait).await;
        }
    }
    push(
        &mut log.lock().dead_letters,
        DeadLetter {
            message,
            event_type: kind,
            url: ep.url.clone(),
            attempts: ep.max_attempts,
            last,
        },
    );
}

/// POSTs `body` and answers the status code.
async fn post(
    ep: &Endpoint,
    headers: &[(&'static str, String); 3],
    body: &str,
) -> std::result::Result<u16, String> {
    let stream = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let host = if ep.host.contains(':') {
        format!("[{}]", ep.host)
    } else {
        ep.host.clone()
    };
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: ratewarden/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        ep.path,
        ep.port,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    for (name, value) in headers {
        req.push_str(name);
        req.push_str(": ");
        req.push_str(value);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    if ep.tls {
        let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
            .map_err(|e| format!("host: {e}"))?;
        let mut tls = connector()
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(&mut tls, req.as_bytes()).await
    } else {
        let mut plain = stream;
        exchange(&mut plain, req.as_bytes()).await
    }
}

/// Writes the request and reads the status line.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    req: &[u8],
) -> std::result::Result<u16, String> {
    s.write_all(req).await.map_err(|e| format!("send: {e}"))?;
    s.flush().await.map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        if n == 0 || buf.len() > 8192 {
            return Err("the connection closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split(' ');
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(format!(
            "not an HTTP answer: `{}`",
            crate::error::truncate(line.lines().next().unwrap_or(""))
        )),
    }
}

fn connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    fn ep(url: &str) -> Result<Endpoint> {
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        Endpoint::new(
            url,
            s,
            crate::events::Filter::default(),
            3,
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
    }

    #[test]
    fn urls_are_read_or_refused_by_what_is_wrong() {
        let e = ep("https://hooks.example.com/rw?x=1").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.path.as_str()),
            (true, "hooks.example.com", 443, "/rw?x=1")
        );
        let e = ep("http://[::1]:8080").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.path.as_str()),
            (false, "::1", 8080, "/")
        );
        for (bad, says) in [
            ("ftp://x/", "http:// or https://"),
            ("http:///x", "needs a host"),
            ("http://u:p@x/", "needs a host"),
            ("http://x:port/", "not a number"),
            ("http://[::1/", "unclosed"),
            ("http://x/a b", "spaces"),
        ] {
            let e = ep(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn an_endpoint_wants_its_types_and_prefixes() {
        let mut e = ep("http://x/").unwrap();
        assert!(e.wants("limit.exhausted"));
        e.events =
            crate::events::Filter::new(vec!["limit.".into(), "upstream.breaker_changed".into()])
                .unwrap();
        assert!(e.wants("limit.exhausted") && e.wants("limit.threshold_crossed"));
        assert!(e.wants("upstream.breaker_changed") && !e.wants("upstream.zone_changed"));
    }
}
