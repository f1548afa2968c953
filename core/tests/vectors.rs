//! Runs the shared conformance vectors in `tests/vectors/*.json` (see its README)
//! unchanged against the embedded engine and against a real Redis server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::calendar::{DAY_US, days_from_civil};
use ratewarden::{
    Amount, Cost, DelegateFrom, Error, ManualClock, Policy, Priority, Request, ReservationId,
    Scope, Warden,
};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors")
}

fn parse_start(s: &str) -> i64 {
    // YYYY-MM-DDTHH:MM:SSZ
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let days = days_from_civil(
        n(0..4),
        u32::try_from(n(5..7)).unwrap(),
        u32::try_from(n(8..10)).unwrap(),
    );
    days * DAY_US + (n(11..13) * 3600 + n(14..16) * 60 + n(17..19)) * 1_000_000
}

fn amount(v: &Value) -> Result<Amount, Error> {
    match v {
        Value::String(s) => Amount::parse(s),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(Amount::units(i)),
            None => Amount::from_f64(n.as_f64().unwrap()),
        },
        other => panic!("bad amount {other}"),
    }
}

fn cost(v: Option<&Value>) -> Result<Cost, Error> {
    let mut c = Cost::new();
    if let Some(Value::Object(m)) = v {
        for (unit, a) in m {
            c.set(unit, amount(a)?);
        }
    }
    Ok(c)
}

fn request(step: &Value) -> Result<Request, Error> {
    let mut r = Request::parse(step["scope"].as_str().unwrap())?.cost(cost(step.get("cost"))?);
    if let Some(res) = step.get("resource").and_then(Value::as_str) {
        r = r.resource(res);
    }
    if let Some(act) = step.get("action").and_then(Value::as_str) {
        r = r.action(act);
    }
    if let Some(p) = step.get("priority").and_then(Value::as_str) {
        r = r.priority(p.parse::<Priority>()?);
    }
    Ok(r)
}

fn lease(step: &Value) -> Option<Duration> {
    step.get("lease_ms")
        .and_then(Value::as_u64)
        .map(Duration::from_millis)
}

enum Got {
    Decision(ratewarden::Decision),
    Receipt(ratewarden::CommitReceipt),
    Released(bool),
    Nothing,
}

async fn run_step(
    w: &Warden,
    clock: &ManualClock,
    names: &mut HashMap<String, ReservationId>,
    step: &Value,
) -> Result<Got, Error> {
    let id = |names: &HashMap<String, ReservationId>, key: &str| -> Result<ReservationId, Error> {
        let s = step[key].as_str().unwrap();
        names
            .get(s)
            .copied()
            .map_or_else(|| ReservationId::parse(s), Ok)
    };
    let op = step["op"].as_str().unwrap();
    let got = match op {
        "advance" => {
            clock.advance(Duration::from_millis(step["ms"].as_u64().unwrap()));
            Got::Nothing
        }
        "check" => Got::Decision(w.check(&request(step)?).await?),
        "acquire" => Got::Decision(w.acquire(&request(step)?).await?),
        "reserve" => Got::Decision(w.reserve(&request(step)?, lease(step)).await?),
        "commit" => Got::Receipt(
            w.commit(id(names, "reservation")?, &cost(step.get("actual"))?)
                .await?,
        ),
        "release" => Got::Released(w.release(id(names, "reservation")?).await?),
        "extend" => {
            w.extend(id(names, "reservation")?, lease(step).unwrap())
                .await?;
            Got::Nothing
        }
        "delegate" => {
            let child = Scope::parse(step["child"].as_str().unwrap())?;
            let amounts = cost(step.get("amounts"))?;
            let d = if let Some(p) = step.get("from_scope").and_then(Value::as_str) {
                let parent = Scope::parse(p)?;
                w.delegate(DelegateFrom::Scope(&parent), &child, &amounts, lease(step))
                    .await?
            } else {
                w.delegate(
                    DelegateFrom::Reservation(id(names, "from_reservation")?),
                    &child,
                    &amounts,
                    lease(step),
                )
                .await?
            };
            Got::Decision(d)
        }
        other => panic!("unknown op {other}"),
    };
    if let (Some(name), Got::Decision(d)) = (step.get("as").and_then(Value::as_str), &got) {
        if let Some(r) = &d.reservation {
            names.insert(name.to_owned(), r.id);
        }
    }
    Ok(got)
}

