//! A coordinated resource's upstream state on Redis: one hash per resource,
//! `<namespace>:{up:<resource>}:up`, on the resource's own slot (its hash
//! tag), read and changed only by `lua/upstream.lua` on the server's clock.

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::upstream::breaker::{Breaker, BreakerState};
use crate::upstream::cascade::{Cascade, MAX_DENIALS};
use crate::upstream::light::{
    Ask, DIMENSIONS, Gate, Light, Observed, Reading, Sample, Ticket, UpstreamState, Verdict, Why,
};
use crate::upstream::{Coordination, Dimension, Zone};

/// Numbers per dimension in the script's state: l r s z t o u.
const PER_DIM: usize = 7;
/// Numbers of the state before the dimensions: b p bs bu bp bn bo.
const HEAD: usize = 7;

impl RedisBackend {
    /// The hash tag and key of `resource`'s upstream state.
    fn upstream_key(&self, resource: &str) -> (u16, String) {
        let tag = format!("up:{resource}");
        let key = format!("{}:{{{tag}}}:up", self.namespace);
        (tag_slot(&tag), key)
    }

    /// Runs `upstream.lua` with `op` and its own arguments after the common
    /// ones. `repeatable` operations are sent again after a dropped
    /// connection.
    async fn upstream_call(
        &self,
        resource: &str,
        c: &Coordination,
        op: &str,
        extra: Vec<String>,
        repeatable: bool,
    ) -> Result<Vec<i64>> {
        let (slot, key) = self.upstream_key(resource);
        if let Some(e) = self.skipping(slot) {
            return Err(e);
        }
        let b = &c.breaker;
        let mut args = vec![
            self.now_arg().to_string(),
            op.to_owned(),
            c.ttl.to_string(),
            c.green.to_string(),
            c.red.to_string(),
            c.delay_standard.to_string(),
            c.delay_background.to_string(),
            c.pace.to_string(),
            b.horizon.to_string(),
            b.max_tokens.to_string(),
            b.fallback.len().to_string(),
            b.step.to_string(),
            b.open_for.to_string(),
            b.probe_lease.to_string(),
            format!("{}:events", self.namespace),
            resource.to_owned(),
            c.cascade.denials.to_string(),
            c.cascade.within.to_string(),
            c.cascade.cooldown.to_string(),
        ];
        args.extend(extra);
        let keys = [key];
        let attempt = || self.invoke::<Vec<Value>>(&self.upstream, &keys, &args);
        let reply = if repeatable {
            self.resent(slot, attempt).await
        } else {
            self.bounded(slot, attempt()).await
        };
        let values = reply.map_err(|e| e.into_error(None))?;
        Ok(values.iter().map(int).collect())
    }
}

fn reply_error(op: &str, len: usize) -> Error {
    Error::Internal {
        message: format!("upstream.lua answered {op} with {len} values"),
    }
}

/// The state as the script dumps it: the head, the dimensions, then the
/// cascade (until, on, the number of recent denials and their times).
fn state_of(v: &[i64]) -> UpstreamState {
    let mut s = UpstreamState {
        blocked_until: v[0],
        pace_next: v[1],
        breaker: Breaker {
            state: BreakerState::of_code(v[2]),
            until: v[3],
            probe: v[4],
            since: v[5],
            opens: v[6],
        },
        ..UpstreamState::default()
    };
    for (i, r) in s.dims.iter_mut().enumerate() {
        let f = &v[HEAD + i * PER_DIM..HEAD + (i + 1) * PER_DIM];
        *r = Reading {
            limit: f[0],
            remaining: f[1],
            spent: f[2],
            reset_at: f[3],
            seen_at: f[4],
            observed: f[5],
            burn: f[6],
        };
    }
    let at = HEAD + PER_DIM * DIMENSIONS;
    let mut cascade = Cascade {
        until: v[at],
        on: v[at + 1] == 1,
        ..Cascade::default()
    };
    let recent = &v[at + 3..];
    let n = recent.len().min(MAX_DENIALS);
    cascade.recent[MAX_DENIALS - n..].copy_from_slice(&recent[recent.len() - n..]);
    s.cascade = cascade;
    s
}

/// How many numbers the state takes in a reply, `v` starting at it.
fn state_len(v: &[i64]) -> Option<usize> {
    let at = HEAD + PER_DIM * DIMENSIONS;
    let n = usize::try_from(*v.get(at + 2)?).ok()?;
    (v.len() == at + 3 + n).then_some(v.len())
}

fn opt(v: Option<i64>) -> String {
    v.unwrap_or(-1).to_string()
}

