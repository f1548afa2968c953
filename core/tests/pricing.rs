//! Pricing (issue 15 §1): bills exact to the micro-unit from real model
//! prices, usage-based reservations charged in every unit the limits count in
//! one decision, commits at the actual usage with refunds, dated price lists,
//! and input the pricing cannot hold refused with a clear error.
//!
//! Runs on the embedded engine; with `RATEWARDEN_TEST_BACKEND` set, on Redis.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{now, remaining, warden, warden_at};
use proptest::prelude::*;
use ratewarden::amount::MAX_AMOUNT;
use ratewarden::pricing::{Prices, Pricing, Usage};
use ratewarden::{
    Amount, CallOutcome, Cost, ErrorKind, ManualClock, Outcome, Policy, Request, Warden,
};
use serde_json::{Value, json};

fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/vectors/pricing/bills.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn usage_of(v: &Value) -> Usage {
    let n = |k: &str| v.get(k).and_then(Value::as_u64);
    Usage {
        input_tokens: n("input_tokens").unwrap_or(0),
        cached_input_tokens: n("cached_input_tokens").unwrap_or(0),
        output_tokens: n("output_tokens").unwrap_or(0),
        max_output_tokens: n("max_output_tokens"),
        images: n("images").unwrap_or(0),
        seconds: v
            .get("seconds")
            .and_then(Value::as_str)
            .map(|s| Amount::parse(s).unwrap()),
        calls: n("calls"),
    }
}

fn date(s: &str) -> ManualClock {
    let p: Vec<u32> = s.split('-').map(|x| x.parse().unwrap()).collect();
    ManualClock::at_date(i64::from(p[0]), p[1], p[2])
}

#[test]
fn real_model_prices_bill_exactly_to_the_micro_dollar() {
    let v = vectors();
    let resources: serde_json::Map<String, Value> = v["prices"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, p)| (name.clone(), json!({ "pricing": p })))
        .collect();
    let policy = json!({"scopes": {"tenant": {}}, "resources": resources});
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let (w, _) = warden_at(policy.clone(), date(case["at"].as_str().unwrap()));
        let resource = case["resource"].as_str().unwrap();
        let usage = usage_of(&case["usage"]);
        let got = if case["estimate"] == json!(true) {
            w.estimate(resource, &usage)
        } else {
            w.cost(resource, &usage)
        };
        match case.get("usd").and_then(Value::as_str) {
            Some(usd) => {
                let priced = got.unwrap_or_else(|e| panic!("{case}: {e}"));
                assert_eq!(priced.unit.as_ref(), "usd");
                assert_eq!(priced.money().to_string(), usd, "{case}");
                assert_eq!(
                    priced.amount,
                    Amount::parse(usd).unwrap().to_base("usd", 6).unwrap(),
                    "{case}"
                );
            }
            None => {
                let e = got.expect_err(&case.to_string());
                assert_eq!(e.kind(), ErrorKind::InvalidInput, "{case}: {e}");
            }
        }
    }
}

/// A tenant with a dollar budget and a token quota, on a priced model.
fn llm_policy() -> Value {
    json!({
        "scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "1.00", "per": "month"},
            {"name": "tpm", "kind": "quota", "unit": "tokens", "limit": 1000000, "per": "minute"}
        ]}},
        "resources": {
            "openai:gpt-4o": {"pricing": {"input": 2.50, "cached_input": 1.25, "output": 10.00}},
            "plain": {}
        }
    })
}

fn llm(usage: Usage) -> Request {
    Request::parse("tenant:a")
        .unwrap()
        .resource("openai:gpt-4o")
        .usage(usage)
}

