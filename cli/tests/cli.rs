//! The `ratewarden` binary as a user runs it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

mod common;

use common::{PolicyFile, Redis, bin, root};

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
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    assert_eq!(
        rejected[2], "0",
        "governed agents never hit the upstream's 429"
    );
    assert_eq!(
        rejected[3], "0",
        "coordinated agents, told nothing but the headers, never do either"
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
    assert_eq!(sent[3], "1200", "so does coordinated: the whole quota used");
}

#[test]
fn simulate_prints_json_with_the_same_numbers() {
    let out = bin()
        .args(["simulate", "--minutes", "10", "--seed", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let variants = v["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "naive: backoff",
            "naive: Retry-After",
            "governed",
            "coordinated"
        ]
    );
    for x in &variants[2..] {
        assert_eq!(
            (x["rejected_429"].as_u64(), x["sent"].as_u64()),
            (Some(0), Some(1200))
        );
    }
    assert!(variants[0]["rejected_429"].as_u64().unwrap() > 0);
    assert_eq!(variants[3]["ok_per_minute"].as_array().unwrap().len(), 10);
}

/// Runs `simulate ARGS… --plot DIR/NAME` and returns the file's bytes.
fn plot(name: &str, args: &[&str]) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("rw-plot-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let out = bin()
        .arg("simulate")
        .args(args)
        .arg("--plot")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    bytes
}

#[test]
fn the_readme_pictures_are_what_simulate_draws() {
    for name in ["simulate.svg", "simulate.png"] {
        let committed = root().join("docs").join(name);
        assert!(
            plot(name, &[]) == std::fs::read(&committed).unwrap(),
            "regenerate docs/{name} with `ratewarden simulate --plot docs/{name}`"
        );
    }
}

/// The four variants' colours, as in the plot.
const COLOURS: [(&str, [u8; 3]); 4] = [
    ("naive: backoff", [214, 39, 40]),
    ("naive: Retry-After", [255, 127, 14]),
    ("governed", [31, 119, 180]),
    ("coordinated", [44, 160, 44]),
];

#[test]
fn simulate_plots_the_four_variants_as_svg() {
    let a = plot("out.svg", &["--minutes", "3"]);
    assert_eq!(
        a,
        plot("out.svg", &["--minutes", "3"]),
        "same run, same bytes"
    );
    let svg = String::from_utf8(a).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    for title in [
        "(a) successful upstream calls per minute",
        "(b) 429 responses per minute",
        "(c) quota remaining",
        "(d) wait per tier",
        "critical (P0)",
        "background (P2)",
    ] {
        assert!(svg.contains(title), "{title} missing");
    }
    for (label, [r, g, b]) in COLOURS {
        assert!(
            svg.contains(&format!("{label}\n</text>")),
            "{label} missing"
        );
        // Three line panels and their three legends; then each tier's two bars.
        let stroke = format!(r##"stroke="#{r:02X}{g:02X}{b:02X}" stroke-width="2" points="##);
        assert_eq!(svg.matches(&stroke).count(), 6, "{label}'s lines");
        let fill = format!(r##"fill="#{r:02X}{g:02X}{b:02X}""##);
        assert!(svg.matches(&fill).count() >= 6, "{label}'s bars");
    }
}

#[test]
fn simulate_plots_the_four_variants_as_png() {
    let bytes = plot("out.png", &["--minutes", "3"]);
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "the PNG signature");
    let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (1280, 960));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let pixels: Vec<[u8; 3]> = pixels[..info.buffer_size()]
        .chunks_exact(3)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    for (label, colour) in COLOURS {
        let n = pixels.iter().filter(|p| **p == colour).count();
        assert!(n > 1000, "{label}: only {n} pixels of its colour");
    }
    let distinct: std::collections::HashSet<_> = pixels.iter().collect();
    assert!(
        distinct.len() > 50,
        "text is antialiased: {} colours",
        distinct.len()
    );
    let black = pixels.iter().filter(|p| **p == [0, 0, 0]).count();
    assert!(black > 1000, "axes and text: {black} black pixels");
}

#[test]
fn simulate_refuses_a_plot_it_cannot_write() {
    let dir = std::env::temp_dir().join(format!("rw-bad-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (pdf, bare) = (dir.join("out.pdf"), dir.join("out"));
    for (path, needle) in [
        (pdf.to_str().unwrap(), "`.png` or `.svg`"),
        (bare.to_str().unwrap(), "`.png` or `.svg`"),
        (
            "/nonexistent-dir/out.png",
            "cannot write /nonexistent-dir/out.png",
        ),
    ] {
        let out = bin()
            .args(["simulate", "--minutes", "1", "--plot", path])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{path}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{path}: {err}");
    }
    assert!(!pdf.exists() && !bare.exists(), "nothing written");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `simulate --scenario examples/scenarios/NAME.yaml --json`, parsed.
fn scenario(name: &str) -> serde_json::Value {
    let out = bin()
        .arg("simulate")
        .arg("--scenario")
        .arg(root().join("examples/scenarios").join(name))
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The variants of a `--json` result by name.
fn variant<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("no variant {name}"))
}

#[test]
fn scenario_nine_agents_on_one_github_token() {
    let v = scenario("github-nine-agents.yaml");
    assert_eq!(
        v,
        scenario("github-nine-agents.yaml"),
        "same seed, same numbers"
    );
    assert_eq!(v["scenario"], "github-nine-agents");
    assert_eq!(
        v["agents"],
        serde_json::json!({"critical": 2, "standard": 4, "background": 3})
    );
    assert_eq!(v["upstreams"][0]["style"], "github");
    let naive = variant(&v, "naive: backoff");
    assert!(
        naive["lockout_rejects"].as_u64().unwrap() > 100,
        "hammering trips the secondary limit: {naive}"
    );
    for name in ["governed", "coordinated"] {
        let x = variant(&v, name);
        assert_eq!(x["rejected_429"], 0, "{name}");
        // The whole quota of some window, never more.
        assert_eq!(x["upstreams"][0]["most_in_a_window"], 100, "{name}");
        assert_eq!(x["tiers"]["critical"]["unfinished"], 0, "{name}");
    }
}

#[test]
fn scenario_openai_org_runs_out_of_tokens_not_requests() {
    let v = scenario("openai-org.yaml");
    let naive = variant(&v, "naive: Retry-After");
    assert!(naive["rejected_429"].as_u64().unwrap() > 0, "{naive}");
    // Requests never bind (200 a window): every naive 429 was the tokens.
    assert!(naive["upstreams"][0]["most_in_a_window"].as_u64().unwrap() < 200);
    for name in ["governed", "coordinated"] {
        let x = variant(&v, name);
        // Governed mirrors the token quota in its policy; coordinated learns it
        // from x-ratelimit-*-tokens alone.
        assert_eq!(x["rejected_429"], 0, "{name}");
        let tokens = x["upstreams"][0]["most_tokens_in_a_window"]
            .as_u64()
            .unwrap();
        assert!((35_000..=40_000).contains(&tokens), "{name}: {tokens}");
    }
}

#[test]
fn scenario_a_background_poller_does_not_starve_the_lead_when_governed() {
    let v = scenario("poller-starves-lead.yaml");
    let lead_tasks = |x: &serde_json::Value| x["completed_per_agent"]["lead"].as_u64().unwrap();
    let naive = variant(&v, "naive: backoff");
    assert!(
        naive["tiers"]["critical"]["unfinished"].as_u64().unwrap() > 10,
        "{naive}"
    );
    assert!(naive["lockout_rejects"].as_u64().unwrap() > 0);
    for name in ["governed", "coordinated"] {
        let x = variant(&v, name);
        assert_eq!(x["rejected_429"], 0, "{name}");
        assert_eq!(x["tiers"]["critical"]["unfinished"], 0, "{name}");
        assert!(
            x["tiers"]["critical"]["wait_p95_s"].as_f64().unwrap() < 5.0,
            "{name}"
        );
        // Each triage task called both stages' upstreams once.
        assert_eq!(x["workflows"][0]["completed"].as_u64(), Some(lead_tasks(x)));
        assert_eq!(x["upstreams"][1]["name"], "llm");
        assert_eq!(x["upstreams"][1]["succeeded"].as_u64(), Some(lead_tasks(x)));
    }
    assert!(lead_tasks(variant(&v, "governed")) > lead_tasks(naive));
}

#[test]
fn a_bad_scenario_is_refused_naming_the_field() {
    let dir = PolicyFile::new("scenario", "");
    let file = dir.0.join("s.yaml");
    let good = std::fs::read_to_string(root().join("examples/scenarios/openai-org.yaml")).unwrap();
    for (from, to, needle) in [
        (
            "rate: 4,",
            "rate: 4, colour: red,",
            "agents[0]: unknown field `colour`",
        ),
        ("window: 1m", "window: 1 minute", "at `upstreams[0].window`"),
        ("style: openai", "style: github", "upstreams[0].tokens"),
        (
            "upstream: openai, rate: 4",
            "upstream: gpt, rate: 4",
            "no upstream named `gpt`",
        ),
    ] {
        assert!(good.contains(from), "{from}");
        std::fs::write(&file, good.replacen(from, to, 1)).unwrap();
        let out = bin()
            .arg("simulate")
            .arg("--scenario")
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{to}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains(needle) && err.contains("s.yaml"),
            "{to}: {err}"
        );
    }
    let out = bin()
        .args(["simulate", "--agents", "3", "--scenario"])
        .arg(root().join("examples/scenarios/openai-org.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "--agents and --scenario together");
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

/// `ratewarden worker` against `redis` with `policy` for `scope`, plus `extra` options.
fn worker(redis: &Redis, policy: &PolicyFile, scope: &str, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args(["worker", "--backend", redis.url(), "--policy"])
        .arg(policy.0.join("policy.yaml"))
        .args(["--scope", scope])
        .args(extra);
    cmd
}

/// Runs a worker to completion and returns how many requests it was granted.
fn admitted(mut cmd: Command) -> u64 {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["admitted"].as_u64().unwrap()
}

/// Starts a `--hold` worker and waits until it reports what it holds.
fn holder(mut cmd: Command) -> (Holder, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Holder(cmd.stdout(std::process::Stdio::piped()).spawn().unwrap());
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_owned())
}

/// A `--hold` worker, killed when the test ends however it ends (a failed
/// assertion must not leave it running, holding the test runner's output).
struct Holder(std::process::Child);

impl std::ops::Deref for Holder {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Holder {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn four_processes_on_one_redis_admit_exactly_the_limit() {
    let redis = Redis::start();
    let policy = PolicyFile::new(
        "mp",
        "scopes:\n  tenant:\n    limits:\n      - {name: budget, kind: budget, unit: tokens, limit: 1000}\n      - {name: quota, kind: quota, limit: 2357, per: day}\n      - {name: slots, kind: concurrency, limit: 5, lease: 1m}\n",
    );
    // 4 processes × 16 tasks × 60 requests = 3840 attempts each time.
    let run = |mode: &str, scope: &str, tokens: &str| -> u64 {
        let children: Vec<_> = (0..4)
            .map(|_| {
                let cmd = worker(
                    &redis,
                    &policy,
                    scope,
                    &[
                        "--tasks", "16", "--ops", "60", "--mode", mode, "--tokens", tokens,
                    ],
                );
                std::thread::spawn(move || admitted(cmd))
            })
            .collect();
        children.into_iter().map(|c| c.join().unwrap()).sum()
    };
    assert_eq!(run("acquire", "tenant:q", "0"), 2357, "the quota, exactly");
    assert_eq!(
        run("acquire", "tenant:b", "3"),
        333,
        "the budget: 1000 tokens at 3 each"
    );
    assert!(
        run("reserve", "tenant:s", "0") > 0,
        "reservations through the concurrency limit went through"
    );
    // The server's own books agree (this also pins the key naming the next check relies on).
    assert_eq!(
        redis.cli(&["HGET", "rw:{tenant:q}:tenant:q#quota", "u"]),
        "2357"
    );
    // Every reservation was committed: no hold is left on the server.
    let holds = redis.cli(&["HKEYS", "rw:{tenant:s}:tenant:s#slots"]);
    assert!(!holds.contains("h:"), "leaked holds: {holds}");
}

#[test]
fn four_processes_waiting_on_one_redis_are_served_critical_first() {
    let redis = Redis::start();
    let policy = PolicyFile::new(
        "line",
        "defaults:\n  floors: {standard: 0, background: 0}\nscopes:\n  team:\n    limits:\n      - {name: calls, kind: quota, limit: 4, per: 2s}\n",
    );
    // 2 processes × 4 critical waiters and 2 × 4 background waiters, all at
    // once on a quota of 4 per 2 s: 16 admissions over about 4 windows. They
    // start together, 0.2 s into a window at least 2 s away (time to connect).
    let now = ratewarden::Clock::now(&ratewarden::SystemClock);
    let start = (now / 2_000_000 + 2) * 2_000_000 + 200_000;
    let start = start.to_string();
    let children: Vec<_> = ["critical", "background", "critical", "background"]
        .iter()
        .map(|priority| {
            let mut cmd = worker(
                &redis,
                &policy,
                "team:a",
                &[
                    "--tasks",
                    "4",
                    "--ops",
                    "1",
                    "--mode",
                    "wait",
                    "--priority",
                    priority,
                    "--start-at",
                    &start,
                ],
            );
            let priority = (*priority).to_owned();
            std::thread::spawn(move || {
                let out = cmd.output().unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let windows: Vec<i64> = v["at"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_i64().unwrap() / 2_000_000)
                    .collect();
                (priority, windows)
            })
        })
        .collect();
    let mut critical = Vec::new();
    let mut background = Vec::new();
    for c in children {
        let (p, w) = c.join().unwrap();
        if p == "critical" {
            critical.extend(w)
        } else {
            background.extend(w)
        }
    }
    assert_eq!(critical.len() + background.len(), 16, "every waiter got in");
    // The first window is a free-for-all (nobody was in line yet); after it,
    // no background waiter may be served in a window before the last one a
    // critical waiter needed.
    let first = critical.iter().chain(&background).min().copied().unwrap();
    let last_critical = critical.iter().max().copied().unwrap();
    let early: Vec<_> = background
        .iter()
        .filter(|&&w| w > first && w < last_critical)
        .collect();
    assert!(
        early.is_empty(),
        "background served ahead of waiting critical callers: critical windows {critical:?}, background {background:?}"
    );
    assert!(
        last_critical > first,
        "critical waiters had to wait (the test is not vacuous)"
    );
}

#[test]
fn four_processes_on_a_cluster_admit_exactly_the_limits_spread_over_its_shards() {
    let redis = Redis::start_cluster();
    // Tenant limits live on the tenants' slots, the provider's pools on others.
    // (64 slots for 64 tasks: each task holds at most one, so only the quotas bind.)
    let policy = PolicyFile::new(
        "mpc",
        "scopes:\n  tenant:\n    limits:\n      - {name: t-quota, kind: quota, limit: 150, per: day}\n      - {name: t-budget, kind: budget, unit: tokens, limit: 100000}\nresources:\n  llm:\n    limits:\n      - {name: llm-quota, kind: quota, limit: 1009, per: day}\n      - {name: llm-slots, kind: concurrency, limit: 64, lease: 1m}\n",
    );
    let tenants = "tenant:a,tenant:b,tenant:c,tenant:d,tenant:e,tenant:f,tenant:g,tenant:h";
    // 4 processes × 16 tasks × 25 requests = 1600 attempts; 8 tenants × 150 = 1200
    // tenant admissions against a pool of 1009: the pool binds, exactly.
    let children: Vec<_> = (0..4)
        .map(|i| {
            let mode = if i % 2 == 0 { "acquire" } else { "reserve" };
            let cmd = worker(
                &redis,
                &policy,
                tenants,
                &[
                    "--resource",
                    "llm",
                    "--tasks",
                    "16",
                    "--ops",
                    "25",
                    "--mode",
                    mode,
                    "--tokens",
                    "2",
                ],
            );
            std::thread::spawn(move || admitted(cmd))
        })
        .collect();
    let total: u64 = children.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(total, 1009, "the shared pool, exactly");
    let out = bin()
        .args(["inspect", "--backend", redis.url()])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(": holds "), "no hold left anywhere:\n{text}");
}

#[test]
fn rediss_urls_speak_tls_and_verify_the_server_certificate() {
    let redis = Redis::start_tls();
    let ca = redis.0["tls_ca"].as_str().unwrap().to_owned();
    let policy = PolicyFile::new(
        "tls",
        "scopes:\n  tenant:\n    limits:\n      - {name: q, kind: quota, limit: 7, per: day}\n",
    );
    let mut cmd = worker(
        &redis,
        &policy,
        "tenant:t",
        &["--tasks", "2", "--ops", "10"],
    );
    // An unknown CA is refused, with the reason.
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    // Trusting the test CA (the standard SSL_CERT_FILE variable), it works.
    cmd.env("SSL_CERT_FILE", &ca);
    assert_eq!(admitted(cmd), 7);
}

#[test]
fn a_holder_killed_with_sigkill_gives_its_leases_back_when_they_expire() {
    let redis = Redis::start();
    let policy = PolicyFile::new(
        "kill",
        "scopes:\n  tenant:\n    limits:\n      - {name: slots, kind: concurrency, limit: 3}\n      - {name: usd, kind: budget, unit: tokens, limit: 30}\n",
    );
    let hold = [
        "--tasks",
        "3",
        "--ops",
        "1",
        "--mode",
        "reserve",
        "--tokens",
        "10",
        "--hold",
        "--lease-secs",
        "3",
    ];
    let (mut child, held) = holder(worker(&redis, &policy, "tenant:t", &hold));
    assert_eq!(
        held, r#"{"admitted": 3}"#,
        "the holder took every slot and the whole budget"
    );
    child.kill().unwrap(); // SIGKILL: no release, no commit
    child.wait().unwrap();
    let probe = |ops: &str| {
        admitted(worker(
            &redis,
            &policy,
            "tenant:t",
            &[
                "--tasks", "1", "--ops", ops, "--mode", "reserve", "--tokens", "10",
            ],
        ))
    };
    assert_eq!(
        probe("1"),
        0,
        "right after the kill, the dead holder's leases still count"
    );
    let mut back = 0;
    for _ in 0..75 {
        // Up to 15 s for a 3 s lease: waiting on a real server-side lease, not on our code.
        std::thread::sleep(std::time::Duration::from_millis(200));
        back = probe("3");
        if back == 3 {
            break;
        }
    }
    assert_eq!(
        back, 3,
        "all three slots and 30 tokens returned after the lease"
    );
}

#[test]
fn inspect_shows_counters_leases_and_reservations_under_a_scope() {
    let redis = Redis::start();
    let policy = PolicyFile::new(
        "inspect",
        "scopes:\n  tenant:\n    limits:\n      - {name: slots, kind: concurrency, limit: 5}\n      - {name: daily, kind: quota, limit: 100, per: day}\n",
    );
    // Another tenant's state must not show up.
    assert_eq!(
        admitted(worker(
            &redis,
            &policy,
            "tenant:other",
            &["--tasks", "1", "--ops", "4"]
        )),
        4
    );
    let (mut child, _) = holder(worker(
        &redis,
        &policy,
        "tenant:acme",
        &[
            "--tasks",
            "2",
            "--ops",
            "1",
            "--mode",
            "reserve",
            "--hold",
            "--lease-secs",
            "60",
        ],
    ));
    let out = bin()
        .args(["inspect", "--backend", redis.url(), "tenant:acme"])
        .output()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("concurrency  tenant:acme#slots"), "{text}");
    // Each reservation holds one unit on each limit: two leases under each key.
    assert_eq!(text.matches(": holds 1, expires in").count(), 4, "{text}");
    let slots = text.split("concurrency  tenant:acme#slots").nth(1).unwrap();
    assert_eq!(slots.matches(": holds 1").count(), 2, "{text}");
    assert!(
        text.contains("counter      tenant:acme#daily  used 0"),
        "reserved, not yet used\n{text}"
    );
    assert_eq!(text.matches("reservation  res:").count(), 2, "{text}");
    assert!(text.contains("active, scope tenant:acme"), "{text}");
    assert!(
        !text.contains("tenant:other"),
        "only the asked scope\n{text}"
    );
    let out = bin()
        .args(["inspect", "--backend", redis.url(), "tenant:{bad"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a malformed scope is an error");
}

#[test]
fn simulate_on_redis_runs_the_agents_as_processes_sharing_one_quota() {
    let redis = Redis::start();
    // 4 agents in 2 processes ask 3× a quota of 10 per (simulated) minute,
    // a minute lasting 3 s: each process alone would stay near its own
    // 10, so only a ledger shared through Redis keeps the two off the 429.
    let out = bin()
        .args(["simulate", "--backend", redis.url()])
        .args([
            "--agents",
            "4",
            "--quota",
            "10",
            "--demand",
            "3",
            "--minutes",
            "3",
        ])
        .args(["--processes", "2", "--time-scale", "20"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("4 agents in 2 processes"), "{text}");
    let row = |name: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name} in\n{text}"));
        line[name.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("429 responses"), ["0", "0"], "{text}");
    // Three whole windows of 10, every one of them used to the last request.
    assert_eq!(row("requests sent upstream"), ["30", "30"], "{text}");
    for variant in ["governed", "coordinated"] {
        assert!(
            text.contains(&format!(
                "{variant}: most successes in one upstream window 10"
            )),
            "{text}"
        );
    }
    let out = bin()
        .args(["simulate", "--backend", redis.url(), "--plot", "x.png"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no plot from the real-time run");
}
