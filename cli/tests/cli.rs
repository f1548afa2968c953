//! The `ratewarden` binary as a user runs it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ratewarden"))
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn check_prints_the_effective_limits() {
    let out = bin()
        .arg("check")
        .arg(root().join("examples/agents.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "valid policy, 10 limits",
        "tenant-monthly-usd",
        "github-hourly",
        "per month",
        "10%/30%",
        "10 risk points",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
}

#[test]
fn check_fails_on_an_invalid_policy_and_names_the_path() {
    let dir = std::env::temp_dir().join(format!("rw-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(&file, "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: rate, limit: 10, per: 1s}\n      - {name: b, kind: budget, limit: 5, per: fortnight}\n").unwrap();
    let out = bin().arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("bad.yaml")
            && err.contains("scopes.tenant.limits[1].per")
            && err.contains("fortnight"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn simulate_is_deterministic_and_governed_never_exceeds_the_quota() {
    let run = || {
        let out = bin()
            .args(["simulate", "--minutes", "10", "--seed", "3"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let a = run();
    assert_eq!(a, run(), "same seed, same numbers");
    let row = |name: &str| -> Vec<String> {
        let line = a
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name} in\n{a}"));
        line[name.len()..]
            .split("  ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let rejected = row("429 responses");
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert_eq!(
        rejected[2], "0",
        "governed agents never hit the upstream's 429"
    );
    assert!(
        rejected[0].parse::<u64>().unwrap() > 0,
        "naive backoff does"
    );
    let sent = row("requests sent upstream");
    assert_eq!(
        sent[2], "1200",
        "governed sends exactly the quota: 120/min × 10 min"
    );
}

#[test]
fn simulate_rejects_bad_options() {
    let out = bin().args(["simulate", "--agents", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("agents"));
    let out = bin()
        .args(["simulate", "--backend", "redis://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