#[test]
fn a_reservation_by_usage_holds_dollars_and_tokens_in_one_decision() {
    let (w, _) = warden(llm_policy());
    // 1 200 in + at most 800 out: $0.003 + $0.008 = $0.011, 2 000 tokens.
    let d = now(w.reserve(&llm(Usage::tokens(1200, 0).max_output(800)), None)).unwrap();
    assert!(d.allowed(), "{d:?}");
    assert_eq!(remaining(&d, "usd"), 1_000_000 - 11_000);
    assert_eq!(remaining(&d, "tpm"), 1_000_000 - 2_000);
    let id = d.reservation.unwrap().id;
    // It used 95 output tokens: $0.003 + $0.00095, 1 295 tokens; the rest comes back.
    let receipt = now(w.commit_usage(id, "openai:gpt-4o", &Usage::tokens(1200, 95))).unwrap();
    let charged = |limit: &str| {
        receipt
            .charges
            .iter()
            .find(|c| c.def.name == limit)
            .unwrap()
            .charged
    };
    assert_eq!(charged("usd"), 3_950);
    assert_eq!(charged("tpm"), 1_295);
    let b = now(w.balances(&"tenant:a".parse().unwrap(), None)).unwrap();
    let left = |n: &str| b.iter().find(|x| x.name == n).unwrap().remaining;
    assert_eq!(left("usd"), 1_000_000 - 3_950);
    assert_eq!(left("tpm"), 1_000_000 - 1_295);
}

#[test]
fn a_usage_the_budget_cannot_cover_is_denied_and_charges_nothing() {
    let (w, _) = warden(llm_policy());
    // 100 000 output tokens at $10/M = $1.00, plus the input: over the budget.
    let d = now(w.acquire(&llm(Usage::tokens(10, 100_000)))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
    assert_eq!(remaining(&d, "usd"), 1_000_000);
    // Exactly the budget passes: 99 997.5 output… 99 990 out + 40 in = $0.9999 + $0.0001.
    let d = now(w.acquire(&llm(Usage::tokens(40, 99_990)))).unwrap();
    assert!(d.allowed(), "{d:?}");
    assert_eq!(remaining(&d, "usd"), 0);
}

#[test]
fn a_unit_the_caller_gives_is_not_priced_over() {
    let (w, _) = warden(llm_policy());
    let req = llm(Usage::tokens(1200, 800)).spend("usd", Amount::parse("0.5").unwrap());
    let d = now(w.acquire(&req)).unwrap();
    assert!(d.allowed(), "{d:?}");
    assert_eq!(remaining(&d, "usd"), 500_000);
    assert_eq!(remaining(&d, "tpm"), 998_000);
}

#[test]
fn a_governed_call_settles_at_its_priced_usage_or_reports_why_not() {
    use ratewarden::settle::{Charged, Usage as Settle};
    let (w, _) = warden(llm_policy());
    let reserve = || {
        let d = now(w.reserve(&llm(Usage::tokens(1000, 0).max_output(1000)), None)).unwrap();
        d.reservation.unwrap().id
    };
    let id = reserve();
    let s = now(w.finish(
        id,
        CallOutcome::Ran(Settle::Priced {
            resource: "openai:gpt-4o".into(),
            usage: Usage::tokens(1000, 10),
        }),
    ));
    assert_eq!(s.charged, Charged::Actual, "{s:?}");
    assert!(s.problem().is_none(), "{s:?}");
    // 2 500 + 100 µ$.
    let b = now(w.balances(&"tenant:a".parse().unwrap(), None)).unwrap();
    assert_eq!(
        b.iter().find(|x| x.name == "usd").unwrap().remaining,
        1_000_000 - 2_600
    );
    // A usage that cannot be priced: the estimate ($0.0125) is charged, and said.
    let id = reserve();
    let s = now(w.finish(
        id,
        CallOutcome::Ran(Settle::Priced {
            resource: "openai:gpt-4o".into(),
            usage: Usage::tokens(10, 0).cached(11),
        }),
    ));
    assert_eq!(s.charged, Charged::Estimate, "{s:?}");
    let problem = s.problem().unwrap();
    assert!(problem.contains("cached_input_tokens"), "{problem}");
    let b = now(w.balances(&"tenant:a".parse().unwrap(), None)).unwrap();
    assert_eq!(
        b.iter().find(|x| x.name == "usd").unwrap().remaining,
        1_000_000 - 2_600 - 12_500
    );
}

#[test]
fn usage_where_it_cannot_be_priced_is_refused_and_changes_nothing() {
    let (w, _) = warden(llm_policy());
    let cases: Vec<(Request, &str)> = vec![
        (
            Request::parse("tenant:a")
                .unwrap()
                .usage(Usage::tokens(1, 1)),
            "needs a resource",
        ),
        (
            Request::parse("tenant:a")
                .unwrap()
                .resource("plain")
                .usage(Usage::tokens(1, 1)),
            "has no `pricing:`",
        ),
        (llm(Usage::tokens(5, 0).cached(6)), "cached_input_tokens"),
        (
            llm(Usage::tokens(MAX_AMOUNT.unsigned_abs(), 1)),
            "exceed the largest amount",
        ),
        (llm(Usage::tokens(u64::MAX, 0)), "input_tokens"),
        (
            llm(Usage {
                seconds: Some(Amount::parse("0.0005").unwrap()),
                ..Usage::default()
            }),
            "seconds",
        ),
    ];
    for (req, says) in cases {
        for op in 0..3 {
            let e = match op {
                0 => now(w.acquire(&req)),
                1 => now(w.reserve(&req, None)),
                _ => now(w.check(&req)),
            }
            .expect_err(says);
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains(says), "{e} should say {says}");
        }
    }
    let d = now(w.check(&Request::parse("tenant:a").unwrap())).unwrap();
    assert_eq!(remaining(&d, "usd"), 1_000_000);
    assert_eq!(remaining(&d, "tpm"), 1_000_000);
    let e = w.cost("nope", &Usage::tokens(1, 1)).unwrap_err();
    assert!(e.to_string().contains("unknown resource `nope`"), "{e}");
}

