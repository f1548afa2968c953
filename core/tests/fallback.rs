//! `Fallback` alone: any primary that fails on demand, every
//! `on_backend_error` mode, on the warden's manual clock.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ratewarden::backend::{Backend, Fallback, MemoryBackend, Mode, OnBackendError, Pending};
use ratewarden::clock::Micros;
use ratewarden::plan::Plan;
use ratewarden::upstream::Coordination;
use ratewarden::upstream::light::{Ask, Gate, Observed, Sample};
use ratewarden::{
    CommitReceipt, Cost, Decision, Degraded, Error, ManualClock, OperationId, Policy, Priority,
    Request, ReservationId, Warden, Zone,
};
use serde_json::json;

/// The embedded engine, failing every call while `down` is set — with a lost
/// answer (`Unconfirmed`) when `lost` is set too.
struct Flaky {
    inner: MemoryBackend,
    down: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
}

impl Flaky {
    fn failure(&self) -> Option<Error> {
        if !self.down.load(Ordering::SeqCst) {
            return None;
        }
        Some(if self.lost.load(Ordering::SeqCst) {
            Error::Unconfirmed {
                message: "no answer".into(),
                operation: OperationId(7),
            }
        } else {
            Error::Backend {
                message: "connection refused".into(),
            }
        })
    }
}

impl Backend for Flaky {
    fn decide<'a>(&'a self, plan: &'a Plan<'a>, mode: Mode<'a>) -> Pending<'a, Decision> {
        match self.failure() {
            Some(e) => Pending::Ready(Err(e)),
            None => self.inner.decide(plan, mode),
        }
    }

    fn commit<'a>(
        &'a self,
        policy: &'a Policy,
        id: ReservationId,
        actual: &'a [(&'a str, i64)],
    ) -> Pending<'a, CommitReceipt> {
        match self.failure() {
            Some(e) => Pending::Ready(Err(e)),
            None => self.inner.commit(policy, id, actual),
        }
    }

    fn release(&self, id: ReservationId) -> Pending<'_, bool> {
        match self.failure() {
            Some(e) => Pending::Ready(Err(e)),
            None => self.inner.release(id),
        }
    }

    fn extend(&self, id: ReservationId, lease: Micros) -> Pending<'_, Micros> {
        match self.failure() {
            Some(e) => Pending::Ready(Err(e)),
            None => self.inner.extend(id, lease),
        }
    }

    fn name(&self) -> &'static str {
        "flaky"
    }

    fn observe<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        sample: &'a Sample,
    ) -> Pending<'a, Observed> {
        match self.failure() {
            Some(e) => Pending::Ready(Err(e)),
            None => self.inner.observe(resource, coordination, sample),
        }
    }

    fn gate<'a>(
        &'a self,
        resource: &'a str,
        coordination: &'a Coordination,
        ask: Ask,
    ) -> Pending<'a, Gate> {
        match self.failure() {
            Some(e) => Pending::Ready(Err(e)),
            None => self.inner.gate(resource, coordination, ask),
        }
    }
}

struct Setup {
    warden: Warden,
    clock: ManualClock,
    down: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
}

fn setup(mode: OnBackendError) -> Setup {
    let clock = ManualClock::at_date(2026, 6, 1);
    let shared: Arc<ManualClock> = Arc::new(clock.clone());
    let (down, lost) = (Arc::default(), Arc::default());
    let primary = Flaky {
        inner: MemoryBackend::new(shared.clone()),
        down: Arc::clone(&down),
        lost: Arc::clone(&lost),
    };
    let backend = Fallback::new(primary, mode, shared.clone()).unwrap();
    let policy = Policy::from_value(&json!({"scopes": {"tenant": {"limits": [
        {"name": "rps", "kind": "rate", "limit": 4, "per": "1s"}
    ]}}, "resources": {"api": {"upstream": {}}}}))
    .unwrap();
    Setup {
        warden: Warden::with_backend(policy, Arc::new(backend), shared),
        clock,
        down,
        lost,
    }
}

fn now<F: std::future::Future>(f: F) -> F::Output {
    ratewarden::backend::poll_ready(f).unwrap()
}

fn req() -> Request {
    Request::parse("tenant:a").unwrap()
}

