//! One multiplexed connection to a standalone server or to a whole cluster.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::error::{Error, Result};

/// A standalone connection (reconnecting by itself) or a cluster connection
/// (routing each command to the node owning its keys, following redirections).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Where to connect, read off a URL.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// `redis://…`, `rediss://…`, `valkey://…`, `valkeys://…`, `unix://…`
    Single(String),
    /// `redis+cluster://[auth@]host:port,host:port…` (or `rediss+cluster://`):
    /// one plain URL per seed node.
    Cluster(Vec<String>),
}

/// Parses a backend URL; errors name what is wrong with it.
pub(super) fn target(url: &str) -> Result<Target> {
    let bad = |why: &str| {
        Error::invalid(
            "redis url",
            format!("`{}`: {why}", crate::error::truncate(url)),
        )
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected scheme://host:port"))?;
    let node_scheme = match scheme {
        "redis+cluster" | "valkey+cluster" => "redis",
        "rediss+cluster" | "valkeys+cluster" => "rediss",
        "redis" | "rediss" | "valkey" | "valkeys" | "unix" | "redis+unix" | "valkey+unix" => {
            return Ok(Target::Single(url.to_owned()));
        }
        other => {
            return Err(bad(&format!(
                "unknown scheme `{}` (use redis://, rediss://, redis+cluster:// or rediss+cluster://)",
                crate::error::truncate(other)
            )));
        }
    };
    let (hosts, tail) = rest
        .split_once(['/', '?', '#'])
        .map_or((rest, ""), |(h, _)| (h, &rest[h.len()..]));
    let (auth, hosts) = hosts.rsplit_once('@').map_or(("", hosts), |(a, h)| (a, h));
    let nodes: Vec<String> = hosts
        .split(',')
        .map(|h| {
            if h.is_empty() {
                return Err(bad("an empty node in the list"));
            }
            let at = if auth.is_empty() { "" } else { "@" };
            Ok(format!("{node_scheme}://{auth}{at}{h}{tail}"))
        })
        .collect::<Result<_>>()?;
    Ok(Target::Cluster(nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_server_or_the_seed_nodes_of_a_cluster() {
        assert_eq!(
            target("redis://127.0.0.1:7000/2").unwrap(),
            Target::Single("redis://127.0.0.1:7000/2".into())
        );
        assert_eq!(
            target("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").unwrap(),
            Target::Cluster(vec![
                "redis://127.0.0.1:7000".into(),
                "redis://127.0.0.1:7001".into()
            ])
        );
        assert_eq!(
            target("rediss+cluster://u:p@a:1,b:2/#insecure").unwrap(),
            Target::Cluster(vec![
                "rediss://u:p@a:1/#insecure".into(),
                "rediss://u:p@b:2/#insecure".into()
            ])
        );
        let e = target("http://x").unwrap_err().to_string();
        assert!(e.contains("unknown scheme `http`"), "{e}");
        let e = target("redis+cluster://a:1,,b:2").unwrap_err().to_string();
        assert!(e.contains("empty node"), "{e}");
        assert!(target("localhost:6379").is_err());
    }
}