#[test]
fn a_dated_price_list_takes_over_at_its_date_without_a_restart() {
    let policy = json!({
        "scopes": {"tenant": {}},
        "resources": {"m": {"pricing": [
            {"from": "2026-01-16", "input": 1, "output": 2},
            {"input": 3, "output": 4},
            {"from": "2026-01-15T12:00:00Z", "input": 5, "output": 6}
        ]}}
    });
    let (w, clock) = warden(policy);
    let u = Usage::tokens(1_000_000, 1_000_000);
    assert_eq!(w.cost("m", &u).unwrap().money().to_string(), "7");
    clock.advance(std::time::Duration::from_secs(12 * 3600));
    assert_eq!(w.cost("m", &u).unwrap().money().to_string(), "11");
    clock.advance(std::time::Duration::from_secs(12 * 3600 - 1));
    assert_eq!(w.cost("m", &u).unwrap().money().to_string(), "11");
    clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(w.cost("m", &u).unwrap().money().to_string(), "3");
}

#[test]
fn a_pricing_the_policy_cannot_hold_names_where() {
    let bad = |pricing: Value, says: &str| {
        let p =
            json!({"units": {"eur": {"decimals": 2}}, "resources": {"m": {"pricing": pricing}}});
        let e = Policy::from_value(&p).unwrap_err().to_string();
        assert!(e.contains(says), "{e} should say {says}");
        assert!(e.contains("resources.m.pricing"), "{e}");
    };
    bad(json!({"input": -1}), "negative");
    bad(json!({"input": "0.0000000000001"}), "more than 12 decimals");
    bad(json!({"inptu": 1}), "unknown field `inptu`");
    bad(
        json!({"unit": "gbp", "input": 1}),
        "unit `gbp` is not declared",
    );
    bad(json!({"from": "2026-13-01", "input": 1}), "is not a date");
    bad(json!({"from": 20260101, "input": 1}), "expected a date");
    bad(json!([]), "has no price list");
    bad(json!("cheap"), "expected a price list");
    bad(json!([{"input": 1}, {"input": 2}]), "needs `from`");
    bad(
        json!([{"from": "2026-01-01", "input": 1}, {"from": "2026-01-01", "input": 2}]),
        "same time",
    );
    bad(
        json!([{"from": "2026-01-01", "input": 1}, {"from": "2026-02-01", "unit": "eur", "input": 2}]),
        "different units",
    );
    let e = Policy::from_value(&json!({"actions": {"a": {"pricing": {"input": 1}}}}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to a resource"), "{e}");
    // A price list in another unit prices in it.
    let (w, _) = warden(
        json!({"units": {"eur": {"decimals": 2}}, "resources": {"m": {"pricing": {"unit": "eur", "call": "0.001"}}}}),
    );
    let p = w.cost("m", &Usage::default()).unwrap();
    assert_eq!((p.unit.as_ref(), p.amount), ("eur", 1));
}

/// The bill by a second, plain computation: the whole sum over one
/// denominator, then rounded up.
fn plain_bill(p: &Prices, u: &Usage, output: u64) -> Option<i64> {
    let frac = |a: Amount, q: u64, per: u128| {
        let (v, s) = a.parts();
        // q × v / (10^s × per) over the denominator 10^12 × 10^6.
        u128::from(q)
            * u128::try_from(v).unwrap()
            * 10u128.pow(12 - u32::from(s))
            * (1_000_000 / per)
    };
    let sum = frac(p.input, u.input_tokens - u.cached_input_tokens, 1_000_000)
        + frac(
            p.cached_input.unwrap_or(p.input),
            u.cached_input_tokens,
            1_000_000,
        )
        + frac(p.output, output, 1_000_000)
        + frac(p.image, u.images, 1)
        + frac(p.call, u.calls.unwrap_or(1), 1);
    // An overflow here is a bill far past the largest amount.
    let base = sum
        .checked_mul(10u128.pow(u32::from(p.decimals)))?
        .div_ceil(10u128.pow(18));
    i64::try_from(base).ok().filter(|b| *b <= MAX_AMOUNT)
}

fn price() -> impl Strategy<Value = Amount> {
    (0i64..10_000_000, 0u8..=6).prop_map(|(v, s)| Amount::decimal(v, s))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn bills_agree_with_a_plain_computation(
        input in price(), cached in proptest::option::of(price()), output in price(),
        image in price(), call in price(), decimals in 0u8..=9,
        tokens in 0u64..1 << 40, cached_part in 0u64..=100, out in 0u64..1 << 40,
        max_out in proptest::option::of(0u64..1 << 40), images in 0u64..1000, calls in proptest::option::of(0u64..1000),
    ) {
        let prices = Prices {
            from: None, unit: "usd".into(), decimals, input, cached_input: cached, output,
            image, second: Amount::units(0), call,
        };
        let pricing = Pricing::new(vec![prices.clone()]).unwrap();
        let usage = Usage {
            input_tokens: tokens,
            cached_input_tokens: tokens / 100 * cached_part,
            output_tokens: out,
            max_output_tokens: max_out,
            images,
            seconds: None,
            calls,
        };
        let actual = pricing.price(&usage, 0, false).ok().map(|p| p.amount);
        prop_assert_eq!(actual, plain_bill(&prices, &usage, out));
        let estimate = pricing.price(&usage, 0, true).ok().map(|p| p.amount);
        prop_assert_eq!(estimate, plain_bill(&prices, &usage, max_out.unwrap_or(out)));
        // The most output within a budget is the largest whose bill fits.
        if let Some(budget) = actual {
            let base = Usage { output_tokens: 0, max_output_tokens: None, ..usage.clone() };
            if let Some(m) = pricing.max_output_within(&base, budget, 0) {
                if m != u64::MAX {
                    prop_assert!(plain_bill(&prices, &base, m).unwrap() <= budget);
                    prop_assert!(m >= out);
                    prop_assert!(plain_bill(&prices, &base, m + 1).is_none_or(|b| b > budget));
                }
            }
        }
    }
}

#[test]
fn a_warden_prices_with_its_policy_not_a_copy() {
    // Two wardens, two policies, one model name: each prices by its own.
    let cheap = Warden::new(
        Policy::from_value(&json!({"resources": {"m": {"pricing": {"input": 1}}}})).unwrap(),
    );
    let dear = Warden::new(
        Policy::from_value(&json!({"resources": {"m": {"pricing": {"input": 2}}}})).unwrap(),
    );
    let u = Usage::tokens(1_000_000, 0);
    assert_eq!(cheap.cost("m", &u).unwrap().amount, 1_000_000);
    assert_eq!(dear.cost("m", &u).unwrap().amount, 2_000_000);
    let c = cheap.cost("m", &u).unwrap().cost(|_| true);
    assert_eq!(c.get("tokens"), Some(Amount::units(1_000_000)));
    assert_eq!(c.get("output_tokens"), Some(Amount::units(0)));
    let _ = Cost::new();
}

/// `llm_policy` with `shrink:` on the model (and its limits as given).
fn shrink_policy(min: u64) -> Value {
    let mut p = llm_policy();
    p["resources"]["openai:gpt-4o"]["shrink"] = json!({ "min_output_tokens": min });
    p["scopes"]["tenant"]["limits"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "calls", "kind": "quota", "limit": 3, "per": "day"}));
    p
}

