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
}

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
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
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
        let id = match event {
            crate::Event::ThresholdCrossed(c) | crate::Event::LimitExhausted(c) => {
                format!("msg_{}", c.id)
            }
            _ => format!("msg_{:032x}", fastrand::u128(..)),
        };
        let at = event.at();
        let body = serde_json::json!({
            "type": event.type_name(),
            "timestamp": rfc3339(at),
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

/// µs since the epoch as RFC 3339 UTC with milliseconds.
fn rfc3339(us: crate::clock::Micros) -> String {
    let secs = us.div_euclid(1_000_000);
    let ms = us.rem_euclid(1_000_000) / 1000;
    let (y, mo, d) = crate::calendar::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
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
