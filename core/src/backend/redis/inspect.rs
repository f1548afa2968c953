//! `inspect`: the live state of a scope's keys (or of the whole namespace),
//! read with `SCAN` on every node, for the CLI and for tests.

#[allow(clippy::wildcard_imports)]
use super::*;

/// One key as `inspect` found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// The key without namespace and hash tag: `<scope prefix>#<limit>`,
    /// `<scope>#@grant`, `…#@starve#…`, or `res:<id>` for a reservation record.
    pub key: String,
    /// What it is, read off the stored fields: `rate`, `counter`, `concurrency`,
    /// `grant`, `starvation`, `reservation`.
    pub what: &'static str,
    /// Stored fields other than holds, as `(field, value)`.
    pub fields: Vec<(String, String)>,
    /// Live holds: `(reservation id, amount, expires at µs)`.
    pub holds: Vec<(String, i64, i64)>,
    /// Milliseconds until Redis drops the key (`None`: no expiry).
    pub ttl_ms: Option<i64>,
}

impl RedisBackend {
    /// Reads the live state under a scope prefix (every scope if `None`), without
    /// changing anything: limit states, holds (leases), delegation grants,
    /// starvation trackers and the reservation records of matching scopes.
    /// Uses `SCAN`, so it is safe on a busy server but not a snapshot.
    ///
    /// # Errors
    /// [`Error::Backend`] if the server cannot be read.
    pub async fn inspect(&self, scope: Option<&Scope>) -> Result<Vec<KeyState>> {
        let mut conn = self.conn.clone();
        let ns = &*self.namespace;
        let pattern = match scope {
            Some(s) => {
                let tag = s.prefix(1);
                format!("{ns}:{{{tag}}}:{}*", glob_escape(s.as_str()))
            }
            None => format!("{ns}:*"),
        };
        // A scope tree (and its reservations) lives on its tag's slot: only
        // that node is scanned.
        let on = scope.map(|s| format!("{{{}}}", s.prefix(1)));
        let mut keys: Vec<String> = self
            .scan(&[pattern, format!("{ns}:{{*}}:res:*")], on.as_deref())
            .await?;
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for full in keys {
            let flat: Vec<String> = redis::cmd("HGETALL")
                .arg(&full)
                .query_async(&mut conn)
                .await
                .map_err(backend_err)?;
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&full)
                .query_async(&mut conn)
                .await
                .map_err(backend_err)?;
            let local = full
                .strip_prefix(ns)
                .map_or(full.as_str(), |r| r.trim_start_matches(':'));
            let local = local.split_once("}:").map_or(local, |(_, k)| k).to_owned();
            let mut fields = Vec::new();
            let mut holds = Vec::new();
            for pair in flat.chunks_exact(2) {
                if let Some(id) = pair[0].strip_prefix("h:") {
                    let mut parts = pair[1].split('|');
                    let amount = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    let expires = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    holds.push((id.to_owned(), amount, expires));
                } else {
                    fields.push((pair[0].clone(), pair[1].clone()));
                }
            }
            let has = |f: &str| fields.iter().any(|(k, _)| k == f);
            let what = if local.starts_with("res:") && !local.contains('#') {
                let scope_ok = scope.is_none_or(|s| {
                    fields.iter().any(|(k, v)| {
                        k == "scope"
                            && (v == s.as_str() || v.starts_with(&format!("{}/", s.as_str())))
                    })
                });
                if !scope_ok {
                    continue;
                }
                "reservation"
            } else if local.contains("#@grant") {
                "grant"
            } else if local.contains("#@starve#") {
                "starvation"
            } else if has("d") {
                "rate"
            } else if has("w") {
                "counter"
            } else {
                "concurrency"
            };
            out.push(KeyState {
                key: local,
                what,
                fields,
                holds,
                ttl_ms: (ttl >= 0).then_some(ttl),
            });
        }
        Ok(out)
    }
}

impl RedisBackend {
    /// Every key matching any of `patterns`, with `SCAN` on the server, on the
    /// master owning `on`'s slot, or on every master of the cluster.
    pub(super) async fn scan(&self, patterns: &[String], on: Option<&str>) -> Result<Vec<String>> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let nodes: Vec<Option<(String, u16)>> = match &self.conn {
            Conn::Single(_) => vec![None],
            Conn::Cluster(_) if on.is_some() => vec![None],
            Conn::Cluster(c) => {
                let mut c = c.clone();
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut c)
                    .await
                    .map_err(backend_err)?;
                text.lines()
                    .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("master")))
                    .filter_map(|l| {
                        let addr = l.split(' ').nth(1)?.split('@').next()?;
                        let (host, port) = addr.rsplit_once(':')?;
                        Some(Some((host.to_owned(), port.parse().ok()?)))
                    })
                    .collect()
            }
        };
        let mut keys = Vec::new();
        for node in nodes {
            for pattern in patterns {
                let mut cursor: u64 = 0;
                loop {
                    let mut cmd = redis::cmd("SCAN");
                    cmd.arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(500);
                    let value = match &self.conn {
                        Conn::Single(c) => {
                            let mut c = c.clone();
                            cmd.query_async::<Value>(&mut c).await
                        }
                        Conn::Cluster(c) => {
                            let target = match (&node, on) {
                                (Some((host, port)), _) => SingleNodeRoutingInfo::ByAddress {
                                    host: host.clone(),
                                    port: *port,
                                },
                                (None, key) => SingleNodeRoutingInfo::SpecificNode(
                                    Route::with_key(key.unwrap_or_default(), SlotAddr::Master),
                                ),
                            };
                            c.clone()
                                .route_command(cmd, RoutingInfo::SingleNode(target))
                                .await
                        }
                    }
                    .map_err(backend_err)?;
                    let (next, batch): (u64, Vec<String>) =
                        redis::from_redis_value(value).map_err(backend_err)?;
                    keys.extend(batch);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(keys)
    }
}

/// Escapes `SCAN MATCH` glob metacharacters. Encoded scopes never contain them
/// (ids are percent-encoded); this keeps that true even if the encoding changes.
pub(super) fn glob_escape(s: &str) -> String {
    s.chars().fold(String::with_capacity(s.len()), |mut o, c| {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            o.push('\\');
        }
        o.push(c);
        o
    })
}
