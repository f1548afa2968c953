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
use ratewarden::{
    Amount, CallOutcome, Cost, ErrorKind, Policy, Request, ReservationId, Scope, Usage, WaitFor,
    Warden,
};

mod clock;
mod compact;
mod convert;
mod decision;
mod errors;
mod http;
mod warden;

pub use clock::*;
pub use compact::*;
pub use convert::*;
pub use decision::*;
use errors::*;
pub use http::*;
pub use warden::*;

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
