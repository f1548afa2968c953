//! Redis keys: a limit instance's key under its hash tag, reservation
//! records, operation answers and the placeholders a cluster needs. Building
//! names only; nothing here talks to a server.

#[allow(clippy::wildcard_imports)]
use super::*;

impl RedisBackend {
    /// The hash tag of a limit instance: the first scope segment, or the whole
    /// key for a shared pool (so pools spread over the cluster).
    pub(super) fn tag<'k>(k: &KeyRef<'k>) -> std::borrow::Cow<'k, str> {
        if k.prefix.starts_with('@') {
            std::borrow::Cow::Owned(format!("{}#{}", k.prefix, k.name))
        } else {
            std::borrow::Cow::Borrowed(&k.prefix[..k.prefix.find('/').unwrap_or(k.prefix.len())])
        }
    }

    /// The Redis key of a limit instance.
    pub(super) fn key(&self, k: KeyRef<'_>) -> String {
        format!(
            "{}:{{{}}}:{}#{}",
            self.namespace,
            Self::tag(&k),
            k.prefix,
            k.name
        )
    }

    /// The record of a reservation, on the slot its id carries.
    pub(super) fn record_key(&self, id: ReservationId) -> String {
        format!("{}:{{{}}}:res:{id}", self.namespace, slot_tag(id_slot(id)))
    }

    /// Where the answer of operation `op` is remembered: on the slot of the
    /// decision's keys.
    /// (An id is scoped to the request's scope tree, whose hash the key
    /// carries, so it means the same on every backend and every slot.)
    pub(super) fn op_key(&self, op: OperationId, slot: u16, plan: &Plan<'_>) -> String {
        format!(
            "{}:{{{}}}:op:{op}:{:x}",
            self.namespace,
            slot_tag(slot),
            plan.operation_tree()
        )
    }

    /// A key on `slot` that is never written: the scripts' placeholder for an
    /// unused KEYS entry (a cluster refuses keys of another slot).
    pub(super) fn spare_key(&self, slot: u16) -> String {
        format!("{}:{{{}}}:none", self.namespace, slot_tag(slot))
    }

    /// The starvation tracker of the plan's caller, if any.
    pub(super) fn caller_key(&self, plan: &Plan<'_>) -> Option<String> {
        plan.caller_key().map(|k| {
            let tag = &k[..k.find(['/', '#']).unwrap_or(k.len())];
            format!("{}:{{{tag}}}:{k}", self.namespace)
        })
    }
}
