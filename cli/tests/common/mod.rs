//! Helpers the binary's tests share: the binary, throwaway Redis servers
//! (through `scripts/redis_harness.py`, never 6379) and policy files.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::process::Command;

/// The `ratewarden` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ratewarden"))
}

/// The repository's root.
pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Starts throwaway Redis servers through the shared harness; stops them on drop.
pub struct Redis(pub serde_json::Value);

impl Redis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A standalone server and a 3-master cluster; [`Redis::url`] names the cluster.
    pub fn start_cluster() -> Self {
        Self::start_naming(&["--cluster"], "cluster_url")
    }

    /// A standalone server and a TLS-only one; [`Redis::url`] names the TLS one
    /// (`rediss://`), `self.0["tls_ca"]` its CA certificate.
    pub fn start_tls() -> Self {
        Self::start_naming(&["--tls"], "tls_url")
    }

    fn start_naming(args: &[&str], url: &str) -> Self {
        let mut r = Self::start_with(args);
        r.0["url"] = r.0[url].clone();
        r
    }

    pub fn start_with(args: &[&str]) -> Self {
        let out = Command::new("python3")
            .arg(root().join("scripts/redis_harness.py"))
            .arg("start")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn url(&self) -> &str {
        self.0["url"].as_str().unwrap()
    }

    /// `redis-cli -p PORT ARGS…`, trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        let port = self.url().rsplit(':').next().unwrap();
        let out = Command::new("redis-cli")
            .args(["-p", port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .arg(root().join("scripts/redis_harness.py"))
            .arg("stop")
            .arg(self.0["dir"].as_str().unwrap())
            .status();
    }
}

/// A policy file in its own temporary directory, removed on drop.
pub struct PolicyFile(pub std::path::PathBuf);

impl PolicyFile {
    pub fn new(tag: &str, yaml: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rw-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("policy.yaml"), yaml).unwrap();
        Self(dir)
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
