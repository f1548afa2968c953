//! Threshold events (issue 15 §4): a decision that takes a quota's or
//! budget's spend across one of its thresholds emits one event per threshold
//! crossed, and across several processes sharing Redis (or a Cluster) each
//! crossing is reported exactly once — by the decision whose atomic update
//! crossed it.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;

use common::redis::RedisServers;
use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::events::Crossing;
use ratewarden::{Amount, Event, ManualClock, Policy, Request, Warden};
use serde_json::json;

fn policy(thresholds: Option<serde_json::Value>) -> Policy {
    let mut limit =
        json!({"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"});
    if let Some(t) = thresholds {
        limit["thresholds"] = t;
    }
    Policy::from_value(&json!({"scopes": {"tenant": {"limits": [limit]}}})).unwrap()
}

fn tenant(usd: &str) -> Request {
    Request::parse("tenant:a")
        .unwrap()
        .spend("usd", Amount::parse(usd).unwrap())
}

/// Every crossing received so far: (threshold ‰, exhausted?, crossing).
fn drain(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<(u16, bool, Crossing)> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        match e {
            Event::ThresholdCrossed(c) => out.push((c.threshold, false, *c)),
            Event::LimitExhausted(c) => out.push((c.threshold, true, *c)),
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn each_threshold_is_reported_by_the_decision_that_crosses_it() {
    let w = Warden::with_clock(policy(None), Arc::new(ManualClock::at_date(2026, 1, 15)));
    let mut rx = w.subscribe();
    assert!(w.acquire(&tenant("4.99")).await.unwrap().allowed());
    assert!(drain(&mut rx).is_empty(), "49.9% crosses nothing");
    assert!(w.acquire(&tenant("0.01")).await.unwrap().allowed());
    let got = drain(&mut rx);
    assert_eq!(got.len(), 1, "{got:?}");
    let (t, exhausted, c) = &got[0];
    assert_eq!((*t, *exhausted), (500, false));
    assert_eq!(
        (c.before, c.after, c.capacity),
        (4_990_000, 5_000_000, 10_000_000)
    );
    assert_eq!(
        (c.owner.as_deref(), c.limit.as_str(), c.unit.as_str()),
        (Some("tenant:a"), "usd", "usd")
    );
    assert_eq!(c.id.len(), 32);
    // A denial crosses nothing; a reservation counts (what it holds is taken).
    assert!(!w.acquire(&tenant("6")).await.unwrap().allowed());
    assert!(drain(&mut rx).is_empty());
    let r = w.reserve(&tenant("5"), None).await.unwrap();
    let got = drain(&mut rx);
    assert_eq!(
        got.iter().map(|(t, e, _)| (*t, *e)).collect::<Vec<_>>(),
        [(800, false), (1000, true)],
        "one decision from 50% to 100% crosses 80% and exhausts it"
    );
    assert_ne!(got[0].2.id, got[1].2.id);
    // A refund and spending again is a new crossing.
    w.commit(
        r.reservation.unwrap().id,
        &ratewarden::Cost::new().with("usd", 1),
    )
    .await
    .unwrap();
    assert!(
        drain(&mut rx).is_empty(),
        "a commit lowering the spend crosses nothing"
    );
    assert!(w.acquire(&tenant("3")).await.unwrap().allowed());
    assert_eq!(
        drain(&mut rx)
            .iter()
            .map(|(t, _, _)| *t)
            .collect::<Vec<_>>(),
        [800]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn thresholds_are_per_limit_and_checked() {
    let w = Warden::with_clock(
        policy(Some(json!(["25%", 0.9]))),
        Arc::new(ManualClock::at_date(2026, 1, 15)),
    );
    let mut rx = w.subscribe();
    assert!(w.acquire(&tenant("10")).await.unwrap().allowed());
    assert_eq!(
        drain(&mut rx)
            .iter()
            .map(|(t, e, _)| (*t, *e))
            .collect::<Vec<_>>(),
        [(250, false), (900, false)]
    );
    let off = Warden::new(policy(Some(json!([]))));
    let mut rx = off.subscribe();
    assert!(off.acquire(&tenant("10")).await.unwrap().allowed());
    assert!(drain(&mut rx).is_empty());
    for (bad, says) in [
        (json!(["0%"]), "always crossed"),
        (json!(["120%"]), "more than 100%"),
        (json!(["half"]), "expected a percentage"),
    ] {
        let e = Policy::from_value(&json!({"scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "thresholds": bad}
        ]}}}))
        .unwrap_err()
        .to_string();
        assert!(e.contains(says) && e.contains("thresholds[0]"), "{e}");
    }
    let e = Policy::from_value(&json!({"scopes": {"tenant": {"limits": [
        {"name": "r", "kind": "rate", "limit": 10, "per": "1s", "thresholds": ["50%"]}
    ]}}}))
    .unwrap_err()
    .to_string();
    assert!(e.contains("apply to quotas and budgets"), "{e}");
}

/// Four "processes" (a connection each) race 1-cent acquires on one budget:
/// each of the three crossings is reported once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_four_processes_each_crossing_is_reported_once() {
    let servers = RedisServers::start(true);
    for (url, ns) in [
        (servers.url().to_owned(), "events-s"),
        (servers.cluster_url().to_owned(), "events-c"),
    ] {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let backend = RedisBackend::connect(&url, ns).await.unwrap();
            let w = Warden::with_backend(
                policy(None),
                Arc::new(backend) as Arc<dyn Backend>,
                Arc::new(ratewarden::SystemClock),
            );
            let mut rx = w.subscribe();
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0;
                // 10 USD in 0.25 steps: 40 admissions in all, then denials.
                for _ in 0..20 {
                    if w.acquire(&tenant("0.25")).await.unwrap().allowed() {
                        admitted += 1;
                    }
                }
                (admitted, drain(&mut rx))
            }));
        }
        let mut admitted = 0;
        let mut crossings = Vec::new();
        for t in tasks {
            let (a, c) = t.await.unwrap();
            admitted += a;
            crossings.extend(c);
        }
        assert_eq!(admitted, 40, "{url}");
        let mut thresholds: Vec<u16> = crossings.iter().map(|(t, _, _)| *t).collect();
        thresholds.sort_unstable();
        assert_eq!(thresholds, [500, 800, 1000], "{url}: {crossings:?}");
        for (t, _, c) in &crossings {
            let mark = 10_000_000 * i64::from(*t) / 1000;
            assert!(
                c.before < mark && c.after >= mark && c.after - c.before == 250_000,
                "{c:?}"
            );
        }
    }
}

