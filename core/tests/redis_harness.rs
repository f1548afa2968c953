//! The test harness the Redis backend's suites stand on: a real standalone
//! server and a real 3-master cluster on free loopback ports, torn down after.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::redis::{RedisServers, cli};

#[test]
fn standalone_and_cluster_come_up_isolated_and_go_away() {
    let servers = RedisServers::start(true);
    let port = servers.port();
    assert_ne!(port, 6379, "never the shared default port");
    assert_eq!(cli(port, &["PING"]), "PONG");
    assert_eq!(cli(port, &["DBSIZE"]), "0", "a fresh, empty server");

    let nodes = servers.cluster_nodes();
    assert_eq!(nodes.len(), 3);
    let ports: Vec<u16> = nodes
        .iter()
        .map(|n| n.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    for p in &ports {
        let info = cli(*p, &["CLUSTER", "INFO"]);
        assert!(
            info.contains("cluster_state:ok") && info.contains("cluster_size:3"),
            "{info}"
        );
    }
    // Keys of one scope tree share a hash tag, hence a slot, hence one node.
    let slot = |k: &str| cli(ports[0], &["CLUSTER", "KEYSLOT", k]);
    assert_eq!(slot("rw:{tenant:acme}:a"), slot("rw:{tenant:acme}:b"));
    assert_ne!(slot("rw:{tenant:acme}:a"), slot("rw:{tenant:zeta}:a"));
    // Each master owns a third of the slots.
    let shards = cli(ports[0], &["CLUSTER", "SHARDS"]);
    assert_eq!(shards.matches("master").count(), 3, "{shards}");

    drop(servers);
    assert_ne!(
        cli(port, &["PING"]),
        "PONG",
        "the standalone server is gone"
    );
    for p in ports {
        assert_ne!(cli(p, &["PING"]), "PONG", "cluster node {p} is gone");
    }
}
