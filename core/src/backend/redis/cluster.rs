//! The cluster protocol: splitting a plan by slot, and deciding a request
//! whose limits span slots in steps (hold the primary slot, then the others,
//! then commit or release everything), handing back what a cancelled request
//! took.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Releases reservations when dropped while armed (`backend` set): a
/// multi-slot decision cancelled between its steps hands back what it took at
/// once instead of leaving it held until the lease runs out.
pub(super) struct Undo {
    pub(super) backend: Option<RedisBackend>,
    pub(super) ids: Vec<ReservationId>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        let (Some(backend), Ok(rt)) = (self.backend.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let ids = std::mem::take(&mut self.ids);
        rt.spawn(async move {
            for id in ids {
                let _ = backend
                    .settle_one(id, SettleMode::Release, 0, &[], None, 0)
                    .await;
            }
        });
    }
}

/// A plan's limits on one cluster slot.
pub(super) struct Part {
    pub(super) slot: u16,
    /// Plan indices.
    pub(super) items: SmallVec<[usize; 8]>,
    /// Whether this part carries the request's own keys (see [`RedisBackend::parts`]).
    pub(super) primary: bool,
}

impl RedisBackend {
    /// Splits a plan by cluster slot. The first part is the primary one: it holds
    /// the request's own keys (record, starvation tracker, delegation grants) and
    /// sits on the scope tree's slot whenever the request has limits there, a
    /// caller to track or a delegation to make; a standalone server is one part.
    pub(super) fn parts(&self, call: Call<'_>) -> SmallVec<[Part; 2]> {
        let plan = call.plan;
        let home = tag_slot(plan.scope().prefix(1));
        if !self.cluster {
            return smallvec::smallvec![Part {
                slot: home,
                items: (0..plan.len()).collect(),
                primary: true,
            }];
        }
        let slots: SmallVec<[u16; 8]> = plan
            .limits()
            .map(|l| tag_slot(&Self::tag(&l.key)))
            .collect();
        let needs_home = slots.is_empty()
            || slots.contains(&home)
            || plan.caller_key().is_some()
            || call.delegate.is_some();
        let first = if needs_home { home } else { slots[0] };
        let mut parts: SmallVec<[Part; 2]> = smallvec::smallvec![Part {
            slot: first,
            items: SmallVec::new(),
            primary: true,
        }];
        for (i, &slot) in slots.iter().enumerate() {
            match parts.iter_mut().find(|p| p.slot == slot) {
                Some(p) => p.items.push(i),
                None => parts.push(Part {
                    slot,
                    items: smallvec::smallvec![i],
                    primary: false,
                }),
            }
        }
        parts
    }

    /// Acquire or reserve across several slots: hold the primary slot (step 1),
    /// then every other slot in parallel at the priority served (step 2), then
    /// commit everything for an acquire — or release everything taken if any
    /// step is refused or fails (step 3). See the module docs.
    pub(super) async fn hold_then_commit(
        &self,
        call: Call<'_>,
        parts: &[Part],
        id: Option<ReservationId>,
    ) -> Result<Decision, Sent> {
        let plan = call.plan;
        let (primary, foreign) = (&parts[0], &parts[1..]);
        let acquire = call.mode == StepMode::Acquire;
        let lease = if acquire { STEP_LEASE_US } else { call.lease };
        let home_id =
            id.unwrap_or_else(|| id_in_slot(ReservationId::random_in_process(), primary.slot));
        let sub: Vec<ReservationId> = foreign
            .iter()
            .map(|p| id_in_slot(ReservationId::random_in_process(), p.slot))
            .collect();
        let all_ids = || std::iter::once(home_id).chain(sub.iter().copied());
        let links = sub
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // If this future is dropped before the last step (the caller cancelled),
        // hand back at once whatever was taken — even by a step whose answer
        // never arrived — instead of waiting out the lease.
        let mut undo = Undo {
            backend: Some(self.clone()),
            ids: all_ids().collect(),
        };

        // Step 1: the primary slot; the starvation tracker is left open.
        let first = Step {
            id: Some(home_id),
            lease,
            first_of_many: true,
            links: &links,
            ..Step::new(StepMode::Reserve, plan)
        };
        let home = self.run_part(call, primary, &first).await?;
        if !home.allowed() {
            undo.backend = None;
            let served = Step {
                rank: home.rank,
                ..Step::new(StepMode::Check, plan)
            };
            let mut outs = self.run_parts(call, foreign, &served).await?;
            outs.insert(0, home);
            return Ok(self.finish(call, parts, &outs, None));
        }

        // Step 2: every other slot, in parallel, at the rank served.
        let steps: Vec<Step<'_>> = sub
            .iter()
            .map(|&sid| Step {
                id: Some(sid),
                lease,
                rank: home.rank,
                ..Step::new(StepMode::Reserve, plan)
            })
            .collect();
        let results = join_all(
            foreign
                .iter()
                .zip(&steps)
                .map(|(p, s)| self.run_part(call, p, s)),
        )
        .await;
        let tracker = self.caller_key(plan);
        let tracker_left = home.tracker_left;
        let mut outs = vec![home];
        let mut failure = None;
        for r in results {
            match r {
                Ok(o) => outs.push(o),
                Err(e) => failure = Some(e),
            }
        }
        let all = failure.is_none() && outs.iter().all(PartOut::allowed);

        // Step 3: a reservation that got everything stands as it is (its
        // starvation tracker cleared); otherwise commit (acquire) or release.
        if all && !acquire {
            undo.backend = None;
            if let Some(t) = tracker.filter(|_| tracker_left) {
                let mut conn = self.conn.clone();
                let del = redis::cmd("DEL").arg(t).clone();
                let _: () = self
                    .bounded(primary.slot, async {
                        del.query_async(&mut conn).await.map_err(|e| failed(&e))
                    })
                    .await?;
            }
            return Ok(self.finish(call, parts, &outs, id));
        }
        let (mode, starve) = if all {
            (SettleMode::Commit, "clear")
        } else {
            (SettleMode::Release, "deny")
        };
        let home_tracker = tracker.as_deref().map(|t| (t, starve));
        let ended = join_all(all_ids().map(|rid| {
            let tracker = home_tracker.filter(|_| rid == home_id);
            self.settle_one(rid, mode, 0, &[], tracker, plan.promote_after())
        }))
        .await;
        undo.backend = None;
        if let Some(e) = failure {
            return Err(e);
        }
        if let (true, Some(Err(e))) = (all, ended.into_iter().find(Result::is_err)) {
            // Parts already committed stay charged (under-admission, never
            // over); the rest is released and the request reported as failed.
            for rid in all_ids() {
                let _ = self
                    .settle_one(rid, SettleMode::Release, 0, &[], None, 0)
                    .await;
            }
            return Err(e);
        }
        Ok(self.finish(call, parts, &outs, None))
    }

    /// Runs one step on several parts in parallel.
    pub(super) async fn run_parts(
        &self,
        call: Call<'_>,
        parts: &[Part],
        step: &Step<'_>,
    ) -> Result<Vec<PartOut>, Sent> {
        join_all(parts.iter().map(|p| self.run_part(call, p, step)))
            .await
            .into_iter()
            .collect()
    }
}
