//! Events out to Redis (`events:` in the policy): four processes race one
//! budget across its thresholds on a standalone Redis and on a Cluster; the
//! stream gets exactly one entry per crossing (the deciding process appends
//! it), a consumer group reads them — a consumer that dies before
//! acknowledging gets its entries again when it restarts — and a live
//! subscriber gets each one published.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::redis::RedisServers;
use futures_util::StreamExt;
use ratewarden::backend::{Backend, RedisBackend};
use ratewarden::{Amount, Policy, Request, Warden};
use serde_json::json;

fn policy() -> Policy {
    Policy::from_value(&json!({
        "scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"}
        ]}},
        "events": {
            "stream": {"max_len": 1000, "events": ["limit."]},
            "publish": {"channel": "billing:live", "events": ["limit.exhausted"]}
        }
    }))
    .unwrap()
}

/// Entries (stream id, fields) of an `XREADGROUP` reply.
type Entries = Vec<(String, std::collections::HashMap<String, String>)>;

async fn read_group(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    consumer: &str,
    from: &str,
    block_ms: Option<u64>,
) -> Entries {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg("billing")
        .arg(consumer)
        .arg("COUNT")
        .arg(2);
    if let Some(ms) = block_ms {
        cmd.arg("BLOCK").arg(ms);
    }
    cmd.arg("STREAMS").arg(key).arg(from);
    let reply: Option<Vec<(String, Entries)>> = cmd.query_async(conn).await.unwrap();
    reply
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(_, entries)| entries)
        .collect()
}