/// A listener gets the events its filter wants, in order, on its own
/// thread; a callback that panics or fails is counted and keeps receiving;
/// closing it stops every later call.
#[tokio::test(flavor = "current_thread")]
async fn a_listener_survives_its_callback_and_stops_when_closed() {
    use ratewarden::events::Filter;
    use std::sync::mpsc;
    use std::time::Duration;
    let w = Warden::with_clock(policy(None), Arc::new(ManualClock::at_date(2026, 1, 15)));
    let (tx, rx) = mpsc::channel::<(String, u16)>();
    let mut calls = 0_u32;
    let mut listener = w
        .listen(
            Filter::new(vec!["limit.threshold_crossed".into()]).unwrap(),
            move |e| {
                calls += 1;
                let Event::ThresholdCrossed(c) = e else {
                    panic!("the filter let {} through", e.type_name())
                };
                tx.send((e.type_name().to_owned(), c.threshold)).unwrap();
                match calls {
                    1 => panic!("first call panics"),
                    2 => Err("second call fails".to_owned()),
                    _ => Ok(()),
                }
            },
        )
        .unwrap();
    // 50%, then 80% and exhausted (filtered out), then nothing (denied).
    assert!(w.acquire(&tenant("5")).await.unwrap().allowed());
    assert!(w.acquire(&tenant("5")).await.unwrap().allowed());
    let wait = Duration::from_secs(10);
    assert_eq!(rx.recv_timeout(wait).unwrap().1, 500);
    assert_eq!(rx.recv_timeout(wait).unwrap().1, 800);
    listener.close();
    assert!(!listener.is_open());
    let s = listener.stats();
    assert_eq!((s.delivered, s.failed, s.dropped), (2, 2, 0), "{s:?}");
    assert_eq!(s.last_error.as_deref(), Some("second call fails"));
    // Closed: another tenant's crossing reaches nobody.
    let b = Request::parse("tenant:b")
        .unwrap()
        .spend("usd", Amount::parse("5").unwrap());
    assert!(w.acquire(&b).await.unwrap().allowed());
    let mut seen = w.subscribe();
    assert!(w.acquire(&b).await.unwrap().allowed());
    assert_eq!(drain(&mut seen).len(), 2, "the crossings happen");
    assert!(rx.try_recv().is_err());
    assert_eq!(listener.stats().delivered, 2);
    let e = Filter::new(vec!["limit.".into(), "limits.exhausted".into()]).unwrap_err();
    assert!(e.to_string().contains("events[1]"), "{e}");
    // A warden dropped ends its listeners.
    let l = w.listen(Filter::default(), |_| Ok(())).unwrap();
    drop(w);
    let mut l = l;
    l.close();
    assert!(!l.is_open());
}

