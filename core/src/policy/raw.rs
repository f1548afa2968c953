//! The policy document as written: what serde reads from YAML, JSON or
//! TOML, before any validation (every field optional where the format allows
//! it, so errors come from `build` with a path, not from serde).

#[allow(clippy::wildcard_imports)]
use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    pub(super) version: Option<u32>,
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) units: IndexMap<String, RawUnit>,
    #[serde(default)]
    pub(super) scopes: IndexMap<String, RawScopeKind>,
    #[serde(default)]
    pub(super) resources: IndexMap<String, RawTarget>,
    #[serde(default)]
    pub(super) actions: IndexMap<String, RawTarget>,
    #[serde(default)]
    pub(super) workflows: IndexMap<String, RawWorkflow>,
    #[serde(default)]
    pub(super) webhooks: Vec<RawWebhook>,
    #[serde(default)]
    pub(super) events: Option<RawEvents>,
    #[serde(default)]
    pub(super) audit: Option<RawAudit>,
}

/// `audit:`: where the audit log goes (off when absent).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) file: Option<String>,
    pub(super) stream: Option<RawOutlet>,
}

/// `events:`: where events go besides callbacks and webhooks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvents {
    pub(super) stream: Option<RawOutlet>,
    pub(super) publish: Option<RawOutlet>,
}

/// `events.stream` / `events.publish`: `true`, or its settings.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawOutlet {
    On(bool),
    With(RawOutletWith),
}

/// `events.stream` / `events.publish` settings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutletWith {
    /// The stream's key (`stream`) or the channel (`publish`), under the namespace.
    pub(super) key: Option<String>,
    pub(super) channel: Option<String>,
    /// `stream` only: entries kept, about (`XADD MAXLEN ~`).
    pub(super) max_len: Option<u64>,
    #[serde(default)]
    pub(super) events: Vec<String>,
}

/// `webhooks[i]`: where events are delivered, signed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) url: String,
    pub(super) secret: Option<String>,
    pub(super) secret_env: Option<String>,
    #[serde(default)]
    pub(super) events: Vec<String>,
    pub(super) max_attempts: Option<u32>,
    pub(super) backoff: Option<String>,
    pub(super) timeout: Option<String>,
}

/// `workflows.<name>`: stages and the resources they call.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkflow {
    pub(super) stages: IndexMap<String, RawStage>,
    /// For readers of the policy; accepted, not used.
    #[allow(dead_code)]
    pub(super) description: Option<String>,
}

/// `workflows.<name>.stages.<stage>`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStage {
    pub(super) resource: String,
    #[serde(default)]
    pub(super) after: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) floors: Option<RawFloors>,
    pub(super) promote_after: Option<String>,
    pub(super) lease: Option<String>,
    pub(super) overage: Option<Overage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUnit {
    pub(super) decimals: u8,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScopeKind {
    #[serde(default)]
    pub(super) limits: Vec<RawLimit>,
    pub(super) description: Option<String>,
    /// Which actions (tools) requests by this scope kind may name.
    pub(super) tools: Option<RawTools>,
    /// At most this many admitted requests per scope, ever (a lifetime budget
    /// of requests named `<kind>-steps`): the steps of one agent run.
    pub(super) max_steps: Option<Value>,
}

/// `scopes.<kind>.tools`: an allow list and/or a deny list of actions.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTools {
    pub(super) allow: Option<Vec<String>>,
    #[serde(default)]
    pub(super) deny: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    #[serde(default)]
    pub(super) limits: Vec<RawLimit>,
    pub(super) risk: Option<Value>,
    pub(super) upstream: Option<RawUpstream>,
    /// `pricing:` under a resource: one price list or a list of dated ones.
    pub(super) pricing: Option<Value>,
    /// `shrink:` under a priced resource.
    pub(super) shrink: Option<RawShrink>,
    pub(super) description: Option<String>,
}

/// `upstream:` under a resource: coordinate on the upstream's observed state.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) green: Option<Value>,
    pub(super) red: Option<Value>,
    pub(super) delay: Option<RawDelay>,
    pub(super) pace: Option<String>,
    pub(super) ttl: Option<String>,
    pub(super) breaker: Option<RawBreaker>,
    pub(super) cascade: Option<RawCascade>,
}

/// `cascade:` under a resource's `upstream:`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCascade {
    pub(super) denials: Option<u64>,
    pub(super) within: Option<String>,
    pub(super) cooldown: Option<String>,
}

/// `breaker:` under a resource's `upstream:`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub(super) horizon: Option<String>,
    pub(super) max_tokens: Option<u64>,
    pub(super) fallback: Option<Vec<String>>,
    pub(super) step: Option<String>,
    pub(super) open_for: Option<String>,
    pub(super) probe_lease: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelay {
    pub(super) standard: Option<String>,
    pub(super) background: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawKind {
    Rate,
    Quota,
    Concurrency,
    Budget,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    pub(super) name: String,
    pub(super) kind: RawKind,
    pub(super) limit: Value,
    pub(super) per: Option<String>,
    pub(super) burst: Option<Value>,
    pub(super) unit: Option<String>,
    pub(super) lease: Option<String>,
    pub(super) tz: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) floors: Option<RawFloors>,
    pub(super) overage: Option<Overage>,
    pub(super) overdraft: Option<Value>,
    pub(super) thresholds: Option<Vec<Value>>,
    #[serde(default)]
    pub(super) caps: Vec<RawCapRule>,
    pub(super) description: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFloors {
    pub(super) standard: Option<Value>,
    pub(super) background: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapRule {
    pub(super) when_remaining_below: Value,
    pub(super) delay_ms: Option<u64>,
    pub(super) max_tokens: Option<u64>,
    pub(super) model: Option<String>,
    pub(super) sequential: Option<bool>,
}

/// `shrink:` under a priced resource.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShrink {
    pub(super) min_output_tokens: Option<Value>,
    #[serde(default)]
    pub(super) fallback: Vec<String>,
}
