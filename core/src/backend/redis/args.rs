//! The arguments of the decision scripts: which script serves a step
//! (`rate.lua` for rate limits alone, `decide.lua` otherwise) and its KEYS and
//! ARGV, exactly as the scripts' headers list them.

#[allow(clippy::wildcard_imports)]
use super::*;

/// What a decision script is asked to do (`ARGV` mode of `decide.lua` /
/// `rate.lua`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepMode {
    Check,
    Acquire,
    Reserve,
    Delegate,
}

impl StepMode {
    const fn arg(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::Acquire => "acquire",
            Self::Reserve => "reserve",
            Self::Delegate => "delegate",
        }
    }
}

/// Whether every limit of `part` is a rate (no holds, windows or grants).
pub(super) fn rates_only(plan: &Plan<'_>, part: &Part) -> bool {
    part.items
        .iter()
        .all(|&i| matches!(plan.get(i).def.kind, LimitKind::Rate(_)))
}

/// What one script run on one part is asked to do.
pub(super) struct Step<'s> {
    pub(super) mode: StepMode,
    pub(super) id: Option<ReservationId>,
    pub(super) lease: Micros,
    /// Priority rank to decide at (the served rank, on later steps).
    pub(super) rank: u8,
    /// First step of a multi-slot decision: leave the starvation tracker.
    pub(super) first_of_many: bool,
    /// Reservations on other slots to record as links.
    pub(super) links: &'s str,
    /// The operation id its answer is remembered under, and for how long (ms).
    pub(super) op: Option<(OperationId, i64)>,
}

impl Step<'_> {
    pub(super) fn new(mode: StepMode, plan: &Plan<'_>) -> Self {
        Self {
            mode,
            id: None,
            lease: 0,
            rank: plan.priority().rank(),
            first_of_many: false,
            links: "",
            op: None,
        }
    }
}

impl RedisBackend {
    /// KEYS and ARGV of the decision script for one part of a call (see
    /// `core/lua/decide.lua`).
    pub(super) fn decide_args(
        &self,
        call: Call<'_>,
        part: &Part,
        step: &Step<'_>,
    ) -> (Vec<String>, Vec<String>) {
        let Call { plan, delegate, .. } = call;
        let n = part.items.len();
        let mut keys: Vec<String> = Vec::with_capacity(n + 8);
        let mut args: Vec<String> = Vec::with_capacity(16 + 13 * n);
        for &i in &part.items {
            keys.push(self.key(plan.get(i).key));
        }
        let caller = self.caller_key(plan).filter(|_| part.primary);
        let has_caller = caller.is_some();
        keys.push(caller.unwrap_or_else(|| self.spare_key(part.slot)));
        keys.push(
            step.id
                .map_or_else(|| self.spare_key(part.slot), |id| self.record_key(id)),
        );
        let scope = plan.scope();
        // Grants cover limits of the scope tree's slot only, so only a primary
        // part on that slot reads them; and they cover only holding limits
        // (quota, budget, concurrency), so a part made of rate limits alone
        // skips the lookups (one HMGET per scope level).
        let grants =
            if !rates_only(plan, part) && part.primary && part.slot == tag_slot(scope.prefix(1)) {
                scope.depth()
            } else {
                0
            };
        for d in 1..=grants {
            keys.push(self.key(KeyRef {
                prefix: scope.prefix(d),
                name: "@grant",
            }));
        }
        let (child, parent) = match delegate.filter(|_| step.mode == StepMode::Delegate) {
            Some((c, p)) => (Some(c), p),
            None => (None, None),
        };
        keys.push(child.map_or_else(
            || self.spare_key(part.slot),
            |c| {
                self.key(KeyRef {
                    prefix: c.as_str(),
                    name: "@grant",
                })
            },
        ));
        keys.push(parent.map_or_else(|| self.spare_key(part.slot), |p| self.record_key(p)));
        keys.push(step.op.map_or_else(
            || self.spare_key(part.slot),
            |(op, _)| self.op_key(op, part.slot, plan),
        ));
        args.extend([
            self.now_arg().to_string(),
            step.mode.arg().to_owned(),
            n.to_string(),
            step.rank.to_string(),
            plan.promote_after().to_string(),
            u8::from(has_caller).to_string(),
            step.id.map_or_else(String::new, |i| i.to_string()),
            step.lease.to_string(),
            TOMBSTONE_US.to_string(),
            child.map_or(scope.as_str(), Scope::as_str).to_owned(),
            grants.to_string(),
            parent.map_or_else(String::new, |p| p.to_string()),
            u8::from(step.first_of_many).to_string(),
            step.links.to_owned(),
        ]);
        args.extend(op_args(plan, step));
        let rejects = reject_list(plan);
        for &i in &part.items {
            let item = plan.get(i);
            let def = &**item.def;
            let (kind, cap, p, l) = match &def.kind {
                LimitKind::Rate(r) => ("r", r.burst, r.p, r.l),
                LimitKind::Concurrency => ("s", def.limit, 1, 1),
                _ => ("c", def.limit, 1, 1),
            };
            let (wk, wlen, woff) = window_args(&def.kind);
            args.extend([kind.to_owned(), item.amount.to_string(), cap.to_string()]);
            for p in Priority::ALL {
                args.push(def.floors.usable(cap, p).to_string());
            }
            args.extend([
                p.to_string(),
                l.to_string(),
                wk.to_owned(),
                wlen.to_string(),
                woff.to_string(),
                def.unit.clone(),
            ]);
            args.push(overage_token(def, cap, &rejects));
        }
        match plan.waiter() {
            None => args.extend([String::new(), "0".into(), "0".into(), "0".into()]),
            Some(w) => args.extend([
                format!("{:016x}", w.id),
                w.until.saturating_sub(self.local_now()).max(0).to_string(),
                Waiter::GRACE.to_string(),
                u8::from(w.leave).to_string(),
            ]),
        }
        (keys, args)
    }

