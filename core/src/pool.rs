//! Soft allocations of a shared pool (issue 14 §3): an agent may hold a share
//! of a pool limit — a quota or budget declared on a resource without
//! `scope:` — kept for it while it heartbeats.
//!
//! An allocation of `amount` sets that much of every window aside for its
//! owner (the agent's scope and the scopes under it):
//!
//! - **active** (heartbeat within its `lease`): only its owner and critical
//!   callers may draw on what is unused of it;
//! - **idle** (no heartbeat for one lease): its unused part is *donated* —
//!   standard callers draw on it after their own share and the free pool,
//!   background callers still may not (they yield below their floor, as
//!   always); a heartbeat makes it active again with what is left;
//! - **dead** (no heartbeat for two leases): it is gone.
//!
//! A caller draws its own share first, then the free pool, then donations,
//! then (critical only) others' active shares. Allocations never let a pool
//! exceed its limit: a decision tests `used + held + amount ≤ usable` with
//! what the caller may not draw on counted as held. Each window renews every
//! share. What a reservation drew stays drawn if it is released.
//!
//! The embedded engine and `lua/decide.lua` implement these rules alike;
//! `lua/allot.lua` records allocations on Redis.

use crate::clock::Micros;
use crate::priority::Priority;

/// Longest lease an allocation may have (a heartbeat renews it).
pub const MAX_ALLOT_LEASE: Micros = 24 * 3600 * 1_000_000;

/// One agent's soft allocation of one pool limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allotment {
    /// The agent's scope (`agent:a`): it and the scopes under it draw on it.
    pub owner: Box<str>,
    /// Set aside per window.
    pub amount: i64,
    /// Drawn in `window`.
    pub drawn: i64,
    /// The window `drawn` counts in (another window: nothing drawn yet).
    pub window: i64,
    /// Active until (µs); idle after, dead one `lease` later.
    pub active_until: Micros,
    /// How long a heartbeat keeps it active (µs).
    pub lease: Micros,
}

/// What an allocation is at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Heartbeating: kept for its owner (and critical callers).
    Active,
    /// Not heartbeating for one lease: its unused part is donated.
    Idle,
    /// Not heartbeating for two leases: gone.
    Dead,
}

impl Allotment {
    /// Its phase at `now`.
    #[must_use]
    pub fn phase(&self, now: Micros) -> Phase {
        if now < self.active_until {
            Phase::Active
        } else if now < self.active_until.saturating_add(self.lease) {
            Phase::Idle
        } else {
            Phase::Dead
        }
    }

    /// What is left of it in window `wid`.
    #[must_use]
    pub fn unused(&self, wid: i64) -> i64 {
        if self.window == wid {
            (self.amount - self.drawn).max(0)
        } else {
            self.amount
        }
    }

    /// Whether a request for scope `who` draws on it as its owner.
    #[must_use]
    pub fn owns(&self, who: &str) -> bool {
        owns(&self.owner, who)
    }
}