fn spend(w: &Warden, usd: &str) {
    let d = now(w.acquire(
        &Request::parse("tenant:a")
            .unwrap()
            .spend("usd", Amount::parse(usd).unwrap())
            .spend("requests", 0),
    ))
    .unwrap();
    assert!(d.allowed(), "{d:?}");
}

#[test]
fn a_usage_the_budget_cannot_cover_is_shrunk_to_what_it_can() {
    let (w, _) = warden(shrink_policy(100));
    spend(&w, "0.995");
    // $0.005 left: 1 000 input tokens take $0.0025, leaving 250 output tokens
    // at $10/M of the 1 000 asked.
    let ask = llm(Usage::tokens(1000, 0).max_output(1000));
    for d in [
        now(w.check(&ask)).unwrap(),
        now(w.reserve(&ask, None)).unwrap(),
    ] {
        assert_eq!(d.outcome, Outcome::AllowWithCaps, "{d:?}");
        assert_eq!(d.caps.max_tokens, Some(250), "{d:?}");
        assert!(
            d.reason.as_deref().unwrap().contains("250 of the 1000"),
            "{d:?}"
        );
    }
    let b = now(w.balances(&"tenant:a".parse().unwrap(), None)).unwrap();
    let left = |n: &str| b.iter().find(|x| x.name == n).unwrap().remaining;
    assert_eq!(left("usd"), 0);
    assert_eq!(left("tpm"), 1_000_000 - 1_250);
    // Nothing is left now: even the smallest reply does not fit.
    let d = now(w.acquire(&llm(Usage::tokens(1, 0).max_output(10)))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
}

#[test]
fn a_shrink_below_the_smallest_useful_reply_is_a_denial() {
    let (w, _) = warden(shrink_policy(251));
    spend(&w, "0.995");
    let d = now(w.acquire(&llm(Usage::tokens(1000, 0).max_output(1000)))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
    assert_eq!(d.caps.max_tokens, None);
    assert_eq!(remaining(&d, "usd"), 5_000);
    // Without `shrink:` the same request is denied as before.
    let (w, _) = warden(llm_policy());
    spend(&w, "0.995");
    let d = now(w.acquire(&llm(Usage::tokens(1000, 0).max_output(1000)))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
}

#[test]
fn a_token_quota_shrinks_the_output_too_and_a_count_limit_does_not() {
    let mut p = shrink_policy(1);
    p["scopes"]["tenant"]["limits"][1]["limit"] = json!(1_100);
    let (w, _) = warden(p);
    let d = now(w.acquire(&llm(Usage::tokens(1000, 0).max_output(1000)))).unwrap();
    assert_eq!(d.outcome, Outcome::AllowWithCaps, "{d:?}");
    assert_eq!(d.caps.max_tokens, Some(100));
    assert_eq!(remaining(&d, "tpm"), 0);
    // The `calls` quota (requests) denies: shrinking the output cannot help.
    let (w, _) = warden(shrink_policy(1));
    for _ in 0..3 {
        assert!(now(w.acquire(&llm(Usage::tokens(1, 1)))).unwrap().allowed());
    }
    let d = now(w.acquire(&llm(Usage::tokens(1, 0).max_output(1000)))).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
    assert_eq!(d.caps.max_tokens, None);
}

#[test]
fn a_request_that_names_its_operation_is_decided_as_asked() {
    // A repeat with the id must answer what the first attempt did; a shrunk
    // attempt's size depends on the state it met, so it is never shrunk.
    let (w, _) = warden(shrink_policy(1));
    spend(&w, "0.995");
    let op = ratewarden::OperationId::parse("0123456789abcdef0123456789abcdef").unwrap();
    let ask = llm(Usage::tokens(1000, 0).max_output(1000)).operation(op);
    let d = now(w.reserve(&ask, None)).unwrap();
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
    let d = now(w.reserve(&llm(Usage::tokens(1000, 0).max_output(1000)), None)).unwrap();
    assert_eq!(d.caps.max_tokens, Some(250), "{d:?}");
    // The shrunk reservation commits at what the call used.
    let id = d.reservation.unwrap().id;
    let r = now(w.commit_usage(id, "openai:gpt-4o", &Usage::tokens(1000, 240))).unwrap();
    assert_eq!(
        r.charges
            .iter()
            .find(|c| c.def.name == "usd")
            .unwrap()
            .charged,
        4_900
    );
}

#[test]
fn a_background_caller_is_shrunk_to_above_its_floor() {
    let mut p = shrink_policy(1);
    p["defaults"] = json!({"floors": {"standard": 0, "background": "50%"}});
    let (w, _) = warden(p);
    spend(&w, "0.49");
    // $0.51 left, of which a background caller may take $0.01: 1 000 input
    // ($0.0025) and 750 output tokens.
    let d = now(w.acquire(
        &llm(Usage::tokens(1000, 0).max_output(100_000)).priority(ratewarden::Priority::Background),
    ))
    .unwrap();
    assert_eq!(d.outcome, Outcome::AllowWithCaps, "{d:?}");
    assert_eq!(d.caps.max_tokens, Some(750));
    assert_eq!(remaining(&d, "usd"), 500_000);
}

#[test]
fn a_shrink_the_policy_cannot_hold_names_where() {
    let bad = |shrink: Value, pricing: bool, says: &str| {
        let mut r = json!({ "shrink": shrink });
        if pricing {
            r["pricing"] = json!({"input": 1});
        }
        let e = Policy::from_value(&json!({"resources": {"m": r}}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(says) && e.contains("resources.m"),
            "{e} should say {says}"
        );
    };
    bad(
        json!({"min_output_tokens": 10}),
        false,
        "needs the resource's `pricing:`",
    );
    bad(json!({"min_output_tokens": 0}), true, "from 1 to 2^53-1");
    bad(json!({"min_output_tokens": 1.5}), true, "from 1 to 2^53-1");
    bad(
        json!({"min_output_tokens": "10"}),
        true,
        "expected a number",
    );
    bad(
        json!({"min_tokens": 10}),
        true,
        "unknown field `min_tokens`",
    );
}

#[test]
fn the_readme_pricing_policy_loads_and_prices_as_it_says() {
    let readme = include_str!("../../README.md");
    let start = readme.find("## Pricing").unwrap();
    let block = readme[start..].split("```yaml\n").nth(1).unwrap();
    let yaml = block.split("```").next().unwrap();
    let policy = Policy::from_str_as(yaml, ratewarden::Format::Yaml, "README.md").unwrap();
    let w = Warden::with_clock(
        policy,
        std::sync::Arc::new(ManualClock::at_date(2026, 12, 1)),
    );
    let whisper = Usage {
        seconds: Some(Amount::parse("60").unwrap()),
        ..Usage::default()
    };
    assert_eq!(w.cost("openai:whisper-1", &whisper).unwrap().amount, 6_000);
    let u = Usage::tokens(1_000_000, 1_000_000);
    assert_eq!(
        w.cost("example:model", &u).unwrap().money().to_string(),
        "6"
    );
}

#[test]
fn a_priced_request_shows_its_tokens_to_the_upstreams_light() {
    let (w, _) = warden(json!({
        "scopes": {"tenant": {}},
        "resources": {"openai:gpt-4o": {
            "pricing": {"input": 2.50, "output": 10.00},
            "upstream": {}
        }}
    }));
    // The upstream has 1 500 tokens left this minute.
    let headers = [
        ("x-ratelimit-limit-tokens", "100000"),
        ("x-ratelimit-remaining-tokens", "1500"),
        ("x-ratelimit-reset-tokens", "1m"),
    ];
    now(w.observe("openai:gpt-4o", &headers)).unwrap();
    let ask = |u: Usage| {
        Request::parse("tenant:a")
            .unwrap()
            .resource("openai:gpt-4o")
            .priority(ratewarden::Priority::Critical)
            .usage(u)
    };
    let big = now(w.acquire(&ask(Usage::tokens(1200, 0).max_output(800)))).unwrap();
    assert_eq!(
        big.outcome,
        Outcome::Deny,
        "2 000 tokens do not fit 1 500: {big:?}"
    );
    let small = now(w.acquire(&ask(Usage::tokens(700, 0).max_output(700)))).unwrap();
    assert!(small.allowed(), "{small:?}");
}

/// `shrink_policy` with a fallback chain: gpt-4o, then gpt-4o-mini
/// ($0.15 / $0.60 per million), then gpt-4.1-nano ($0.10 / $0.40).
fn fallback_policy(min: u64) -> Value {
    let mut p = shrink_policy(min);
    p["resources"]["openai:gpt-4o"]["shrink"]["fallback"] =
        json!(["openai:gpt-4o-mini", "openai:gpt-4.1-nano"]);
    p["resources"]["openai:gpt-4o-mini"] = json!({"pricing": {"input": "0.15", "output": "0.60"},
        "limits": [{"name": "mini-rpd", "kind": "quota", "limit": 1, "per": "day"}]});
    p["resources"]["openai:gpt-4.1-nano"] = json!({"pricing": {"input": "0.10", "output": "0.40"}});
    p
}

#[test]
fn a_call_no_shrink_can_fit_falls_back_along_the_cheaper_models() {
    let (w, _) = warden(fallback_policy(500));
    spend(&w, "0.995");
    // $0.005 left: on gpt-4o 1 000 input tokens leave 250 output tokens, under
    // the 500 worth a call; on gpt-4o-mini the whole call costs $0.00075.
    let ask = llm(Usage::tokens(1000, 0).max_output(1000));
    let d = now(w.reserve(&ask, None)).unwrap();
    assert_eq!(d.outcome, Outcome::AllowWithCaps, "{d:?}");
    assert_eq!(d.caps.model.as_deref(), Some("openai:gpt-4o-mini"));
    assert_eq!(
        d.caps.max_tokens, None,
        "the whole call fits on the fallback"
    );
    assert!(d.reason.as_deref().unwrap().contains("fallback"), "{d:?}");
    // Held at the fallback's prices (and on its own limits).
    assert_eq!(remaining(&d, "usd"), 5_000 - 750);
    assert_eq!(remaining(&d, "mini-rpd"), 0);
    // Committed on the model it ran on.
    let id = d.reservation.unwrap().id;
    let r = now(w.commit_usage(id, "openai:gpt-4o-mini", &Usage::tokens(1000, 400))).unwrap();
    assert_eq!(
        r.charges
            .iter()
            .find(|c| c.name() == "usd")
            .unwrap()
            .charged,
        390
    );
    // gpt-4o-mini's daily call is spent: the next falls to gpt-4.1-nano.
    let d = now(w.acquire(&ask)).unwrap();
    assert_eq!(
        d.caps.model.as_deref(),
        Some("openai:gpt-4.1-nano"),
        "{d:?}"
    );
    // A call that fits as asked never falls back.
    let small = llm(Usage::tokens(10, 0).max_output(10));
    let d = now(w.acquire(&small)).unwrap();
    assert_eq!((d.outcome, d.caps.model.as_deref()), (Outcome::Allow, None));
}

#[test]
fn a_governed_call_on_a_fallback_settles_at_the_fallbacks_prices() {
    let (w, _) = warden(fallback_policy(500));
    spend(&w, "0.995");
    let d = now(w.reserve(&llm(Usage::tokens(1000, 0).max_output(1000)), None)).unwrap();
    assert_eq!(d.caps.model.as_deref(), Some("openai:gpt-4o-mini"), "{d:?}");
    // The guard (any binding's) names the resource it asked for; the call
    // ran on gpt-4o-mini: 1 000 in + 400 out there is $0.00039, not the
    // $0.0065 gpt-4o would bill.
    let s = now(w.finish(
        d.reservation.unwrap().id,
        CallOutcome::Ran(ratewarden::Usage::Priced {
            resource: "openai:gpt-4o".into(),
            usage: Usage::tokens(1000, 400),
        }),
    ));
    assert!(s.problem().is_none(), "{s:?}");
    let ratewarden::settle::Settled::Committed(receipt) = &s.settled else {
        panic!("{s:?}");
    };
    let usd = receipt.charges.iter().find(|c| c.name() == "usd").unwrap();
    assert_eq!((usd.reserved, usd.charged), (750, 390));
    // A reservation on the asked-for model still settles at its prices.
    let d = now(w.reserve(&llm(Usage::tokens(100, 0).max_output(100)), None)).unwrap();
    assert_eq!((d.outcome, d.caps.model.as_deref()), (Outcome::Allow, None));
    let s = now(w.finish(
        d.reservation.unwrap().id,
        CallOutcome::Ran(ratewarden::Usage::Priced {
            resource: "openai:gpt-4o".into(),
            usage: Usage::tokens(100, 100),
        }),
    ));
    let ratewarden::settle::Settled::Committed(receipt) = &s.settled else {
        panic!("{s:?}");
    };
    let usd = receipt.charges.iter().find(|c| c.name() == "usd").unwrap();
    assert_eq!(usd.charged, 1_250, "$0.00025 in + $0.001 out on gpt-4o");
}

#[test]
fn a_fallback_chain_names_priced_resources_only() {
    for (fallback, says) in [
        (json!(["openai:gpt-5"]), "is no resource"),
        (json!(["plain"]), "has no `pricing:`"),
        (json!(["openai:gpt-4o"]), "is the resource itself"),
        (
            json!(["openai:gpt-4o-mini", "openai:gpt-4o-mini"]),
            "is named twice",
        ),
    ] {
        let mut p = fallback_policy(1);
        p["resources"]["openai:gpt-4o"]["shrink"]["fallback"] = fallback;
        let e = Policy::from_value(&p).unwrap_err().to_string();
        assert!(e.contains("shrink.fallback[") && e.contains(says), "{e}");
    }
}
