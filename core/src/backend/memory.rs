//! The embedded in-process engine: sharded hash tables behind mutexes.
//!
//! A decision locks every shard its keys live in (in ascending order, so
//! concurrent decisions never deadlock), evaluates every limit, and applies all
//! changes or none. Leases live next to the state they hold and are purged by
//! the next operation on that key; idle keys (state equal to a fresh one) are
//! swept once per clock-second per shard, so memory stays bounded under key
//! churn. No background thread.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use super::{AllotOp, Backend, Mode, Pending};
use crate::clock::{Clock, Micros};
use crate::decision::{Charge, CommitReceipt, Decision, ReservationId, ReservationInfo};
use crate::error::{Error, Result};
use crate::eval::{
    ItemEval, assemble_with, counter_add, counter_eval, rate_debt_restated, rate_eval, rate_settle,
};
use crate::plan::{KeyRef, Plan, PlannedLimit};
use crate::policy::{LimitDef, LimitKind, Overage, Policy};
use crate::pool::{self, Allotment};
use crate::priority::Priority;
use crate::scope::Scope;
use crate::upstream::Coordination;
use crate::upstream::gated;
use crate::upstream::light::{Ask, Gate, Observed, Sample, Ticket, UpstreamState, Verdict};

const SHARDS: usize = 64;
const RES_SHARDS: usize = 16;
const SWEEP_EVERY: Micros = 1_000_000;
/// How long an ended reservation is remembered (so commit/release stay idempotent).
const TOMBSTONE: Micros = 10 * 60 * 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Hold {
    id: u128,
    /// The reservation this hold was carved from (a delegation), or 0.
    parent: u128,
    amount: i64,
    expires: Micros,
}

#[derive(Debug)]
struct Grant {
    delegation: u128,
    covers: Vec<Box<str>>,
}

#[derive(Debug)]
enum State {
    Rate {
        debt: i64,
        at: Micros,
        /// The `p` and `l` of the spec `debt` is in (a reloaded policy's
        /// may differ: see [`crate::eval::rate_debt_restated`]).
        kept: (i64, i64),
    },
    Counter {
        window: i64,
        used: i64,
        holds: Vec<Hold>,
    },
    Slots {
        holds: Vec<Hold>,
    },
    Grant(Box<Grant>),
    Starve {
        since: Micros,
        last: Micros,
    },
}

#[derive(Debug)]
struct Slot {
    key: Box<str>,
    /// When the state becomes equivalent to a fresh one (then it may be dropped).
    idle_at: Micros,
    state: State,
}

#[derive(Default)]
struct Shard {
    table: HashTable<Slot>,
    next_sweep: Micros,
}

#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

#[derive(Debug)]
struct ResItem {
    /// The full key (`<prefix>#<limit>`), shared with the charges of a receipt.
    key: Arc<str>,
    def: Arc<LimitDef>,
    amount: i64,
}

#[derive(Debug)]
enum ResState {
    Active,
    Committed(CommitReceipt),
    Released,
}

#[derive(Debug)]
struct ResRecord {
    id: u128,
    scope: Box<str>,
    expires: Micros,
    forget_at: Micros,
    state: ResState,
    items: Vec<ResItem>,
    /// For a delegation: the key of its grant.
    grant_key: Option<Box<str>>,
}

#[derive(Default)]
struct ResShard {
    table: HashTable<ResRecord>,
    next_sweep: Micros,
}

/// A decision remembered under the operation id the caller gave.
struct OpRecord {
    id: u128,
    /// [`Plan::operation_tree`]: ids are scoped to a scope tree.
    tree: u64,
    /// [`Plan::fingerprint`] of the request it answered.
    fingerprint: u64,
    forget_at: Micros,
    decision: Decision,
}

#[derive(Default)]
struct OpShard {
    table: HashTable<OpRecord>,
    next_sweep: Micros,
}

/// Counts of what the engine holds ([`crate::Warden::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Limit, grant and starvation keys currently stored.
    pub keys: usize,
    /// Reservation records (live and remembered) currently stored.
    pub reservations: usize,
    /// Decisions remembered under callers' operation ids.
    pub operations: usize,
    /// Entries the tables have room for: what memory they hold. Tables shrink
    /// once a sweep leaves them under a quarter full, so this follows `keys`
    /// down after a burst of keys expires.
    pub capacity: usize,
}

/// The embedded engine. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct MemoryBackend {
    clock: Arc<dyn Clock>,
    hasher: foldhash::fast::RandomState,
    shards: Box<[Padded<Mutex<Shard>>]>,
    reservations: Box<[Padded<Mutex<ResShard>>]>,
    /// Decisions remembered under operation ids callers gave (see `decide`).
    ops: Box<[Padded<Mutex<OpShard>>]>,
    grants: AtomicUsize,
    /// When decisions next sweep the reservation and operation records (µs).
    next_record_sweep: AtomicI64,
    /// Each coordinated resource's ordered lock (sequential mode).
    lines: Mutex<Vec<(Box<str>, crate::upstream::sequence::Line)>>,
    /// Each coordinating resource's observed upstream state (one entry per
    /// resource a policy declares `upstream:` for: a handful, searched in
    /// order, cheaper than hashing the name).
    upstream: Mutex<Vec<(Box<str>, UpstreamState)>>,
    /// Soft allocations of pool limits, by limit key ([`crate::pool`]), and
    /// how many keys have any (0: decisions skip the lookup).
    allots: Mutex<HashMap<Box<str>, Vec<Allotment>>>,
    allotted: AtomicUsize,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Where a key lives: its shard and its hash within the shard's table.
///
/// Keys of one scope tree (same first segment, e.g. `tenant:acme`) share a
/// shard — the in-process analogue of a Redis Cluster hash tag — so a request
/// touching many limits of one tenant takes one lock. Shared pools (`@#…`)
/// are spread by their own hash.
#[derive(Debug, Clone, Copy)]
struct Loc {
    shard: usize,
    hash: u64,
}

/// The scope-tree tag of a key prefix (its first segment), or `None` for pools.
fn tag_of(prefix: &str) -> Option<&str> {
    if prefix.starts_with('@') {
        return None;
    }
    Some(&prefix[..prefix.find(['/', '#']).unwrap_or(prefix.len())])
}

/// The shards one operation holds, locked in ascending order. `mask` has bit
/// `i` set for each locked shard `i`; guards are stored in ascending shard order.
struct Locked<'a> {
    mask: u64,
    guards: SmallVec<[MutexGuard<'a, Shard>; 4]>,
}

impl Locked<'_> {
    fn shard(&mut self, shard: usize) -> &mut Shard {
        let below = self.mask & ((1u64 << shard) - 1);
        &mut self.guards[below.count_ones() as usize]
    }
}

fn fresh_state(def: &LimitDef, now: Micros, window: i64) -> State {
    match &def.kind {
        LimitKind::Rate(r) => State::Rate {
            debt: 0,
            at: now,
            kept: (r.p, r.l),
        },
        LimitKind::Quota(_) | LimitKind::Budget(_) => State::Counter {
            window,
            used: 0,
            holds: Vec::new(),
        },
        LimitKind::Concurrency => State::Slots { holds: Vec::new() },
    }
}

