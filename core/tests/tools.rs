//! Policy caps per scope kind (issue 15 §2): which actions (tools) a scope
//! kind may name (`tools: {allow, deny}`) and how many steps a run may take
//! (`max_steps`). Runs on the embedded engine, and on Redis / Cluster with
//! `RATEWARDEN_TEST_BACKEND`.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, remaining, warden};
use ratewarden::{Outcome, Policy, Request, WaitFor};
use serde_json::json;

fn policy() -> serde_json::Value {
    json!({
        "scopes": {
            "tenant": {"tools": {"deny": ["delete_repo"]}},
            "agent": {"tools": {"allow": ["search", "send_email"]}},
            "run": {"max_steps": 3}
        },
        "actions": {
            "search": {},
            "send_email": {"risk": 10},
            "delete_repo": {},
            "deploy": {}
        }
    })
}

fn ask(scope: &str, action: &str) -> Request {
    Request::parse(scope).unwrap().action(action)
}

#[test]
fn a_tool_outside_the_lists_is_denied_by_policy_and_counts_nothing() {
    let (w, _) = warden(policy());
    let d = now(w.acquire(&ask("tenant:a/agent:b", "search"))).unwrap();
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    for (scope, action, says) in [
        (
            "tenant:a/agent:b",
            "deploy",
            "not among those allowed to `agent` scopes (scopes.agent.tools.allow)",
        ),
        (
            "tenant:a/agent:b",
            "delete_repo",
            "denied to `tenant` scopes (scopes.tenant.tools.deny)",
        ),
        ("tenant:a", "delete_repo", "denied to `tenant` scopes"),
    ] {
        for d in [
            now(w.check(&ask(scope, action))).unwrap(),
            now(w.acquire(&ask(scope, action))).unwrap(),
            now(w.reserve(&ask(scope, action), None)).unwrap(),
            now(w.wait(
                &ask(scope, action),
                WaitFor::Acquire,
                Duration::from_secs(5),
            ))
            .unwrap(),
        ] {
            assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
            assert!(d.reason.as_deref().unwrap().contains(says), "{d:?}");
            assert_eq!(
                (d.retry_after, d.reservation.as_ref()),
                (None, None),
                "waiting changes nothing"
            );
            assert!(d.limits.is_empty());
        }
    }
    // A tenant (no allow list) may deploy; its agents may not.
    assert!(
        now(w.acquire(&ask("tenant:a", "deploy")))
            .unwrap()
            .allowed()
    );
}

#[test]
fn a_run_takes_at_most_max_steps() {
    let (w, _) = warden(policy());
    let step = Request::parse("tenant:a/run:r1").unwrap();
    for _ in 0..3 {
        assert!(now(w.acquire(&step)).unwrap().allowed());
    }
    let d = now(w.acquire(&step)).unwrap();
    assert_eq!(d.denied_by().map(|l| l.name()), Some("run-steps"), "{d:?}");
    // Another run has its own steps.
    assert!(
        now(w.acquire(&Request::parse("tenant:a/run:r2").unwrap()))
            .unwrap()
            .allowed()
    );
}

