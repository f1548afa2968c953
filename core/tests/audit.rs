//! The audit log (issue 15 §6): every decision, commit, release, extend and
//! expiry as one record — to a callback, a JSON-lines file, and a Redis
//! Stream (standalone and Cluster).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::redis::RedisServers;
use ratewarden::audit::Record;
use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::{Amount, Cost, ManualClock, Policy, Request, Warden};
use serde_json::json;

fn policy(audit: Option<serde_json::Value>) -> Policy {
    let mut doc = json!({
        "scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"}
        ]}},
        "resources": {"openai": {"limits": [
            {"name": "rpm", "kind": "rate", "limit": 100, "per": "1m"}
        ]}}
    });
    if let Some(a) = audit {
        doc["audit"] = a;
    }
    Policy::from_value(&doc).unwrap()
}

fn spend(usd: &str) -> Request {
    Request::parse("tenant:a")
        .unwrap()
        .resource("openai")
        .spend("usd", Amount::parse(usd).unwrap())
}

/// The operations every test runs: allow, deny, reserve → commit past the
/// estimate, reserve → release, reserve → extend → expiry found by commit.
async fn operations(w: &Warden, clock: Option<&ManualClock>) -> Vec<String> {
    let mut ids = Vec::new();
    assert!(w.acquire(&spend("4")).await.unwrap().allowed());
    assert!(!w.acquire(&spend("7")).await.unwrap().allowed());
    let r = w.reserve(&spend("1"), None).await.unwrap();
    let id = r.reservation.unwrap().id;
    ids.push(id.to_string());
    w.commit(id, &Cost::new().with("usd", Amount::parse("1.5").unwrap()))
        .await
        .unwrap();
    let id = w
        .reserve(&spend("1"), None)
        .await
        .unwrap()
        .reservation
        .unwrap()
        .id;
    ids.push(id.to_string());
    assert!(w.release(id).await.unwrap());
    if let Some(clock) = clock {
        let id = w
            .reserve(&spend("1"), Some(Duration::from_secs(5)))
            .await
            .unwrap()
            .reservation
            .unwrap()
            .id;
        ids.push(id.to_string());
        w.extend(id, Duration::from_secs(5)).await.unwrap();
        clock.advance(Duration::from_secs(6));
        w.commit(id, &Cost::new()).await.unwrap_err();
    }
    ids
}

#[tokio::test(flavor = "current_thread")]
async fn a_callback_gets_one_record_per_operation() {
    let clock = Arc::new(ManualClock::at_date(2026, 1, 15));
    let w = Warden::with_clock(policy(None), clock.clone());
    let (tx, rx) = mpsc::channel::<Record>();
    let mut listener = w
        .on_audit(move |r| {
            tx.send(r.clone()).unwrap();
            Ok(())
        })
        .unwrap();
    let ids = operations(&w, Some(&clock)).await;
    let got: Vec<Record> = (0..9)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
        .collect();
    let brief: Vec<(&str, &str)> = got.iter().map(|r| (r.action, r.outcome)).collect();
    assert_eq!(
        brief,
        [
            ("acquire", "allow"),
            ("acquire", "deny"),
            ("reserve", "allow"),
            ("commit", "ok"),
            ("reserve", "allow"),
            ("release", "ok"),
            ("reserve", "allow"),
            ("extend", "ok"),
            ("expire", "expired"),
        ]
    );
    let allow = &got[0];
    assert_eq!(allow.scope.as_deref(), Some("tenant:a"));
    assert_eq!(allow.resource.as_deref(), Some("openai"));
    assert_eq!(allow.priority, Some("standard"));
    assert_eq!((allow.backend, allow.degraded), ("memory", None));
    let amounts = |r: &Record| -> Vec<(String, i64)> {
        r.amounts
            .iter()
            .map(|a| (a.unit().to_owned(), a.amount))
            .collect()
    };
    assert!(amounts(allow).contains(&("usd".to_owned(), 4_000_000)));
    assert_eq!(allow.request_id_hex().len(), 32);
    let deny = &got[1];
    assert!(
        deny.reason.as_deref().unwrap_or("").contains("usd"),
        "{deny:?}"
    );
    assert_eq!(got[2].request_id_hex(), ids[0]);
    assert_eq!(got[3].request_id_hex(), ids[0]);
    assert_eq!(
        amounts(&got[3]),
        [("usd".to_owned(), 1_500_000), ("requests".to_owned(), 1)]
    );
    assert_eq!(
        (got[5].request_id_hex(), got[5].action),
        (ids[1].clone(), "release")
    );
    assert_eq!(got[8].request_id_hex(), ids[2]);
    let line = got[3].to_json();
    assert_eq!(line["amounts"]["usd"], "1.5");
    assert_eq!(line["amounts_base"]["usd"], 1_500_000);
    listener.close();
    assert_eq!(listener.stats().delivered, 9);
}