/// A commit past its reservation emits one `reservation.overage` naming
/// each limit it went past (a repeated commit emits nothing); a commit or
/// extend that finds the reservation expired emits `reservation.expired`.
#[tokio::test(flavor = "current_thread")]
async fn overage_and_expiry_are_reported_by_the_call_that_meets_them() {
    let policy = Policy::from_value(&json!({"scopes": {"tenant": {"limits": [
        {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month",
         "overage": "allow_with_overdraft", "overdraft": "1", "thresholds": []},
        {"name": "tokens", "kind": "quota", "unit": "tokens", "limit": 1000, "per": "day",
         "overage": "cap", "thresholds": []}
    ]}}}))
    .unwrap();
    let clock = Arc::new(ManualClock::at_date(2026, 1, 15));
    let w = Warden::with_clock(policy, clock.clone());
    let mut rx = w.subscribe();
    let req = Request::parse("tenant:a")
        .unwrap()
        .spend("usd", Amount::parse("2").unwrap())
        .spend("tokens", Amount::from(100));
    let id = w.reserve(&req, None).await.unwrap().reservation.unwrap().id;
    let within = ratewarden::Cost::new().with("usd", 1).with("tokens", 100);
    let past = ratewarden::Cost::new()
        .with("usd", Amount::parse("11.5").unwrap())
        .with("tokens", 150);
    let other = w.reserve(&req, None).await.unwrap().reservation.unwrap().id;
    w.commit(other, &within).await.unwrap();
    assert!(rx.try_recv().is_err(), "within the reservation: no event");
    w.commit(id, &past).await.unwrap();
    let Ok(Event::Overage(o)) = rx.try_recv() else {
        panic!("expected an overage event")
    };
    assert_eq!(o.reservation, id);
    let lines: Vec<_> = o
        .lines
        .iter()
        .map(|l| {
            (
                l.limit.as_str(),
                l.rule,
                l.reserved,
                l.charged,
                l.uncharged,
                l.owner.as_deref(),
            )
        })
        .collect();
    // usd: 1 spent, 2 reserved, 11.5 asked: room 9 + overdraft 1 → 10 charged.
    assert_eq!(
        lines,
        [
            (
                "usd",
                "allow_with_overdraft",
                2_000_000,
                10_000_000,
                1_500_000,
                Some("tenant:a")
            ),
            ("tokens", "cap", 100, 100, 50, Some("tenant:a")),
        ]
    );
    let Ok(Event::DebtIncurred(debt)) = rx.try_recv() else {
        panic!("expected a debt event")
    };
    assert_eq!(
        debt.lines
            .iter()
            .map(|l| (l.limit.as_str(), l.debt))
            .collect::<Vec<_>>(),
        [("usd", 1_000_000)],
        "room 9, charged 10: 1 into the overdraft"
    );
    let data = Event::Overage(o).data();
    assert_eq!(data["limits"][0]["charged_text"], "10");
    assert_eq!(data["limits"][0]["debt_text"], "1");
    assert_eq!(data["reservation"], id.to_string());
    w.commit(id, &past).await.unwrap();
    assert!(rx.try_recv().is_err(), "a repeated commit emits nothing");

    // Expiry, found by extend and then by commit.
    let lapsing = w
        .reserve(
            &Request::parse("tenant:b")
                .unwrap()
                .spend("usd", Amount::from(1)),
            Some(std::time::Duration::from_secs(5)),
        )
        .await
        .unwrap()
        .reservation
        .unwrap()
        .id;
    clock.advance(std::time::Duration::from_secs(6));
    let e = w
        .extend(lapsing, std::time::Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ratewarden::Error::ReservationExpired { .. }),
        "{e}"
    );
    w.commit(lapsing, &ratewarden::Cost::new())
        .await
        .unwrap_err();
    let found: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|e| match e {
            Event::ReservationExpired {
                reservation,
                operation,
                ..
            } => (reservation, operation),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        found,
        [
            (lapsing.to_string(), "extend"),
            (lapsing.to_string(), "commit")
        ]
    );
}

