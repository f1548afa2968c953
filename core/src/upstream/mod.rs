//! Coordinating on the upstream's real state (SPEC §3.3).
//!
//! **What the upstream says.** [`parse`] reads the rate-limit headers of the
//! providers agents call into one shape ([`Observation`]). Understood: OpenAI
//! and Azure OpenAI (`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`,
//! resets like `6m0s`, `1.5s`, `20ms`), Anthropic
//! (`anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
//! {limit,remaining,reset}`, RFC 3339 resets), GitHub (`x-ratelimit-limit`,
//! `-remaining`, `-used`, `-reset` in epoch seconds, `x-ratelimit-resource`),
//! the IETF drafts (draft-6 `RateLimit-Limit`/`-Remaining`/`-Reset`, draft-7
//! `RateLimit: limit=…, remaining=…, reset=…`, draft-11 `RateLimit` /
//! `RateLimit-Policy` lists, parsed as RFC 9651 Structured Fields), generic
//! `X-RateLimit-*`, `Retry-After` (seconds or an HTTP-date) and
//! `retry-after-ms`. Every dimension (requests, tokens, input and output
//! tokens) is kept apart. A malformed or sentinel value is skipped with a
//! warning ([`Observation::warnings`]) — never a panic, never a number made up.
//!
//! **What every agent then sees.** A resource declared with `upstream:` in
//! the policy keeps the observed state of its upstream in the backend (the
//! embedded engine, or Redis on the resource's own slot, on the server's
//! clock), so one agent's response informs every process at once
//! ([`crate::Warden::observe`], [`crate::Warden::report`]). Each decision on
//! the resource then passes its **traffic light** ([`Zone`]) — see
//! [`light`] for the rules, and its predictive circuit breaker — see
//! [`breaker`] — decided once here for every backend.

pub mod breaker;
pub mod cascade;
pub(crate) mod gated;
pub(crate) mod headers;
pub mod light;
pub mod sequence;

pub use breaker::{BreakerConfig, BreakerState};
pub use cascade::CascadeConfig;
pub use headers::{Dimension, Observation, Quota, parse};

/// The request header by which one call through a governed client (the
/// bindings' `govern`/`GovernedTransport`, `fetcher`) names its own priority;
/// the client removes it before the request is sent.
pub const PRIORITY_HEADER: &str = "ratewarden-priority";

/// The request header by which one call through a governed client names its
/// own scope; removed before the request is sent.
pub const SCOPE_HEADER: &str = "ratewarden-scope";
pub use light::{Coordination, Light, QuotaView, UpstreamView, Zone};