#[tokio::test(flavor = "current_thread")]
async fn a_file_gets_one_json_line_per_operation() {
    let dir = std::env::temp_dir().join(format!("rw-audit-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let clock = Arc::new(ManualClock::at_date(2026, 1, 15));
    let w = Warden::with_clock(
        policy(Some(json!({"file": path.to_str().unwrap()}))),
        clock.clone(),
    );
    operations(&w, Some(&clock)).await;
    assert!(w.flush_audit(Duration::from_secs(10)).await);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 9);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["action"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "acquire", "acquire", "reserve", "commit", "reserve", "release", "reserve", "extend",
            "expire"
        ]
    );
    assert_eq!(lines[1]["outcome"], "deny");
    assert_eq!(lines[0]["amounts"]["usd"], "4");
    assert_eq!(lines[0]["timestamp"], "2026-01-15T00:00:00.000Z");
    let s = w.audit_stats();
    assert_eq!((s.written, s.failed, s.dropped), (9, 0, 0), "{s:?}");
    std::fs::remove_dir_all(&dir).unwrap();

    // A file that cannot be written is counted, and decisions go on.
    let w = Warden::new(policy(Some(
        json!({"file": "/nonexistent-dir/audit.jsonl"}),
    )));
    assert!(w.acquire(&spend("1")).await.unwrap().allowed());
    assert!(w.flush_audit(Duration::from_secs(10)).await);
    let s = w.audit_stats();
    assert_eq!((s.written, s.failed), (0, 1));
    assert!(s.last_error.unwrap().contains("cannot be opened"));
}

#[tokio::test(flavor = "current_thread")]
async fn audit_settings_are_checked() {
    for (audit, path, says) in [
        (json!({}), "audit", "give a `file`"),
        (json!({"file": ""}), "audit.file", "expected a file path"),
        (
            json!({"stream": {"max_len": 0}}),
            "audit.stream.max_len",
            "not from 1",
        ),
        (
            json!({"stream": {"events": ["limit."]}}),
            "audit.stream.events",
            "`key` and a `max_len` only",
        ),
        (json!({"files": "x"}), "audit", "unknown field"),
    ] {
        let mut doc = json!({"audit": audit});
        doc["scopes"] = json!({});
        let e = Policy::from_value(&doc).unwrap_err().to_string();
        assert!(e.contains(path) && e.contains(says), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stream_gets_one_entry_per_operation() {
    let servers = RedisServers::start(true);
    for (url, ns) in [
        (servers.url().to_owned(), "audit-s"),
        (servers.cluster_url().to_owned(), "audit-c"),
    ] {
        let backend = RedisBackend::connect(&url, ns).await.unwrap();
        let w = Warden::with_backend(
            policy(Some(json!({"stream": {"key": "trail", "max_len": 1000}}))),
            Arc::new(backend) as Arc<dyn Backend>,
            Arc::new(ratewarden::SystemClock),
        );
        operations(&w, None).await;
        assert!(w.flush_audit(Duration::from_secs(10)).await);
        let s = w.audit_stats();
        assert_eq!((s.appended, s.failed), (6, 0), "{s:?}");
        let key = format!("{ns}:trail");
        let entries: Vec<(String, Vec<String>)> = if url.contains("cluster") {
            let nodes: Vec<String> = servers
                .cluster_nodes()
                .iter()
                .map(|n| format!("redis://{n}"))
                .collect();
            let mut c = redis::cluster::ClusterClient::new(nodes)
                .unwrap()
                .get_async_connection()
                .await
                .unwrap();
            redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut c)
                .await
                .unwrap()
        } else {
            let mut c = redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut c)
                .await
                .unwrap()
        };
        let actions: Vec<String> = entries
            .iter()
            .map(|(_, f)| {
                let body: serde_json::Value = serde_json::from_str(&f[5]).unwrap();
                assert_eq!(body["backend"], "redis");
                body["action"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            actions,
            [
                "acquire", "acquire", "reserve", "commit", "reserve", "release"
            ],
            "{url}"
        );
    }
}
