//! A coordinated resource's upstream state on Redis: one hash per resource,
//! `<namespace>:{up:<resource>}:up`, on the resource's own slot (its hash
//! tag), read and changed only by `lua/upstream.lua` on the server's clock.

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::upstream::light::{
    Ask, DIMENSIONS, Gate, Light, Observed, Reading, Sample, Ticket, UpstreamState, Verdict, Why,
};
use crate::upstream::{Coordination, Dimension, Zone};

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
        let mut args = vec![
            self.now_arg().to_string(),
            op.to_owned(),
            c.ttl.to_string(),
            c.green.to_string(),
            c.red.to_string(),
            c.delay_standard.to_string(),
            c.delay_background.to_string(),
            c.pace.to_string(),
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

fn state_of(v: &[i64]) -> UpstreamState {
    let mut s = UpstreamState {
        blocked_until: v[0],
        pace_next: v[1],
        ..UpstreamState::default()
    };
    for (i, r) in s.dims.iter_mut().enumerate() {
        let f = &v[2 + i * 5..7 + i * 5];
        *r = Reading {
            limit: f[0],
            remaining: f[1],
            spent: f[2],
            reset_at: f[3],
            seen_at: f[4],
        };
    }
    s
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
        let mut extra = vec![opt(sample.block)];
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
        if v.len() != 4 + 5 * DIMENSIONS {
            return Err(reply_error("observe", v.len()));
        }
        Ok(Observed {
            now: v[0],
            before: Zone::of_code(v[1]),
            state: state_of(&v[2..]),
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
        if v.len() != 10 + 2 * DIMENSIONS {
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
        };
        let verdict = match v[0] {
            0 => Verdict::Pass,
            1 => Verdict::Delay(v[1]),
            _ => Verdict::Deny {
                retry: v[1],
                why: match v[2] {
                    0 => Why::Blocked,
                    1 => Why::Exhausted(dim(v[3]).unwrap_or(Dimension::Requests)),
                    2 => Why::Red,
                    3 => Why::Paced,
                    _ => Why::Deferred,
                },
            },
        };
        let ticket = (v[7] == 1).then(|| {
            let mut t = Ticket {
                pace: (v[8] >= 0).then_some((v[8], v[9])),
                ..Ticket::default()
            };
            t.amounts.copy_from_slice(&v[10..10 + DIMENSIONS]);
            t.seen
                .copy_from_slice(&v[10 + DIMENSIONS..10 + 2 * DIMENSIONS]);
            t
        });
        Ok(Gate {
            light,
            verdict,
            ticket,
        })
    }))
}

pub(super) fn ungate<'a>(
    b: &'a RedisBackend,
    resource: &'a str,
    c: &'a Coordination,
    t: Ticket,
) -> Pending<'a, ()> {
    Pending::Future(Box::pin(async move {
        let mut extra: Vec<String> = t.amounts.iter().map(ToString::to_string).collect();
        extra.extend(t.seen.iter().map(ToString::to_string));
        let (before, after) = t.pace.unwrap_or((-1, 0));
        extra.extend([before.to_string(), after.to_string()]);
        b.upstream_call(resource, c, "ungate", extra, false).await?;
        Ok(())
    }))
}
