//! Real Redis servers for tests, started by `scripts/redis_harness.py` on free
//! loopback ports (never 6379) and stopped when the handle drops.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

/// Servers started for one test: a standalone server and, optionally, a 3-master cluster.
pub struct RedisServers {
    /// The harness's JSON description.
    pub info: serde_json::Value,
}

fn harness() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis_harness.py")
}

impl RedisServers {
    /// Starts the servers; panics with the harness's message if Redis is missing.
    pub fn start(cluster: bool) -> Self {
        let mut cmd = Command::new("python3");
        cmd.arg(harness()).arg("start");
        if cluster {
            cmd.arg("--cluster");
        }
        let out = cmd.output().expect("python3 runs the Redis harness");
        assert!(
            out.status.success(),
            "redis harness failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            info: serde_json::from_slice(&out.stdout).expect("harness prints JSON"),
        }
    }

    /// `redis://127.0.0.1:PORT` of the standalone server.
    pub fn url(&self) -> &str {
        self.info["url"].as_str().unwrap()
    }

    /// The standalone server's port.
    pub fn port(&self) -> u16 {
        self.url().rsplit(':').next().unwrap().parse().unwrap()
    }

    /// `redis+cluster://…` naming every cluster master.
    pub fn cluster_url(&self) -> &str {
        self.info["cluster_url"]
            .as_str()
            .expect("started with a cluster")
    }

    /// `host:port` of each cluster master.
    pub fn cluster_nodes(&self) -> Vec<String> {
        self.info["cluster"].as_array().map_or_else(Vec::new, |a| {
            a.iter().map(|v| v.as_str().unwrap().to_owned()).collect()
        })
    }
}

impl Drop for RedisServers {
    fn drop(&mut self) {
        if let Some(dir) = self.info["dir"].as_str() {
            let _ = Command::new("python3")
                .arg(harness())
                .arg("stop")
                .arg(dir)
                .status();
        }
    }
}

/// Runs `redis-cli -p PORT ARGS…` and returns its trimmed output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
