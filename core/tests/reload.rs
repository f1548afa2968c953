//! Live policy reload (issue 15 §1: "prices can change without a restart"):
//! a new policy swapped into a running warden keeps what was counted, applies
//! to every later decision, settles earlier reservations under the limits
//! they hold, refuses edits the stored counters cannot survive (and then
//! changes nothing), and says what changed in an event.
//!
//! Runs on the embedded engine; with `RATEWARDEN_TEST_BACKEND` set, on Redis
//! and on a Redis Cluster.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{now, remaining, warden};
use proptest::prelude::*;
use ratewarden::pricing::Usage;
use ratewarden::{Cost, ErrorKind, Event, Outcome, Policy, Request};
use serde_json::{Value, json};

fn budget(limit: &str) -> Value {
    json!({
        "scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": limit, "per": "month"},
            {"name": "rpm", "kind": "rate", "limit": 10, "per": "1m"}
        ]}},
        "resources": {
            "m": {"pricing": {"input": 2.50, "output": 10.00}}
        }
    })
}

fn policy(v: &Value) -> Policy {
    Policy::from_value(v).unwrap()
}

fn spend(usd: &str) -> Request {
    Request::parse("tenant:a")
        .unwrap()
        .cost(Cost::new().with("usd", usd.parse::<ratewarden::Amount>().unwrap()))
}

#[test]
fn a_budget_half_spent_stays_half_spent_of_its_new_size() {
    let (w, _) = warden(budget("10"));
    let d = now(w.acquire(&spend("5"))).unwrap();
    assert_eq!(remaining(&d, "usd"), 5_000_000);
    let changes = w.reload(policy(&budget("20"))).unwrap();
    assert_eq!(changes.changed, ["usd"]);
    assert!(changes.added.is_empty() && changes.removed.is_empty());
    let d = now(w.check(&spend("15"))).unwrap();
    assert!(
        d.allowed(),
        "the $5 spent stays spent of the new $20: {d:?}"
    );
    assert_eq!(remaining(&d, "usd"), 0);
    // Shrunk below what was spent: nothing more until it grows again.
    w.reload(policy(&budget("4"))).unwrap();
    let d = now(w.acquire(&spend("0.000001"))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
    w.reload(policy(&budget("10"))).unwrap();
    let d = now(w.acquire(&spend("5"))).unwrap();
    assert!(d.allowed(), "{d:?}");
    assert_eq!(remaining(&d, "usd"), 0);
    let d = now(w.acquire(&spend("0.000001"))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "exactly $10 in all: {d:?}");
}

#[test]
fn new_prices_apply_to_the_next_estimate_and_reservation() {
    let (w, _) = warden(budget("10"));
    let usage = Usage::tokens(1_000_000, 0).max_output(100_000);
    // $2.50 in + $1.00 out at most.
    assert_eq!(w.estimate("m", &usage).unwrap().amount, 3_500_000);
    let mut dearer = budget("10");
    dearer["resources"]["m"]["pricing"] = json!({"input": 5.00, "output": 20.00});
    let changes = w.reload(policy(&dearer)).unwrap();
    assert_eq!(changes.repriced, ["m"]);
    assert!(changes.changed.is_empty(), "{changes:?}");
    assert_eq!(w.estimate("m", &usage).unwrap().amount, 7_000_000);
    let r = Request::parse("tenant:a")
        .unwrap()
        .resource("m")
        .usage(usage);
    let d = now(w.reserve(&r, None)).unwrap();
    assert!(d.allowed(), "{d:?}");
    assert_eq!(remaining(&d, "usd"), 3_000_000, "held at the new prices");
    // A second one does not fit: at the old prices it would have.
    let d = now(w.reserve(&r, None)).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
}

#[test]
fn a_reservation_made_before_settles_under_the_limits_it_holds() {
    let two = json!({
        "scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
            {"name": "tokens", "kind": "budget", "unit": "tokens", "limit": 1000, "per": "month"}
        ]}}
    });
    let (w, _) = warden(two);
    let cost = Cost::new()
        .with("usd", "2".parse::<ratewarden::Amount>().unwrap())
        .with("tokens", 100_u64);
    let d = now(w.reserve(&Request::parse("tenant:a").unwrap().cost(cost), None)).unwrap();
    let id = d.reservation.unwrap().id;
    // `tokens` is gone, `usd` halves.
    let one = json!({
        "scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "5", "per": "month"},
            {"name": "calls", "kind": "quota", "limit": 2, "per": "day"}
        ]}}
    });
    let changes = w.reload(policy(&one)).unwrap();
    assert_eq!(
        (changes.added, changes.removed, changes.changed),
        (
            vec!["calls".to_owned()],
            vec!["tokens".to_owned()],
            vec!["usd".to_owned()]
        )
    );
    let actual = Cost::new()
        .with("usd", "1".parse::<ratewarden::Amount>().unwrap())
        .with("tokens", 60_u64);
    let receipt = now(w.commit(id, &actual)).unwrap();
    let charged: Vec<(&str, i64, i64)> = receipt
        .charges
        .iter()
        .map(|c| (c.def.name.as_str(), c.reserved, c.charged))
        .collect();
    assert_eq!(
        charged,
        [("usd", 2_000_000, 1_000_000), ("tokens", 100, 60)],
        "charged under the limits the reservation held"
    );
    // The new policy governs what follows: $4 left of $5, two calls a day.
    let d = now(w.acquire(&spend("4"))).unwrap();
    assert!(d.allowed(), "{d:?}");
    assert_eq!(remaining(&d, "usd"), 0);
    assert_eq!(remaining(&d, "calls"), 1);
    assert!(d.limits.iter().all(|l| l.name() != "tokens"), "{d:?}");
    let d = now(w.acquire(&spend("0"))).unwrap();
    assert!(d.allowed());
    let d = now(w.acquire(&spend("0"))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "the added quota counts: {d:?}");
}