/// Whether `who` is `owner` or a scope under it.
#[must_use]
pub fn owns(owner: &str, who: &str) -> bool {
    who.strip_prefix(owner)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Whether a caller at `rank` may draw on another agent's allocation in `phase`.
#[must_use]
pub fn may_draw(rank: Priority, phase: Phase) -> bool {
    match phase {
        Phase::Active => rank == Priority::Critical,
        Phase::Idle => rank != Priority::Background,
        Phase::Dead => true,
    }
}

/// What a caller (`who` at `rank`) may not draw on in window `wid`: the
/// unused parts of the live allocations that are neither its own nor open
/// to its tier. Counted as held when its request is tested.
#[must_use]
pub fn barred(allots: &[Allotment], who: &str, rank: Priority, now: Micros, wid: i64) -> i64 {
    allots
        .iter()
        .filter(|a| {
            let p = a.phase(now);
            p != Phase::Dead && !a.owns(who) && !may_draw(rank, p)
        })
        .fold(0i64, |s, a| s.saturating_add(a.unused(wid)))
}

/// Records that `amount` was admitted for `who` at `rank` in window `wid`,
/// with `free` unallocated room in the pool before it: drawn from its own
/// allocation first, then the free pool, then donations, then (critical)
/// others' active shares. Dead allocations are dropped.
pub fn draw(
    allots: &mut Vec<Allotment>,
    who: &str,
    rank: Priority,
    amount: i64,
    free: i64,
    now: Micros,
    wid: i64,
) {
    allots.retain(|a| a.phase(now) != Phase::Dead);
    let mut left = amount;
    let take = |a: &mut Allotment, left: &mut i64| {
        if a.window != wid {
            a.window = wid;
            a.drawn = 0;
        }
        let t = (*left).min(a.unused(wid));
        a.drawn += t;
        *left -= t;
    };
    if let Some(a) = allots.iter_mut().find(|a| a.owns(who)) {
        take(a, &mut left);
    }
    left -= left.min(free.max(0));
    for phase in [Phase::Idle, Phase::Active] {
        for a in allots.iter_mut() {
            if left == 0 {
                return;
            }
            if a.phase(now) == phase && !a.owns(who) && may_draw(rank, phase) {
                take(a, &mut left);
            }
        }
    }
}

/// The unallocated room of a pool: `usable` minus what is used, held and
/// set aside (unused) by live allocations.
#[must_use]
pub fn free(allots: &[Allotment], usable: i64, used: i64, held: i64, now: Micros, wid: i64) -> i64 {
    let aside = allots
        .iter()
        .filter(|a| a.phase(now) != Phase::Dead)
        .fold(0i64, |s, a| s.saturating_add(a.unused(wid)));
    usable
        .saturating_sub(used)
        .saturating_sub(held)
        .saturating_sub(aside)
        .max(0)
}

/// Applies `op` to the allocations of one pool limit of `cap` at `now`
/// (dead ones dropped first): the answer [`crate::backend::Backend::allot`]
/// gives, or `Err(unallocated)` when a `Set` asks for more than the other
/// live allocations leave.
///
/// # Errors
/// `Err(unallocated)` as said.
pub fn apply(
    allots: &mut Vec<Allotment>,
    op: crate::backend::AllotOp<'_>,
    now: Micros,
    cap: i64,
) -> Result<i64, i64> {
    use crate::backend::AllotOp;
    allots.retain(|a| a.phase(now) != Phase::Dead);
    match op {
        AllotOp::Set {
            owner,
            amount,
            lease,
        } => {
            let others = allots
                .iter()
                .filter(|a| &*a.owner != owner)
                .fold(0i64, |s, a| s.saturating_add(a.amount));
            if amount > cap.saturating_sub(others) {
                return Err(cap.saturating_sub(others).max(0));
            }
            let until = now.saturating_add(lease);
            match allots.iter_mut().find(|a| &*a.owner == owner) {
                Some(a) => {
                    a.amount = amount;
                    a.active_until = until;
                    a.lease = lease;
                }
                None => allots.push(Allotment {
                    owner: owner.into(),
                    amount,
                    drawn: 0,
                    window: i64::MIN,
                    active_until: until,
                    lease,
                }),
            }
            Ok(until)
        }
        AllotOp::Beat { owner } => {
            Ok(allots
                .iter_mut()
                .find(|a| &*a.owner == owner)
                .map_or(0, |a| {
                    a.active_until = now.saturating_add(a.lease);
                    a.active_until
                }))
        }
        AllotOp::Drop { owner } => {
            let before = allots.len();
            allots.retain(|a| &*a.owner != owner);
            Ok(i64::from(allots.len() < before))
        }
    }
}

/// The error for an allocation the pool cannot hold.
#[must_use]
pub fn over_allocated(pool: &str, amount: i64, unallocated: i64, cap: i64) -> crate::Error {
    crate::Error::invalid(
        "allocation",
        format!(
            "pool `{pool}` has {unallocated} of {cap} left to allocate (the other agents' allocations hold the rest); asked for {amount}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(owner: &str, amount: i64, active_until: Micros) -> Allotment {
        Allotment {
            owner: owner.into(),
            amount,
            drawn: 0,
            window: 0,
            active_until,
            lease: 10,
        }
    }

    #[test]
    fn owners_phases_and_who_may_draw() {
        assert!(owns("agent:a", "agent:a"));
        assert!(owns("agent:a", "agent:a/task:1"));
        assert!(!owns("agent:a", "agent:ab"));
        let x = a("agent:a", 5, 100);
        assert_eq!(
            [x.phase(99), x.phase(100), x.phase(109), x.phase(110)],
            [Phase::Active, Phase::Idle, Phase::Idle, Phase::Dead]
        );
        let all = [a("agent:a", 5, 100), a("agent:b", 7, 55)];
        // At 60: a active, b idle (donated).
        assert_eq!(barred(&all, "agent:c", Priority::Standard, 60, 0), 5);
        assert_eq!(barred(&all, "agent:c", Priority::Background, 60, 0), 12);
        assert_eq!(barred(&all, "agent:c", Priority::Critical, 60, 0), 0);
        assert_eq!(barred(&all, "agent:a/t", Priority::Background, 60, 0), 7);
        assert_eq!(free(&all, 100, 10, 3, 60, 0), 75);
    }

    #[test]
    fn draws_own_then_free_then_donations_then_active_shares() {
        let mut all = vec![
            a("agent:a", 5, 100),
            a("agent:b", 7, 55),
            a("agent:c", 4, 100),
        ];
        // a draws 8 with 2 free: 5 own, 2 free, 1 from b's donation.
        draw(&mut all, "agent:a", Priority::Standard, 8, 2, 60, 0);
        assert_eq!([all[0].drawn, all[1].drawn, all[2].drawn], [5, 1, 0]);
        // A critical caller with nothing free: b's donation, then c's share.
        draw(&mut all, "agent:z", Priority::Critical, 8, 0, 60, 0);
        assert_eq!([all[0].drawn, all[1].drawn, all[2].drawn], [5, 7, 2]);
        // A new window renews every share; dead ones go.
        draw(&mut all, "agent:a", Priority::Standard, 1, 0, 105, 1);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].window, all[0].drawn), (1, 1));
        assert_eq!(all[1].unused(1), 4);
    }
}