async fn ack(conn: &mut impl redis::aio::ConnectionLike, key: &str, entries: &Entries) {
    for (id, _) in entries {
        let n: i64 = redis::cmd("XACK")
            .arg(key)
            .arg("billing")
            .arg(id)
            .query_async(conn)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
}

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_crossing_is_one_stream_entry_read_by_a_consumer_group_across_a_restart() {
    let servers = RedisServers::start(true);
    let nodes: Vec<String> = servers
        .cluster_nodes()
        .iter()
        .map(|n| format!("redis://{n}"))
        .collect();
    case(
        connect(servers.url()).await,
        servers.url(),
        "out-s",
        servers.url(),
    )
    .await;
    let cluster = redis::cluster::ClusterClient::new(nodes.clone())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    case(cluster, servers.cluster_url(), "out-c", &nodes[0]).await;
}

/// One backend: `admin` asks the stream's node, `node` is where to subscribe.
async fn case(mut admin: impl redis::aio::ConnectionLike + Send, url: &str, ns: &str, node: &str) {
    {
        let key = format!("{ns}:events:stream");
        let created: String = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("billing")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(created, "OK");
        let mut live = redis::Client::open(node)
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        live.subscribe(format!("{ns}:billing:live")).await.unwrap();

        let mut tasks = Vec::new();
        for _ in 0..4 {
            let backend = RedisBackend::connect(url, ns).await.unwrap();
            let w = Warden::with_backend(
                policy(),
                Arc::new(backend) as Arc<dyn Backend>,
                Arc::new(ratewarden::SystemClock),
            );
            tasks.push(tokio::spawn(async move {
                let req = Request::parse("tenant:a")
                    .unwrap()
                    .spend("usd", Amount::parse("0.25").unwrap());
                let mut admitted = 0;
                for _ in 0..20 {
                    if w.acquire(&req).await.unwrap().allowed() {
                        admitted += 1;
                    }
                }
                (admitted, w)
            }));
        }
        let mut admitted = 0;
        let mut wardens = Vec::new();
        for t in tasks {
            let (a, w) = t.await.unwrap();
            admitted += a;
            wardens.push(w);
        }
        assert_eq!(admitted, 40);

        // A consumer reads two entries and dies before acknowledging them.
        let first = read_group(&mut admin, &key, "c1", ">", Some(10_000)).await;
        assert!(!first.is_empty());
        // Restarted, it reads its pending entries again (same stream ids),
        // acknowledges them, then reads the rest.
        let pending = read_group(&mut admin, &key, "c1", "0", None).await;
        assert_eq!(
            pending.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            first.iter().map(|(id, _)| id).collect::<Vec<_>>()
        );
        ack(&mut admin, &key, &pending).await;
        let mut all = pending;
        while all.len() < 3 {
            let more = read_group(&mut admin, &key, "c1", ">", Some(10_000)).await;
            assert!(!more.is_empty(), "{url}: only {} entries", all.len());
            ack(&mut admin, &key, &more).await;
            all.extend(more);
        }
        let len: u64 = redis::cmd("XLEN")
            .arg(&key)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(
            len, 3,
            "{url}: one entry per crossing, in all four processes"
        );
        let mut thresholds = BTreeSet::new();
        let mut exhausted_id = None;
        for (_, fields) in &all {
            let body: serde_json::Value = serde_json::from_str(&fields["body"]).unwrap();
            assert_eq!(body["id"], fields["id"]);
            assert_eq!(body["type"], fields["type"]);
            assert_eq!(body["data"]["owner"], "tenant:a");
            assert!(fields["id"].starts_with("msg_") && fields["id"].len() == 36);
            thresholds.insert(body["data"]["threshold"].to_string());
            if fields["type"] == "limit.exhausted" {
                exhausted_id = Some(fields["id"].clone());
            }
        }
        assert_eq!(
            thresholds.into_iter().collect::<Vec<_>>(),
            ["0.5", "0.8", "1.0"]
        );
        let pending: Vec<redis::Value> = redis::cmd("XPENDING")
            .arg(&key)
            .arg("billing")
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(pending[0], redis::Value::Int(0), "every entry acknowledged");

        // The live channel got the one event it wants, with the same id.
        let msg =
            tokio::time::timeout(std::time::Duration::from_secs(10), live.on_message().next())
                .await
                .unwrap()
                .unwrap();
        let body: serde_json::Value =
            serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
        assert_eq!(body["type"], "limit.exhausted");
        assert_eq!(body["id"].as_str(), exhausted_id.as_deref());
        let (mut appended, mut published) = (0, 0);
        for w in &wardens {
            assert!(w.flush_outlets(std::time::Duration::from_secs(10)).await);
            let s = w.outlet_stats();
            assert_eq!((s.failed, s.dropped), (0, 0), "{s:?}");
            appended += s.appended;
            published += s.published;
        }
        assert_eq!((appended, published), (3, 1));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn outlets_are_checked_and_need_redis() {
    for (events, path, says) in [
        (
            json!({"stream": {"max_len": 0}}),
            "events.stream.max_len",
            "not from 1",
        ),
        (
            json!({"stream": {"max_len": 1_000_000_001u64}}),
            "events.stream.max_len",
            "not from 1",
        ),
        (
            json!({"stream": {"channel": "x"}}),
            "events.stream.channel",
            "has a `key`",
        ),
        (
            json!({"publish": {"max_len": 5}}),
            "events.publish.max_len",
            "has a `channel`",
        ),
        (
            json!({"publish": {"events": ["limits."]}}),
            "events.publish.events[0]",
            "no event type",
        ),
        (
            json!({"stream": {"key": ""}}),
            "events.stream.key",
            "1 to 200",
        ),
        (json!({"stream": 3}), "events.stream", ""),
        (json!({"sink": true}), "events", "unknown field"),
    ] {
        let e = Policy::from_value(&json!({"events": events}))
            .unwrap_err()
            .to_string();
        assert!(e.contains(path) && e.contains(says), "{e}");
    }
    for edge in [1u64, 1_000_000_000] {
        Policy::from_value(&json!({"events": {"stream": {"max_len": edge}}})).unwrap();
    }
    let on = Policy::from_value(&json!({"events": {"stream": true, "publish": false}})).unwrap();
    let e = ratewarden::ops::Setup::default()
        .connect(on)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("give a Redis backend"), "{e}");
}