/// Hashes a key by its two parts, exactly as [`KeyRef::split`] of the full key would.
fn key_hash(hasher: &foldhash::fast::RandomState, k: KeyRef<'_>) -> u64 {
    use std::hash::Hasher;
    let mut h = hasher.build_hasher();
    h.write(k.prefix.as_bytes());
    h.write_u8(b'#');
    h.write(k.name.as_bytes());
    h.finish()
}

/// Gives memory back once a table is under a quarter full (keeping room for
/// twice what it holds, so a table that refills does not thrash).
fn shrink<T>(table: &mut HashTable<T>, hash: impl Fn(&T) -> u64) {
    const MIN: usize = 64;
    if table.capacity() > MIN && table.len() * 4 < table.capacity() {
        table.shrink_to((table.len() * 2).max(MIN), hash);
    }
}

/// Removes expired holds, returning carved amounts to their parent hold if it is still live.
/// A commit refused by a limit whose overage rule is `reject`.
pub(crate) fn overage_rejected(
    id: ReservationId,
    def: &crate::policy::LimitDef,
    reserved: i64,
    actual: i64,
) -> Error {
    Error::OverageRejected {
        id: id.to_string(),
        unit: def.unit.clone(),
        reserved: def.fmt_amount(reserved),
        actual: def.fmt_amount(actual),
    }
}

fn purge(holds: &mut Vec<Hold>, now: Micros) {
    if !holds.iter().any(|h| h.expires <= now) {
        return;
    }
    let expired: SmallVec<[Hold; 4]> = holds.iter().filter(|h| h.expires <= now).copied().collect();
    holds.retain(|h| h.expires > now);
    for h in expired {
        give_back(holds, h.parent, h.amount);
    }
}

fn give_back(holds: &mut [Hold], parent: u128, amount: i64) {
    if parent != 0 && amount > 0 {
        if let Some(p) = holds.iter_mut().find(|p| p.id == parent) {
            p.amount += amount;
        }
    }
}

fn holds_idle_at(holds: &[Hold], otherwise: Micros) -> Micros {
    holds
        .iter()
        .map(|h| h.expires)
        .max()
        .map_or(otherwise, |m| m.max(otherwise))
}

/// The current window of a limit at `now` as `(id, end)`; `(0, i64::MAX)` when it
/// has none (rate, concurrency) or never resets (lifetime). Computed once per
/// item per decision: calendar windows cost civil-date arithmetic.
fn window_of(def: &LimitDef, now: Micros) -> (i64, Micros) {
    def.kind.window().map_or((0, i64::MAX), |w| {
        let (id, _, end) = w.at(now);
        (id, end)
    })
}

/// A counter's `(used, held)` in window `wid` (0, 0 for any other state).
fn counter_room(slot: &Slot, wid: i64) -> (i64, i64) {
    match &slot.state {
        State::Counter {
            window,
            used,
            holds,
        } => (
            if *window == wid { *used } else { 0 },
            holds.iter().map(|h| h.amount).sum(),
        ),
        _ => (0, 0),
    }
}

fn idle_at(def: &LimitDef, state: &State, now: Micros, end: Micros) -> Micros {
    match (state, &def.kind) {
        // It drains at the pace it was written under (a reload restates it
        // only when it is next touched).
        (State::Rate { debt, at, kept }, LimitKind::Rate(_)) => {
            at + crate::eval::ceil_div(*debt, kept.1)
        }
        (State::Counter { used, holds, .. }, _) => {
            let base = if end == i64::MAX {
                if *used == 0 { now } else { i64::MAX }
            } else {
                end
            };
            holds_idle_at(holds, base)
        }
        (State::Slots { holds }, _) => holds_idle_at(holds, now),
        _ => now,
    }
}

impl MemoryBackend {
    /// [`Backend::name`] of the embedded engine.
    pub const NAME: &'static str = "memory";