#[test]
fn tool_lists_name_declared_actions_and_steps_are_counts() {
    for (scopes, says) in [
        (
            json!({"agent": {"tools": {"allow": ["serch"]}}}),
            "scopes.agent.tools.allow[0]",
        ),
        (
            json!({"agent": {"tools": {"deny": ["search", "rm"]}}}),
            "scopes.agent.tools.deny[1]",
        ),
        (
            json!({"agent": {"tools": {"permit": ["search"]}}}),
            "unknown field",
        ),
        (json!({"run": {"max_steps": 0}}), "scopes.run.max_steps"),
        (
            json!({"run": {"max_steps": 9_007_199_254_740_992u64}}),
            "scopes.run.max_steps",
        ),
        (json!({"run": {"max_steps": 1.5}}), "scopes.run.max_steps"),
        (
            json!({"run": {"max_steps": "many"}}),
            "scopes.run.max_steps",
        ),
    ] {
        let e = Policy::from_value(&json!({"scopes": scopes, "actions": {"search": {}}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{e}");
    }
}

#[test]
fn the_readme_policy_loads_with_its_tools_and_steps() {
    let readme = include_str!("../../README.md");
    let start = readme.find("## Policies").unwrap();
    let block = readme[start..].split("```yaml\n").nth(1).unwrap();
    let yaml = block.split("```").next().unwrap();
    let policy = Policy::from_str_as(yaml, ratewarden::Format::Yaml, "README.md").unwrap();
    let w = ratewarden::Warden::new(policy);
    let d = now(w.acquire(&ask("tenant:a/agent:b", "send_email"))).unwrap();
    assert!(d.allowed(), "{d:?}");
    let d = now(w.acquire(
        &Request::parse("tenant:a/agent:b")
            .unwrap()
            .resource("github")
            .action("search"),
    ))
    .unwrap();
    assert!(d.allowed(), "{d:?}");
    assert!(w.policy().limit("run-steps").is_some());
}

/// A prepaid (lifetime) budget charged past its capacity stays in debt —
/// every request denied — until topped up; a top-up gives back at most what
/// was spent, debt first.
#[test]
fn a_limit_in_debt_admits_again_once_topped_up() {
    let (w, _) = warden(json!({
        "scopes": {"tenant": {"limits": [
            {"name": "credits", "kind": "budget", "unit": "usd", "limit": "10"},
            {"name": "rps", "kind": "rate", "limit": 100, "per": "1s"}
        ]}}
    }));
    let scope = "tenant:a".parse().unwrap();
    let usd = |v: &str| ratewarden::Amount::parse(v).unwrap();
    let spend = |v: &str| Request::parse("tenant:a").unwrap().spend("usd", usd(v));
    let id = now(w.reserve(&spend("5"), None))
        .unwrap()
        .reservation
        .unwrap()
        .id;
    let r = now(w.commit(id, &ratewarden::Cost::new().with("usd", usd("12")))).unwrap();
    assert_eq!(r.charges[0].debt, 2_000_000);
    assert!(!now(w.acquire(&spend("1"))).unwrap().allowed(), "in debt");
    let t = now(w.top_up(&scope, None, "credits", usd("1"))).unwrap();
    assert_eq!(
        (t.credited, t.spent, t.unit.as_str()),
        (1_000_000, 11_000_000, "usd")
    );
    assert!(
        !now(w.acquire(&spend("0.01"))).unwrap().allowed(),
        "still 1 in debt"
    );
    let t = now(w.top_up(&scope, None, "credits", usd("5"))).unwrap();
    assert_eq!(t.spent, 6_000_000);
    let d = now(w.acquire(&spend("1"))).unwrap();
    assert!(d.allowed());
    assert_eq!(remaining(&d, "credits"), 3_000_000);
    let t = now(w.top_up(&scope, None, "credits", usd("100"))).unwrap();
    assert_eq!((t.credited, t.spent), (7_000_000, 0), "never below zero");
    // The largest amount the books hold is accepted (there is nothing to give back).
    let t = now(w.top_up(&scope, None, "credits", usd("9007199254.740991"))).unwrap();
    assert_eq!((t.credited, t.spent), (0, 0));
    for (limit, amount, says) in [
        (
            "nope",
            "1",
            "is not a limit that requests by tenant:a touch",
        ),
        ("rps", "1", "only quotas and budgets"),
        ("credits", "0", "a positive amount"),
        ("credits", "0.0000001", "usd"),
        ("credits", "9007199254.740992", "usd"),
    ] {
        let e = now(w.top_up(&scope, None, limit, usd(amount)))
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{limit} {amount}: {e}");
    }
}

#[test]
fn max_steps_takes_the_whole_range() {
    for steps in [1u64, 9_007_199_254_740_991] {
        let p = Policy::from_value(&json!({"scopes": {"run": {"max_steps": steps}}})).unwrap();
        assert_eq!(
            p.limit("run-steps").unwrap().limit,
            i64::try_from(steps).unwrap()
        );
    }
}