pub(super) fn observe<'a>(
    b: &'a RedisBackend,
    resource: &'a str,
    c: &'a Coordination,
    sample: &'a Sample,
) -> Pending<'a, Observed> {
    Pending::Future(Box::pin(async move {
        let mut extra = vec![opt(sample.block), sample.outcome.code().to_string()];
        for d in &sample.dims {
            match d {
                None => extra.extend(["0".into(), "-1".into(), "0".into(), "-1".into()]),
                Some(s) => extra.extend([
                    "1".into(),
                    opt(s.limit),
                    s.remaining.to_string(),
                    opt(s.reset),
                ]),
            }
        }
        let v = b.upstream_call(resource, c, "observe", extra, true).await?;
        if v.len() < 4 || state_len(&v[4..]).is_none() {
            return Err(reply_error("observe", v.len()));
        }
        Ok(Observed {
            now: v[0],
            before: Zone::of_code(v[1]),
            breaker_before: BreakerState::of_code(v[2]),
            cascade_before: v[3] == 1,
            state: state_of(&v[4..]),
        })
    }))
}

pub(super) fn gate<'a>(
    b: &'a RedisBackend,
    resource: &'a str,
    c: &'a Coordination,
    ask: Ask,
) -> Pending<'a, Gate> {
    Pending::Future(Box::pin(async move {
        let mut extra = vec![
            ask.priority.rank().to_string(),
            if ask.mutate { "1" } else { "0" }.to_owned(),
        ];
        extra.extend(ask.amounts.iter().map(ToString::to_string));
        let v = b
            .upstream_call(resource, c, "gate", extra, !ask.mutate)
            .await?;
        if v.len() != 17 + 2 * DIMENSIONS {
            return Err(reply_error("gate", v.len()));
        }
        let dim = |code: i64| {
            usize::try_from(code)
                .ok()
                .and_then(|i| Dimension::ALL.get(i).copied())
        };
        let light = Light {
            zone: Zone::of_code(v[4]),
            left: u16::try_from(v[5]).ok(),
            dimension: dim(v[6]),
            breaker: BreakerState::of_code(v[7]),
            probe: v[12] == 1,
            sequential: v[15] == 1,
            cascade: (v[16] >= 0).then_some(v[16] == 1),
        };
        let verdict = match v[0] {
            0 => Verdict::Pass,
            1 => Verdict::Delay(v[1]),
            _ => Verdict::Deny {
                retry: v[1],
                why: Why::of_code(v[2], dim(v[3])).ok_or_else(|| reply_error("gate", v.len()))?,
            },
        };
        let ticket = (v[8] == 1).then(|| {
            let mut t = Ticket {
                pace: (v[9] >= 0).then_some((v[9], v[10])),
                probe: (v[11] >= 0).then_some(v[11]),
                ..Ticket::default()
            };
            t.amounts.copy_from_slice(&v[17..17 + DIMENSIONS]);
            t.seen
                .copy_from_slice(&v[17 + DIMENSIONS..17 + 2 * DIMENSIONS]);
            t
        });
        Ok(Gate {
            light,
            verdict,
            ticket,
            max_tokens: (v[13] >= 0).then_some(v[13]),
            model: usize::try_from(v[14]).ok(),
            probe: v[12] == 1,
        })
    }))
}

pub(super) fn ungate<'a>(
    b: &'a RedisBackend,
    resource: &'a str,
    c: &'a Coordination,
    t: Ticket,
) -> Pending<'a, bool> {
    Pending::Future(Box::pin(async move {
        let mut extra: Vec<String> = t.amounts.iter().map(ToString::to_string).collect();
        extra.extend(t.seen.iter().map(ToString::to_string));
        let (before, after) = t.pace.unwrap_or((-1, 0));
        extra.extend([
            before.to_string(),
            after.to_string(),
            t.probe.unwrap_or(-1).to_string(),
            if t.denied { "1" } else { "0" }.to_owned(),
        ]);
        let v = b.upstream_call(resource, c, "ungate", extra, false).await?;
        Ok(v.first() == Some(&1))
    }))
}

pub(super) fn line<'a>(
    b: &'a RedisBackend,
    resource: &'a str,
    holder: u128,
    op: crate::backend::LineOp,
) -> Pending<'a, i64> {
    Pending::Future(Box::pin(async move {
        let tag = format!("up:{resource}");
        let slot = tag_slot(&tag);
        if let Some(e) = b.skipping(slot) {
            return Err(e);
        }
        let keys = [format!("{}:{{{tag}}}:line", b.namespace)];
        let mut args = vec![b.now_arg().to_string()];
        match op {
            crate::backend::LineOp::Enter { hold, wait } => args.extend([
                "enter".to_owned(),
                format!("{holder:032x}"),
                hold.to_string(),
                wait.to_string(),
            ]),
            crate::backend::LineOp::Leave => {
                args.extend(["leave".to_owned(), format!("{holder:032x}")]);
            }
        }
        // Entering again renews the same place, leaving twice is harmless:
        // both are safe to send again after a dropped connection.
        let attempt = || b.invoke::<i64>(&b.line, &keys, &args);
        b.resent(slot, attempt)
            .await
            .map_err(|e| e.into_error(None))
    }))
}
