//! A fixed number of embedded acquires on one resource, with or without
//! `upstream:` — for counting instructions per decision, which this VM's
//! wall clock cannot resolve (bench/README.md):
//!
//! ```bash
//! cargo build --release -p ratewarden --example decision_cost
//! perf stat -e instructions:u target/release/examples/decision_cost plain 2000000
//! perf stat -e instructions:u target/release/examples/decision_cost coordinated 2000000
//! ```
//! (or `valgrind --tool=callgrind`; subtract a run with 0 decisions: the
//! setup). `observe N` counts N observations of a six-header OpenAI response.
//! `money N` acquires a cost in dollars and tokens from a budget and a token
//! quota, `priced N` the same by usage (1 200 input, 800 output tokens priced
//! by the policy), `priced-events N` with an event subscriber (threshold
//! detection on). `audit N` is `money` with the audit log on (a callback
//! counting records on its thread), `audit-file N` with it written to a
//! JSON-lines file in the temp directory (on the writer's thread).

use ratewarden::{Policy, Request, Warden};
use serde_json::json;

fn main() -> ratewarden::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("plain", String::as_str);
    if matches!(
        mode,
        "money" | "priced" | "priced-events" | "audit" | "audit-file"
    ) {
        return money(mode, &args);
    }
    let coordinated = mode != "plain";
    let n: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let mut resource = json!({"limits": [
        {"name": "rps", "kind": "rate", "limit": 1_000_000_000u64, "per": "1s"}
    ]});
    if coordinated {
        resource["upstream"] = json!({});
    }
    let w = Warden::new(Policy::from_value(
        &json!({"scopes": {"user": {}}, "resources": {"llm": resource}}),
    )?);
    if coordinated {
        let headers = [
            ("x-ratelimit-limit-requests", "1000000000"),
            ("x-ratelimit-remaining-requests", "999999999"),
            ("x-ratelimit-reset-requests", "6m0s"),
        ];
        ratewarden::backend::at_once(w.observe("llm", &headers))?;
    }
    if mode == "observe" {
        let headers = [
            ("x-ratelimit-limit-requests", "1000000000"),
            ("x-ratelimit-remaining-requests", "999999999"),
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-limit-tokens", "1000000000"),
            ("x-ratelimit-remaining-tokens", "999999999"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ];
        for _ in 0..n {
            ratewarden::backend::at_once(w.observe("llm", &headers))?;
        }
        println!("{n} observed");
        return Ok(());
    }
    let req = Request::parse("user:42")?.resource("llm");
    let mut allowed = 0u64;
    for _ in 0..n {
        allowed += u64::from(ratewarden::backend::at_once(w.acquire(&req))?.allowed());
    }
    println!("{allowed} of {n} allowed");
    Ok(())
}

/// Dollars and tokens: given as a cost (`money`), or priced from usage.
fn money(mode: &str, args: &[String]) -> ratewarden::Result<()> {
    use ratewarden::pricing::Usage;
    let n: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let mut policy = json!({
        "scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "1000000000", "per": "month"},
            {"name": "tpm", "kind": "quota", "unit": "tokens", "limit": 1_000_000_000_000u64, "per": "month"}
        ]}},
        "resources": {"openai:gpt-4o": {"pricing": {"input": "2.50", "output": "10.00"}}}
    });
    let file = std::env::temp_dir().join("ratewarden-decision-cost-audit.jsonl");
    if mode == "audit-file" {
        policy["audit"] = json!({"file": file.to_string_lossy()});
    }
    let w = Warden::new(Policy::from_value(&policy)?);
    let _events = (mode == "priced-events").then(|| w.subscribe());
    let records = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = std::sync::Arc::clone(&records);
    let _audit = (mode == "audit")
        .then(|| {
            w.on_audit(move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            })
        })
        .transpose()?;
    let base = Request::parse("tenant:acme")?.resource("openai:gpt-4o");
    let req = if matches!(mode, "money" | "audit" | "audit-file") {
        base.spend("usd", ratewarden::Amount::parse("0.011")?)
            .spend("tokens", 2000)
    } else {
        base.usage(Usage::tokens(1200, 800))
    };
    let mut allowed = 0u64;
    for _ in 0..n {
        allowed += u64::from(ratewarden::backend::at_once(w.acquire(&req))?.allowed());
    }
    if mode == "audit-file" {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ratewarden::Error::Backend {
                message: e.to_string(),
            })?;
        rt.block_on(w.flush_audit(std::time::Duration::from_secs(60)));
        let _ = std::fs::remove_file(&file);
    }
    println!(
        "{allowed} of {n} allowed; {} audit records seen by the callback, {:?}",
        records.load(std::sync::atomic::Ordering::Relaxed),
        w.audit_stats()
    );
    Ok(())
}
