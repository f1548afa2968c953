//! Replacing the policy of a running warden ([`crate::Warden::reload`]):
//! which edits a live ledger can take, and what an edit changed.
//!
//! Counters are stored by `<scope>#<limit name>` in base units of the
//! limit's unit, so a reload keeps what was spent: a limit whose capacity,
//! prices, floors, thresholds or overage rule change goes on from the usage
//! already counted (a budget half spent stays half spent of its new size).
//! What the stored numbers cannot survive is refused, naming the limit or
//! unit: a unit's decimals, a limit's unit, or a limit's kind (a rate keeps
//! a different state from a quota; quota ↔ budget is allowed, both are
//! counters). The event sinks (`webhooks:`, `events:`, `audit:`) run on
//! threads started with the warden and cannot be swapped either.

#[allow(clippy::wildcard_imports)]
use super::*;

/// What a reload changed, by name, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Limits the new policy declares and the old one did not.
    pub added: Vec<String>,
    /// Limits the old policy declared and the new one does not: their
    /// counters are no longer consulted; reservations already holding them
    /// still commit, release and expire.
    pub removed: Vec<String>,
    /// Limits declared in both whose definition differs (capacity, period,
    /// window, floors, thresholds, overage rule, caps, lease, attachment).
    pub changed: Vec<String>,
    /// Resources whose `pricing:` or `shrink:` differ.
    pub repriced: Vec<String>,
}

impl Changes {
    /// Whether nothing changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.repriced.is_empty()
    }
}

/// The state a limit's counter keeps: only limits of one family can take
/// over each other's stored state.
const fn family(kind: &LimitKind) -> &'static str {
    match kind {
        LimitKind::Rate(_) => "rate",
        LimitKind::Quota(_) | LimitKind::Budget(_) => "quota or budget",
        LimitKind::Concurrency => "concurrency",
    }
}

impl Policy {
    /// Checks that `next` can replace this policy in a running warden and
    /// says what it changes.
    ///
    /// # Errors
    /// [`Error::Policy`] (naming `next`'s source and the unit, limit or
    /// section) when a unit's decimals, a limit's unit or kind family, or
    /// the event sinks differ — nothing is replaced then.
    pub fn changes_to(&self, next: &Self) -> Result<Changes> {
        let refuse = |path: String, message: String| Error::Policy {
            source_name: next.source.clone(),
            path,
            message,
        };
        for (name, unit) in &next.units {
            if let Some(old) = self.units.get(name)
                && old.decimals != unit.decimals
            {
                return Err(refuse(
                    format!("units.{name}"),
                    format!(
                        "a running warden cannot change unit `{name}` from {} to {} decimals: \
                         amounts are stored in its base units (declare a new unit instead)",
                        old.decimals, unit.decimals
                    ),
                ));
            }
        }
        let mut changes = Changes::default();
        for def in next.limits() {
            let Some(old) = self.limit(&def.name) else {
                changes.added.push(def.name.clone());
                continue;
            };
            if old.unit != def.unit {
                return Err(refuse(
                    format!("limit `{}`", def.name),
                    format!(
                        "a running warden cannot change a limit's unit (`{}` to `{}`): \
                         its counters hold amounts of `{}` (give the limit a new name)",
                        old.unit, def.unit, old.unit
                    ),
                ));
            }
            if family(&old.kind) != family(&def.kind) {
                return Err(refuse(
                    format!("limit `{}`", def.name),
                    format!(
                        "a running warden cannot turn a {} limit into a {} limit: \
                         their counters keep different state (give the limit a new name)",
                        old.kind.name(),
                        def.kind.name()
                    ),
                ));
            }
            if !same_limit(old, def) {
                changes.changed.push(def.name.clone());
            }
        }
        changes.removed = self
            .limits()
            .filter(|d| next.limit(&d.name).is_none())
            .map(|d| d.name.clone())
            .collect();
        for (name, target) in &next.resources {
            let old = self.resources.get(name);
            if old.is_some_and(|o| o.pricing != target.pricing || o.shrink != target.shrink)
                || (old.is_none() && target.pricing.is_some())
            {
                changes.repriced.push(name.clone());
            }
        }
        let sinks = [
            ("webhooks", self.webhooks != next.webhooks),
            ("events", self.outlets != next.outlets),
            ("audit", self.audit != next.audit),
        ];
        if let Some((section, _)) = sinks.iter().find(|(_, differ)| *differ) {
            return Err(refuse(
                (*section).to_owned(),
                format!(
                    "a running warden cannot change `{section}:`: its sinks run on threads \
                     started with the warden (make a new warden to change them)"
                ),
            ));
        }
        Ok(changes)
    }

    /// Keeps, for receipts of reservations made before a reload, the limits
    /// `previous` had and this policy does not.
    pub(crate) fn retire(&mut self, previous: &Self) {
        let gone = previous
            .by_name
            .iter()
            .chain(&previous.retired)
            .filter(|(name, _)| !self.by_name.contains_key(*name));
        let kept: Vec<(String, Arc<LimitDef>)> =
            gone.map(|(n, d)| (n.clone(), Arc::clone(d))).collect();
        self.retired.extend(kept);
        self.serial_base = previous.serial_base + previous.all.len() as u64;
    }

    /// A number for `def` that no other limit of this policy, or of the
    /// policies a warden had before it, has: its [`LimitDef::id`] past those
    /// of earlier policies. `None` when `def` is not this policy's (a
    /// decision made before a reload). Bindings index limit tables by it.
    #[must_use]
    pub fn serial_of(&self, def: &Arc<LimitDef>) -> Option<u64> {
        self.all
            .get(def.id as usize)
            .filter(|d| Arc::ptr_eq(d, def))
            .map(|_| self.serial_base + u64::from(def.id))
    }

    /// A limit by name, or one an earlier policy of the same warden had: a
    /// reservation made before a reload settles under the limits it holds.
    #[must_use]
    pub fn limit_or_retired(&self, name: &str) -> Option<&Arc<LimitDef>> {
        self.by_name.get(name).or_else(|| self.retired.get(name))
    }
}

/// Two definitions of one limit alike but for their position in their policies.
fn same_limit(a: &LimitDef, b: &LimitDef) -> bool {
    a.name == b.name
        && a.kind == b.kind
        && a.limit == b.limit
        && a.floors == b.floors
        && a.overage == b.overage
        && a.overdraft == b.overdraft
        && a.thresholds == b.thresholds
        && a.attach == b.attach
        && a.owner == b.owner
        && a.caps == b.caps
        && a.lease == b.lease
        && a.description == b.description
}
