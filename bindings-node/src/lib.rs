//! Node.js bindings for `ratewarden`, loaded by `bindings-node/index.cjs`, which
//! wraps them in the public API (`Warden`, typed errors, Express middleware).
//!
//! This layer converts and bridges async; every decision is made by the core.
//! - On the embedded engine the `*Sync` methods decide on the calling thread
//!   (the JS layer hands back an already-settled Promise: no thread hop).
//! - The `*Async` methods run on napi's Tokio runtime (Redis, and waits) and
//!   return Promises; nothing blocks the event loop and no handle keeps the
//!   process alive.
//! - Errors carry their kind, code and details as JSON after a marker that the JS layer
//!   turns into a typed error class (users never parse messages).
//!
//! Modules, along the seams: `errors` (`to_js`, `OrThrow`), `convert` (JS values
//! into core inputs), `decision` (core outputs as plain objects), `clock`,
//! `warden` (`NativeWarden`: every operation), `compact` (the hot path's
//! encoding and its layout) and `http` (the Express middleware's native half).

use std::time::Duration;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use ratewarden::decision::{CommitReceipt, Decision as CoreDecision};
use ratewarden::http::{HeaderStyle, denial_body, rate_limit_headers};
use ratewarden::ops::{self, Setup, Source};
use ratewarden::pricing::{Priced as CorePriced, Usage as PricedUsage};
use ratewarden::{
    Amount, CallOutcome, Cost, ErrorKind, Policy, Request, ReservationId, Scope, Usage, WaitFor,
    Warden,
};

mod clock;
mod compact;
mod convert;
mod decision;
mod errors;
mod events;
mod http;
mod warden;

pub use clock::*;
pub use compact::*;
pub use convert::*;
pub use decision::*;
use errors::*;
pub use events::*;
pub use http::*;
pub use warden::*;

/// One quota an upstream's headers describe (`parseHeaders`).
#[napi(object)]
pub struct UpstreamQuota {
    /// `requests`, `tokens`, `input_tokens` or `output_tokens`.
    pub dimension: String,
    /// The provider's name for it, when it names one.
    pub name: Option<String>,
    /// Its capacity, when given.
    pub limit: Option<f64>,
    /// What is left, when given.
    pub remaining: Option<f64>,
    /// Seconds until replenished, when given.
    pub reset: Option<f64>,
}

/// What one response's rate-limit headers say (`parseHeaders`).
#[napi(object)]
pub struct ParsedHeaders {
    /// One quota per dimension (and name).
    pub quotas: Vec<UpstreamQuota>,
    /// Seconds the upstream asks callers to wait.
    pub retry_after: Option<f64>,
    /// Values present but not usable, one line each.
    pub warnings: Vec<String>,
}

/// An upstream response's rate-limit headers (`[name, value]` pairs) as
/// `ratewarden::upstream::parse` reads them, at `now` (seconds since the
/// epoch; default: this machine's clock).
#[napi]
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)] // counts ≤ 2^53; finite seconds
pub fn parse_headers(headers: Vec<Vec<String>>, now: Option<f64>) -> Result<ParsedHeaders> {
    use ratewarden::Clock as _;
    let now = match now {
        Some(s) if s.is_finite() && s >= 0.0 => (s * 1e6) as i64,
        Some(s) => {
            return Err(invalid(
                "now",
                format!("{s} is not seconds since the epoch"),
            ));
        }
        None => ratewarden::SystemClock.now(),
    };
    let o = ratewarden::upstream::parse(header_pairs(&headers), now);
    Ok(ParsedHeaders {
        quotas: o
            .quotas
            .iter()
            .map(|q| UpstreamQuota {
                dimension: q.dimension.as_str().to_owned(),
                name: q.name.clone(),
                limit: q.limit.map(|v| v as f64),
                remaining: q.remaining.map(|v| v as f64),
                reset: q.reset.map(|r| r.as_secs_f64()),
            })
            .collect(),
        retry_after: o.retry_after.map(|r| r.as_secs_f64()),
        warnings: o.warnings,
    })
}

/// Seconds to wait before retry `attempt` (1 = the first) of a `priority`
/// caller: the upstream's `retryAfter` (seconds) or an exponential backoff,
/// plus a jittered offset from the tier's band (`ratewarden::retry`).
#[napi]
pub fn retry_delay(
    attempt: u32,
    priority: Option<String>,
    retry_after: Option<f64>,
) -> Result<f64> {
    let priority: ratewarden::Priority = priority
        .as_deref()
        .unwrap_or("standard")
        .parse()
        .or_throw()?;
    let retry_after = optional_seconds(retry_after, "retryAfter")?;
    Ok(ratewarden::retry::RetryBands::default()
        .retry_delay(attempt, priority, retry_after)
        .as_secs_f64())
}

/// The Standard Webhooks headers of a message (`ratewarden::webhook`):
/// `webhook-id`, `webhook-timestamp`, `webhook-signature`.
#[napi]
pub fn sign_webhook(
    secret: String,
    msg_id: String,
    timestamp: i64,
    body: Buffer,
) -> Result<std::collections::HashMap<String, String>> {
    let secret = ratewarden::webhook::Secret::parse(&secret).or_throw()?;
    Ok(
        ratewarden::webhook::headers(&secret, &msg_id, timestamp, &body)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

/// Return the version of the ratewarden core library.
#[napi]
pub fn version() -> &'static str {
    ratewarden::VERSION
}

/// A scope string from `[kind, id]` pairs; ids may hold any text (`/`, `:`…):
/// they are escaped, never interpreted.
#[napi]
pub fn scope_of(segments: Vec<Vec<String>>) -> Result<String> {
    let mut pairs = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        match s.as_slice() {
            [k, id] => pairs.push((k.as_str(), id.as_str())),
            _ => {
                return Err(invalid(
                    "scope",
                    format!("segment {} is not a [kind, id] pair", i + 1),
                ));
            }
        }
    }
    Scope::from_segments(pairs)
        .map(|s| s.as_str().to_owned())
        .or_throw()
}

/// `[name, value]` string arrays as pairs (anything else is skipped: the JS
/// layer already dropped entries without a value).
pub(crate) fn header_pairs(headers: &[Vec<String>]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .filter_map(|p| match p.as_slice() {
            [k, v] => Some((k.as_str(), v.as_str())),
            _ => None,
        })
        .collect()
}

/// The request headers a governed `fetch` reads one call's priority and
/// scope from (and removes).
#[napi(object)]
pub struct GovernedHeaders {
    /// Names the call's priority.
    pub priority: String,
    /// Names the call's scope.
    pub scope: String,
}

/// The request headers of governed calls (the same in every binding).
#[napi]
pub fn governed_headers() -> GovernedHeaders {
    GovernedHeaders {
        priority: ratewarden::upstream::PRIORITY_HEADER.to_owned(),
        scope: ratewarden::upstream::SCOPE_HEADER.to_owned(),
    }
}
