//! The settlement rule every binding's guard, wrapper and middleware follows
//! (`Warden::finish`): a call that ran is always charged — its actual usage,
//! rounded up to the unit, or the estimate when the usage cannot be used — and
//! a call that failed releases its hold. The same cases are pinned in pytest
//! (tests/python/test_settle.py) and node --test (tests/node/settle.test.mjs).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{now, remaining, warden};
use ratewarden::settle::{Charged, Settled};
use ratewarden::{Amount, CallOutcome, Cost, Event, Request, Usage, Warden};
use serde_json::json;

fn policy() -> serde_json::Value {
    json!({"scopes": {"tenant": {"limits": [
        {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
        {"name": "calls", "kind": "quota", "limit": 100, "per": "day"}
    ]}}})
}

fn usd(s: &str) -> Cost {
    Cost::new().with("usd", Amount::parse(s).unwrap())
}

/// `(usd left in base units, calls left)`, read without charging.
fn left(w: &Warden) -> (i64, i64) {
    let d = now(w.check(
        &Request::parse("tenant:a")
            .unwrap()
            .cost(Cost::new().with("requests", 0)),
    ))
    .unwrap();
    (remaining(&d, "usd"), remaining(&d, "calls"))
}

/// Reserves 1 usd (the estimate) and one call.
fn hold(w: &Warden) -> ratewarden::ReservationId {
    let d = now(w.reserve(&Request::parse("tenant:a").unwrap().cost(usd("1")), None)).unwrap();
    assert!(d.allowed(), "{d:?}");
    d.reservation.unwrap().id
}

#[test]
fn a_failed_call_releases_its_hold() {
    let (w, _c) = warden(policy());
    let id = hold(&w);
    assert_eq!(left(&w), (9_000_000, 99));
    let s = now(w.finish(id, CallOutcome::Failed));
    assert!(matches!(s.settled, Settled::Released(true)), "{s:?}");
    assert_eq!(s.charged, Charged::Nothing);
    assert_eq!(s.problem(), None);
    assert_eq!(left(&w), (10_000_000, 100));
}

#[test]
fn a_call_that_ran_is_charged_its_actual_usage() {
    let (w, _c) = warden(policy());
    let id = hold(&w);
    let s = now(w.finish(id, CallOutcome::Ran(Usage::Actual(usd("0.25")))));
    assert!(matches!(s.settled, Settled::Committed(_)), "{s:?}");
    assert_eq!(s.charged, Charged::Actual);
    assert_eq!(s.problem(), None);
    assert_eq!(
        left(&w),
        (9_750_000, 99),
        "the actual; the call as reserved"
    );

    let id = hold(&w);
    let s = now(w.finish(id, CallOutcome::Ran(Usage::Estimate)));
    assert_eq!(s.charged, Charged::Estimate);
    assert_eq!(left(&w), (8_750_000, 98));
}

#[test]
fn an_actual_finer_than_the_unit_is_rounded_up_not_dropped() {
    let (w, _c) = warden(policy());
    let id = hold(&w);
    // 1234 tokens at 2.5e-6 usd: 0.003085 usd — exact; 0.0030851 is finer.
    let s = now(w.finish(id, CallOutcome::Ran(Usage::Actual(usd("0.0030851")))));
    assert_eq!(s.charged, Charged::RoundedUp);
    assert_eq!(s.problem(), None, "rounding is the rule, not a problem");
    assert_eq!(left(&w).0, 10_000_000 - 3_086);

    // From a binary float, as the bindings convert one.
    let id = hold(&w);
    let f = Amount::from_f64(1234.0 * 2.5e-6).unwrap();
    let s = now(w.finish(
        id,
        CallOutcome::Ran(Usage::Actual(Cost::new().with("usd", f))),
    ));
    assert!(matches!(s.charged, Charged::Actual | Charged::RoundedUp));
    assert_eq!(left(&w).0, 10_000_000 - 3_086 - 3_085);
}

#[test]
fn an_unusable_actual_charges_the_estimate_and_says_why() {
    let (w, _c) = warden(policy());
    let mut events = w.subscribe();
    let cases = [
        Usage::Unreadable("actual() raised KeyError: 'usage'".into()),
        Usage::Actual(Cost::new().with("gpu-seconds", 5)),
        Usage::Actual(Cost::new().with("usd", Amount::units(-1))),
        Usage::Actual(Cost::new().with("usd", Amount::units(1 << 53))),
    ];
    let mut spent = 0;
    for usage in cases {
        let id = hold(&w);
        let s = now(w.finish(id, CallOutcome::Ran(usage.clone())));
        spent += 1_000_000;
        assert_eq!(s.charged, Charged::Estimate, "{usage:?}");
        assert!(s.confirmed());
        let problem = s.problem().expect("reported");
        assert!(problem.contains("charged the estimate"), "{problem}");
        assert!(problem.contains(&id.to_string()), "{problem}");
        assert_eq!(left(&w).0, 10_000_000 - spent, "{usage:?}");
        match events.try_recv().unwrap() {
            Event::SettlementProblem {
                reservation,
                problem: p,
                ..
            } => {
                assert_eq!(reservation, id);
                assert_eq!(p, problem);
            }
            other => panic!("{other:?}"),
        }
    }
    // The reasons name what was wrong.
    let id = hold(&w);
    let s = now(w.finish(
        id,
        CallOutcome::Ran(Usage::Actual(Cost::new().with("gpu-seconds", 5))),
    ));
    assert!(
        s.problem().unwrap().contains("gpu-seconds"),
        "{:?}",
        s.problem()
    );
}

#[test]
fn a_settlement_the_backend_refuses_is_reported_not_raised() {
    let (w, _c) = warden(policy());
    let id = hold(&w);
    assert!(now(w.release(id)).unwrap());
    let s = now(w.finish(id, CallOutcome::Ran(Usage::Actual(usd("0.5")))));
    assert!(matches!(s.settled, Settled::Refused(_)), "{s:?}");
    assert_eq!(s.charged, Charged::Nothing);
    assert!(!s.confirmed());
    assert!(s.problem().unwrap().contains("could not be settled"));
    assert_eq!(left(&w), (10_000_000, 100));

    // Finishing twice: the second commit is a duplicate, charged once.
    let id = hold(&w);
    now(w.finish(id, CallOutcome::Ran(Usage::Estimate)));
    let again = now(w.finish(id, CallOutcome::Ran(Usage::Actual(usd("3")))));
    match again.settled {
        Settled::Committed(r) => assert!(r.duplicate),
        other => panic!("{other:?}"),
    }
    assert_eq!(left(&w), (9_000_000, 99));
}