#[test]
fn a_raised_rate_admits_at_once_and_a_lowered_one_from_what_was_taken() {
    let (w, clock) = warden(budget("10"));
    let one = || Request::parse("tenant:a").unwrap();
    for _ in 0..10 {
        assert!(now(w.acquire(&one())).unwrap().allowed());
    }
    assert_eq!(now(w.acquire(&one())).unwrap().outcome, Outcome::Deny);
    let mut faster = budget("10");
    faster["scopes"]["tenant"]["limits"][1]["limit"] = json!(15);
    assert_eq!(w.reload(policy(&faster)).unwrap().changed, ["rpm"]);
    for i in 0..5 {
        let d = now(w.acquire(&one())).unwrap();
        assert!(d.allowed(), "request {i} of the 5 more: {d:?}");
    }
    assert_eq!(now(w.acquire(&one())).unwrap().outcome, Outcome::Deny);
    // Lowered: the 15 taken fill it. (Untouched since, what was taken
    // drains at the pace it was written under — one every 4 s — until an
    // admitted request restates it: 11 s later 12.25 are still out.)
    let mut slower = budget("10");
    slower["scopes"]["tenant"]["limits"][1]["limit"] = json!(5);
    w.reload(policy(&slower)).unwrap();
    clock.advance(std::time::Duration::from_secs(11));
    assert_eq!(now(w.acquire(&one())).unwrap().outcome, Outcome::Deny);
    // Another period: what was taken counts in requests, not in the old
    // rate's time — 30 a second has room for the 17 requests 12.25 leave at
    // once, not none for most of a minute.
    let mut per_second = budget("10");
    per_second["scopes"]["tenant"]["limits"][1] =
        json!({"name": "rpm", "kind": "rate", "limit": 30, "per": "1s"});
    w.reload(policy(&per_second)).unwrap();
    let d = now(w.check(&one())).unwrap();
    assert_eq!(remaining(&d, "rpm"), 16, "17 fit, 16 after this one: {d:?}");
    for _ in 0..17 {
        assert!(now(w.acquire(&one())).unwrap().allowed());
    }
    assert_eq!(now(w.acquire(&one())).unwrap().outcome, Outcome::Deny);
}

