//! Scenario files of `ratewarden simulate --scenario FILE.yaml`: the
//! upstreams (quota, window, header style, secondary limit), the agents
//! (priority, workload, what they call) and workflows (stages, each calling
//! one upstream). Read strictly: an unknown field or a bad value is an error
//! naming its path in the file.

use std::path::Path;
use std::str::FromStr;

use ratewarden::Priority;
use ratewarden::calendar::{MINUTE_US, SECOND_US};
use ratewarden::clock::Micros;
use ratewarden::policy::parse_duration;
use serde::Deserialize;

/// Which provider's rate-limit headers the simulated upstream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// `x-ratelimit-limit` / `-remaining` / `-used` / `-reset` (epoch
    /// seconds) / `-resource`.
    Github,
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as Go
    /// durations (`6m0s`, `1.5s`, `20ms`).
    Openai,
    /// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`,
    /// resets as RFC 3339 times.
    Anthropic,
    /// IETF draft-7: `RateLimit: limit=…, remaining=…, reset=…` and
    /// `RateLimit-Policy: …;w=…`.
    Ietf,
}

impl Style {
    /// The provider, as the table names it.
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Github => "GitHub headers",
            Self::Openai => "OpenAI headers",
            Self::Anthropic => "Anthropic headers",
            Self::Ietf => "IETF RateLimit headers",
        }
    }

    /// The style's name in a scenario file.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Github => "github",
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Ietf => "ietf",
        }
    }
}

/// Hammering a spent quota locks every caller out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secondary {
    /// More than this many over-quota calls in one window trigger it.
    pub after: u32,
    /// For this long.
    pub lockout: Micros,
}

/// One simulated upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    /// Its name (the governed and coordinated policies' resource).
    pub name: String,
    /// Its headers.
    pub style: Style,
    /// Requests per window.
    pub requests: u32,
    /// Tokens per window, if it counts tokens too.
    pub tokens: Option<u64>,
    /// The window's length (windows are aligned to the epoch).
    pub window: Micros,
    /// Its secondary limit, if any.
    pub secondary: Option<Secondary>,
}

impl UpstreamSpec {
    /// Requests per minute, on average.
    #[must_use]
    pub fn per_minute(&self) -> f64 {
        f64::from(self.requests) * MINUTE_US as f64 / self.window as f64
    }
}

/// Extra tasks arriving at once, periodically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Burst {
    /// Every this long (first at `every` after the start).
    pub every: Micros,
    /// This many tasks at once.
    pub tasks: u32,
}

/// One simulated agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Its name.
    pub name: String,
    /// Its tier.
    pub priority: Priority,
    /// The upstreams (indices) each task calls, in order: one, or a
    /// workflow's stages.
    pub route: Vec<usize>,
    /// The workflow (index) its tasks run, if any.
    pub workflow: Option<usize>,
    /// Expected Poisson tasks over the whole run.
    pub tasks: f64,
    /// Tokens each call spends.
    pub tokens_per_call: u64,
    /// Periodic bursts on top, if any.
    pub burst: Option<Burst>,
}

/// A workflow: stages, each calling one upstream.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// Its name.
    pub name: String,
    /// `(stage name, upstream index)`, in order.
    pub stages: Vec<(String, usize)>,
}

/// Everything a run simulates.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name, if it has one (files do).
    pub name: Option<String>,
    /// Simulated minutes.
    pub minutes: u32,
    /// Seed of arrivals and jitter.
    pub seed: u64,
    /// The upstreams.
    pub upstreams: Vec<UpstreamSpec>,
    /// The agents, one entry each.
    pub agents: Vec<AgentSpec>,
    /// The workflows.
    pub workflows: Vec<Workflow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: Option<String>,
    minutes: u32,
    #[serde(default)]
    seed: Option<u64>,
    upstreams: Vec<RawUpstream>,
    agents: Vec<RawAgent>,
    #[serde(default)]
    workflows: Vec<RawWorkflow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    style: Style,
    /// Requests per window.
    quota: u32,
    window: String,
    #[serde(default)]
    tokens: Option<u64>,
    #[serde(default)]
    secondary_limit: Option<RawSecondary>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecondary {
    after: u32,
    lockout: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: String,
    #[serde(default)]
    count: Option<u32>,
    priority: String,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    workflow: Option<String>,
    /// Tasks per minute, each agent.
    #[serde(default)]
    rate: Option<f64>,
    /// The group's tasks as a multiple of its (first) upstream's quota.
    #[serde(default)]
    demand: Option<f64>,
    #[serde(default)]
    tokens: Option<u64>,
    #[serde(default)]
    burst: Option<RawBurst>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBurst {
    every: String,
    tasks: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    stages: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: String,
    upstream: String,
}

/// Most agents a scenario may define.
pub const MAX_AGENTS: usize = 1000;

impl Scenario {
    /// Reads and validates a scenario file.
    ///
    /// # Errors
    /// The file cannot be read, is not YAML of this shape (the message names
    /// the field's path), or its values do not hold together.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and validates a scenario.
    ///
    /// # Errors
    /// As [`Scenario::from_file`], without the file name.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let de = serde_norway::Deserializer::from_str(text);
        let raw: RawScenario = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                format!("{inner}")
            } else {
                format!("at `{path}`: {inner}")
            }
        })?;
        raw.build()
    }
}

