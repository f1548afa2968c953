//! Health per node: after a command times out, the node that serves its slot
//! is not waited on again for a moment — every slot of that node, and no
//! other. On a cluster the slot → node map is read with `CLUSTER SLOTS` when
//! connecting and again (in the background, at most every few seconds) after
//! a timeout, so a failover is followed; until a map is known, only the slot
//! that timed out is skipped. A standalone server is one node.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::RwLock;
use redis::Value;

use super::conn::Conn;
use super::slots;
use crate::clock::Micros;

/// After a command times out, how long its node is skipped.
pub(super) const PROBE_AFTER_TIMEOUT_US: i64 = 1_000_000;
/// How often, at most, the slot map is read again after timeouts.
const REFRESH_EVERY_US: i64 = 5_000_000;

/// Skip deadlines per slot, and which node serves which slots.
pub(super) struct Health {
    /// Per slot (one entry for a standalone server): not waited on before
    /// this time (µs).
    skip_until: Box<[AtomicI64]>,
    /// `(first slot, last slot, node)` ranges, as last read.
    map: RwLock<Vec<(u16, u16, String)>>,
    /// When the map may be read again (µs).
    next_refresh: AtomicI64,
}

impl Health {
    pub(super) fn new(cluster: bool) -> Self {
        Self {
            skip_until: (0..if cluster { slots::SLOTS } else { 1 })
                .map(|_| AtomicI64::new(0))
                .collect(),
            map: RwLock::default(),
            next_refresh: AtomicI64::new(0),
        }
    }

    fn at(&self, slot: u16) -> &AtomicI64 {
        &self.skip_until[usize::from(slot) % self.skip_until.len()]
    }

    /// Whether `slot`'s node is being skipped at `now`.
    pub(super) fn skipping(&self, slot: u16, now: Micros) -> bool {
        now < self.at(slot).load(Ordering::Relaxed)
    }

    /// A command on `slot` timed out at `now`: skip every slot of its node
    /// (just `slot` while no map is known). Returns whether the map should be
    /// read again (not more often than every few seconds).
    pub(super) fn timed_out(&self, slot: u16, now: Micros) -> bool {
        let until = now + PROBE_AFTER_TIMEOUT_US;
        let map = self.map.read();
        let node = map
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, n)| n);
        match node {
            Some(n) => {
                for (a, b, _) in map.iter().filter(|r| &r.2 == n) {
                    for s in *a..=*b {
                        self.at(s).store(until, Ordering::Relaxed);
                    }
                }
            }
            None => self.at(slot).store(until, Ordering::Relaxed),
        }
        let due = self.next_refresh.load(Ordering::Relaxed);
        now >= due
            && self
                .next_refresh
                .compare_exchange(
                    due,
                    now + REFRESH_EVERY_US,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Reads the slot map of the cluster behind `conn` (bounded by `timeout`);
    /// keeps the old one if the read fails.
    pub(super) async fn refresh(self: Arc<Self>, mut conn: Conn, timeout: std::time::Duration) {
        let read = redis::cmd("CLUSTER").arg("SLOTS").clone();
        let Ok(Ok(v)) = tokio::time::timeout(timeout, read.query_async::<Value>(&mut conn)).await
        else {
            return;
        };
        let ranges = parse_slots(&v);
        if !ranges.is_empty() {
            *self.map.write() = ranges;
        }
    }
}

/// `CLUSTER SLOTS`: `[[start, end, [host, port, id…], replicas…], …]` →
/// `(start, end, "host:port")`; entries it cannot read are left out.
fn parse_slots(v: &Value) -> Vec<(u16, u16, String)> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let Value::Array(f) = e else { return None };
            let num = |v: &Value| match v {
                Value::Int(i) => u16::try_from(*i).ok(),
                _ => None,
            };
            let (start, end) = (num(f.first()?)?, num(f.get(1)?)?);
            let Value::Array(master) = f.get(2)? else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let port = match master.get(1)? {
                Value::Int(p) => *p,
                _ => return None,
            };
            Some((start, end, format!("{host}:{port}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_skips_every_slot_of_its_node_and_no_other() {
        let h = Health::new(true);
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
            ])
        };
        let v = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(99), node("a", 1)]),
            Value::Array(vec![Value::Int(100), Value::Int(199), node("b", 2)]),
            Value::Array(vec![Value::Int(200), Value::Int(299), node("a", 1)]),
            Value::Array(vec![Value::Int(300)]), // unreadable: left out
        ]);
        *h.map.write() = parse_slots(&v);
        assert_eq!(h.map.read().len(), 3);
        assert!(
            h.timed_out(250, 1_000),
            "the first timeout asks for a fresh map"
        );
        assert!(!h.timed_out(250, 1_001), "not again so soon");
        for s in [0, 99, 200, 299] {
            assert!(h.skipping(s, 1_000), "slot {s} is node a's");
        }
        for s in [100, 199, 300, 16_383] {
            assert!(!h.skipping(s, 1_000), "slot {s} is not node a's");
        }
        assert!(
            !h.skipping(0, 1_001 + PROBE_AFTER_TIMEOUT_US),
            "skipped for a moment only"
        );
        // No map: only the slot itself.
        let bare = Health::new(true);
        bare.timed_out(7, 0);
        assert!(bare.skipping(7, 0) && !bare.skipping(8, 0));
    }
}
