//! A decision on a coordinated resource: its breaker and traffic light
//! first, then its limits — decided here once for every backend
//! ([`crate::backend::Backend::decide_gated`]). What the light counted is
//! given back when the limits deny (or fail); a light that denies leaves the
//! limits unchanged (they are only checked, so the decision reports their
//! true state).

use std::time::Duration;

use super::Coordination;
use super::light::{Gate, Light, Verdict, Why};
use crate::backend::{Backend, Mode};
use crate::decision::{Caps, Decision, Outcome};
use crate::error::Result;
use crate::plan::Plan;

/// Gate, then decide (see the module docs).
pub(crate) async fn decide<B: Backend + ?Sized>(
    backend: &B,
    plan: &Plan<'_>,
    mode: Mode<'_>,
    resource: &str,
    c: &Coordination,
) -> Result<Decision> {
    let mut gate = backend
        .gate(resource, c, plan.upstream_ask(mode.mutates()))
        .await?;
    let mut d = match gate.verdict {
        Verdict::Deny { retry, why } => {
            let mut d = backend.decide(plan, Mode::Check).await?;
            denied(&mut d, retry, why, resource, &gate.light);
            d
        }
        Verdict::Pass | Verdict::Delay(_) => {
            let d = backend.decide(plan, mode).await;
            let mut switched = false;
            if !d.as_ref().is_ok_and(Decision::allowed) {
                // A failure to give back only leaves the estimate lower
                // until the next response (never over-admits).
                if let Some(mut t) = gate.ticket {
                    t.denied = d.is_ok();
                    switched = backend.ungate(resource, c, t).await.unwrap_or(false);
                }
            }
            let mut d = d?;
            passed(&mut d, &gate, resource, c);
            if switched {
                gate.light.cascade = Some(true);
            }
            d
        }
    };
    d.light = Some(gate.light);
    Ok(d)
}

fn add_reason(d: &mut Decision, why: String) {
    d.reason = Some(match d.reason.take() {
        Some(r) => format!("{r}; {why}"),
        None => why,
    });
}

/// The limits' check turned into the light's denial.
pub(crate) fn denied(d: &mut Decision, retry: i64, why: Why, resource: &str, light: &Light) {
    let retry = Duration::from_micros(u64::try_from(retry).unwrap_or(0));
    d.retry_after = if d.allowed() {
        Some(retry)
    } else {
        d.retry_after.map(|r| r.max(retry))
    };
    let why = denial(resource, why, light);
    d.reason = Some(match d.reason.take().filter(|_| !d.allowed()) {
        Some(limits) => format!("{why}; {limits}"),
        None => why,
    });
    d.outcome = Outcome::Deny;
    d.caps = Caps::default();
    d.reservation = None;
}

/// The limits' decision with the light's caps on an admission.
pub(crate) fn passed(d: &mut Decision, gate: &Gate, resource: &str, c: &Coordination) {
    if !d.allowed() {
        return;
    }
    if gate.max_tokens.is_some() || gate.model.is_some() {
        d.caps.merge(&Caps {
            max_tokens: gate.max_tokens.and_then(|t| u64::try_from(t).ok()),
            model: gate.model.and_then(|i| c.breaker.fallback.get(i).cloned()),
            ..Caps::default()
        });
        d.outcome = Outcome::AllowWithCaps;
        add_reason(
            d,
            format!(
                "the breaker of `{resource}` is pre-emptively open: its quota runs out within {}",
                crate::policy::fmt_duration(c.breaker.horizon)
            ),
        );
    }
    if gate.light.sequential {
        d.caps.sequential = true;
        d.outcome = Outcome::AllowWithCaps;
        add_reason(
            d,
            format!(
                "`{resource}` is in sequential mode (a burst of denials or failures): one call at a time"
            ),
        );
    }
    if gate.probe {
        add_reason(
            d,
            format!("the half-open breaker's probe of `{resource}`: report its outcome"),
        );
    }
    if let Verdict::Delay(us) = gate.verdict {
        if us > 0 {
            d.caps.merge(&Caps {
                delay_ms: Some(u64::try_from((us + 999) / 1000).unwrap_or(0)),
                ..Caps::default()
            });
            d.outcome = Outcome::AllowWithCaps;
            let why = format!(
                "the upstream of `{resource}` is amber ({}): {} callers wait first",
                share(&gate.light),
                d.priority
            );
            add_reason(d, why);
        }
    }
}

fn share(light: &Light) -> String {
    match (light.left, light.dimension) {
        (Some(l), Some(d)) => format!("{}.{}% of {} left", l / 10, l % 10, d.as_str()),
        _ => "nothing fresh known".to_owned(),
    }
}

fn denial(resource: &str, why: Why, light: &Light) -> String {
    match why {
        Why::Blocked => {
            format!("the upstream of `{resource}` asked callers to wait (Retry-After or 429)")
        }
        Why::Exhausted(d) => format!(
            "the upstream of `{resource}` has no {} left for this request until it resets",
            d.as_str()
        ),
        Why::Red => format!(
            "the upstream of `{resource}` is red ({}): background callers wait for its reset",
            share(light)
        ),
        Why::Open => format!(
            "the breaker of `{resource}` is open: the upstream failed (429 or 5xx); it half-opens for one probe"
        ),
        Why::Probing => format!(
            "the breaker of `{resource}` is half-open and its probe is out: waiting for its outcome"
        ),
        Why::Deferred => format!(
            "the upstream of `{resource}` is amber ({}): a delay could reach past its reset, so this asks again later",
            share(light)
        ),
        Why::Paced => format!(
            "the upstream of `{resource}` is red ({}): standard callers go one at a time, paced",
            share(light)
        ),
    }
}
