//! # ratewarden
//!
//! A runtime governor for AI agents and the APIs they call. Before an agent
//! spends anything — an API request, LLM tokens, dollars, a risky action — it
//! asks a [`Warden`] for one atomic [`Decision`]: allow, allow with caps, or
//! deny with a retry time. Every limit the request touches (the scope chain
//! `tenant → user → run`, the upstream resource, the action) is checked and
//! charged together or not at all.
//!
//! ```
//! use ratewarden::{Policy, Request, Warden};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ratewarden::Result<()> {
//! let policy = Policy::from_value(&serde_json::json!({
//!     "scopes": {
//!         "tenant": { "limits": [
//!             { "name": "tenant-usd", "kind": "budget", "unit": "usd", "limit": "50", "per": "month" }
//!         ]},
//!         "user": { "limits": [
//!             { "name": "user-rps", "kind": "rate", "limit": 5, "per": "1s" }
//!         ]}
//!     }
//! }))?;
//! let warden = Warden::new(policy);
//! let request = Request::parse("tenant:acme/user:42")?.spend("usd", ratewarden::Amount::parse("0.02")?);
//! let decision = warden.acquire(&request).await?;
//! assert!(decision.allowed());
//! # Ok(()) }
//! ```
//!
//! Modules: [`policy`] (loading and validation), [`scope`], [`amount`],
//! [`decision`], [`backend`] (the storage contract and the embedded engine),
//! [`clock`], [`eval`] (the arithmetic every backend shares), [`events`]
//! (degraded decisions and backend outages, via [`Warden::subscribe`]).

pub mod amount;
pub mod audit;
pub mod backend;
pub mod calendar;
pub mod clock;
pub mod decision;
pub mod error;
pub mod eval;
pub mod events;
pub mod http;
pub mod ops;
pub mod plan;
pub mod policy;
pub mod pool;
pub mod pricing;
pub mod priority;
pub mod retry;
pub mod scope;
pub mod settle;
pub mod sink;
pub mod upstream;
mod warden;
pub mod webhook;

pub use amount::{Amount, Cost};
pub use backend::{Backend, MemoryBackend};
pub use clock::{Clock, ManualClock, SystemClock};
pub use decision::{
    Balance, Caps, Charge, CommitReceipt, Decision, Degraded, LimitState, OperationId, Outcome,
    ReservationId, ReservationInfo,
};
pub use error::{Error, ErrorKind, Result};
pub use events::Event;
pub use http::HeaderStyle;
pub use plan::Request;
pub use policy::{Format, Policy};
pub use priority::Priority;
pub use scope::Scope;
pub use settle::{CallOutcome, Settlement, Usage};
pub use upstream::{UpstreamView, Zone};
/// How long a waiter for an ordered lock keeps its place without looking again (µs).
pub use warden::LINE_WAIT_LEASE;
pub use warden::{Allocation, DelegateFrom, MAX_LEASE, Turn, WaitCancel, WaitFor, Warden};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The version of this crate.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