fn check_expect(at: &str, expect: &Value, got: Result<Got, Error>) {
    if let Some(kind) = expect.get("error").and_then(Value::as_str) {
        match got {
            Err(e) => assert_eq!(e.kind().to_string(), kind, "{at}: wrong error kind for {e}"),
            Ok(_) => panic!("{at}: expected a {kind} error"),
        }
        return;
    }
    let got = got.unwrap_or_else(|e| panic!("{at}: unexpected error {e}"));
    match got {
        Got::Decision(d) => {
            if let Some(o) = expect.get("outcome") {
                assert_eq!(
                    d.outcome.as_str(),
                    o.as_str().unwrap(),
                    "{at}: outcome; reason {:?}",
                    d.reason
                );
            }
            if let Some(r) = expect.get("retry_after_ms") {
                let want = r.as_u64().map(Duration::from_millis);
                assert_eq!(d.retry_after, want, "{at}: retry_after");
            }
            if let Some(Value::Object(m)) = expect.get("remaining") {
                for (name, v) in m {
                    let l = d
                        .limits
                        .iter()
                        .find(|l| l.name() == name)
                        .unwrap_or_else(|| panic!("{at}: no limit {name}"));
                    assert_eq!(
                        l.remaining,
                        v.as_i64().unwrap(),
                        "{at}: remaining of {name}"
                    );
                }
            }
            if let Some(n) = expect.get("denied_by") {
                assert_eq!(
                    d.denied_by().map(|l| l.name()),
                    n.as_str(),
                    "{at}: denied_by"
                );
            }
            if let Some(p) = expect.get("priority") {
                assert_eq!(
                    d.priority.as_str(),
                    p.as_str().unwrap(),
                    "{at}: served priority"
                );
            }
            if let Some(c) = expect.get("caps") {
                if let Some(t) = c.get("max_tokens") {
                    assert_eq!(d.caps.max_tokens, t.as_u64(), "{at}: caps.max_tokens");
                }
                if let Some(m) = c.get("model") {
                    assert_eq!(d.caps.model.as_deref(), m.as_str(), "{at}: caps.model");
                }
            }
        }
        Got::Receipt(r) => {
            if let Some(Value::Object(m)) = expect.get("charged") {
                for (name, v) in m {
                    let c = r
                        .charges
                        .iter()
                        .find(|c| c.name() == name)
                        .unwrap_or_else(|| panic!("{at}: no charge for {name}"));
                    assert_eq!(c.charged, v.as_i64().unwrap(), "{at}: charged {name}");
                }
            }
            if let Some(dup) = expect.get("duplicate") {
                assert_eq!(r.duplicate, dup.as_bool().unwrap(), "{at}: duplicate");
            }
        }
        Got::Released(b) => {
            if let Some(want) = expect.get("released") {
                assert_eq!(b, want.as_bool().unwrap(), "{at}: released");
            }
        }
        Got::Nothing => {}
    }
}

fn vector_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "vectors missing: {files:?}");
    files
}

/// Runs every vector file against wardens made by `make(file index, policy, clock)`;
/// returns the number of steps run.
async fn run_all<F, Fut>(skip: &[&str], make: F) -> usize
where
    F: Fn(usize, Policy, ManualClock) -> Fut,
    Fut: std::future::Future<Output = Warden>,
{
    let mut steps_run = 0;
    for (n, file) in vector_files().into_iter().enumerate() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if skip.contains(&name.as_str()) {
            continue;
        }
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let policy = Policy::from_value(&doc["policy"]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let clock = ManualClock::new(parse_start(doc["start"].as_str().unwrap()));
        let w = make(n, policy, clock.clone()).await;
        let mut names = HashMap::new();
        for (i, step) in doc["steps"].as_array().unwrap().iter().enumerate() {
            let at = format!("{name} step {i} ({}) on {}", step["op"], w.backend_name());
            let got = run_step(&w, &clock, &mut names, step).await;
            check_expect(&at, step.get("expect").unwrap_or(&Value::Null), got);
            steps_run += 1;
        }
    }
    steps_run
}

#[tokio::test(flavor = "current_thread")]
async fn conformance_vectors_on_the_embedded_engine() {
    let steps = run_all(&[], |_, policy, clock| async move {
        Warden::with_clock(policy, Arc::new(clock))
    })
    .await;
    assert!(steps > 50);
}

/// Runs every vector file on Redis at `url`, a namespace per file.
async fn run_all_on_redis(url: &str) -> usize {
    run_all(&[], |n, policy, clock| async move {
        let clock: Arc<ManualClock> = Arc::new(clock);
        let backend = RedisBackend::connect(url, &format!("v{n}"))
            .await
            .unwrap()
            .with_clock(clock.clone());
        Warden::with_backend(policy, Arc::new(backend) as Arc<dyn Backend>, clock)
    })
    .await
}

#[tokio::test(flavor = "current_thread")]
async fn conformance_vectors_on_redis() {
    let servers = common::redis::RedisServers::start(false);
    assert!(run_all_on_redis(servers.url()).await > 50);
}

#[tokio::test(flavor = "current_thread")]
async fn conformance_vectors_on_a_redis_cluster() {
    let servers = common::redis::RedisServers::start(true);
    assert!(run_all_on_redis(servers.cluster_url()).await > 50);
}