    /// The script for one part and its keys and arguments: `rate.lua` for a
    /// check or acquire of rate limits only with no starvation tracker (the
    /// common case: a third of the arguments, no grant, record or window
    /// work), `decide.lua` for everything else.
    pub(super) fn script_for(
        &self,
        call: Call<'_>,
        part: &Part,
        step: &Step<'_>,
    ) -> (&Script, Vec<String>, Vec<String>) {
        let plan = call.plan;
        // check / acquire hold nothing and make no record; a starvation tracker
        // lives on the primary part only.
        let lean = self.use_rate_script
            && plan.waiter().is_none()
            && matches!(step.mode, StepMode::Check | StepMode::Acquire)
            && (plan.caller_key().is_none() || !part.primary)
            && rates_only(plan, part);
        if !lean {
            let (keys, args) = self.decide_args(call, part, step);
            return (&self.decide, keys, args);
        }
        let rank = usize::from(step.rank.min(2));
        let mut keys = Vec::with_capacity(part.items.len());
        let mut args = Vec::with_capacity(5 + 5 * part.items.len());
        args.extend([
            self.now_arg().to_string(),
            step.mode.arg().to_owned(),
            step.rank.to_string(),
        ]);
        args.extend(op_args(plan, step));
        for &i in &part.items {
            let item = plan.get(i);
            keys.push(self.key(item.key));
            if let LimitKind::Rate(r) = &item.def.kind {
                args.extend([
                    item.amount.to_string(),
                    r.burst.to_string(),
                    item.def
                        .floors
                        .usable(r.burst, Priority::ALL[rank])
                        .to_string(),
                    r.p.to_string(),
                    r.l.to_string(),
                ]);
            }
        }
        if let Some((op, _)) = step.op {
            keys.push(self.op_key(op, part.slot, plan));
        }
        (&self.rate, keys, args)
    }