#[test]
fn each_mode_decides_while_the_primary_fails_and_the_primary_resumes() {
    let deny = setup(OnBackendError::Deny);
    deny.down.store(true, Ordering::SeqCst);
    let d = now(deny.warden.acquire(&req())).unwrap();
    assert!(!d.allowed());
    assert_eq!(d.degraded, Some(Degraded::Deny));
    assert_eq!(d.unconfirmed, None, "a refused connection applied nothing");
    deny.down.store(false, Ordering::SeqCst);
    let d = now(deny.warden.acquire(&req())).unwrap();
    assert!(d.allowed() && d.degraded.is_none());

    let allow = setup(OnBackendError::Allow);
    allow.down.store(true, Ordering::SeqCst);
    for _ in 0..10 {
        let d = now(allow.warden.acquire(&req())).unwrap();
        assert!(d.allowed());
        assert_eq!(d.degraded, Some(Degraded::Allow));
    }
}

#[test]
fn local_mode_runs_on_the_wardens_clock_with_its_share() {
    let s = setup(OnBackendError::Local { share: 2 });
    s.down.store(true, Ordering::SeqCst);
    // 2 of 4 per second on this node, refilled by the manual clock.
    for second in 0..3 {
        let admitted = (0..4)
            .filter(|_| now(s.warden.acquire(&req())).unwrap().allowed())
            .count();
        assert_eq!(admitted, 2, "second {second}");
        s.clock.advance(Duration::from_secs(1));
    }
    // A reservation made while degraded is settled locally even once the
    // primary is back.
    let r = now(s.warden.reserve(&req(), None))
        .unwrap()
        .reservation
        .unwrap();
    s.down.store(false, Ordering::SeqCst);
    assert!(!now(s.warden.commit(r.id, &Cost::new())).unwrap().duplicate);
    let d = now(s.warden.acquire(&req())).unwrap();
    assert!(d.degraded.is_none(), "{d:?}");
}

#[test]
fn a_lost_answer_is_degraded_and_names_its_operation() {
    let s = setup(OnBackendError::Deny);
    s.down.store(true, Ordering::SeqCst);
    s.lost.store(true, Ordering::SeqCst);
    let d = now(s.warden.acquire(&req())).unwrap();
    assert_eq!(d.degraded, Some(Degraded::Deny));
    assert_eq!(d.unconfirmed, Some(OperationId(7)));
    assert!(d.reason.unwrap().contains("whether operation"));
}

#[test]
fn settles_are_never_degraded() {
    let s = setup(OnBackendError::Allow);
    let r = now(s.warden.reserve(&req(), None))
        .unwrap()
        .reservation
        .unwrap();
    s.down.store(true, Ordering::SeqCst);
    let e = now(s.warden.commit(r.id, &Cost::new())).unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e}");
    s.down.store(false, Ordering::SeqCst);
    assert!(!now(s.warden.commit(r.id, &Cost::new())).unwrap().duplicate);
}

#[test]
fn the_upstream_light_runs_on_what_this_process_saw_while_the_primary_fails() {
    let s = setup(OnBackendError::Allow);
    let w = &s.warden;
    let red = [
        ("x-ratelimit-limit-requests", "100"),
        ("x-ratelimit-remaining-requests", "5"),
        ("x-ratelimit-reset-requests", "1m"),
    ];
    let bg = || req().resource("api").priority(Priority::Background);
    now(w.observe("api", &red)).unwrap();
    assert!(
        !now(w.acquire(&bg())).unwrap().allowed(),
        "red on the primary"
    );
    s.down.store(true, Ordering::SeqCst);
    // Nothing seen locally: the light is unknown, the limits decide degraded.
    let d = now(w.acquire(&bg())).unwrap();
    assert!(d.allowed() && d.degraded.is_some(), "{d:?}");
    assert_eq!(d.light.unwrap().zone, Zone::Unknown);
    // What this process observes during the outage governs it.
    let v = now(w.observe("api", &red)).unwrap();
    assert_eq!(v.zone, Zone::Red);
    assert!(!now(w.acquire(&bg())).unwrap().allowed());
    s.down.store(false, Ordering::SeqCst);
    s.clock.advance(Duration::from_secs(61));
    let d = now(w.acquire(&bg())).unwrap();
    assert!(
        d.allowed() && d.degraded.is_none(),
        "stale everywhere after the reset"
    );
}