#[test]
fn a_reload_the_counters_cannot_survive_is_refused_and_changes_nothing() {
    let (w, _) = warden(budget("10"));
    assert!(now(w.acquire(&spend("3"))).unwrap().allowed());
    let bad: Vec<(Value, &str, &str)> = vec![
        (
            {
                let mut v = budget("10");
                v["units"] = json!({"usd": {"decimals": 2}});
                v
            },
            "units.usd",
            "from 6 to 2 decimals",
        ),
        (
            {
                let mut v = budget("10");
                v["scopes"]["tenant"]["limits"][1] =
                    json!({"name": "rpm", "kind": "quota", "limit": 10, "per": "minute"});
                v
            },
            "limit `rpm`",
            "cannot turn a rate limit into a quota limit",
        ),
        (
            {
                let mut v = budget("10");
                v["scopes"]["tenant"]["limits"][0]["unit"] = json!("tokens");
                v["scopes"]["tenant"]["limits"][0]["limit"] = json!(10);
                v
            },
            "limit `usd`",
            "cannot change a limit's unit (`usd` to `tokens`)",
        ),
        (
            {
                let mut v = budget("10");
                v["webhooks"] = json!([{"url": "http://127.0.0.1:9/hook",
                    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]);
                v
            },
            "webhooks",
            "cannot change `webhooks:`",
        ),
    ];
    let mut events = w.subscribe();
    for (v, path, says) in bad {
        let e = w.reload(policy(&v)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Policy, "{e}");
        let text = e.to_string();
        assert!(text.contains(path) && text.contains(says), "{text}");
        // The policy in force is the old one, with the $3 spent.
        let d = now(w.check(&spend("7"))).unwrap();
        assert!(d.allowed(), "{d:?}");
        assert_eq!(remaining(&d, "usd"), 0);
        assert!(now(w.check(&spend("7.000001"))).unwrap().outcome == Outcome::Deny);
    }
    assert!(events.try_recv().is_err(), "a refused reload emits nothing");
    // Quota ↔ budget keep the same counter: allowed, and the spend stays.
    let mut quota = budget("10");
    quota["scopes"]["tenant"]["limits"][0]["kind"] = json!("quota");
    assert_eq!(w.reload(policy(&quota)).unwrap().changed, ["usd"]);
    let d = now(w.check(&spend("7"))).unwrap();
    assert_eq!(remaining(&d, "usd"), 0, "{d:?}");
}

#[test]
fn a_reload_is_an_event_naming_what_changed() {
    let (w, _) = warden(budget("10"));
    let mut events = w.subscribe();
    // The same document again changes nothing, and says so.
    let same = w.reload(policy(&budget("10"))).unwrap();
    assert!(same.is_empty(), "{same:?}");
    let mut v = budget("20");
    v["resources"]["m"]["pricing"]["input"] = json!(3.0);
    w.reload(Policy::from_str_as(&v.to_string(), ratewarden::Format::Json, "v2.json").unwrap())
        .unwrap();
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let Event::PolicyReloaded { source, .. } = &seen[1] else {
        panic!("{seen:?}");
    };
    assert_eq!(source, "v2.json");
    let env = seen[1].envelope("msg_x");
    assert_eq!(env["type"], "policy.reloaded");
    assert_eq!(
        env["data"],
        json!({"source": "v2.json", "added": [], "removed": [], "changed": ["usd"], "repriced": ["m"]})
    );
}

#[test]
fn decisions_racing_reloads_count_exactly() {
    // Four threads take one unit each from a quota of 400 while another
    // reloads the policy (repricing, resizing an unrelated limit) 200 times:
    // exactly 400 are admitted, none lost or doubled by a swap.
    let quota = |other: i64| {
        json!({
            "scopes": {"tenant": {"limits": [
                {"name": "q", "kind": "quota", "limit": 400, "per": "day"},
                {"name": "other", "kind": "quota", "limit": other, "per": "day"}
            ]}}
        })
    };
    let (w, _) = warden(quota(1_000_000));
    let admitted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let r = Request::parse("tenant:a").unwrap();
                for _ in 0..150 {
                    if now(w.acquire(&r)).unwrap().allowed() {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        s.spawn(|| {
            for i in 0..200 {
                w.reload(policy(&quota(1_000_000 + i))).unwrap();
            }
        });
    });
    assert_eq!(admitted.into_inner(), 400);
    let d = now(w.check(&Request::parse("tenant:a").unwrap())).unwrap();
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(remaining(&d, "other"), 1_000_199 - 400);
}

/// A rate limit from the accepted range: `(limit, per, burst)`.
fn rate_strategy() -> impl Strategy<Value = Value> {
    let per = prop_oneof![
        Just("1ms"),
        Just("1s"),
        Just("7s"),
        Just("1m"),
        Just("1h"),
        Just("1d"),
        Just("365d")
    ];
    let limit = prop_oneof![1_i64..=10, 1_i64..=1_000_000, Just(1_000_000_000_i64)];
    (limit, per, proptest::option::of(1_i64..=2_000)).prop_filter_map(
        "rates the loader refuses",
        |(limit, per, burst)| {
            let mut l = json!({"name": "r", "kind": "rate", "limit": limit, "per": per});
            if let Some(b) = burst {
                l["burst"] = json!(b);
            }
            let v = json!({"scopes": {"tenant": {"limits": [l]}}});
            Policy::from_value(&v).is_ok().then_some(v)
        },
    )
}

fn spec_of(v: &Value) -> ratewarden::policy::RateSpec {
    match &Policy::from_value(v).unwrap().limit("r").unwrap().kind {
        ratewarden::policy::LimitKind::Rate(r) => *r,
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if common::test_backend().is_some() { 48 } else { 256 },
        ..ProptestConfig::default()
    })]

    /// Over the accepted range of rates, what a rate took carries into the
    /// reloaded rate as whole units — remaining and reset exactly as the
    /// integer model says, on the embedded engine and in the Lua scripts.
    #[test]
    fn a_rate_reloaded_carries_what_it_took_in_whole_units(
        a in rate_strategy(),
        b in rate_strategy(),
        share in 0.0_f64..=1.0,
        elapsed in 0_u64..=4_000_000,
    ) {
        let (sa, sb) = (spec_of(&a), spec_of(&b));
        let (w, clock) = warden(a);
        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
        let taken = ((sa.burst as f64) * share).floor() as i64;
        let ask = |n: i64| Request::parse("tenant:x").unwrap().cost(Cost::new().with("requests", n.unsigned_abs()));
        if taken > 0 {
            let d = now(w.acquire(&ask(taken))).unwrap();
            prop_assert!(d.allowed(), "{d:?}");
        }
        clock.advance(std::time::Duration::from_micros(elapsed));
        w.reload(policy(&b)).unwrap();
        let d = now(w.check(&ask(0))).unwrap();
        // The model, in exact integers.
        let micros = i128::from(i64::try_from(elapsed).unwrap());
        let left_a = (i128::from(taken) * i128::from(sa.p) - micros * i128::from(sa.l)).max(0);
        let debt = if (sa.p, sa.l) == (sb.p, sb.l) {
            left_a // the same rate: nothing to restate
        } else {
            let units = (left_a + i128::from(sa.p) - 1) / i128::from(sa.p);
            (units * i128::from(sb.p)).min(i128::from(ratewarden::amount::MAX_AMOUNT))
        };
        let remaining = ((i128::from(sb.burst) * i128::from(sb.p) - debt).max(0)) / i128::from(sb.p);
        let reset = (debt + i128::from(sb.l) - 1) / i128::from(sb.l);
        prop_assert_eq!(i128::from(d.limits[0].remaining), remaining, "{:?} {:?}", sa, sb);
        prop_assert_eq!(i128::try_from(d.limits[0].reset.as_micros()).unwrap(), reset, "{:?} {:?}", sa, sb);
    }
}
