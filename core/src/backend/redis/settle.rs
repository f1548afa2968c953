//! Commit, release and extend: one `settle.lua` run per reservation record,
//! then the records it links to on other slots, with the answers read into
//! receipts in plan order.

#[allow(clippy::wildcard_imports)]
use super::*;

/// What the settle script is asked to do (`settle.lua` ARGV[2]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SettleMode {
    Commit,
    Release,
    Extend,
}

impl SettleMode {
    const fn arg(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Release => "release",
            Self::Extend => "extend",
        }
    }
}

/// What the settle script answered besides the shared statuses.
pub(super) struct SettleOut {
    /// `ok` / `dup` (commit), `released`, `extended`.
    pub(super) status: String,
    /// The values after the status and the links.
    pub(super) rest: Vec<Value>,
    /// Reservations of the same request on other cluster slots.
    pub(super) links: Vec<ReservationId>,
}

impl SettleOut {
    pub(super) fn unexpected(&self) -> Sent {
        Sent::Never(Error::Internal {
            message: format!("settle script answered `{}`", self.status),
        })
    }
}

/// The receipt in a commit's answer: `ok` / `dup`, n, then per limit key,
/// reserved, charged, actual, debt, before (-1: not measured).
pub(super) fn receipt_of(
    policy: &Policy,
    id: ReservationId,
    out: &SettleOut,
) -> Result<CommitReceipt, Sent> {
    if out.status == "rejected" {
        // unit, reserved, actual: a `reject` limit refused the commit.
        let unit = out.rest.first().map(text).unwrap_or_default();
        let decimals = policy.unit(&unit).map_or(0, |u| u.decimals);
        let fmt = |i: usize| crate::amount::format_base(out.rest.get(i).map_or(0, int), decimals);
        return Err(Sent::Never(Error::OverageRejected {
            id: id.to_string(),
            reserved: fmt(1),
            actual: fmt(2),
            unit,
        }));
    }
    if !matches!(out.status.as_str(), "ok" | "dup") {
        return Err(out.unexpected());
    }
    let mut charges = Vec::new();
    for c in out.rest.get(1..).unwrap_or_default().chunks_exact(6) {
        let key = text(&c[0]);
        let local = key.split_once("}:").map_or(key.as_str(), |(_, k)| k);
        let name = KeyRef::split(local).name;
        let def = policy.limit_or_retired(name).ok_or_else(|| {
            Sent::Never(Error::invalid(
                "commit",
                format!("limit `{name}` of reservation {id} is not in the policy in force"),
            ))
        })?;
        let (reserved, charged, actual) = (int(&c[1]), int(&c[2]), int(&c[3]));
        charges.push(Charge {
            def: Arc::clone(def),
            key: local.into(),
            reserved,
            charged,
            uncharged: actual - charged,
            debt: int(&c[4]),
            before: Some(int(&c[5])).filter(|b| *b >= 0),
        });
    }
    Ok(CommitReceipt {
        id,
        charges,
        duplicate: out.status == "dup",
    })
}

/// A charge's place in plan order: the scope chain's own limits by depth,
/// then resource and action limits as the policy declares them.
pub(super) fn plan_order(c: &Charge) -> (u8, usize, u32) {
    match c.def.attach {
        crate::policy::Attach::Scope(_) => {
            let prefix = KeyRef::split(&c.key).prefix;
            (0, prefix.split('/').count(), c.def.id)
        }
        _ => (1, 0, c.def.id),
    }
}

impl RedisBackend {
    /// Commits a reservation, then the reservations it links to on other
    /// cluster slots (made by the same request); the receipt lists every
    /// charge in plan order, as the embedded engine does.
    pub(super) async fn commit_all(
        &self,
        policy: &Policy,
        id: ReservationId,
        actual: &[(&str, i64)],
    ) -> Result<CommitReceipt, Sent> {
        let out = self
            .settle_one(id, SettleMode::Commit, 0, actual, None, 0)
            .await?;
        let mut receipt = receipt_of(policy, id, &out)?;
        for (l, more) in self
            .settle_links(&out.links, SettleMode::Commit, 0, actual)
            .await?
        {
            receipt
                .charges
                .extend(receipt_of(policy, l, &more)?.charges);
        }
        receipt.charges.sort_by_key(plan_order);
        Ok(receipt)
    }