    /// The exact command one `acquire` of `plan` sends — `EVALSHA <sha> <numkeys>
    /// <keys…> <args…>` — so benchmarks can replay it with `redis-benchmark`.
    /// For a plan on one slot (every plan on a standalone server); without an
    /// operation id (what the benchmark replays is the same command each time).
    #[doc(hidden)]
    #[must_use]
    pub fn acquire_command(&self, plan: &Plan<'_>) -> Vec<String> {
        let call = Call::of(plan, Mode::Acquire);
        let part = &self.parts(call)[0];
        let step = Step::new(StepMode::Acquire, plan);
        let (script, keys, args) = self.script_for(call, part, &step);
        let mut out = vec![
            "EVALSHA".to_owned(),
            script.get_hash().to_owned(),
            keys.len().to_string(),
        ];
        out.extend(keys);
        out.extend(args);
        out
    }
}

/// The operation arguments both scripts take, in order: the id its answer is
/// remembered under (`""`: none), for how long (ms), and the request's
/// fingerprint (see `common.lua`).
fn op_args(plan: &Plan<'_>, step: &Step<'_>) -> [String; 3] {
    match step.op {
        None => [String::new(), "0".to_owned(), String::new()],
        Some((op, ms)) => [
            op.to_string(),
            ms.to_string(),
            format!("{:016x}", plan.fingerprint(step.mode.arg())),
        ],
    }
}

/// The units a commit is refused for when its actual exceeds the reserved
/// amount (limits with `overage: reject`), as `unit=amount,…`: every record
/// of a reservation carries the whole list, so on a cluster each slot's
/// commit refuses (or not) alike, before any slot changes.
fn reject_list(plan: &Plan<'_>) -> String {
    let mut out = String::new();
    let mut seen: SmallVec<[&str; 4]> = SmallVec::new();
    for l in plan.limits() {
        if l.def.overage == Overage::Reject
            && !matches!(l.def.kind, LimitKind::Concurrency)
            && !seen.contains(&l.def.unit.as_str())
        {
            seen.push(&l.def.unit);
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&l.def.unit);
            out.push('=');
            out.push_str(&l.amount.to_string());
        }
    }
    out
}

/// A limit's overage rule as `settle.lua` reads it from the record:
/// `charge` (`charge:<capacity>` on quotas and budgets), `cap`, `reject`, `avail:<capacity>` or
/// `od:<capacity>:<overdraft>`, then `|` and the reservation's reject list
/// when it has one.
fn overage_token(def: &crate::policy::LimitDef, cap: i64, rejects: &str) -> String {
    let counted = matches!(def.kind, LimitKind::Quota(_) | LimitKind::Budget(_));
    let mut t = match def.overage {
        // With its capacity on quotas and budgets: a commit past the
        // reservation reports where it took the spend (debt, thresholds).
        Overage::Charge if counted => format!("charge:{cap}"),
        Overage::Charge => "charge".to_owned(),
        Overage::Cap => "cap".to_owned(),
        Overage::Reject => "reject".to_owned(),
        Overage::AllowIfAvailable => format!("avail:{cap}"),
        Overage::AllowWithOverdraft => format!("od:{cap}:{}", def.overdraft),
    };
    if !rejects.is_empty() {
        t.push('|');
        t.push_str(rejects);
    }
    t
}

/// A limit's window as the scripts read it: kind (`n` none, `l` lifetime,
/// `f` fixed, `w` week, `m` month, `y` year), length and offset (µs).
pub(super) fn window_args(kind: &LimitKind) -> (&'static str, i64, i64) {
    match kind.window() {
        None => ("n", 0, 0),
        Some(Window::Lifetime) => ("l", 0, 0),
        Some(Window::Fixed { len, offset }) => ("f", len, offset),
        Some(Window::Week { offset }) => ("w", 0, offset),
        Some(Window::Month { offset }) => ("m", 0, offset),
        Some(Window::Year { offset }) => ("y", 0, offset),
    }
}
