//! Coordination on the upstream's observed state: `observe` / `report`, the
//! traffic light in every decision on a coordinated resource, staleness, the
//! give-back when the limits deny. Runs on the embedded engine and, with
//! `RATEWARDEN_TEST_BACKEND`, unchanged on Redis and Redis Cluster (the same
//! rules in `lua/upstream.lua`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, warden};
use ratewarden::upstream::{BreakerState, Zone};
use ratewarden::{Clock, ErrorKind, Event, Outcome, Priority, Request};
use serde_json::{Value, json};

fn policy(extra_limits: Value) -> Value {
    json!({
        "scopes": {"user": {"limits": []}},
        "resources": {
            "openai": {"upstream": {}, "limits": extra_limits},
            "plain": {"limits": []}
        }
    })
}

fn openai(limit: u64, remaining: u64, reset: &str) -> Vec<(String, String)> {
    vec![
        ("x-ratelimit-limit-requests".into(), limit.to_string()),
        (
            "x-ratelimit-remaining-requests".into(),
            remaining.to_string(),
        ),
        ("x-ratelimit-reset-requests".into(), reset.into()),
    ]
}

fn pairs(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

fn ask(user: &str, p: Priority) -> Request {
    Request::parse(user).unwrap().resource("openai").priority(p)
}

#[test]
fn green_amber_red_per_tier() {
    let (w, clock) = warden(policy(json!([])));
    let v = now(w.observe("openai", &pairs(&openai(1000, 500, "60s")))).unwrap();
    assert_eq!((v.zone, v.left), (Zone::Green, Some(500)));
    let d = now(w.acquire(&ask("user:1", Priority::Background))).unwrap();
    assert_eq!(d.outcome, Outcome::Allow);
    assert_eq!(d.light.unwrap().zone, Zone::Green);

    // Amber: 275 of 1000 left → standard 125/250 of 500 ms, background more.
    now(w.observe("openai", &pairs(&openai(1000, 275, "60s")))).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(d.outcome, Outcome::AllowWithCaps, "{d:?}");
    assert_eq!(d.caps.delay_ms, Some(250));
    let d = now(w.acquire(&ask("user:1", Priority::Background))).unwrap();
    assert_eq!(d.caps.delay_ms, Some(1008), "274 left: 126/250 of 2 s");
    let d = now(w.acquire(&ask("user:1", Priority::Critical))).unwrap();
    assert_eq!(d.outcome, Outcome::Allow, "critical is never delayed");

    // Red: 100 of 1000 left (a later window).
    now(w.observe("openai", &pairs(&openai(1000, 100, "90s")))).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Background))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs(90)),
        "until the reset"
    );
    assert!(d.reason.as_deref().unwrap().contains("red"), "{d:?}");
    // Standard: one per second across every caller.
    assert!(
        now(w.acquire(&ask("user:1", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    let d = now(w.acquire(&ask("user:2", Priority::Standard))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.retry_after, Some(Duration::from_secs(1)));
    assert!(
        now(w.acquire(&ask("user:2", Priority::Critical)))
            .unwrap()
            .allowed()
    );
    clock.advance(Duration::from_secs(1));
    assert!(
        now(w.acquire(&ask("user:2", Priority::Standard)))
            .unwrap()
            .allowed()
    );
}

#[test]
fn an_amber_delay_past_the_reset_waits_for_the_reset_instead() {
    let (w, clock) = warden(policy(json!([])));
    // 275 of 1000 left: standard would wait 250 ms, but the window ends in 200 ms.
    now(w.observe("openai", &pairs(&openai(1000, 275, "200ms")))).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(
        (d.outcome, d.retry_after),
        (Outcome::Deny, Some(Duration::from_millis(200)))
    );
    assert!(
        d.reason.as_deref().unwrap().contains("past its reset"),
        "{d:?}"
    );
    // In time it is a delay; after the reset the window is whole again.
    now(w.observe("openai", &pairs(&openai(1000, 275, "300ms")))).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(d.caps.delay_ms, Some(250));
    clock.advance(Duration::from_millis(300));
    assert_eq!(
        now(w.acquire(&ask("user:1", Priority::Standard)))
            .unwrap()
            .outcome,
        Outcome::Allow
    );
    // The reset unknown (Azure sends none): ask again after the delay, counted then.
    let azure = [
        ("x-ratelimit-limit-requests", "1000"),
        ("x-ratelimit-remaining-requests", "275"),
    ];
    now(w.observe("openai", &azure)).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(
        (d.outcome, d.retry_after),
        (Outcome::Deny, Some(Duration::from_millis(250)))
    );
    assert_eq!(
        now(w.upstream("openai")).unwrap().quotas[0].remaining,
        275,
        "nothing counted"
    );
}

#[test]
fn admissions_lower_the_estimate_until_the_next_response() {
    let (w, _clock) = warden(policy(json!([])));
    now(w.observe("openai", &pairs(&openai(100, 100, "60s")))).unwrap();
    for _ in 0..59 {
        assert_eq!(
            now(w.acquire(&ask("user:1", Priority::Background)))
                .unwrap()
                .outcome,
            Outcome::Allow
        );
    }
    // 41 left (41%): still green; a check counts nothing.
    for _ in 0..5 {
        assert_eq!(
            now(w.check(&ask("user:1", Priority::Background)))
                .unwrap()
                .outcome,
            Outcome::Allow
        );
    }
    let v = now(w.upstream("openai")).unwrap();
    assert_eq!((v.quotas[0].remaining, v.quotas[0].observed), (41, 100));
    assert!(
        now(w.acquire(&ask("user:1", Priority::Background)))
            .unwrap()
            .allowed()
    );
    // 40 left: amber, at its top (no delay yet); 39 left (390‰): 10/250 of 2 s.
    let d = now(w.acquire(&ask("user:1", Priority::Background))).unwrap();
    assert_eq!(
        (d.outcome, d.light.unwrap().zone),
        (Outcome::Allow, Zone::Amber)
    );
    let d = now(w.acquire(&ask("user:1", Priority::Background))).unwrap();
    assert_eq!(
        (d.outcome, d.caps.delay_ms),
        (Outcome::AllowWithCaps, Some(80))
    );
    // A late reply of the same window (it says 80) never raises the estimate.
    let v = now(w.observe("openai", &pairs(&openai(100, 80, "60s")))).unwrap();
    assert_eq!(v.quotas[0].remaining, 38);
}

#[test]
fn readings_roll_over_at_their_reset_and_go_stale_after_ttl() {
    let (w, clock) = warden(policy(json!([])));
    now(w.observe("openai", &pairs(&openai(100, 5, "10s")))).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Background))).unwrap();
    assert_eq!(
        (d.outcome, d.retry_after),
        (Outcome::Deny, Some(Duration::from_secs(10)))
    );
    // At the reset the quota is replenished: the whole limit, nothing known
    // of the next reset — not "nothing known", which would let everyone rush.
    clock.advance(Duration::from_secs(10));
    let d = now(w.acquire(&ask("user:1", Priority::Background))).unwrap();
    assert_eq!(
        (d.outcome, d.light.unwrap().zone),
        (Outcome::Allow, Zone::Green)
    );
    let v = now(w.upstream("openai")).unwrap();
    assert_eq!((v.quotas[0].remaining, v.quotas[0].reset), (99, None));
    for _ in 0..99 {
        assert!(
            now(w.acquire(&ask("user:1", Priority::Critical)))
                .unwrap()
                .allowed()
        );
    }
    let d = now(w.acquire(&ask("user:1", Priority::Critical))).unwrap();
    assert_eq!(
        d.outcome,
        Outcome::Deny,
        "the rolled-over window is spent too"
    );
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs(1)),
        "look again within `pace`"
    );
    // `ttl` after the reset, unconfirmed by any response: stale, ignored.
    clock.advance(Duration::from_secs(60));
    let d = now(w.acquire(&ask("user:1", Priority::Critical))).unwrap();
    assert_eq!(
        (d.outcome, d.light.unwrap().zone),
        (Outcome::Allow, Zone::Unknown)
    );
    // Without a reset (Azure) a reading is trusted for `ttl` (60 s).
    let azure = [("x-ratelimit-remaining-requests", "0")];
    now(w.observe("openai", &azure)).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Critical))).unwrap();
    assert_eq!(
        d.outcome,
        Outcome::Deny,
        "nothing left: even critical waits"
    );
    assert_eq!(d.retry_after, Some(Duration::from_secs(1)));
    clock.advance(Duration::from_secs(59));
    assert!(
        !now(w.acquire(&ask("user:1", Priority::Critical)))
            .unwrap()
            .allowed()
    );
    clock.advance(Duration::from_secs(1));
    assert!(
        now(w.acquire(&ask("user:1", Priority::Critical)))
            .unwrap()
            .allowed()
    );
}