    /// Releases a reservation and the ones it links to.
    pub(super) async fn release_all(&self, id: ReservationId) -> Result<bool, Sent> {
        let out = self
            .settle_one(id, SettleMode::Release, 0, &[], None, 0)
            .await?;
        self.settle_links(&out.links, SettleMode::Release, 0, &[])
            .await?;
        match (out.status.as_str(), out.rest.first()) {
            ("released", Some(v)) => Ok(int(v) == 1),
            _ => Err(out.unexpected()),
        }
    }

    /// Renews a reservation's lease and the leases of the ones it links to.
    pub(super) async fn extend_all(
        &self,
        id: ReservationId,
        lease: Micros,
    ) -> Result<Micros, Sent> {
        let out = self
            .settle_one(id, SettleMode::Extend, lease, &[], None, 0)
            .await?;
        self.settle_links(&out.links, SettleMode::Extend, lease, &[])
            .await?;
        match (out.status.as_str(), out.rest.first()) {
            ("extended", Some(v)) => Ok(int(v)),
            _ => Err(out.unexpected()),
        }
    }

    /// Settles the linked reservations of a multi-slot request the same way,
    /// in parallel. A linked record gone (its lease ran out, or it was never
    /// written because its step failed) holds nothing any more and is skipped.
    pub(super) async fn settle_links(
        &self,
        links: &[ReservationId],
        mode: SettleMode,
        lease: Micros,
        actual: &[(&str, i64)],
    ) -> Result<Vec<(ReservationId, SettleOut)>, Sent> {
        let linked = join_all(links.iter().map(|&l| async move {
            let r = self.settle_one(l, mode, lease, actual, None, 0).await;
            (l, r)
        }))
        .await;
        let mut outs = Vec::new();
        for (l, r) in linked {
            match r {
                Ok(out) => outs.push((l, out)),
                Err(Sent::Never(
                    Error::ReservationNotFound { .. } | Error::ReservationExpired { .. },
                )) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(outs)
    }

    /// The settle script on one record, under the command timeout, sent once
    /// more if the connection failed under it (a settle is idempotent by
    /// reservation id). The statuses every mode shares (not found, expired,
    /// closed, a delegation committed) become errors; the rest is returned for
    /// the mode's own reading.
    pub(super) async fn settle_one(
        &self,
        id: ReservationId,
        mode: SettleMode,
        lease: Micros,
        actual: &[(&str, i64)],
        starve: Option<(&str, &str)>,
        promote_after: Micros,
    ) -> Result<SettleOut, Sent> {
        let rec = self.record_key(id);
        let keys = [rec.clone(), starve.map_or(rec, |(k, _)| k.to_owned())];
        let mut args = vec![
            self.now_arg().to_string(),
            mode.arg().to_owned(),
            lease.to_string(),
            TOMBSTONE_US.to_string(),
            starve.map_or("", |(_, op)| op).to_owned(),
            promote_after.to_string(),
        ];
        for (unit, amount) in actual {
            args.extend([(*unit).to_owned(), amount.to_string()]);
        }
        let out: Vec<Value> = self
            .resent(id_slot(id), || self.invoke(&self.settle, &keys, &args))
            .await?;
        let status = out.first().map(text).unwrap_or_default();
        let links: Vec<ReservationId> = out
            .get(1)
            .map(text)
            .unwrap_or_default()
            .split(',')
            .filter_map(|l| ReservationId::parse(l).ok())
            .collect();
        let id_s = || id.to_string();
        let refused = match status.as_str() {
            "nf" => Error::ReservationNotFound { id: id_s() },
            "expired" => Error::ReservationExpired { id: id_s() },
            "closed" if out.get(2).map(text).as_deref() == Some("committed") => {
                closed(id_s(), "committed")
            }
            "closed" => closed(id_s(), "released"),
            "delegation" => Error::invalid(
                "commit",
                format!("{id} is a delegation; release it to close the sub-budget"),
            ),
            _ => {
                return Ok(SettleOut {
                    status,
                    rest: out.into_iter().skip(2).collect(),
                    links,
                });
            }
        };
        Err(Sent::Never(refused))
    }
}