fn duration(path: &str, s: &str) -> Result<Micros, String> {
    let d = parse_duration(s).map_err(|e| format!("at `{path}`: {e}"))?;
    if d < SECOND_US {
        return Err(format!("at `{path}`: `{s}` is shorter than one second"));
    }
    Ok(d)
}

impl RawScenario {
    fn build(self) -> Result<Scenario, String> {
        let _ = self.description;
        if !(1..=24 * 60).contains(&self.minutes) {
            return Err(format!(
                "at `minutes`: {} is not between 1 and 1440",
                self.minutes
            ));
        }
        if self.upstreams.is_empty() {
            return Err("at `upstreams`: a scenario needs at least one upstream".into());
        }
        let mut upstreams: Vec<UpstreamSpec> = Vec::new();
        for (i, u) in self.upstreams.into_iter().enumerate() {
            let at = |f: &str| format!("upstreams[{i}].{f}");
            if upstreams.iter().any(|o| o.name == u.name) {
                return Err(format!(
                    "at `{}`: `{}` is defined twice",
                    at("name"),
                    u.name
                ));
            }
            if u.name.is_empty()
                || !u
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                return Err(format!(
                    "at `{}`: `{}` is not a name (letters, digits, `-`, `_`)",
                    at("name"),
                    u.name
                ));
            }
            if u.quota == 0 {
                return Err(format!(
                    "at `{}`: the quota must be at least 1",
                    at("quota")
                ));
            }
            let window = duration(&at("window"), &u.window)?;
            if let Some(t) = u.tokens {
                if t == 0 {
                    return Err(format!(
                        "at `{}`: the token quota must be at least 1",
                        at("tokens")
                    ));
                }
                if matches!(u.style, Style::Github | Style::Ietf) {
                    return Err(format!(
                        "at `{}`: {} announce requests only; a token quota needs style `openai` or `anthropic`",
                        at("tokens"),
                        u.style.describe()
                    ));
                }
            }
            let secondary = match u.secondary_limit {
                None => None,
                Some(s) => Some(Secondary {
                    after: s.after,
                    lockout: duration(&at("secondary_limit.lockout"), &s.lockout)?,
                }),
            };
            upstreams.push(UpstreamSpec {
                name: u.name,
                style: u.style,
                requests: u.quota,
                tokens: u.tokens,
                window,
                secondary,
            });
        }
        let find = |path: &str, name: &str| {
            upstreams
                .iter()
                .position(|u| u.name == name)
                .ok_or_else(|| {
                    format!(
                        "at `{path}`: no upstream named `{name}` (the scenario has {})",
                        upstreams
                            .iter()
                            .map(|u| format!("`{}`", u.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
        };
        let mut workflows: Vec<Workflow> = Vec::new();
        for (i, w) in self.workflows.into_iter().enumerate() {
            if workflows.iter().any(|o| o.name == w.name) {
                return Err(format!(
                    "at `workflows[{i}].name`: `{}` is defined twice",
                    w.name
                ));
            }
            if w.stages.is_empty() {
                return Err(format!(
                    "at `workflows[{i}].stages`: a workflow needs at least one stage"
                ));
            }
            let mut stages = Vec::new();
            for (j, s) in w.stages.into_iter().enumerate() {
                let u = find(&format!("workflows[{i}].stages[{j}].upstream"), &s.upstream)?;
                stages.push((s.name, u));
            }
            workflows.push(Workflow {
                name: w.name,
                stages,
            });
        }
        if self.agents.is_empty() {
            return Err("at `agents`: a scenario needs at least one agent".into());
        }
        let span = f64::from(self.minutes);
        let mut agents = Vec::new();
        for (i, a) in self.agents.into_iter().enumerate() {
            let at = |f: &str| format!("agents[{i}].{f}");
            let priority = Priority::from_str(&a.priority)
                .map_err(|e| format!("at `{}`: {e}", at("priority")))?;
            let (route, workflow) = match (&a.upstream, &a.workflow) {
                (Some(u), None) => (vec![find(&at("upstream"), u)?], None),
                (None, Some(w)) => {
                    let k = workflows.iter().position(|x| &x.name == w).ok_or_else(|| {
                        format!("at `{}`: no workflow named `{w}`", at("workflow"))
                    })?;
                    (workflows[k].stages.iter().map(|s| s.1).collect(), Some(k))
                }
                _ => {
                    return Err(format!(
                        "at `agents[{i}]`: give exactly one of `upstream` (what each task calls) or `workflow` (its stages)"
                    ));
                }
            };
            let count = a.count.unwrap_or(1);
            if count == 0 {
                return Err(format!("at `{}`: must be at least 1", at("count")));
            }
            let per_agent_rate = match (a.rate, a.demand) {
                (Some(r), None) if (0.0..=1e6).contains(&r) => r,
                (None, Some(d)) if d > 0.0 && d <= 100.0 => {
                    d * upstreams[route[0]].per_minute() / f64::from(count)
                }
                (Some(_), None) => {
                    return Err(format!(
                        "at `{}`: tasks per minute must be between 0 and 1000000",
                        at("rate")
                    ));
                }
                (None, Some(_)) => {
                    return Err(format!(
                        "at `{}`: must be above 0 and at most 100",
                        at("demand")
                    ));
                }
                _ => {
                    return Err(format!(
                        "at `agents[{i}]`: give exactly one of `rate` (tasks per minute, each agent) or `demand` (the group's tasks as a multiple of its upstream's quota)"
                    ));
                }
            };
            let burst = match a.burst {
                None => None,
                Some(b) => Some(Burst {
                    every: duration(&at("burst.every"), &b.every)?,
                    tasks: b.tasks,
                }),
            };
            let tokens_per_call = a.tokens.unwrap_or(0);
            for &u in &route {
                if let Some(t) = upstreams[u].tokens {
                    if tokens_per_call > t {
                        return Err(format!(
                            "at `{}`: {tokens_per_call} tokens per call can never fit `{}`'s {t} per window",
                            at("tokens"),
                            upstreams[u].name
                        ));
                    }
                }
            }
            for k in 0..count {
                agents.push(AgentSpec {
                    name: if count == 1 {
                        a.name.clone()
                    } else {
                        format!("{}-{}", a.name, k + 1)
                    },
                    priority,
                    route: route.clone(),
                    workflow,
                    tasks: per_agent_rate * span,
                    tokens_per_call,
                    burst,
                });
            }
            if agents.len() > MAX_AGENTS {
                return Err(format!(
                    "at `{}`: more than {MAX_AGENTS} agents in all",
                    at("count")
                ));
            }
        }
        Ok(Scenario {
            name: Some(self.name),
            minutes: self.minutes,
            seed: self.seed.unwrap_or(7),
            upstreams,
            agents,
            workflows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "name: t\nminutes: 5\nupstreams:\n  - {name: gh, style: github, quota: 60, window: 1m, secondary_limit: {after: 3, lockout: 30s}}\n  - {name: llm, style: openai, quota: 10, window: 10s, tokens: 5000}\nworkflows:\n  - name: triage\n    stages: [{name: fetch, upstream: gh}, {name: think, upstream: llm}]\nagents:\n  - {name: lead, priority: critical, upstream: gh, rate: 6}\n  - {name: bot, count: 3, priority: p2, workflow: triage, demand: 1.5, tokens: 400, burst: {every: 1m, tasks: 4}}\n";

    #[test]
    fn a_scenario_reads_into_agents_and_routes() {
        let s = Scenario::from_yaml(OK).map_err(|e| panic!("{e}")).ok();
        let Some(s) = s else { return };
        assert_eq!(s.agents.len(), 4);
        assert_eq!(s.agents[1].name, "bot-1");
        assert_eq!(s.agents[1].route, vec![0, 1]);
        assert_eq!(s.agents[1].priority, Priority::Background);
        // 1.5 × 60/min over three agents, for five minutes.
        assert!((s.agents[1].tasks - 150.0).abs() < 1e-9);
        assert_eq!(s.upstreams[1].window, 10 * SECOND_US);
        assert_eq!(
            s.upstreams[0].secondary,
            Some(Secondary {
                after: 3,
                lockout: 30 * SECOND_US
            })
        );
    }

    #[test]
    fn errors_name_the_path() {
        for (from, to, needle) in [
            (
                "rate: 6}",
                "rate: 6, colour: red}",
                "agents[0]: unknown field `colour`",
            ),
            ("window: 10s", "window: 10", "upstreams[1].window"),
            (
                "upstream: gh, rate",
                "upstream: gitlab, rate",
                "agents[0].upstream`: no upstream named `gitlab`",
            ),
            ("style: openai", "style: azure", "upstreams[1].style"),
            ("priority: p2", "priority: urgent", "agents[1].priority"),
            ("rate: 6}", "rate: 6, demand: 1}", "exactly one of `rate`"),
            ("tokens: 400", "tokens: 6000", "never fit `llm`"),
            (
                "style: github, quota: 60",
                "style: github, quota: 60, tokens: 9",
                "style `openai` or `anthropic`",
            ),
        ] {
            assert!(OK.contains(from), "{from}");
            let err = Scenario::from_yaml(&OK.replacen(from, to, 1))
                .err()
                .unwrap_or_default();
            assert!(err.contains(needle), "{to}: {err}");
        }
    }
}