/// A commit past its reservation reports the thresholds its excess crossed,
/// from where the spend stood to where the commit took it — once (a repeated
/// commit charges and reports nothing).
#[tokio::test(flavor = "current_thread")]
async fn a_commit_past_its_reservation_reports_the_thresholds_it_crossed() {
    let w = Warden::with_clock(policy(None), Arc::new(ManualClock::at_date(2026, 1, 15)));
    let mut rx = w.subscribe();
    let id = w
        .reserve(&tenant("4"), None)
        .await
        .unwrap()
        .reservation
        .unwrap()
        .id;
    assert!(drain(&mut rx).is_empty(), "40% crosses nothing");
    let actual = ratewarden::Cost::new().with("usd", Amount::parse("8.5").unwrap());
    let r = w.commit(id, &actual).await.unwrap();
    assert_eq!(r.charges[0].before, Some(4_000_000));
    let got = drain(&mut rx);
    assert_eq!(
        got.iter()
            .map(|(t, _, c)| (*t, c.before, c.after))
            .collect::<Vec<_>>(),
        [(500, 4_000_000, 8_500_000), (800, 4_000_000, 8_500_000)]
    );
    w.commit(id, &actual).await.unwrap();
    assert!(
        drain(&mut rx).is_empty(),
        "a repeated commit reports nothing"
    );
    // Within its reservation a commit crosses nothing (its hold was counted).
    let id = w
        .reserve(&tenant("1"), None)
        .await
        .unwrap()
        .reservation
        .unwrap()
        .id;
    let got = drain(&mut rx);
    assert_eq!(got.len(), 0, "{got:?}");
    w.commit(id, &ratewarden::Cost::new().with("usd", 1))
        .await
        .unwrap();
    assert!(drain(&mut rx).is_empty());
}

/// The same on Redis and a Cluster: settle.lua measures where the spend
/// stood, and the commit reports the crossings of its excess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_commit_past_its_reservation_reports_its_crossings() {
    let servers = RedisServers::start(true);
    for (url, ns) in [
        (servers.url().to_owned(), "commit-x-s"),
        (servers.cluster_url().to_owned(), "commit-x-c"),
    ] {
        let backend = RedisBackend::connect(&url, ns).await.unwrap();
        let w = Warden::with_backend(
            policy(None),
            Arc::new(backend) as Arc<dyn Backend>,
            Arc::new(ratewarden::SystemClock),
        );
        let mut rx = w.subscribe();
        let id = w
            .reserve(&tenant("4"), None)
            .await
            .unwrap()
            .reservation
            .unwrap()
            .id;
        let actual = ratewarden::Cost::new().with("usd", Amount::parse("10.5").unwrap());
        let r = w.commit(id, &actual).await.unwrap();
        assert_eq!(
            (r.charges[0].before, r.charges[0].debt),
            (Some(4_000_000), 500_000),
            "{url}: the default rule charges it all, 0.5 past the capacity"
        );
        let got = drain(&mut rx);
        assert_eq!(
            got.iter().map(|(t, e, _)| (*t, *e)).collect::<Vec<_>>(),
            [(500, false), (800, false), (1000, true)],
            "{url}"
        );
    }
}