    /// An engine reading time from `clock`.
    #[must_use]
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            hasher: foldhash::fast::RandomState::default(),
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            reservations: (0..RES_SHARDS).map(|_| Padded::default()).collect(),
            ops: (0..RES_SHARDS).map(|_| Padded::default()).collect(),
            grants: AtomicUsize::new(0),
            next_record_sweep: AtomicI64::new(0),
            upstream: Mutex::default(),
            lines: Mutex::default(),
            allots: Mutex::default(),
            allotted: AtomicUsize::new(0),
        }
    }

    /// Runs `f` on `resource`'s upstream state at the engine's time, under
    /// its lock.
    fn with_upstream<T>(
        &self,
        resource: &str,
        f: impl FnOnce(&mut UpstreamState, Micros) -> T,
    ) -> T {
        let now = self.clock.now();
        self.upstream_at(resource, |s| f(s, now))
    }

    /// Runs `f` on `resource`'s upstream state, under its lock.
    fn upstream_at<T>(&self, resource: &str, f: impl FnOnce(&mut UpstreamState) -> T) -> T {
        let mut states = self.upstream.lock();
        if let Some(i) = states.iter().position(|(name, _)| &**name == resource) {
            return f(&mut states[i].1);
        }
        states.push((resource.into(), UpstreamState::default()));
        let last = states.len() - 1;
        f(&mut states[last].1)
    }

    /// The clock this engine reads.
    #[must_use]
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// What the engine currently stores.
    #[must_use]
    pub fn stats(&self) -> MemoryStats {
        let mut st = MemoryStats::default();
        for s in &*self.shards {
            let g = s.0.lock();
            st.keys += g.table.len();
            st.capacity += g.table.capacity();
        }
        for s in &*self.reservations {
            let g = s.0.lock();
            st.reservations += g.table.len();
            st.capacity += g.table.capacity();
        }
        for s in &*self.ops {
            let g = s.0.lock();
            st.operations += g.table.len();
            st.capacity += g.table.capacity();
        }
        st
    }

    /// Whether a reservation with this id is known here (live or remembered).
    #[must_use]
    pub fn knows(&self, id: ReservationId) -> bool {
        let g = self.res_shard(id.0);
        g.table
            .find(Self::res_hash(id.0), |r| r.id == id.0)
            .is_some()
    }

    /// Drops every idle key and forgotten reservation now, whatever the sweep schedule.
    pub fn purge_idle(&self) {
        let now = self.clock.now();
        for s in &*self.shards {
            self.sweep(&mut s.0.lock(), now);
        }
        self.sweep_records(now);
    }

    /// Forgets ended reservation records and remembered operations whose time
    /// is up, in every shard; run once per clock-second by decisions (so
    /// records go even when no reservation traffic comes), or by a settle on
    /// its own shard.
    fn sweep_records(&self, now: Micros) {
        self.next_record_sweep
            .store(now.saturating_add(SWEEP_EVERY), Ordering::Relaxed);
        for s in &*self.reservations {
            Self::sweep_res(&mut s.0.lock(), now);
        }
        for s in &*self.ops {
            let mut g = s.0.lock();
            g.table.retain(|r| r.forget_at > now);
            shrink(&mut g.table, |r| Self::res_hash(r.id));
            g.next_sweep = now + SWEEP_EVERY;
        }
    }

    fn sweep_res(g: &mut ResShard, now: Micros) {
        g.table.retain(|r| r.forget_at > now);
        shrink(&mut g.table, |r| Self::res_hash(r.id));
        g.next_sweep = now + SWEEP_EVERY;
    }

    /// Where `key` lives.
    fn loc(&self, key: KeyRef<'_>) -> Loc {
        let hash = key_hash(&self.hasher, key);
        let shard = match tag_of(key.prefix) {
            Some(tag) => Self::shard_of(self.hasher.hash_one(tag)),
            None => Self::shard_of(hash),
        };
        Loc { shard, hash }
    }

    /// Where a key of the scope tree in shard `tree` lives (pools: by their own hash).
    fn loc_in(&self, key: KeyRef<'_>, tree: usize) -> Loc {
        let hash = key_hash(&self.hasher, key);
        let shard = if key.prefix.starts_with('@') {
            Self::shard_of(hash)
        } else {
            tree
        };
        Loc { shard, hash }
    }

    fn shard_of(hash: u64) -> usize {
        // Bits the table itself uses least (hashbrown: low bits index, top 7 bits tag).
        usize::try_from((hash >> 40) & (SHARDS as u64 - 1)).unwrap_or(0)
    }

    fn lock<'a>(&'a self, locs: &[Loc]) -> Locked<'a> {
        let mut mask = 0u64;
        for l in locs {
            mask |= 1 << l.shard;
        }
        let mut guards = SmallVec::new();
        let mut rest = mask;
        while rest != 0 {
            guards.push(self.shards[rest.trailing_zeros() as usize].0.lock());
            rest &= rest - 1;
        }
        Locked { mask, guards }
    }

    fn sweep(&self, shard: &mut Shard, now: Micros) {
        let mut dropped_grants = 0;
        shard.table.retain(|s| {
            let keep = s.idle_at > now;
            if !keep && matches!(s.state, State::Grant(_)) {
                dropped_grants += 1;
            }
            keep
        });
        if dropped_grants > 0 {
            self.grants.fetch_sub(dropped_grants, Ordering::Relaxed);
        }
        let hasher = &self.hasher;
        shrink(&mut shard.table, |s| {
            key_hash(hasher, KeyRef::split(&s.key))
        });
        shard.next_sweep = now + SWEEP_EVERY;
    }

    fn maybe_sweep(&self, locked: &mut Locked<'_>, now: Micros) {
        for g in &mut locked.guards {
            if now >= g.next_sweep {
                self.sweep(g, now);
            }
        }
    }

    fn find<'s>(
        &self,
        locked: &'s mut Locked<'_>,
        loc: Loc,
        key: KeyRef<'_>,
    ) -> Option<&'s mut Slot> {
        locked
            .shard(loc.shard)
            .table
            .find_mut(loc.hash, |s| key.matches(&s.key))
    }

    fn find_or_insert<'s>(
        &self,
        locked: &'s mut Locked<'_>,
        loc: Loc,
        key: KeyRef<'_>,
        init: impl FnOnce() -> State,
        now: Micros,
    ) -> &'s mut Slot {
        let hasher = &self.hasher;
        let shard = locked.shard(loc.shard);
        let entry = shard.table.entry(
            loc.hash,
            |s| key.matches(&s.key),
            |s| key_hash(hasher, KeyRef::split(&s.key)),
        );
        entry
            .or_insert_with(|| Slot {
                key: key.to_string().into_boxed_str(),
                idle_at: now,
                state: init(),
            })
            .into_mut()
    }

    /// The bucket of `key` in its shard, inserting a fresh state if absent. Indices
    /// stay valid while no other insert grows the table (see `decide`).
    fn slot_index(
        &self,
        locked: &mut Locked<'_>,
        loc: Loc,
        key: KeyRef<'_>,
        init: impl FnOnce() -> State,
        now: Micros,
    ) -> usize {
        let hasher = &self.hasher;
        let table = &mut locked.shard(loc.shard).table;
        if let Some(i) = table.find_bucket_index(loc.hash, |s| key.matches(&s.key)) {
            return i;
        }
        table
            .insert_unique(
                loc.hash,
                Slot {
                    key: key.to_string().into_boxed_str(),
                    idle_at: now,
                    state: init(),
                },
                |s| key_hash(hasher, KeyRef::split(&s.key)),
            )
            .bucket_index()
    }

    /// Delegation shadows for a scope: limit key → delegation id whose hold it spends from.
    fn shadows(
        &self,
        locked: &mut Locked<'_>,
        grant_keys: &[(String, Loc)],
        now: Micros,
    ) -> Vec<(Box<str>, u128)> {
        let mut out: Vec<(Box<str>, u128)> = Vec::new();
        for (key, loc) in grant_keys {
            if let Some(slot) = self.find(locked, *loc, KeyRef::split(key)) {
                if slot.idle_at <= now {
                    continue;
                }
                if let State::Grant(g) = &slot.state {
                    for c in &g.covers {
                        if let Some(e) = out.iter_mut().find(|(k, _)| k == c) {
                            e.1 = g.delegation;
                        } else {
                            out.push((c.clone(), g.delegation));
                        }
                    }
                }
            }
        }
        out
    }

    fn grant_keys(&self, scope: &Scope) -> Vec<(String, Loc)> {
        if self.grants.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        (1..=scope.depth())
            .map(|d| {
                let k = Plan::grant_key(scope, d);
                let l = self.loc(KeyRef::split(&k));
                (k, l)
            })
            .collect()
    }

    fn eval_item(
        slot: Option<&mut Slot>,
        item: &PlannedLimit<'_>,
        served: Priority,
        now: Micros,
        via: Option<u128>,
        (wid, end): (i64, Micros),
        barred: i64,
    ) -> ItemEval {
        let def = &**item.def;
        let usable = def.floors.usable(def.limit, served);
        match &def.kind {
            LimitKind::Rate(spec) => {
                let usable = def.floors.usable(spec.burst, served);
                let debt = match slot.map(|s| &s.state) {
                    Some(State::Rate { debt, at, kept }) => {
                        rate_debt_restated(spec, *debt, *at, *kept, now)
                    }
                    _ => 0,
                };
                rate_eval(spec, debt, item.amount, usable).0
            }
            _ => {
                let end = (end != i64::MAX).then_some(end);
                let (used, holds): (i64, &[Hold]) = match slot.map(|s| &mut s.state) {
                    Some(State::Counter {
                        window,
                        used,
                        holds,
                    }) => {
                        purge(holds, now);
                        (if *window == wid { *used } else { 0 }, holds)
                    }
                    Some(State::Slots { holds }) => {
                        purge(holds, now);
                        (0, holds)
                    }
                    _ => (0, &[]),
                };
                if let Some(d) = via {
                    let avail = holds.iter().find(|h| h.id == d).map_or(0, |h| h.amount);
                    let allowed = item.amount == 0 || item.amount <= avail;
                    return ItemEval {
                        allowed,
                        remaining: avail - if allowed { item.amount } else { 0 },
                        reset: end.map_or(0, |e| e - now),
                        retry: None,
                        held: holds.iter().map(|h| h.amount).sum(),
                    };
                }
                let held: i64 = holds.iter().map(|h| h.amount).sum();
                // What the caller may not draw on of others' allocations
                // counts as held (pool.rs); the answer reports the true holds.
                let mut e = counter_eval(
                    def.limit,
                    used,
                    held + barred,
                    &mut [],
                    item.amount,
                    usable,
                    now,
                    end,
                );
                e.held = held;
                if e.allowed || holds.is_empty() {
                    return e;
                }
                // Denied with holds outstanding: their expiries refine the retry estimate.
                let mut hv: SmallVec<[(Micros, i64); 8]> =
                    holds.iter().map(|h| (h.expires, h.amount)).collect();
                let mut e = counter_eval(
                    def.limit,
                    used,
                    held + barred,
                    &mut hv,
                    item.amount,
                    usable,
                    now,
                    end,
                );
                e.held = held;
                e
            }
        }
    }

    /// Runs `f` on the allocations of `item`'s limit, if it is a pool quota
    /// or budget with any (`None` otherwise — one relaxed load when no
    /// allocation exists anywhere).
    fn with_allots<T>(
        &self,
        item: &PlannedLimit<'_>,
        f: impl FnOnce(&mut Vec<Allotment>) -> T,
    ) -> Option<T> {
        if self.allotted.load(Ordering::Relaxed) == 0
            || !matches!(item.def.kind, LimitKind::Quota(_) | LimitKind::Budget(_))
        {
            return None;
        }
        let mut map = self.allots.lock();
        let list = map.get_mut(&*item.key.to_string())?;
        Some(f(list))
    }

    /// Applies an admitted item: consume (`hold = None`) or hold under a reservation.
    fn apply_item(
        slot: &mut Slot,
        item: &PlannedLimit<'_>,
        now: Micros,
        via: Option<u128>,
        hold: Option<(u128, Micros)>,
        (wid, end): (i64, Micros),
    ) {
        let def = &**item.def;
        match (&mut slot.state, &def.kind) {
            (State::Rate { debt, at, kept }, LimitKind::Rate(spec)) => {
                // Admitted: amount ≤ usable and the debt fits the room it leaves (eval.rs).
                *debt = rate_debt_restated(spec, *debt, *at, *kept, now) + item.amount * spec.p;
                *at = now;
                *kept = (spec.p, spec.l);
            }
            (
                State::Counter {
                    window,
                    used,
                    holds,
                },
                _,
            ) => {
                if *window != wid {
                    *window = wid;
                    *used = 0;
                }
                Self::take(holds, item.amount, via, hold, Some(used));
            }
            (State::Slots { holds }, _) if hold.is_some() => {
                Self::take(holds, item.amount, via, hold, None);
            }
            _ => {}
        }
        slot.idle_at = idle_at(def, &slot.state, now, end);
    }

    fn take(
        holds: &mut Vec<Hold>,
        amount: i64,
        via: Option<u128>,
        hold: Option<(u128, Micros)>,
        used: Option<&mut i64>,
    ) {
        if amount == 0 {
            return;
        }
        if let Some(d) = via {
            if let Some(h) = holds.iter_mut().find(|h| h.id == d) {
                h.amount -= amount;
            }
        }
        match hold {
            Some((id, expires)) => holds.push(Hold {
                id,
                parent: via.unwrap_or(0),
                amount,
                expires,
            }),
            None => {
                if let Some(u) = used {
                    *u = counter_add(*u, amount);
                }
            }
        }
    }

    /// Decides as [`Self::decide_now`] (sweeping ended records first when
    /// due); an admitted state-changing decision
    /// under an operation id the caller gave is remembered (as on Redis, for
    /// [`super::OPERATION_MEMORY`]) and a repeat answers it unchanged. The
    /// id's shard stays locked while deciding, so two calls with one id
    /// decide once.
    pub(super) fn decide_sync(&self, plan: &Plan<'_>, mode: Mode<'_>) -> Result<Decision> {
        self.decide_at(plan, mode, self.clock.now())
    }

    /// [`MemoryBackend::decide_sync`] at `now` (read once by the caller).
    fn decide_at(&self, plan: &Plan<'_>, mode: Mode<'_>, now: Micros) -> Result<Decision> {
        if now >= self.next_record_sweep.load(Ordering::Relaxed) {
            self.sweep_records(now);
        }
        let Some(op) = plan.operation().filter(|_| mode.mutates()) else {
            return self.decide_now(plan, mode, now);
        };
        let idx = usize::try_from((op.0 as u64) % RES_SHARDS as u64).unwrap_or(0);
        let mut g = self.ops[idx].0.lock();
        if now >= g.next_sweep {
            g.table.retain(|r| r.forget_at > now);
            g.next_sweep = now + SWEEP_EVERY;
        }
        let h = Self::res_hash(op.0);
        let fingerprint = plan.fingerprint(mode.name());
        let tree = plan.operation_tree();
        if let Ok(e) = g.table.find_entry(h, |r| r.id == op.0 && r.tree == tree) {
            match e.get() {
                r if r.forget_at <= now => drop(e.remove()),
                r if r.fingerprint == fingerprint => return Ok(r.decision.clone()),
                _ => return Err(super::redis::reused(op)),
            }
        }
        let d = self.decide_now(plan, mode, now)?;
        if !d.allowed() {
            return Ok(d); // changed nothing: decided afresh next time
        }
        g.table.insert_unique(
            h,
            OpRecord {
                id: op.0,
                tree,
                fingerprint,
                forget_at: now + crate::clock::micros(super::OPERATION_MEMORY),
                decision: d.clone(),
            },
            |r| Self::res_hash(r.id),
        );
        Ok(d)
    }

    /// Evaluates (and for acquire/reserve/delegate applies) a plan atomically,
    /// in phases under one lock set: resolve the keys, find delegation grants,
    /// the priority served, evaluate, apply, track starvation; then record the
    /// reservation made.
    fn decide_now(&self, plan: &Plan<'_>, mode: Mode<'_>, now: Micros) -> Result<Decision> {
        let mut t = self.touched(plan, mode, now)?;
        let mut locked = self.lock(&t.locs);
        self.maybe_sweep(&mut locked, now);
        let shadows = self.shadows_for(&mut locked, &t, now)?;
        let served = self.served(&mut locked, plan, t.caller, now);
        let mutating = mode.mutates();
        let who = plan.scope().as_str();
        self.evaluate(
            &mut locked,
            &mut t.works,
            &shadows,
            (served, who),
            mutating,
            now,
        );
        let allowed = t.works.iter().all(|w| w.eval.allowed);
        let (reservation, record_items) = if allowed && mutating {
            self.apply(&mut locked, plan, mode, &t, (served, now))
        } else {
            (None, Vec::new())
        };
        if mutating {
            self.track_starvation(&mut locked, plan, t.caller, allowed, now);
        }
        drop(locked);
        if let Some(info) = &reservation {
            let scope: Box<str> = match mode {
                Mode::Delegate { child, .. } => child.as_str().into(),
                _ => plan.scope().as_str().into(),
            };
            self.insert_record(ResRecord {
                id: info.id.0,
                scope,
                expires: info.expires_at,
                forget_at: info.expires_at + TOMBSTONE,
                state: ResState::Active,
                items: record_items,
                grant_key: t.child_grant.map(|(k, _)| k.into_boxed_str()),
            });
        }
        Ok(assemble_with(
            t.works.len(),
            |i| (t.works[i].item, &t.works[i].eval),
            served,
            reservation,
        ))
    }

    /// Phase 1, before any lock: every key the decision touches, where it
    /// lives and each limit's current window; a parent reservation being
    /// carved is looked up (and refused if not live).
    #[inline(always)]
    fn touched<'p>(&self, plan: &'p Plan<'p>, mode: Mode<'_>, now: Micros) -> Result<Touched<'p>> {
        let tree = Self::shard_of(self.hasher.hash_one(plan.scope().prefix(1)));
        let mut works: SmallVec<[Work<'_>; 8]> = SmallVec::new();
        let mut locs: SmallVec<[Loc; 8]> = SmallVec::new();
        for item in plan.limits() {
            let loc = self.loc_in(item.key, tree);
            locs.push(loc);
            works.push(Work {
                item,
                win: window_of(item.def, now),
                loc,
                bucket: usize::MAX,
                via: None,
                eval: ItemEval {
                    allowed: true,
                    remaining: 0,
                    reset: 0,
                    retry: None,
                    held: 0,
                },
            });
        }
        let caller = plan
            .caller_key()
            .map(|k| (KeyRef::split(k), self.loc(KeyRef::split(k))));
        locs.extend(caller.map(|(_, l)| l));
        let grant_keys = self.grant_keys(plan.scope());
        locs.extend(grant_keys.iter().map(|(_, l)| *l));
        let (child_grant, from) = match mode {
            Mode::Delegate { child, from, .. } => {
                let k = Plan::grant_key(child, child.depth());
                let l = self.loc(KeyRef::split(&k));
                locs.push(l);
                let from = match from {
                    Some(p) => Some((p.0, self.parent_keys(p, child)?)),
                    None => None,
                };
                (Some((k, l)), from)
            }
            _ => (None, None),
        };
        Ok(Touched {
            works,
            locs,
            caller,
            grant_keys,
            child_grant,
            from,
        })
    }

    /// Phase 2: which limits spend from a delegation's hold instead (the
    /// scope's live grants, a parent reservation being carved overriding
    /// them); a delegation onto a scope that has one open is refused.
    fn shadows_for(
        &self,
        locked: &mut Locked<'_>,
        t: &Touched<'_>,
        now: Micros,
    ) -> Result<Vec<(Box<str>, u128)>> {
        let mut shadows = self.shadows(locked, &t.grant_keys, now);
        if let Some((from_id, from_keys)) = &t.from {
            for k in from_keys {
                if let Some(e) = shadows.iter_mut().find(|(s, _)| s == k) {
                    e.1 = *from_id;
                } else {
                    shadows.push((k.clone(), *from_id));
                }
            }
        }
        if let Some((k, h)) = &t.child_grant {
            if let Some(slot) = self.find(locked, *h, KeyRef::split(k)) {
                if slot.idle_at > now && matches!(slot.state, State::Grant(_)) {
                    return Err(Error::invalid(
                        "delegation",
                        format!(
                            "scope `{}` already has an open delegation; release it first",
                            k.trim_end_matches("#@grant")
                        ),
                    ));
                }
            }
        }
        Ok(shadows)
    }

    /// Phase 3: the priority served — a background caller denied
    /// continuously for `promote_after` is served as standard.
    fn served(
        &self,
        locked: &mut Locked<'_>,
        plan: &Plan<'_>,
        caller: Option<(KeyRef<'_>, Loc)>,
        now: Micros,
    ) -> Priority {
        if let Some((key, h)) = caller {
            if let Some(slot) = self.find(locked, h, key) {
                if let State::Starve { since, last } = slot.state {
                    let pa = plan.promote_after();
                    if now - last <= pa && now - since >= pa {
                        return Priority::Standard;
                    }
                }
            }
        }
        plan.priority()
    }

    /// Phase 4: evaluates every limit. Mutating decisions make room in the
    /// tables first and keep each limit's bucket, so no insert can grow a
    /// table and move a bucket between evaluation and apply.
    fn evaluate(
        &self,
        locked: &mut Locked<'_>,
        works: &mut [Work<'_>],
        shadows: &[(Box<str>, u128)],
        (served, who): (Priority, &str),
        mutating: bool,
        now: Micros,
    ) {
        if mutating {
            let hasher = &self.hasher;
            for g in &mut locked.guards {
                g.table
                    .reserve(works.len() + 3, |s| key_hash(hasher, KeyRef::split(&s.key)));
            }
        }
        for w in works {
            let item = &w.item;
            w.via = shadows
                .iter()
                .find(|(k, _)| item.key.matches(k))
                .map(|(_, d)| *d);
            let bucket = if mutating {
                Some(self.slot_index(
                    locked,
                    w.loc,
                    item.key,
                    || fresh_state(item.def, now, w.win.0),
                    now,
                ))
            } else {
                locked
                    .shard(w.loc.shard)
                    .table
                    .find_bucket_index(w.loc.hash, |s| item.key.matches(&s.key))
            };
            let slot = bucket.and_then(|b| locked.shard(w.loc.shard).table.get_bucket_mut(b));
            let barred = match w.via {
                None => self.with_allots(item, |a| pool::barred(a, who, served, now, w.win.0)),
                Some(_) => None,
            };
            w.eval = Self::eval_item(slot, item, served, now, w.via, w.win, barred.unwrap_or(0));
            w.bucket = bucket.unwrap_or(usize::MAX);
        }
    }

    /// Phase 5, when every limit admitted a mutating decision: charges or
    /// holds each limit, opens the child's grant for a delegation, and
    /// returns the reservation made with the items its record keeps.
    fn apply(
        &self,
        locked: &mut Locked<'_>,
        plan: &Plan<'_>,
        mode: Mode<'_>,
        t: &Touched<'_>,
        (served, now): (Priority, Micros),
    ) -> (Option<ReservationInfo>, Vec<ResItem>) {
        let hold = mode.hold().map(|(id, lease)| (id.0, now + lease));
        let mut record_items = Vec::new();
        for w in &t.works {
            let item = &w.item;
            let slot = match locked.shard(w.loc.shard).table.get_bucket_mut(w.bucket) {
                Some(slot) => slot,
                None => self.find_or_insert(
                    locked,
                    w.loc,
                    item.key,
                    || fresh_state(item.def, now, w.win.0),
                    now,
                ),
            };
            if w.via.is_none() && !matches!(mode, Mode::Delegate { .. }) && item.amount > 0 {
                // Drawn from allocations as pool::draw says, knowing the room before.
                let (used, held) = counter_room(slot, w.win.0);
                let usable = item.def.floors.usable(item.def.limit, served);
                let who = plan.scope().as_str();
                self.with_allots(item, |a| {
                    let free = pool::free(a, usable, used, held, now, w.win.0);
                    pool::draw(a, who, served, item.amount, free, now, w.win.0);
                });
            }
            Self::apply_item(slot, item, now, w.via, hold, w.win);
            if hold.is_some() {
                record_items.push(ResItem {
                    key: Arc::from(item.key.to_string()),
                    def: Arc::clone(item.def),
                    amount: item.amount,
                });
            }
        }
        if let (Some((k, h)), Mode::Delegate { id, lease, .. }) = (&t.child_grant, mode) {
            let covers = plan
                .limits()
                .filter(|l| l.amount > 0 && !matches!(l.def.kind, LimitKind::Rate(_)))
                .map(|l| l.key.to_string().into_boxed_str())
                .collect();
            let slot = self.find_or_insert(
                locked,
                *h,
                KeyRef::split(k),
                || State::Starve { since: 0, last: 0 },
                now,
            );
            slot.state = State::Grant(Box::new(Grant {
                delegation: id.0,
                covers,
            }));
            slot.idle_at = now + lease;
            self.grants.fetch_add(1, Ordering::Relaxed);
        }
        let reservation = hold.map(|(id, expires)| ReservationInfo {
            id: ReservationId(id),
            expires_at: expires,
        });
        (reservation, record_items)
    }

    /// Phase 6, for a mutating decision of a tracked (background) caller: an
    /// admission forgets its streak of denials; a denial starts or continues it.
    fn track_starvation(
        &self,
        locked: &mut Locked<'_>,
        plan: &Plan<'_>,
        caller: Option<(KeyRef<'_>, Loc)>,
        allowed: bool,
        now: Micros,
    ) {
        let Some((key, h)) = caller else { return };
        if allowed {
            if let Some(slot) = self.find(locked, h, key) {
                slot.idle_at = now; // dropped by the next sweep
                slot.state = State::Starve {
                    since: now,
                    last: i64::MIN / 2,
                };
            }
            return;
        }
        let pa = plan.promote_after();
        let slot = self.find_or_insert(
            locked,
            h,
            key,
            || State::Starve {
                since: now,
                last: now,
            },
            now,
        );
        if let State::Starve { since, last } = &mut slot.state {
            if now - *last > pa {
                *since = now;
            }
            *last = now;
        }
        slot.idle_at = now + pa + 1; // still "continuous" at exactly last + pa
    }

    fn res_shard(&self, id: u128) -> MutexGuard<'_, ResShard> {
        let idx = usize::try_from((id as u64) % RES_SHARDS as u64).unwrap_or(0);
        let mut g = self.reservations[idx].0.lock();
        let now = self.clock.now();
        if now >= g.next_sweep {
            Self::sweep_res(&mut g, now);
        }
        g
    }

    fn res_hash(id: u128) -> u64 {
        (id >> 64) as u64 ^ (id as u64).rotate_left(17)
    }

    fn insert_record(&self, rec: ResRecord) {
        let h = Self::res_hash(rec.id);
        let mut g = self.res_shard(rec.id);
        g.table.insert_unique(h, rec, |r| Self::res_hash(r.id));
    }

    /// The record of `id` as every settle sees it first.
    fn lookup(g: &mut ResShard, id: ReservationId, now: Micros) -> Result<Found<'_>> {
        let rec = g
            .table
            .find_mut(Self::res_hash(id.0), |r| r.id == id.0)
            .ok_or_else(|| Error::ReservationNotFound { id: id.to_string() })?;
        Ok(match rec.state {
            ResState::Committed(ref r) => Found::Committed(r),
            ResState::Released => Found::Released,
            ResState::Active if rec.expires <= now => Found::Lapsed,
            ResState::Active => Found::Live(rec),
        })
    }

    fn commit_now(&self, id: ReservationId, actual: &[(&str, i64)]) -> Result<CommitReceipt> {
        let now = self.clock.now();
        let mut g = self.res_shard(id.0);
        let rec = match Self::lookup(&mut g, id, now)? {
            Found::Committed(r) => {
                let mut r = r.clone();
                r.duplicate = true;
                return Ok(r);
            }
            Found::Released => return Err(closed(id, "released")),
            Found::Lapsed => return Err(Error::ReservationExpired { id: id.to_string() }),
            Found::Live(rec) => rec,
        };
        if rec.grant_key.is_some() {
            return Err(Error::invalid(
                "commit",
                format!("{id} is a delegation; release it to close the sub-budget"),
            ));
        }
        let actuals: SmallVec<[i64; 8]> = rec
            .items
            .iter()
            .map(|it| {
                actual
                    .iter()
                    .find(|(u, _)| **u == *it.def.unit)
                    .map_or(it.amount, |(_, a)| *a)
            })
            .collect();
        // `reject` needs no state: refused before anything changes.
        for (it, &a) in rec.items.iter().zip(&actuals) {
            if it.def.overage == Overage::Reject
                && a > it.amount
                && !matches!(it.def.kind, LimitKind::Concurrency)
            {
                return Err(overage_rejected(id, &it.def, it.amount, a));
            }
        }
        // The limits are locked with the reservation's shard held: every
        // path takes the reservation shard first (or alone).
        let items = std::mem::take(&mut rec.items);
        let mut locs: SmallVec<[Loc; 8]> = items
            .iter()
            .map(|i| self.loc(KeyRef::split(&i.key)))
            .collect();
        let grant = rec.grant_key.take();
        let gl = grant.as_deref().map(|k| self.loc(KeyRef::split(k)));
        locs.extend(gl);
        let mut locked = self.lock(&locs);
        let charges: Vec<Charge> = items
            .iter()
            .enumerate()
            .map(|(n, it)| {
                let a = actuals[n];
                let counted = matches!(it.def.kind, LimitKind::Quota(_) | LimitKind::Budget(_));
                let (charged, debt, before) = match it.def.overage {
                    Overage::Charge | Overage::AllowIfAvailable | Overage::AllowWithOverdraft
                        if counted && a > it.amount =>
                    {
                        let room = self.room(&mut locked, locs[n], it, id, now);
                        let charged = if it.def.overage == Overage::Charge {
                            a
                        } else {
                            a.min(room.saturating_add(it.def.overdraft)).max(it.amount)
                        };
                        let debt = charged.saturating_sub(room.max(0)).max(0);
                        let before = it.def.capacity() - room + it.amount;
                        (charged, debt, Some(before))
                    }
                    Overage::Cap => (a.min(it.amount), 0, None),
                    _ => (a, 0, None),
                };
                Charge {
                    def: Arc::clone(&it.def),
                    key: Arc::clone(&it.key),
                    reserved: it.amount,
                    charged,
                    uncharged: a - charged,
                    debt,
                    before,
                }
            })
            .collect();
        let receipt = CommitReceipt {
            id,
            charges,
            duplicate: false,
        };
        self.settle_locked(
            &mut locked,
            &locs,
            id,
            &items,
            Some(&receipt),
            grant.as_deref(),
            now,
        );
        drop(locked);
        rec.state = ResState::Committed(receipt.clone());
        rec.forget_at = now + TOMBSTONE;
        Ok(receipt)
    }

    /// The most this reservation may charge to `it`'s counter without
    /// passing its capacity: capacity − spent this window − every other
    /// live hold.
    fn room(
        &self,
        locked: &mut Locked<'_>,
        loc: Loc,
        it: &ResItem,
        id: ReservationId,
        now: Micros,
    ) -> i64 {
        let (wid, _) = window_of(&it.def, now);
        let Some(slot) = self.find(locked, loc, KeyRef::split(&it.key)) else {
            return it.def.capacity();
        };
        match &mut slot.state {
            State::Counter {
                window,
                used,
                holds,
            } => {
                purge(holds, now);
                let used = if *window == wid { *used } else { 0 };
                let others: i64 = holds
                    .iter()
                    .filter(|h| h.id != id.0 && h.expires > now)
                    .map(|h| h.amount)
                    .sum();
                it.def.capacity() - used - others
            }
            _ => it.def.capacity(),
        }
    }

    fn release_now(&self, id: ReservationId) -> Result<bool> {
        let now = self.clock.now();
        let mut g = self.res_shard(id.0);
        let rec = match Self::lookup(&mut g, id, now)? {
            Found::Committed(_) => return Err(closed(id, "committed")),
            Found::Released | Found::Lapsed => return Ok(false),
            Found::Live(rec) => rec,
        };
        rec.state = ResState::Released;
        rec.forget_at = now + TOMBSTONE;
        let items = std::mem::take(&mut rec.items);
        let grant = rec.grant_key.take();
        drop(g);
        self.finish(id, &items, None, grant.as_deref());
        Ok(true)
    }

    fn finish(
        &self,
        id: ReservationId,
        items: &[ResItem],
        receipt: Option<&CommitReceipt>,
        grant_key: Option<&str>,
    ) {
        let now = self.clock.now();
        let mut locs: SmallVec<[Loc; 8]> = items
            .iter()
            .map(|i| self.loc(KeyRef::split(&i.key)))
            .collect();
        let gl = grant_key.map(|k| self.loc(KeyRef::split(k)));
        locs.extend(gl);
        let mut locked = self.lock(&locs);
        self.settle_locked(&mut locked, &locs, id, items, receipt, grant_key, now);
    }

    /// Applies a settlement to the locked limits: drops the holds, charges
    /// what `receipt` says (nothing for a release), removes a delegation's grant.
    #[allow(clippy::too_many_arguments)]
    fn settle_locked(
        &self,
        locked: &mut Locked<'_>,
        locs: &[Loc],
        id: ReservationId,
        items: &[ResItem],
        receipt: Option<&CommitReceipt>,
        grant_key: Option<&str>,
        now: Micros,
    ) {
        let gl = grant_key.and(locs.get(items.len()).copied());
        for (n, item) in items.iter().enumerate() {
            let charged = receipt.map_or(0, |r| r.charges[n].charged);
            let (wid, end) = window_of(&item.def, now);
            let slot = self.find_or_insert(
                locked,
                locs[n],
                KeyRef::split(&item.key),
                || fresh_state(&item.def, now, wid),
                now,
            );
            match (&mut slot.state, &item.def.kind) {
                (State::Rate { debt, at, kept }, LimitKind::Rate(spec)) => {
                    *debt = rate_settle(
                        spec,
                        rate_debt_restated(spec, *debt, *at, *kept, now),
                        item.amount,
                        charged,
                    );
                    *at = now;
                    *kept = (spec.p, spec.l);
                }
                (
                    State::Counter {
                        window,
                        used,
                        holds,
                    },
                    _,
                ) => {
                    purge(holds, now);
                    if *window != wid {
                        *window = wid;
                        *used = 0;
                    }
                    *used = counter_add(*used, charged);
                    Self::drop_hold(holds, id.0, charged);
                }
                (State::Slots { holds }, _) => {
                    purge(holds, now);
                    Self::drop_hold(holds, id.0, 0);
                }
                _ => {}
            }
            slot.idle_at = idle_at(&item.def, &slot.state, now, end);
        }
        if let (Some(k), Some(l)) = (grant_key, gl) {
            let shard = locked.shard(l.shard);
            if let Ok(e) = shard.table.find_entry(l.hash, |s| &*s.key == k) {
                if matches!(&e.get().state, State::Grant(g) if g.delegation == id.0) {
                    e.remove();
                    self.grants.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Removes hold `id`; what it held beyond `charged` returns to its parent
    /// hold, and a charge beyond it is taken from the parent as far as it goes.
    fn drop_hold(holds: &mut Vec<Hold>, id: u128, charged: i64) {
        let Some(pos) = holds.iter().position(|h| h.id == id) else {
            return;
        };
        let h = holds.swap_remove(pos);
        if h.parent == 0 {
            return;
        }
        if let Some(p) = holds.iter_mut().find(|p| p.id == h.parent) {
            let diff = h.amount - charged;
            if diff >= 0 {
                p.amount += diff;
            } else {
                p.amount -= (-diff).min(p.amount);
            }
        }
    }

    fn extend_now(&self, id: ReservationId, lease: Micros) -> Result<Micros> {
        let now = self.clock.now();
        let mut g = self.res_shard(id.0);
        let (expires, keys, grant_key) = match Self::lookup(&mut g, id, now)? {
            Found::Committed(_) => return Err(closed(id, "committed")),
            Found::Released => return Err(closed(id, "released")),
            Found::Lapsed => return Err(Error::ReservationExpired { id: id.to_string() }),
            Found::Live(rec) => {
                rec.expires = now + lease;
                rec.forget_at = rec.expires + TOMBSTONE;
                let keys: Vec<Box<str>> = rec.items.iter().map(|i| Box::from(&*i.key)).collect();
                (rec.expires, keys, rec.grant_key.clone())
            }
        };
        drop(g);
        let mut locs: SmallVec<[Loc; 8]> =
            keys.iter().map(|k| self.loc(KeyRef::split(k))).collect();
        let gl = grant_key.as_deref().map(|k| self.loc(KeyRef::split(k)));
        locs.extend(gl);
        let mut locked = self.lock(&locs);
        for (n, key) in keys.iter().enumerate() {
            if let Some(slot) = self.find(&mut locked, locs[n], KeyRef::split(key)) {
                if let State::Counter { holds, .. } | State::Slots { holds } = &mut slot.state {
                    if let Some(h) = holds.iter_mut().find(|h| h.id == id.0) {
                        h.expires = expires;
                    }
                    slot.idle_at = slot.idle_at.max(expires);
                }
            }
        }
        if let (Some(k), Some(l)) = (grant_key.as_deref(), gl) {
            if let Some(slot) = self.find(&mut locked, l, KeyRef::split(k)) {
                slot.idle_at = expires;
            }
        }
        Ok(expires)
    }

    /// Keys of a parent reservation a delegation may carve from, after checking
    /// it is live and the child lies under its scope.
    fn parent_keys(&self, parent: ReservationId, child: &Scope) -> Result<Vec<Box<str>>> {
        let now = self.clock.now();
        let g = self.res_shard(parent.0);
        let rec = g
            .table
            .find(Self::res_hash(parent.0), |r| r.id == parent.0)
            .ok_or_else(|| Error::ReservationNotFound {
                id: parent.to_string(),
            })?;
        match rec.state {
            ResState::Active if rec.expires > now => {}
            ResState::Active => {
                return Err(Error::ReservationExpired {
                    id: parent.to_string(),
                });
            }
            ResState::Committed(_) => {
                return Err(Error::ReservationClosed {
                    id: parent.to_string(),
                    state: "committed",
                });
            }
            ResState::Released => {
                return Err(Error::ReservationClosed {
                    id: parent.to_string(),
                    state: "released",
                });
            }
        }
        let depth = rec.scope.split('/').count();
        if !(child.depth() > depth && child.prefix(depth) == &*rec.scope) {
            return Err(Error::invalid(
                "delegation",
                format!(
                    "child scope `{child}` is not under the reservation's scope `{}`",
                    rec.scope
                ),
            ));
        }
        Ok(rec
            .items
            .iter()
            .filter(|i| !matches!(i.def.kind, LimitKind::Rate(_)))
            .map(|i| Box::from(&*i.key))
            .collect())
    }
}

/// Everything one decision touches, resolved before any lock is taken.
struct Touched<'p> {
    works: SmallVec<[Work<'p>; 8]>,
    /// Every shard location to lock.
    locs: SmallVec<[Loc; 8]>,
    /// A background caller's starvation tracker.
    caller: Option<(KeyRef<'p>, Loc)>,
    /// The delegation grants of the scope's levels.
    grant_keys: Vec<(String, Loc)>,
    /// A delegation's grant key for the child.
    child_grant: Option<(String, Loc)>,
    /// A parent reservation being carved: its id and the keys it holds.
    from: Option<(u128, Vec<Box<str>>)>,
}

/// One limit of a decision in flight: resolved once, then evaluated and applied.
struct Work<'p> {
    item: PlannedLimit<'p>,
    /// Current window `(id, end)` of the limit.
    win: (i64, Micros),
    loc: Loc,
    /// Bucket index in the shard table (`usize::MAX` if absent).
    bucket: usize,
    /// The delegation hold this item spends from, if any.
    via: Option<u128>,
    eval: ItemEval,
}

/// A reservation record as a settle finds it.
enum Found<'r> {
    Live(&'r mut ResRecord),
    Committed(&'r CommitReceipt),
    Released,
    /// Active, but its lease ran out.
    Lapsed,
}

fn closed(id: ReservationId, state: &'static str) -> Error {
    Error::ReservationClosed {
        id: id.to_string(),
        state,
    }
}

impl Backend for MemoryBackend {
    fn decide<'a>(&'a self, plan: &'a Plan<'a>, mode: Mode<'a>) -> Pending<'a, Decision> {
        Pending::Ready(self.decide_sync(plan, mode))
    }

    fn commit<'a>(
        &'a self,
        _policy: &'a Policy,
        id: ReservationId,
        actual: &'a [(&'a str, i64)],
    ) -> Pending<'a, CommitReceipt> {
        Pending::Ready(self.commit_now(id, actual))
    }

    fn release(&self, id: ReservationId) -> Pending<'_, bool> {
        Pending::Ready(self.release_now(id))
    }

    fn extend(&self, id: ReservationId, lease: Micros) -> Pending<'_, Micros> {
        Pending::Ready(self.extend_now(id, lease))
    }

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn observe<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        sample: &'a Sample,
    ) -> Pending<'a, Observed> {
        Pending::Ready(Ok(self.with_upstream(resource, |state, now| {
            // A read (an empty sample) changes nothing, as on Redis.
            let mut next = *state;
            let (before, breaker_before, cascade_before) = next.observe(sample, now, coordination);
            if !sample.is_empty() {
                *state = next;
            }
            Observed {
                state: next,
                now,
                before,
                breaker_before,
                cascade_before,
            }
        })))
    }

    fn decide_gated<'a>(
        &'a self,
        plan: &'a Plan<'a>,
        mode: Mode<'a>,
        resource: &'a str,
        coordination: &'a Coordination,
    ) -> Pending<'a, Decision> {
        // The steps of `upstream::gated::decide`, synchronously, on one
        // reading of the clock.
        let now = self.clock.now();
        let ask = plan.upstream_ask(mode.mutates());
        let mut gate = self.upstream_at(resource, |s| s.gate(&ask, now, coordination));
        let mut d = if let Verdict::Deny { retry, why } = gate.verdict {
            let mut d = self.decide_at(plan, Mode::Check, now);
            if let Ok(d) = &mut d {
                gated::denied(d, retry, why, resource, &gate.light);
            }
            d
        } else {
            let mut d = self.decide_at(plan, mode, now);
            match &mut d {
                Ok(d) if d.allowed() => gated::passed(d, &gate, resource, coordination),
                _ => {
                    if let Some(mut t) = gate.ticket {
                        t.denied = d.is_ok();
                        let switched =
                            self.upstream_at(resource, |s| s.ungate(&t, now, coordination));
                        if switched == Some(true) {
                            gate.light.cascade = Some(true);
                        }
                    }
                }
            }
            d
        };
        if let Ok(d) = &mut d {
            d.light = Some(gate.light);
        }
        Pending::Ready(d)
    }

    fn allot<'a>(&'a self, limit: &'a PlannedLimit<'a>, op: AllotOp<'a>) -> Pending<'a, i64> {
        let now = self.clock.now();
        let key: Box<str> = limit.key.to_string().into();
        let mut map = self.allots.lock();
        let had = map.len();
        let list = map.entry(key.clone()).or_default();
        let out = pool::apply(list, op, now, limit.def.limit);
        if list.is_empty() {
            map.remove(&key);
        }
        // Keys with allocations: decisions look only while there are some.
        if map.len() != had {
            self.allotted.store(map.len(), Ordering::Relaxed);
        }
        Pending::Ready(out.map_err(|unallocated| {
            let amount = match op {
                AllotOp::Set { amount, .. } => amount,
                _ => 0,
            };
            pool::over_allocated(&limit.def.name, amount, unallocated, limit.def.limit)
        }))
    }

    fn credit<'a>(&'a self, limit: &'a PlannedLimit<'a>, amount: i64) -> Pending<'a, (i64, i64)> {
        let now = self.clock.now();
        let loc = self.loc(limit.key);
        let mut locked = self.lock(&[loc]);
        let (wid, _) = window_of(limit.def, now);
        let out = match self.find(&mut locked, loc, limit.key).map(|s| &mut s.state) {
            Some(State::Counter { window, used, .. }) => {
                let spent = if *window == wid { *used } else { 0 };
                let credited = amount.min(spent.max(0));
                if credited > 0 {
                    *window = wid;
                    *used = spent - credited;
                }
                (credited, spent - credited)
            }
            _ => (0, 0),
        };
        Pending::Ready(Ok(out))
    }

    fn gate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ask: Ask,
    ) -> Pending<'a, Gate> {
        Pending::Ready(Ok(self.with_upstream(resource, |state, now| {
            state.gate(&ask, now, coordination)
        })))
    }

    fn line<'a>(&'a self, resource: &'a str, holder: u128, op: super::LineOp) -> Pending<'a, i64> {
        let now = self.clock.now();
        let mut lines = self.lines.lock();
        let i = if let Some(i) = lines.iter().position(|(name, _)| &**name == resource) {
            i
        } else {
            lines.push((resource.into(), crate::upstream::sequence::Line::default()));
            lines.len() - 1
        };
        let line = &mut lines[i].1;
        let answer = match op {
            super::LineOp::Enter { hold, wait } => {
                i64::try_from(line.enter(holder, now, hold, wait)).unwrap_or(i64::MAX)
            }
            super::LineOp::Leave => i64::from(line.leave(holder)),
        };
        if line.places.is_empty() {
            lines.swap_remove(i);
        }
        Pending::Ready(Ok(answer))
    }

    fn ungate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ticket: Ticket,
    ) -> Pending<'a, bool> {
        Pending::Ready(Ok(self.with_upstream(resource, |state, now| {
            state.ungate(&ticket, now, coordination) == Some(true)
        })))
    }

    fn stats(&self) -> Option<MemoryStats> {
        Some(Self::stats(self))
    }
}
