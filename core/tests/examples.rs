//! Every policy in `examples/` loads, and the agents example works end to end.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{now, remaining};
use ratewarden::{Amount, ManualClock, Outcome, Policy, Priority, Request, Warden};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn every_example_policy_is_valid() {
    let mut n = 0;
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "json" | "toml")
        ) {
            let p = Policy::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(p.limits().count() >= 5, "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 3);
}

#[test]
fn the_agents_example_governs_a_run() {
    let policy = Policy::from_file(examples().join("agents.yaml")).unwrap();
    // Every limit kind is covered by the examples.
    let kinds: std::collections::HashSet<&str> = policy.limits().map(|l| l.kind.name()).collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    let clock = ManualClock::at_date(2026, 6, 1);
    let w = Warden::with_clock(policy, Arc::new(clock));
    let run = "tenant:acme/user:42/run:7f3a";
    let llm = Request::parse(run)
        .unwrap()
        .resource("openai:gpt-4o")
        .spend("tokens", 2_000)
        .spend("usd", Amount::parse("0.02").unwrap());
    let d = now(w.reserve(&llm, None)).unwrap();
    assert!(d.allowed(), "{d:?}");
    // scope chain (2 tenant + 2 user + 1 run limits) + the resource's TPM
    assert_eq!(d.limits.len(), 6);
    let r = d.reservation.unwrap().id;
    now(w.commit(
        r,
        &ratewarden::Cost::new()
            .with("tokens", 1_500)
            .with("usd", Amount::parse("0.015").unwrap()),
    ))
    .unwrap();
    let d = now(w.check(
        &Request::parse(run)
            .unwrap()
            .spend("usd", 0)
            .spend("requests", 0),
    ))
    .unwrap();
    assert_eq!(remaining(&d, "run-lifetime-usd"), 5_000_000 - 15_000);
    // Emails carry 10 risk points each: 5 per user per day, the 6th is denied.
    let email = Request::parse("tenant:acme/user:42")
        .unwrap()
        .action("send_email");
    for _ in 0..5 {
        assert!(now(w.acquire(&email)).unwrap().allowed());
    }
    let d = now(w.acquire(&email)).unwrap();
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.denied_by().unwrap().name(), "user-daily-risk");
    // Background agents leave GitHub's last 30% to others.
    let gh = Request::parse("tenant:acme/user:7")
        .unwrap()
        .resource("github")
        .spend("requests", 3_501)
        .priority(Priority::Background);
    assert!(!now(w.check(&gh)).unwrap().allowed());
}