#[test]
fn a_429_opens_the_breaker_then_exactly_one_probe_goes_and_its_success_closes_it() {
    let (w, clock) = warden(policy(json!([])));
    let mut rx = w.subscribe();
    let v = now(w.report("openai", 429, &[("retry-after", "5")])).unwrap();
    assert_eq!(
        (v.zone, v.blocked, v.breaker),
        (Zone::Red, Some(Duration::from_secs(5)), BreakerState::Open)
    );
    let d = now(w.acquire(&ask("user:1", Priority::Critical))).unwrap();
    assert_eq!(
        (d.outcome, d.retry_after),
        (Outcome::Deny, Some(Duration::from_secs(5)))
    );
    clock.advance(Duration::from_secs(5));
    assert_eq!(
        now(w.upstream("openai")).unwrap().breaker,
        BreakerState::HalfOpen
    );
    // One probe, whoever asks first; everyone else looks again within `pace`.
    let probe = now(w.acquire(&ask("user:1", Priority::Background))).unwrap();
    assert!(probe.allowed(), "{probe:?}");
    assert!(
        probe.reason.as_deref().unwrap().contains("probe"),
        "{probe:?}"
    );
    for p in [Priority::Critical, Priority::Standard] {
        let d = now(w.acquire(&ask("user:2", p))).unwrap();
        assert_eq!(
            (d.outcome, d.retry_after),
            (Outcome::Deny, Some(Duration::from_secs(1)))
        );
    }
    // Its success closes the breaker.
    let v = now(w.report("openai", 200, &[])).unwrap();
    assert_eq!(v.breaker, BreakerState::Closed);
    assert!(
        now(w.acquire(&ask("user:2", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    let mut seen = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let Event::Breaker { from, to, .. } = e {
            seen.push((from, to));
        }
    }
    assert_eq!(
        seen,
        [
            (BreakerState::Closed, BreakerState::Open),
            (BreakerState::Open, BreakerState::HalfOpen),
            (BreakerState::HalfOpen, BreakerState::Closed)
        ]
    );
}

#[test]
fn a_failed_probe_reopens_for_twice_as_long_and_an_unreported_probe_expires() {
    let (w, clock) = warden(policy(json!([])));
    // A 5xx without Retry-After: open for `open_for` (5 s).
    assert_eq!(
        now(w.report("openai", 503, &[])).unwrap().breaker,
        BreakerState::Open
    );
    clock.advance(Duration::from_secs(5));
    assert!(
        now(w.acquire(&ask("user:1", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    // The probe failed: open again, twice as long.
    now(w.report("openai", 500, &[])).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Critical))).unwrap();
    assert_eq!(d.retry_after, Some(Duration::from_secs(10)));
    clock.advance(Duration::from_secs(10));
    assert!(
        now(w.acquire(&ask("user:1", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    // That probe never reports: after its lease (30 s) another one goes.
    clock.advance(Duration::from_secs(29));
    assert!(
        !now(w.acquire(&ask("user:2", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    clock.advance(Duration::from_secs(1));
    assert!(
        now(w.acquire(&ask("user:2", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    // A 404 says nothing about the upstream's health; a success closes it.
    assert_eq!(
        now(w.report("openai", 404, &[])).unwrap().breaker,
        BreakerState::HalfOpen
    );
    assert_eq!(
        now(w.report("openai", 204, &[])).unwrap().breaker,
        BreakerState::Closed
    );
    // Closed again, the count of opens starts over: 5 s.
    now(w.report("openai", 502, &[])).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Critical))).unwrap();
    assert_eq!(d.retry_after, Some(Duration::from_secs(5)));
}

#[test]
fn a_probe_the_limits_deny_is_handed_back() {
    let (w, clock) = warden(policy(json!([
        {"name": "per_user", "kind": "quota", "limit": 1, "per": "day", "scope": "user"}
    ])));
    assert!(
        now(w.acquire(&ask("user:1", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    now(w.report("openai", 429, &[("retry-after", "1")])).unwrap();
    clock.advance(Duration::from_secs(1));
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert!(d.reason.as_deref().unwrap().contains("per_user"), "{d:?}");
    assert!(
        now(w.acquire(&ask("user:2", Priority::Standard)))
            .unwrap()
            .allowed(),
        "the probe came back"
    );
    assert!(
        !now(w.acquire(&ask("user:3", Priority::Standard)))
            .unwrap()
            .allowed()
    );
}

#[test]
fn a_short_runway_opens_pre_emptively_capping_then_walking_the_fallback_chain() {
    let (w, clock) = warden(json!({
        "scopes": {"user": {}},
        "resources": {"openai": {"upstream": {"breaker": {
            "horizon": "10s", "max_tokens": 256, "fallback": ["gpt-small", "gpt-tiny"], "step": "10s"
        }}}}
    }));
    let end = clock.now() + 3_600_000_000;
    let seen = |remaining: u64| {
        let reset = format!("{}ms", (end - clock.now()) / 1000);
        now(w.observe("openai", &pairs(&openai(1000, remaining, &reset)))).unwrap()
    };
    seen(1000);
    clock.advance(Duration::from_secs(1));
    // 100 a second gone, 900 left: nine seconds of runway, under the horizon.
    let v = seen(900);
    assert_eq!(
        (v.breaker, v.quotas[0].burn),
        (BreakerState::PreEmptiveOpen, 100)
    );
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(d.outcome, Outcome::AllowWithCaps);
    assert_eq!(
        (d.caps.max_tokens, d.caps.model.as_deref()),
        (Some(256), None)
    );
    clock.advance(Duration::from_secs(10));
    let d = now(w.acquire(&ask("user:1", Priority::Critical))).unwrap();
    assert_eq!(
        (d.caps.max_tokens, d.caps.model.as_deref()),
        (Some(256), Some("gpt-small"))
    );
    clock.advance(Duration::from_secs(20));
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(
        d.caps.model.as_deref(),
        Some("gpt-tiny"),
        "the chain's end holds"
    );
    // The burn slows (nothing more is used): closed once the runway is twice the horizon.
    let mut burns = Vec::new();
    for _ in 0..3 {
        clock.advance(Duration::from_millis(500));
        let v = seen(898);
        burns.push((v.quotas[0].burn, v.breaker));
    }
    assert_eq!(
        burns,
        [
            (75, BreakerState::PreEmptiveOpen),
            (56, BreakerState::PreEmptiveOpen),
            (42, BreakerState::Closed)
        ]
    );
    assert_eq!(
        now(w.acquire(&ask("user:1", Priority::Standard)))
            .unwrap()
            .outcome,
        Outcome::Allow
    );
}

#[test]
fn a_burst_of_denials_switches_to_sequential_mode_for_a_cooldown() {
    let (w, clock) = warden(policy(json!([])));
    let mut rx = w.subscribe();
    // Nothing left for an hour: every call is denied.
    now(w.observe("openai", &pairs(&openai(100, 0, "1h")))).unwrap();
    for i in 0..3 {
        let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
        assert_eq!(d.outcome, Outcome::Deny);
        let light = d.light.unwrap();
        assert_eq!(light.sequential, i == 2, "the third denial within 30 s");
        assert_eq!(light.cascade, (i == 2).then_some(true));
        clock.advance(Duration::from_secs(10));
    }
    // A later window has room: admitted, one call at a time.
    now(w.observe("openai", &pairs(&openai(100, 90, "2h")))).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(
        (d.outcome, d.caps.sequential),
        (Outcome::AllowWithCaps, true)
    );
    assert!(
        d.reason.as_deref().unwrap().contains("sequential mode"),
        "{d:?}"
    );
    let v = now(w.upstream("openai")).unwrap();
    assert_eq!(
        v.sequential,
        Some(Duration::from_secs(50)),
        "60 s after the burst"
    );
    // A check sees it and changes nothing.
    assert!(
        now(w.check(&ask("user:1", Priority::Standard)))
            .unwrap()
            .caps
            .sequential
    );
    clock.advance(Duration::from_secs(50));
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(
        (d.outcome, d.light.unwrap().cascade),
        (Outcome::Allow, Some(false))
    );
    let mut seen = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let Event::Cascade { on, .. } = e {
            seen.push(on);
        }
    }
    assert_eq!(seen, [true, false]);
}

#[test]
fn denials_spread_out_or_a_detector_turned_off_never_switch() {
    let (w, clock) = warden(policy(json!([])));
    now(w.observe("openai", &pairs(&openai(100, 0, "1h")))).unwrap();
    for _ in 0..4 {
        let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
        assert!(!d.allowed() && !d.light.unwrap().sequential);
        clock.advance(Duration::from_secs(16));
    }
    let (w, _clock) = warden(json!({
        "scopes": {"user": {}},
        "resources": {"openai": {"upstream": {"cascade": {"denials": 0}}}}
    }));
    now(w.observe("openai", &pairs(&openai(100, 0, "1h")))).unwrap();
    for _ in 0..5 {
        assert!(
            !now(w.acquire(&ask("user:1", Priority::Standard)))
                .unwrap()
                .light
                .unwrap()
                .sequential
        );
    }
}

#[test]
fn reported_failures_and_the_limits_denials_count_too() {
    let (w, _clock) = warden(policy(json!([])));
    for _ in 0..2 {
        now(w.report("openai", 429, &[("retry-after", "1")])).unwrap();
    }
    let v = now(w.report("openai", 503, &[])).unwrap();
    assert_eq!(v.sequential, Some(Duration::from_secs(60)));
    // The limits' denials (the light let them through).
    let (w, _clock) = warden(policy(json!([
        {"name": "per_user", "kind": "quota", "limit": 1, "per": "day", "scope": "user"}
    ])));
    assert!(
        now(w.acquire(&ask("user:1", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    let mut lights = Vec::new();
    for _ in 0..3 {
        let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
        assert!(d.reason.as_deref().unwrap().contains("per_user"), "{d:?}");
        lights.push(d.light.unwrap().cascade);
    }
    assert_eq!(lights, [None, None, Some(true)]);
    assert!(
        now(w.check(&ask("user:2", Priority::Standard)))
            .unwrap()
            .caps
            .sequential
    );
}

#[test]
fn what_the_light_counted_comes_back_when_the_limits_deny() {
    let (w, _clock) = warden(policy(json!([
        {"name": "per_user", "kind": "quota", "limit": 1, "per": "day", "scope": "user"}
    ])));
    now(w.observe("openai", &pairs(&openai(100, 10, "60s")))).unwrap();
    assert!(
        now(w.acquire(&ask("user:1", Priority::Critical)))
            .unwrap()
            .allowed()
    );
    // user:1's quota is gone: denied by the limit, the paced turn it took is
    // handed back, so user:2 goes at once.
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(d.reason.as_deref().unwrap().contains("per_user"), "{d:?}");
    assert!(
        now(w.acquire(&ask("user:2", Priority::Standard)))
            .unwrap()
            .allowed()
    );
    let v = now(w.upstream("openai")).unwrap();
    assert_eq!(
        v.quotas[0].remaining, 8,
        "two admitted, the denied one given back"
    );
}

#[test]
fn a_denial_by_the_light_reports_the_limits_true_state() {
    let (w, _clock) = warden(policy(json!([
        {"name": "pool", "kind": "quota", "limit": 10, "per": "day"}
    ])));
    now(w.report("openai", 429, &[("retry-after", "3")])).unwrap();
    let d = now(w.acquire(&ask("user:1", Priority::Standard))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny);
    let pool = d.limits.iter().find(|l| l.name() == "pool").unwrap();
    assert_eq!(
        (pool.remaining, pool.denied),
        (9, false),
        "what it would leave"
    );
    assert!(
        d.reason
            .as_deref()
            .unwrap()
            .contains("breaker of `openai` is open"),
        "{d:?}"
    );
    let scope = ratewarden::Scope::parse("user:1").unwrap();
    let b = now(w.balances(&scope, Some("openai"))).unwrap();
    assert_eq!(b[0].remaining, 10, "nothing charged");
}

#[test]
fn every_dimension_is_its_own_constraint() {
    let (w, _clock) = warden(policy(json!([])));
    let h = [
        ("x-ratelimit-limit-requests", "100"),
        ("x-ratelimit-remaining-requests", "90"),
        ("x-ratelimit-reset-requests", "1m"),
        ("x-ratelimit-limit-tokens", "10000"),
        ("x-ratelimit-remaining-tokens", "400"),
        ("x-ratelimit-reset-tokens", "30s"),
    ];
    let v = now(w.observe("openai", &h)).unwrap();
    assert_eq!(
        (v.zone, v.left),
        (Zone::Red, Some(40)),
        "tokens are the tightest"
    );
    let big = ask("user:1", Priority::Critical).spend("tokens", 500);
    let d = now(w.acquire(&big)).unwrap();
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.retry_after, Some(Duration::from_secs(30)));
    assert!(
        d.reason.as_deref().unwrap().contains("no tokens left"),
        "{d:?}"
    );
    let small = ask("user:1", Priority::Critical).spend("tokens", 300);
    assert!(now(w.acquire(&small)).unwrap().allowed());
    let v = now(w.upstream("openai")).unwrap();
    assert_eq!((v.quotas[0].remaining, v.quotas[1].remaining), (89, 100));
}

#[test]
fn headers_that_say_nothing_change_nothing() {
    let (w, _clock) = warden(policy(json!([])));
    let v = now(w.observe(
        "openai",
        &[
            ("x-ratelimit-remaining-requests", "lots"),
            ("x-ratelimit-limit-requests", "-1"),
        ],
    ))
    .unwrap();
    assert_eq!((v.zone, v.quotas.len()), (Zone::Unknown, 0));
    assert_eq!(v.warnings.len(), 2, "{:?}", v.warnings);
    let v = now(w.observe("openai", &[("content-type", "text/plain")])).unwrap();
    assert_eq!((v.zone, v.warnings.len()), (Zone::Unknown, 0));
}

#[test]
fn zone_changes_are_events() {
    let (w, _clock) = warden(policy(json!([])));
    let mut rx = w.subscribe();
    now(w.observe("openai", &pairs(&openai(100, 90, "60s")))).unwrap();
    now(w.observe("openai", &pairs(&openai(100, 89, "60s")))).unwrap();
    now(w.observe("openai", &pairs(&openai(100, 10, "60s")))).unwrap();
    let mut seen = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let Event::UpstreamZone {
            resource, from, to, ..
        } = e
        {
            seen.push((resource, from, to));
        }
    }
    assert_eq!(
        seen,
        vec![
            ("openai".into(), Zone::Unknown, Zone::Green),
            ("openai".into(), Zone::Green, Zone::Red)
        ]
    );
}

#[test]
fn bad_calls_name_what_was_wrong() {
    let (w, _clock) = warden(policy(json!([])));
    let e = now(w.observe("opnai", &[])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("opnai"), "{e}");
    let e = now(w.observe("plain", &[])).unwrap_err();
    assert!(e.to_string().contains("upstream: {}"), "{e}");
    let e = now(w.report("openai", 42, &[])).unwrap_err();
    assert!(e.to_string().contains("42 is not an HTTP status"), "{e}");
    // A resource without `upstream:` decides as before: no light.
    let d = now(w.acquire(&Request::parse("user:1").unwrap().resource("plain"))).unwrap();
    assert!(d.light.is_none());
}

#[test]
fn the_policy_section_is_validated() {
    let bad = |upstream: Value, want: &str| {
        let e =
            ratewarden::Policy::from_value(&json!({"resources": {"r": {"upstream": upstream}}}))
                .unwrap_err()
                .to_string();
        assert!(e.contains(want), "{e} should say {want}");
    };
    bad(json!({"green": "10%", "red": "20%"}), "must be above red");
    bad(
        json!({"delay": {"background": "2h"}}),
        "longer than an hour",
    );
    bad(json!({"pace": "0s"}), "resources.r.upstream.pace");
    bad(json!({"ttl": "400d"}), "longer than a year");
    bad(json!({"green": 1.5}), "more than 100%");
    bad(json!({"gren": 0.5}), "unknown field `gren`");
    bad(
        json!({"breaker": {"horizon": "2h"}}),
        "resources.r.upstream.breaker.horizon",
    );
    bad(json!({"breaker": {"max_tokens": 0}}), "breaker.max_tokens");
    bad(
        json!({"breaker": {"fallback": ["a", " "]}}),
        "breaker.fallback[1]",
    );
    bad(json!({"breaker": {"open_for": "0s"}}), "breaker.open_for");
    bad(json!({"block": "1s"}), "unknown field `block`");
    bad(json!({"cascade": {"denials": 17}}), "cascade.denials");
    bad(json!({"cascade": {"within": "0s"}}), "cascade.within");
    let e = ratewarden::Policy::from_value(&json!({"actions": {"a": {"upstream": {}}}}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to a resource"), "{e}");
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Step {
    Observe {
        limit: Option<u64>,
        remaining: u64,
        reset_ms: Option<u64>,
        tokens: bool,
        status: Option<u16>,
    },
    Report {
        status: u16,
        retry_after: Option<u64>,
    },
    Acquire {
        priority: Priority,
        tokens: u64,
        check: bool,
    },
    Advance(u64),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let count = prop_oneof![0u64..200, 0u64..=(1 << 40), Just(1u64 << 40)];
    let priority = prop_oneof![
        Just(Priority::Critical),
        Just(Priority::Standard),
        Just(Priority::Background)
    ];
    let status = prop_oneof![Just(200u16), Just(429), Just(500), Just(404)];
    prop_oneof![
        4 => (proptest::option::of(count.clone()), count.clone(), proptest::option::of(1u64..120_000), any::<bool>(), proptest::option::of(status.clone()))
            .prop_map(|(limit, remaining, reset_ms, tokens, status)| Step::Observe { limit, remaining, reset_ms, tokens, status }),
        1 => (status, proptest::option::of(0u64..30)).prop_map(|(status, retry_after)| Step::Report { status, retry_after }),
        6 => (priority, prop_oneof![Just(0u64), 0u64..300, 0u64..=(1 << 40)], any::<bool>())
            .prop_map(|(priority, tokens, check)| Step::Acquire { priority, tokens, check }),
        2 => prop_oneof![0u64..2_000, 0u64..200_000].prop_map(Step::Advance),
    ]
}

/// What the memory backend does with an observation (a read changes
/// nothing); the expected view.
fn model_observe(
    model: &mut ratewarden::upstream::light::UpstreamState,
    h: &[(&str, &str)],
    status: Option<u16>,
    now: i64,
    c: &ratewarden::upstream::Coordination,
) -> ratewarden::UpstreamView {
    use ratewarden::upstream::light::Sample;
    let (sample, _) = Sample::of(&ratewarden::upstream::parse(h.iter().copied(), now), status);
    let mut next = *model;
    let (before, _, _) = next.observe(&sample, now, c);
    if !sample.is_empty() {
        *model = next;
    }
    let mut view = next.view("openai", now, c);
    view.previous = before;
    view
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Every backend decides exactly as the rules in `upstream::light` and
    /// `upstream::breaker` on a model state, over the whole accepted range of
    /// readings, amounts and statuses.
    #[test]
    fn every_backend_follows_the_rules(steps in proptest::collection::vec(step(), 1..40)) {
        use ratewarden::upstream::light::{UpstreamState, Verdict};
        let (w, clock) = warden(json!({
            "scopes": {"user": {}},
            "resources": {"openai": {"upstream": {"breaker": {
                "horizon": "20s", "max_tokens": 100, "fallback": ["a", "b"], "step": "2s", "open_for": "1s"
            }}}}
        }));
        let c = w.coordination("openai").unwrap().clone();
        let mut model = UpstreamState::default();
        for s in steps {
            match s {
                Step::Observe { limit, remaining, reset_ms, tokens, status } => {
                    let dim = if tokens { "tokens" } else { "requests" };
                    let mut h = vec![(format!("x-ratelimit-remaining-{dim}"), remaining.to_string())];
                    if let Some(l) = limit {
                        h.push((format!("x-ratelimit-limit-{dim}"), l.to_string()));
                    }
                    if let Some(r) = reset_ms {
                        h.push((format!("x-ratelimit-reset-{dim}"), format!("{r}ms")));
                    }
                    let h = pairs(&h);
                    let mut expected = model_observe(&mut model, &h, status, clock.now(), &c);
                    let v = match status {
                        None => now(w.observe("openai", &h)),
                        Some(st) => now(w.report("openai", st, &h)),
                    }
                    .unwrap();
                    expected.warnings.clone_from(&v.warnings);
                    proptest::prop_assert_eq!(v, expected);
                }
                Step::Report { status, retry_after } => {
                    let r = retry_after.map(|s| s.to_string());
                    let h: Vec<(&str, &str)> = r.iter().map(|r| ("retry-after", r.as_str())).collect();
                    let mut expected = model_observe(&mut model, &h, Some(status), clock.now(), &c);
                    let v = now(w.report("openai", status, &h)).unwrap();
                    expected.warnings.clone_from(&v.warnings);
                    proptest::prop_assert_eq!(v, expected);
                }
                Step::Acquire { priority, tokens, check } => {
                    let r = ask("user:1", priority).spend("tokens", tokens);
                    let d = if check { now(w.check(&r)) } else { now(w.acquire(&r)) }.unwrap();
                    let plan_ask = ratewarden::upstream::light::Ask {
                        priority,
                        amounts: [1, i64::try_from(tokens).unwrap(), i64::try_from(tokens).unwrap(), 0],
                        mutate: !check,
                    };
                    let g = model.gate(&plan_ask, clock.now(), &c);
                    proptest::prop_assert_eq!(d.light, Some(g.light));
                    let capped = g.max_tokens.is_some() || g.model.is_some() || g.light.sequential;
                    proptest::prop_assert_eq!(d.caps.sequential, g.light.sequential && d.allowed());
                    proptest::prop_assert_eq!(d.caps.max_tokens, g.max_tokens.map(|t| u64::try_from(t).unwrap()).filter(|_| d.allowed()));
                    proptest::prop_assert_eq!(d.caps.model.clone(), g.model.map(|i| c.breaker.fallback[i].clone()).filter(|_| d.allowed()));
                    match g.verdict {
                        Verdict::Pass | Verdict::Delay(0) => proptest::prop_assert_eq!(
                            d.outcome,
                            if capped { Outcome::AllowWithCaps } else { Outcome::Allow }
                        ),
                        Verdict::Delay(us) => {
                            proptest::prop_assert_eq!(d.outcome, Outcome::AllowWithCaps);
                            proptest::prop_assert_eq!(d.caps.delay_ms, Some(u64::try_from(us).unwrap().div_ceil(1000)));
                        }
                        Verdict::Deny { retry, .. } => {
                            proptest::prop_assert_eq!(d.outcome, Outcome::Deny);
                            proptest::prop_assert_eq!(d.retry_after, Some(Duration::from_micros(u64::try_from(retry).unwrap())));
                        }
                    }
                }
                Step::Advance(ms) => clock.advance(Duration::from_millis(ms)),
            }
        }
    }
}

#[test]
fn the_ordered_lock_is_held_by_one_and_a_holder_that_never_releases_frees_it() {
    let (w, clock) = warden(policy(json!([])));
    let (hold, none) = (Duration::from_secs(5), Duration::ZERO);
    let first = now(w.sequential("openai", hold, none))
        .unwrap()
        .expect("free: taken at once");
    assert_eq!(first.resource(), "openai");
    // Held: a caller that cannot wait is turned away (and leaves the line).
    assert!(now(w.sequential("openai", hold, none)).unwrap().is_none());
    assert!(now(w.release_turn(&first)).unwrap());
    let second = now(w.sequential("openai", hold, none))
        .unwrap()
        .expect("released");
    // Never released: free again when its hold runs out.
    clock.advance(Duration::from_secs(5));
    let third = now(w.sequential("openai", hold, none))
        .unwrap()
        .expect("the hold ran out");
    assert!(
        !now(w.release_turn(&second)).unwrap(),
        "it no longer held it"
    );
    assert!(now(w.release_turn(&third)).unwrap());
    // Bad calls.
    let e = now(w.sequential("plain", hold, none)).unwrap_err();
    assert!(e.to_string().contains("upstream: {}"), "{e}");
    let e = now(w.sequential("openai", Duration::ZERO, none)).unwrap_err();
    assert!(e.to_string().contains("longer than zero"), "{e}");
}

#[test]
fn the_edges_of_what_is_accepted() {
    let (w, _clock) = warden(policy(json!([])));
    // Statuses: 100 and 599 are HTTP statuses, 99 and 600 are not.
    for ok in [100, 599] {
        assert!(now(w.report("openai", ok, &[])).is_ok(), "{ok}");
    }
    for bad in [0, 99, 600, u16::MAX] {
        let e = now(w.report("openai", bad, &[])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
    }
    // Readings: 2^40 is kept; past it (up to 2^53 - 1) is no constraint, said so.
    let at = |n: u64| now(w.observe("openai", &pairs(&openai(n, n, "60s")))).unwrap();
    let v = at(1 << 40);
    assert_eq!((v.quotas[0].limit, v.warnings.len()), (1 << 40, 0));
    for past in [(1u64 << 40) + 1, (1 << 53) - 1] {
        let v = at(past);
        assert_eq!(v.warnings.len(), 1, "{past}: {:?}", v.warnings);
        assert!(v.warnings[0].contains("no constraint"), "{:?}", v.warnings);
        assert_eq!(
            v.quotas[0].limit,
            1 << 40,
            "{past}: the reading before stands"
        );
    }
    // The policy's bounds, on either side.
    let upstream = |u: Value| {
        ratewarden::Policy::from_value(&json!({"resources": {"r": {"upstream": u}}}))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(upstream(json!({"delay": {"background": "1h"}, "breaker": {"horizon": "1h"}})).is_ok());
    assert!(upstream(json!({"breaker": {"horizon": "1h1s"}})).is_err());
    assert!(upstream(json!({"breaker": {"max_tokens": 1u64 << 40}})).is_ok());
    assert!(upstream(json!({"breaker": {"max_tokens": (1u64 << 40) + 1}})).is_err());
    assert!(upstream(json!({"breaker": {"horizon": "0s"}, "cascade": {"denials": 16}})).is_ok());
    assert!(upstream(json!({"cascade": {"denials": 0}, "ttl": "366d"})).is_ok());
    assert!(upstream(json!({"ttl": "367d"})).is_err());
    assert!(upstream(json!({"green": "100%", "red": "0%"})).is_ok());
    assert!(upstream(json!({"green": "15%", "red": "15%"})).is_err());
    assert!(
        upstream(json!({"pace": 5})).is_err(),
        "a number is not a duration"
    );
}

/// fetch (GitHub) → summarize (OpenAI) → publish (a mailer with limits of its
/// own but no upstream to observe), and a side branch triage (OpenAI) after fetch.
fn workflow_policy() -> Value {
    json!({
        "scopes": {"user": {"limits": []}},
        "resources": {
            "github": {"upstream": {}},
            "openai": {"upstream": {}},
            "mailer": {"limits": [{"name": "mails", "kind": "rate", "limit": 100, "per": "1s"}]}
        },
        "workflows": {"research": {"stages": {
            "fetch": {"resource": "github"},
            "summarize": {"resource": "openai", "after": ["fetch"]},
            "publish": {"resource": "mailer", "after": ["summarize"]}
        }}}
    })
}

fn github(limit: u64, remaining: u64) -> Vec<(String, String)> {
    vec![
        ("x-ratelimit-limit".into(), limit.to_string()),
        ("x-ratelimit-remaining".into(), remaining.to_string()),
        ("x-ratelimit-reset".into(), String::new()),
    ]
}

fn stage_request(resource: &str) -> Request {
    Request::parse("user:1").unwrap().resource(resource)
}

fn backpressure(d: &ratewarden::Decision) -> Vec<&str> {
    d.caps.backpressure.stages().iter().map(|s| &**s).collect()
}

#[test]
fn a_limited_stage_presses_back_on_every_stage_after_it() {
    let (w, clock) = warden(workflow_policy());
    // GitHub's window resets a minute from now (epoch seconds).
    let start = clock.now() / 1_000_000;
    let gh = |remaining: u64, reset: i64| {
        let mut h = github(5000, remaining);
        h[2].1 = (start + reset).to_string();
        h
    };
    // Nothing known: no backpressure, no caps.
    let d = now(w.acquire(&stage_request("mailer"))).unwrap();
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    assert!(d.caps.backpressure.is_empty());

    // GitHub green: still none.
    now(w.observe("github", &pairs(&gh(4000, 60)))).unwrap();
    let d = now(w.acquire(&stage_request("mailer"))).unwrap();
    assert_eq!(d.outcome, Outcome::Allow);

    // GitHub red: every stage after fetch says so, before spending.
    now(w.observe("github", &pairs(&gh(100, 60)))).unwrap();
    for resource in ["openai", "mailer"] {
        let d = now(w.acquire(&stage_request(resource))).unwrap();
        assert_eq!(d.outcome, Outcome::AllowWithCaps, "{resource}: {d:?}");
        assert_eq!(backpressure(&d), ["research/fetch"], "{resource}");
    }
    // The limited stage itself and checks: its own light speaks for it; a
    // check says so too.
    let d = now(w.acquire(&stage_request("github").priority(Priority::Critical))).unwrap();
    assert!(d.caps.backpressure.is_empty(), "{d:?}");
    let d = now(w.check(&stage_request("mailer"))).unwrap();
    assert_eq!(backpressure(&d), ["research/fetch"]);

    // OpenAI's breaker opens too: publish names both, in policy order.
    now(w.report("openai", 429, &[("retry-after", "30")])).unwrap();
    let d = now(w.acquire(&stage_request("mailer"))).unwrap();
    assert_eq!(backpressure(&d), ["research/fetch", "research/summarize"]);

    // GitHub recovers (its next window); OpenAI's breaker stays open 30 s.
    now(w.observe("github", &pairs(&gh(4900, 120)))).unwrap();
    let d = now(w.acquire(&stage_request("mailer"))).unwrap();
    assert_eq!(backpressure(&d), ["research/summarize"]);
    clock.advance(Duration::from_secs(31));
    // Half-open now: still limited until a probe succeeds.
    let d = now(w.acquire(&stage_request("mailer"))).unwrap();
    assert_eq!(backpressure(&d), ["research/summarize"]);
    let probe = now(w.acquire(&stage_request("openai").priority(Priority::Critical))).unwrap();
    assert!(probe.light.unwrap().probe, "{probe:?}");
    now(w.report("openai", 200, &[])).unwrap();
    let d = now(w.acquire(&stage_request("mailer"))).unwrap();
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");

    // A denial carries no caps.
    let mut last = d;
    for _ in 0..200 {
        last = now(w.acquire(&stage_request("mailer"))).unwrap();
        if !last.allowed() {
            break;
        }
    }
    assert_eq!(last.outcome, Outcome::Deny);
    assert!(last.caps.backpressure.is_empty());
}

#[test]
fn workflows_are_validated() {
    let bad = |workflows: Value, want: &str| {
        let mut p = workflow_policy();
        p["workflows"] = workflows;
        let e = ratewarden::Policy::from_value(&p).unwrap_err().to_string();
        assert!(e.contains(want), "{e} should say {want}");
    };
    bad(
        json!({"w": {"stages": {"a": {"resource": "nope"}}}}),
        "workflows.w.stages.a.resource",
    );
    bad(
        json!({"w": {"stages": {"a": {"resource": "github", "after": ["b"]}}}}),
        "workflows.w.stages.a.after[0]",
    );
    bad(
        json!({"w": {"stages": {"a": {"resource": "github", "after": ["a"]}}}}),
        "cannot come after itself",
    );
    bad(
        json!({"w": {"stages": {
            "a": {"resource": "github", "after": ["c"]},
            "b": {"resource": "openai", "after": ["a"]},
            "c": {"resource": "openai", "after": ["b"]}
        }}}),
        "a cycle",
    );
    bad(
        json!({"w": {"stages": {
            "a": {"resource": "mailer"},
            "b": {"resource": "openai", "after": ["a"]}
        }}}),
        "its resource `mailer` must coordinate on its upstream",
    );
    bad(json!({"w": {"stages": {}}}), "1 to 64 stages");
    let many: serde_json::Map<String, Value> = (0..65)
        .map(|i| (format!("s{i}"), json!({"resource": "github"})))
        .collect();
    bad(json!({"w": {"stages": many}}), "not 65");
    bad(
        json!({"w/x": {"stages": {"a": {"resource": "github"}}}}),
        "not a valid workflow name",
    );
    bad(
        json!({"w": {"stages": {"a/b": {"resource": "github"}}}}),
        "not a valid stage name",
    );
    bad(
        json!({"w": {"stages": {"a": {"resource": "github", "before": []}}}}),
        "unknown field `before`",
    );
    bad(json!({"w": {"steps": {}}}), "unknown field `steps`");
    // A diamond, and a resource in two stages: each stage before is named once.
    let mut p = workflow_policy();
    p["workflows"]["side"] = json!({"stages": {
        "a": {"resource": "github"},
        "b": {"resource": "openai", "after": ["a"]},
        "c": {"resource": "openai", "after": ["a"]},
        "d": {"resource": "mailer", "after": ["b", "c"]}
    }});
    let policy = ratewarden::Policy::from_value(&p).unwrap();
    let names: Vec<&str> = policy
        .resource("mailer")
        .unwrap()
        .stages_before
        .iter()
        .map(|s| &*s.name)
        .collect();
    assert_eq!(
        names,
        [
            "research/fetch",
            "research/summarize",
            "side/a",
            "side/b",
            "side/c"
        ]
    );
}
