//! Building a [`Policy`] from its raw document: every field validated, every
//! error naming the source, the path inside the document and the problem;
//! amounts converted to base units once.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) struct Ctx<'a> {
    pub(super) source: &'a str,
}

impl Ctx<'_> {
    pub(super) fn err(&self, path: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Policy {
            source_name: self.source.to_owned(),
            path: path.into(),
            message: message.into(),
        }
    }
}

pub(super) fn build_floors(
    ctx: &Ctx<'_>,
    path: &str,
    raw: Option<&RawFloors>,
    base: Floors,
) -> Result<Floors> {
    let Some(raw) = raw else { return Ok(base) };
    let mut f = base;
    if let Some(v) = &raw.standard {
        f.standard = parse_permille(v).map_err(|m| ctx.err(format!("{path}.standard"), m))?;
    }
    if let Some(v) = &raw.background {
        f.background = parse_permille(v).map_err(|m| ctx.err(format!("{path}.background"), m))?;
    }
    if f.standard > f.background {
        return Err(ctx.err(
            path,
            format!(
                "standard floor ({}) is above background floor ({}); higher tiers must not keep less headroom",
                fmt_permille(f.standard),
                fmt_permille(f.background)
            ),
        ));
    }
    if f.background >= 1000 {
        return Err(ctx.err(
            format!("{path}.background"),
            "a 100% floor would deny every background call",
        ));
    }
    Ok(f)
}

pub(super) fn build(ctx: &Ctx<'_>, raw: RawPolicy) -> Result<Policy> {
    if let Some(v) = raw.version {
        if v != 1 {
            return Err(ctx.err(
                "version",
                format!("unsupported version {v}; this ratewarden reads version 1"),
            ));
        }
    }
    let floors = build_floors(
        ctx,
        "defaults.floors",
        raw.defaults.floors.as_ref(),
        Floors::default(),
    )?;
    let dur = |path: &str, v: &Option<String>, default: Micros| -> Result<Micros> {
        match v {
            None => Ok(default),
            Some(s) => {
                let d = parse_duration(s).map_err(|m| ctx.err(path, m))?;
                if d <= 0 {
                    return Err(ctx.err(path, "must be longer than zero"));
                }
                Ok(d)
            }
        }
    };
    let defaults = Defaults {
        floors,
        promote_after: dur(
            "defaults.promote_after",
            &raw.defaults.promote_after,
            5 * MINUTE_US,
        )?,
        lease: dur("defaults.lease", &raw.defaults.lease, 30 * SECOND_US)?,
        overage: match raw.defaults.overage {
            Some(Overage::AllowWithOverdraft) => {
                return Err(ctx.err(
                    "defaults.overage",
                    "`allow_with_overdraft` is set per limit, with its `overdraft`",
                ));
            }
            o => o.unwrap_or_default(),
        },
    };

    let mut units: Map<UnitDef> = BUILTIN_UNITS
        .iter()
        .map(|&(n, d)| {
            (
                n.to_owned(),
                UnitDef {
                    name: n.to_owned(),
                    decimals: d,
                },
            )
        })
        .collect();
    for (name, u) in &raw.units {
        if !valid_unit(name) {
            return Err(ctx.err(
                format!("units.{name}"),
                "unit names are lowercase words: a-z, 0-9, `_`",
            ));
        }
        if u.decimals > 9 {
            return Err(ctx.err(format!("units.{name}.decimals"), "at most 9 decimals"));
        }
        units.insert(
            name.clone(),
            UnitDef {
                name: name.clone(),
                decimals: u.decimals,
            },
        );
    }

    let mut by_name: HashMap<String, Arc<LimitDef>> = HashMap::new();
    let mut scopes = Map::default();
    let mut tool_lists: Vec<(String, RawTools)> = Vec::new();
    for (kind, sk) in raw.scopes {
        let path = format!("scopes.{kind}");
        if crate::scope::Scope::from_segments([(kind.as_str(), "x")]).is_err() {
            return Err(ctx.err(&path, format!("`{kind}` is not a valid scope kind (a-z, 0-9, `_`, `-`, starting with a letter)")));
        }
        let _ = sk.description;
        if let Some(t) = sk.tools {
            tool_lists.push((kind.clone(), t));
        }
        let mut raw_limits = sk.limits;
        let own = raw_limits.len();
        if let Some(steps) = sk.max_steps {
            // Sugar for a lifetime quota of admitted requests.
            let name = format!("{kind}-steps");
            let v = serde_json::json!({"name": name, "kind": "budget", "unit": "requests", "limit": steps, "per": "lifetime"});
            let rl: RawLimit = serde_json::from_value(v).map_err(|e| {
                ctx.err(
                    format!("{path}.max_steps"),
                    format!("expected a number of steps: {e}"),
                )
            })?;
            raw_limits.push(rl);
        }
        let mut limits = Vec::new();
        for (i, rl) in raw_limits.into_iter().enumerate() {
            let lpath = if i < own {
                format!("{path}.limits[{i}]")
            } else {
                format!("{path}.max_steps")
            };
            if rl.scope.is_some() {
                return Err(ctx.err(format!("{lpath}.scope"), "`scope` is only for resource and action limits; scope limits count per their own scope kind"));
            }
            let def = build_limit(
                ctx,
                &lpath,
                rl,
                &defaults,
                &mut units,
                Attach::Scope(kind.clone()),
                None,
            )?;
            limits.push(register(ctx, &lpath, def, &mut by_name)?);
        }
        scopes.insert(kind, limits);
    }
    let targets = |raws: IndexMap<String, RawTarget>,
                   section: &str,
                   units: &mut Map<UnitDef>,
                   by_name: &mut HashMap<String, Arc<LimitDef>>|
     -> Result<Map<Target>> {
        let mut out = Map::default();
        for (name, rt) in raws {
            let path = format!("{section}.{name}");
            if !valid_name(&name, &[':', '/']) {
                return Err(ctx.err(
                    &path,
                    format!(
                        "`{name}` is not a valid {} name (1-64 of a-z A-Z 0-9 `_ - . : /`)",
                        &section[..section.len() - 1]
                    ),
                ));
            }
            let owner = if section == "resources" {
                Owner::Resource(name.clone())
            } else {
                Owner::Action(name.clone())
            };
            let risk = match &rt.risk {
                None => 0,
                Some(v) => {
                    if section == "resources" {
                        return Err(
                            ctx.err(format!("{path}.risk"), "risk points belong to actions")
                        );
                    }
                    let d = units.get("risk").map_or(0, |u| u.decimals);
                    parse_amount(v, "risk", d).map_err(|m| ctx.err(format!("{path}.risk"), m))?
                }
            };
            let upstream = match rt.upstream {
                None => None,
                Some(_) if section != "resources" => {
                    return Err(ctx.err(
                        format!("{path}.upstream"),
                        "an upstream belongs to a resource, not an action",
                    ));
                }
                Some(u) => Some(build_upstream(ctx, &format!("{path}.upstream"), u)?),
            };
            let pricing = match &rt.pricing {
                None => None,
                Some(_) if section != "resources" => {
                    return Err(ctx.err(
                        format!("{path}.pricing"),
                        "pricing belongs to a resource, not an action",
                    ));
                }
                Some(v) => Some(Arc::new(build_pricing(
                    ctx,
                    &format!("{path}.pricing"),
                    v,
                    units,
                )?)),
            };
            let shrink = match &rt.shrink {
                None => None,
                Some(_) if pricing.is_none() => {
                    return Err(ctx.err(
                        format!("{path}.shrink"),
                        "shrinking a request to its budget needs the resource's `pricing:`",
                    ));
                }
                Some(raw) => {
                    let spath = format!("{path}.shrink.min_output_tokens");
                    let min = match &raw.min_output_tokens {
                        None => 1,
                        Some(Value::Number(n)) => n
                            .as_u64()
                            .filter(|m| (1..=MAX_AMOUNT.unsigned_abs()).contains(m))
                            .ok_or_else(|| {
                                ctx.err(
                                    &spath,
                                    format!("{n} is not a whole number of tokens from 1 to 2^53-1"),
                                )
                            })?,
                        Some(other) => {
                            return Err(ctx.err(
                                &spath,
                                format!("expected a number of tokens, found {}", kind_of(other)),
                            ));
                        }
                    };
                    Some(crate::pricing::Shrink {
                        min_output_tokens: min,
                        fallback: raw.fallback.iter().map(|f| Arc::from(f.as_str())).collect(),
                    })
                }
            };
            let mut limits = Vec::new();
            for (i, rl) in rt.limits.into_iter().enumerate() {
                let lpath = format!("{path}.limits[{i}]");
                let attach = match &rl.scope {
                    None => Attach::Pool,
                    Some(k) => {
                        if !scopes.contains_key(k) {
                            return Err(ctx.err(format!("{lpath}.scope"), format!("scope kind `{k}` is not declared under `scopes` (declared: {})", scopes.keys().cloned().collect::<Vec<_>>().join(", "))));
                        }
                        Attach::PerScope(k.clone())
                    }
                };
                let def = build_limit(
                    ctx,
                    &lpath,
                    rl,
                    &defaults,
                    units,
                    attach,
                    Some(owner.clone()),
                )?;
                limits.push(register(ctx, &lpath, def, by_name)?);
            }
            out.insert(
                name,
                Target {
                    limits,
                    risk,
                    upstream,
                    pricing,
                    shrink,
                    description: rt.description,
                    stages_before: Vec::new(),
                },
            );
        }
        Ok(out)
    };
    let mut resources = targets(raw.resources, "resources", &mut units, &mut by_name)?;
    check_fallbacks(ctx, &resources)?;
    let actions = targets(raw.actions, "actions", &mut units, &mut by_name)?;
    build_workflows(ctx, raw.workflows, &mut resources)?;
    let mut all: Vec<Arc<LimitDef>> = by_name.values().cloned().collect();
    all.sort_by_key(|d| d.id);
    let webhooks = build_webhooks(ctx, raw.webhooks)?;
    let outlets = build_outlets(ctx, raw.events)?;
    let audit = build_audit(ctx, raw.audit)?;
    let tools = build_tools(ctx, tool_lists, &actions)?;
    Ok(Policy {
        source: ctx.source.to_owned(),
        defaults,
        units,
        scopes,
        resources,
        actions,
        by_name,
        all,
        retired: HashMap::new(),
        serial_base: 0,
        webhooks,
        outlets,
        audit,
        tools,
    })
}

/// `scopes.<kind>.tools`: each name a declared action.
fn build_tools(
    ctx: &Ctx<'_>,
    lists: Vec<(String, RawTools)>,
    actions: &super::Map<Target>,
) -> Result<super::Map<super::Tools>> {
    let mut out = super::Map::default();
    for (kind, raw) in lists {
        for (list, names) in [
            ("allow", raw.allow.as_deref().unwrap_or_default()),
            ("deny", &raw.deny[..]),
        ] {
            for (i, n) in names.iter().enumerate() {
                if super::lookup(actions, n).is_none() {
                    return Err(ctx.err(
                        format!("scopes.{kind}.tools.{list}[{i}]"),
                        format!(
                            "`{}` is no action of the policy (declared: {})",
                            crate::error::truncate(n),
                            actions
                                .keys()
                                .map(String::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        out.insert(
            kind,
            super::Tools {
                allow: raw.allow,
                deny: raw.deny,
            },
        );
    }
    Ok(out)
}

/// Validates `audit:` (a JSON-lines file and/or a Redis Stream).
fn build_audit(ctx: &Ctx<'_>, raw: Option<RawAudit>) -> Result<crate::audit::Sinks> {
    let Some(raw) = raw else {
        return Ok(crate::audit::Sinks::default());
    };
    let file = match raw.file {
        None => None,
        Some(f) if f.is_empty() || f.contains('\0') => {
            return Err(ctx.err("audit.file", "expected a file path"));
        }
        Some(f) => Some(std::path::PathBuf::from(f)),
    };
    let stream = match raw.stream {
        None | Some(RawOutlet::On(false)) => None,
        Some(RawOutlet::On(true)) => Some((
            crate::audit::DEFAULT_STREAM.to_owned(),
            crate::sink::DEFAULT_MAX_LEN,
        )),
        Some(RawOutlet::With(w)) => {
            if w.channel.is_some() || !w.events.is_empty() {
                let field = if w.channel.is_some() {
                    "channel"
                } else {
                    "events"
                };
                return Err(ctx.err(
                    format!("audit.stream.{field}"),
                    "the audit stream has a `key` and a `max_len` only",
                ));
            }
            let key = w
                .key
                .unwrap_or_else(|| crate::audit::DEFAULT_STREAM.to_owned());
            if key.is_empty() || key.len() > 200 || key.chars().any(char::is_control) {
                return Err(ctx.err(
                    "audit.stream.key",
                    "expected a name of 1 to 200 printable characters",
                ));
            }
            let max_len = w.max_len.unwrap_or(crate::sink::DEFAULT_MAX_LEN);
            if !(1..=1_000_000_000).contains(&max_len) {
                return Err(ctx.err(
                    "audit.stream.max_len",
                    format!("{max_len} is not from 1 to 1000000000 entries"),
                ));
            }
            Some((key, max_len))
        }
    };
    if file.is_none() && stream.is_none() {
        return Err(ctx.err(
            "audit",
            "give a `file` (JSON lines) or a `stream` (Redis), or leave `audit:` out",
        ));
    }
    Ok(crate::audit::Sinks { file, stream })
}

/// Validates `events:` (Redis Streams and pub/sub outlets).
fn build_outlets(ctx: &Ctx<'_>, raw: Option<RawEvents>) -> Result<crate::sink::Outlets> {
    use crate::sink::{Outlet, Outlets};
    let Some(raw) = raw else {
        return Ok(Outlets::default());
    };
    let one = |raw: Option<RawOutlet>, field: &str| -> Result<Option<Outlet>> {
        let path = format!("events.{field}");
        let with = match raw {
            None | Some(RawOutlet::On(false)) => return Ok(None),
            Some(RawOutlet::On(true)) => RawOutletWith::default(),
            Some(RawOutlet::With(w)) => w,
        };
        let stream = field == "stream";
        let (name, wrong) = if stream {
            (with.key, with.channel.is_some().then_some("channel"))
        } else {
            (
                with.channel,
                with.key
                    .is_some()
                    .then_some("key")
                    .or(with.max_len.is_some().then_some("max_len")),
            )
        };
        if let Some(wrong) = wrong {
            return Err(ctx.err(
                format!("{path}.{wrong}"),
                if stream {
                    "a stream has a `key`, not a `channel`"
                } else {
                    "pub/sub has a `channel` (and no `key` or `max_len`)"
                },
            ));
        }
        let name = name.unwrap_or_else(|| {
            if stream {
                crate::sink::DEFAULT_STREAM.to_owned()
            } else {
                crate::sink::DEFAULT_CHANNEL.to_owned()
            }
        });
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(ctx.err(
                format!("{path}.{}", if stream { "key" } else { "channel" }),
                "expected a name of 1 to 200 printable characters",
            ));
        }
        let max_len = with.max_len.unwrap_or(crate::sink::DEFAULT_MAX_LEN);
        if stream && !(1..=1_000_000_000).contains(&max_len) {
            return Err(ctx.err(
                format!("{path}.max_len"),
                format!("{max_len} is not from 1 to 1000000000 entries"),
            ));
        }
        Ok(Some(Outlet {
            name,
            max_len,
            events: event_filter(ctx, &path, with.events)?,
        }))
    };
    Ok(Outlets {
        stream: one(raw.stream, "stream")?,
        publish: one(raw.publish, "publish")?,
    })
}

/// `resources.<r>.shrink.fallback`: each a priced resource, other than `r`,
/// named once.
fn check_fallbacks(ctx: &Ctx<'_>, resources: &super::Map<Target>) -> Result<()> {
    for (name, t) in resources {
        let Some(shrink) = &t.shrink else { continue };
        for (i, f) in shrink.fallback.iter().enumerate() {
            let path = format!("resources.{name}.shrink.fallback[{i}]");
            let why = if **f == **name {
                Some("is the resource itself".to_owned())
            } else if shrink.fallback[..i].contains(f) {
                Some("is named twice".to_owned())
            } else {
                match super::lookup(resources, f) {
                    None => Some(format!(
                        "is no resource of the policy (known: {})",
                        resources
                            .keys()
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    Some(r) if r.pricing.is_none() => {
                        Some("has no `pricing:` to price the usage with".to_owned())
                    }
                    Some(_) => None,
                }
            };
            if let Some(why) = why {
                return Err(ctx.err(path, format!("`{}` {why}", crate::error::truncate(f))));
            }
        }
    }
    Ok(())
}

/// `<path>.events`: event types and prefixes, each known.
fn event_filter(ctx: &Ctx<'_>, path: &str, types: Vec<String>) -> Result<crate::events::Filter> {
    crate::events::Filter::new(types).map_err(|e| match e {
        Error::InvalidArgument { message, .. } => {
            // `events[i]: …` → the path's `events[i]`.
            let (field, why) = message.split_once(": ").unwrap_or(("events", &message));
            ctx.err(format!("{path}.{field}"), why.to_owned())
        }
        other => other,
    })
}

/// Validates `webhooks:`; a `secret_env` is read now, so a missing variable
/// fails when the policy loads, not at the first event.
fn build_webhooks(
    ctx: &Ctx<'_>,
    raw: Vec<RawWebhook>,
) -> Result<Vec<Arc<crate::webhook::Endpoint>>> {
    use crate::webhook::{Endpoint, Secret};
    let mut out = Vec::with_capacity(raw.len());
    for (i, w) in raw.into_iter().enumerate() {
        let path = format!("webhooks[{i}]");
        let secret_text = match (&w.secret, &w.secret_env) {
            (Some(s), None) => s.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                ctx.err(
                    format!("{path}.secret_env"),
                    format!("the environment variable `{var}` is not set"),
                )
            })?,
            _ => {
                return Err(ctx.err(
                    &path,
                    "give exactly one of `secret` (whsec_…) or `secret_env` (a variable holding it)",
                ));
            }
        };
        let secret = Secret::parse(&secret_text).map_err(|e| {
            let field = if w.secret.is_some() {
                "secret"
            } else {
                "secret_env"
            };
            ctx.err(format!("{path}.{field}"), e.to_string())
        })?;
        let events = event_filter(ctx, &path, w.events)?;
        let dur = |v: &Option<String>,
                   field: &str,
                   default: Micros|
         -> Result<std::time::Duration> {
            let us = match v {
                None => default,
                Some(s) => parse_duration(s).map_err(|m| ctx.err(format!("{path}.{field}"), m))?,
            };
            Ok(std::time::Duration::from_micros(us.unsigned_abs()))
        };
        let endpoint = Endpoint::new(
            &w.url,
            secret,
            events,
            w.max_attempts.unwrap_or(8),
            dur(&w.backoff, "backoff", SECOND_US)?,
            dur(&w.timeout, "timeout", 10 * SECOND_US)?,
        )
        .map_err(|e| match e {
            Error::InvalidArgument { what, message } => ctx.err(format!("{path}.{what}"), message),
            other => other,
        })?;
        out.push(Arc::new(endpoint));
    }
    Ok(out)
}

/// Most stages a workflow may have.
pub const MAX_STAGES: usize = 64;

/// Validates `workflows:` and gives every resource the stages before the
/// stages that call it ([`Target::stages_before`]).
fn build_workflows(
    ctx: &Ctx<'_>,
    raw: IndexMap<String, RawWorkflow>,
    resources: &mut Map<Target>,
) -> Result<()> {
    for (wname, wf) in raw {
        let path = format!("workflows.{wname}");
        if !valid_name(&wname, &[]) {
            return Err(ctx.err(
                &path,
                format!("`{wname}` is not a valid workflow name (1-64 of a-z A-Z 0-9 `_ - .`)"),
            ));
        }
        if wf.stages.is_empty() || wf.stages.len() > MAX_STAGES {
            return Err(ctx.err(
                format!("{path}.stages"),
                format!(
                    "a workflow has 1 to {MAX_STAGES} stages, not {}",
                    wf.stages.len()
                ),
            ));
        }
        let names: Vec<&str> = wf.stages.keys().map(String::as_str).collect();
        // Direct predecessors by index, every reference checked.
        let mut before: Vec<Vec<usize>> = Vec::with_capacity(names.len());
        for (sname, st) in &wf.stages {
            let spath = format!("{path}.stages.{sname}");
            if !valid_name(sname, &[]) {
                return Err(ctx.err(
                    &spath,
                    format!("`{sname}` is not a valid stage name (1-64 of a-z A-Z 0-9 `_ - .`)"),
                ));
            }
            if !resources.contains_key(&st.resource) {
                return Err(ctx.err(
                    format!("{spath}.resource"),
                    format!(
                        "resource `{}` is not declared under `resources` (declared: {})",
                        st.resource,
                        resources.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            let mut direct = Vec::new();
            for (i, a) in st.after.iter().enumerate() {
                let Some(j) = names.iter().position(|n| n == a) else {
                    return Err(ctx.err(
                        format!("{spath}.after[{i}]"),
                        format!(
                            "stage `{a}` is not a stage of workflow `{wname}` (stages: {})",
                            names.join(", ")
                        ),
                    ));
                };
                if names[j] == sname {
                    return Err(ctx.err(
                        format!("{spath}.after[{i}]"),
                        "a stage cannot come after itself",
                    ));
                }
                direct.push(j);
            }
            before.push(direct);
        }
        // Every stage's ancestors (a cycle is an error naming one stage on it).
        let n = names.len();
        let mut ancestors: Vec<Option<Vec<bool>>> = vec![None; n];
        for s in 0..n {
            let mut seen = vec![false; n];
            let mut stack: Vec<usize> = before[s].clone();
            while let Some(a) = stack.pop() {
                if a == s {
                    return Err(ctx.err(
                        format!("{path}.stages.{}.after", names[s]),
                        format!(
                            "stage `{}` comes after itself through its `after` chain (a cycle)",
                            names[s]
                        ),
                    ));
                }
                if !seen[a] {
                    seen[a] = true;
                    stack.extend(&before[a]);
                }
            }
            ancestors[s] = Some(seen);
        }
        let has_successor: Vec<bool> = (0..n)
            .map(|s| before.iter().any(|b| b.contains(&s)))
            .collect();
        for (s, (sname, st)) in wf.stages.iter().enumerate() {
            if has_successor[s] {
                let coordinated = resources
                    .get(&st.resource)
                    .is_some_and(|t| t.upstream.is_some());
                if !coordinated {
                    return Err(ctx.err(
                        format!("{path}.stages.{sname}.resource"),
                        format!(
                            "stage `{sname}` has stages after it, so its resource `{}` must coordinate on its upstream (`upstream:` under the resource): backpressure comes from that observed state",
                            st.resource
                        ),
                    ));
                }
            }
        }
        for (s, st) in wf.stages.values().enumerate() {
            let Some(seen) = &ancestors[s] else { continue };
            let mut refs: Vec<StageRef> = seen
                .iter()
                .enumerate()
                .filter(|(_, a)| **a)
                .map(|(a, _)| StageRef {
                    name: format!("{wname}/{}", names[a]).into_boxed_str(),
                    resource: wf.stages[a].resource.clone().into_boxed_str(),
                })
                .collect();
            if let Some(t) = resources.get_mut(&st.resource) {
                refs.retain(|r| !t.stages_before.contains(r));
                t.stages_before.extend(refs);
            }
        }
        // (`description` is for readers of the policy.)
    }
    Ok(())
}

pub(super) fn register(
    ctx: &Ctx<'_>,
    path: &str,
    def: LimitDef,
    by_name: &mut HashMap<String, Arc<LimitDef>>,
) -> Result<Arc<LimitDef>> {
    if by_name.contains_key(&def.name) {
        return Err(ctx.err(
            format!("{path}.name"),
            format!(
                "limit name `{}` is used twice; names must be unique in a policy",
                def.name
            ),
        ));
    }
    let mut def = def;
    def.id = u32::try_from(by_name.len()).unwrap_or(u32::MAX);
    let def = Arc::new(def);
    by_name.insert(def.name.clone(), Arc::clone(&def));
    Ok(def)
}

#[allow(clippy::too_many_lines)]
pub(super) fn build_limit(
    ctx: &Ctx<'_>,
    path: &str,
    rl: RawLimit,
    defaults: &Defaults,
    units: &mut Map<UnitDef>,
    attach: Attach,
    owner: Option<Owner>,
) -> Result<LimitDef> {
    if !valid_name(&rl.name, &[]) {
        return Err(ctx.err(
            format!("{path}.name"),
            format!(
                "`{}` is not a valid limit name (1-64 of a-z A-Z 0-9 `_ - .`)",
                rl.name
            ),
        ));
    }
    let unit = rl.unit.clone().unwrap_or_else(|| "requests".to_owned());
    if !valid_unit(&unit) {
        return Err(ctx.err(
            format!("{path}.unit"),
            format!("`{unit}` is not a valid unit name (lowercase a-z, 0-9, `_`)"),
        ));
    }
    let decimals = units
        .entry(unit.clone())
        .or_insert_with(|| UnitDef {
            name: unit.clone(),
            decimals: 0,
        })
        .decimals;
    let limit = parse_amount(&rl.limit, &unit, decimals)
        .map_err(|m| ctx.err(format!("{path}.limit"), m))?;
    if limit == 0 {
        return Err(ctx.err(format!("{path}.limit"), "must be greater than zero"));
    }
    let only = |field: &str, present: bool, kinds: &str| -> Result<()> {
        if present {
            Err(ctx.err(
                format!("{path}.{field}"),
                format!("`{field}` only applies to {kinds} limits"),
            ))
        } else {
            Ok(())
        }
    };
    let tz = match &rl.tz {
        None => 0,
        Some(s) => parse_tz(s).map_err(|m| ctx.err(format!("{path}.tz"), m))?,
    };
    let kind = match rl.kind {
        RawKind::Rate => {
            only("tz", rl.tz.is_some(), "quota and budget")?;
            only("lease", rl.lease.is_some(), "concurrency")?;
            let per = rl
                .per
                .as_deref()
                .ok_or_else(|| ctx.err(path, "a rate limit needs `per` (e.g. `1s`, `1m`, `1h`)"))?;
            let period = match per {
                "second" => SECOND_US,
                "minute" => MINUTE_US,
                "hour" => HOUR_US,
                "day" => DAY_US,
                other => parse_duration(other).map_err(|m| {
                    ctx.err(
                        format!("{path}.per"),
                        format!("{m}; rate periods are fixed durations"),
                    )
                })?,
            };
            if period <= 0 {
                return Err(ctx.err(format!("{path}.per"), "must be longer than zero"));
            }
            let burst = match &rl.burst {
                None => limit,
                Some(v) => parse_amount(v, &unit, decimals)
                    .map_err(|m| ctx.err(format!("{path}.burst"), m))?,
            };
            if burst == 0 {
                return Err(ctx.err(format!("{path}.burst"), "must be greater than zero"));
            }
            let g = gcd(period, limit);
            let (p, l) = (period / g, limit / g);
            if i128::from(burst) * i128::from(p) > i128::from(MAX_AMOUNT) {
                return Err(ctx.err(
                    path,
                    format!(
                        "{} per {} with burst {} cannot be tracked exactly (burst × period/gcd exceeds 2^53); use a coarser unit or a quota",
                        format_base(limit, decimals), per, format_base(burst, decimals)
                    ),
                ));
            }
            LimitKind::Rate(RateSpec {
                period,
                burst,
                p,
                l,
            })
        }
        RawKind::Quota | RawKind::Budget => {
            let budget = rl.kind == RawKind::Budget;
            only("burst", rl.burst.is_some(), "rate")?;
            only("lease", rl.lease.is_some(), "concurrency")?;
            let w = parse_window(rl.per.as_deref(), tz, budget)
                .map_err(|m| ctx.err(format!("{path}.per"), m))?;
            if budget {
                LimitKind::Budget(w)
            } else {
                LimitKind::Quota(w)
            }
        }
        RawKind::Concurrency => {
            only("burst", rl.burst.is_some(), "rate")?;
            only("per", rl.per.is_some(), "rate, quota and budget")?;
            only("tz", rl.tz.is_some(), "quota and budget")?;
            LimitKind::Concurrency
        }
    };
    let lease = match &rl.lease {
        None => defaults.lease,
        Some(s) => {
            let d = parse_duration(s).map_err(|m| ctx.err(format!("{path}.lease"), m))?;
            if d <= 0 {
                return Err(ctx.err(format!("{path}.lease"), "must be longer than zero"));
            }
            d
        }
    };
    let floors = build_floors(
        ctx,
        &format!("{path}.floors"),
        rl.floors.as_ref(),
        defaults.floors,
    )?;
    let mut caps = Vec::new();
    for (i, c) in rl.caps.into_iter().enumerate() {
        let cpath = format!("{path}.caps[{i}]");
        let below = parse_permille(&c.when_remaining_below)
            .map_err(|m| ctx.err(format!("{cpath}.when_remaining_below"), m))?;
        let caps_v = crate::decision::Caps {
            delay_ms: c.delay_ms,
            max_tokens: c.max_tokens,
            model: c.model.map(std::sync::Arc::from),
            sequential: c.sequential.unwrap_or(false),
            backpressure: crate::decision::Backpressure::default(),
        };
        if caps_v.is_empty() {
            return Err(ctx.err(
                &cpath,
                "a caps rule needs at least one of delay_ms, max_tokens, model, sequential",
            ));
        }
        caps.push(CapRule {
            below,
            caps: caps_v,
        });
    }
    let counts = matches!(kind, LimitKind::Quota(_) | LimitKind::Budget(_));
    let overage = match rl.overage {
        Some(o) => o,
        // The default `allow_if_available` is for the limits it applies to.
        None if !counts && defaults.overage == Overage::AllowIfAvailable => Overage::Charge,
        None => defaults.overage,
    };
    if matches!(
        overage,
        Overage::AllowIfAvailable | Overage::AllowWithOverdraft
    ) && !counts
    {
        return Err(ctx.err(
            format!("{path}.overage"),
            format!(
                "`{}` applies to quotas and budgets (a {} limit has no spend to go into debt)",
                overage.name(),
                kind.name()
            ),
        ));
    }
    let overdraft = match (&rl.overdraft, overage) {
        (None, Overage::AllowWithOverdraft) => {
            return Err(ctx.err(
                format!("{path}.overdraft"),
                "`allow_with_overdraft` needs `overdraft`: the most debt a commit may leave",
            ));
        }
        (None, _) => 0,
        (Some(_), o) if o != Overage::AllowWithOverdraft => {
            return Err(ctx.err(
                format!("{path}.overdraft"),
                format!(
                    "`overdraft` goes with `overage: allow_with_overdraft` (this limit's is `{}`)",
                    o.name()
                ),
            ));
        }
        (Some(v), _) => {
            parse_amount(v, &unit, decimals).map_err(|m| ctx.err(format!("{path}.overdraft"), m))?
        }
    };
    let thresholds = match &rl.thresholds {
        None if counts => vec![500, 800, 1000],
        None => Vec::new(),
        Some(_) if !counts => {
            return Err(ctx.err(
                format!("{path}.thresholds"),
                format!("thresholds apply to quotas and budgets (a {} limit has no spend to cross them)", kind.name()),
            ));
        }
        Some(list) => {
            let mut t = Vec::with_capacity(list.len());
            for (i, v) in list.iter().enumerate() {
                let p =
                    parse_permille(v).map_err(|m| ctx.err(format!("{path}.thresholds[{i}]"), m))?;
                if p == 0 {
                    return Err(ctx.err(
                        format!("{path}.thresholds[{i}]"),
                        "a threshold of 0% is always crossed",
                    ));
                }
                t.push(p);
            }
            t.sort_unstable();
            t.dedup();
            t
        }
    };
    Ok(LimitDef {
        id: 0, // assigned by register()
        name: rl.name,
        kind,
        unit,
        decimals,
        limit,
        floors,
        overage,
        overdraft,
        thresholds,
        attach,
        owner,
        caps,
        lease,
        description: rl.description,
    })
}

/// The longest coordination time accepted (a year): `now` plus it stays
/// exact in the Redis scripts' doubles.
const MAX_COORDINATION_TIME: Micros = 366 * DAY_US;
/// The longest amber delay accepted (an hour): times the ‰ depth it stays exact.
const MAX_DELAY: Micros = HOUR_US;

/// Validates a resource's `upstream:` section over the defaults of
/// [`Coordination`].
fn build_upstream(ctx: &Ctx<'_>, path: &str, raw: RawUpstream) -> Result<Coordination> {
    let mut c = Coordination::default();
    let share = |v: &Option<Value>, field: &str, default: u16| -> Result<u16> {
        v.as_ref().map_or(Ok(default), |v| {
            parse_permille(v).map_err(|m| ctx.err(format!("{path}.{field}"), m))
        })
    };
    c.green = share(&raw.green, "green", c.green)?;
    c.red = share(&raw.red, "red", c.red)?;
    if c.green <= c.red {
        return Err(ctx.err(
            path,
            format!(
                "green ({}%) must be above red ({}%): amber lies between them",
                f64::from(c.green) / 10.0,
                f64::from(c.red) / 10.0
            ),
        ));
    }
    let time = |v: &Option<String>, field: &str, default: Micros, delay: bool| -> Result<Micros> {
        let Some(s) = v else { return Ok(default) };
        let at = format!("{path}.{field}");
        let t = parse_duration(s).map_err(|m| ctx.err(&at, m))?;
        if t == 0 && !delay {
            return Err(ctx.err(&at, "must be longer than zero"));
        }
        if delay && t > MAX_DELAY {
            return Err(ctx.err(&at, format!("`{s}` is longer than an hour")));
        }
        if t > MAX_COORDINATION_TIME {
            return Err(ctx.err(&at, format!("`{s}` is longer than a year")));
        }
        Ok(t)
    };
    let delay = raw.delay.unwrap_or_default();
    c.delay_standard = time(&delay.standard, "delay.standard", c.delay_standard, true)?;
    c.delay_background = time(
        &delay.background,
        "delay.background",
        c.delay_background,
        true,
    )?;
    c.pace = time(&raw.pace, "pace", c.pace, false)?;
    c.ttl = time(&raw.ttl, "ttl", c.ttl, false)?;
    let rb = raw.breaker.unwrap_or_default();
    let b = &mut c.breaker;
    // The horizon may be 0s (no pre-emptive opening), at most an hour.
    b.horizon = time(&rb.horizon, "breaker.horizon", b.horizon, true)?;
    b.step = time(&rb.step, "breaker.step", b.step, false)?;
    b.open_for = time(&rb.open_for, "breaker.open_for", b.open_for, false)?;
    b.probe_lease = time(&rb.probe_lease, "breaker.probe_lease", b.probe_lease, false)?;
    if let Some(t) = rb.max_tokens {
        if t == 0 || t > crate::upstream::light::MAX_READING {
            return Err(ctx.err(
                format!("{path}.breaker.max_tokens"),
                format!("{t} is not a token count from 1 to 2^40"),
            ));
        }
        b.max_tokens = i64::try_from(t).unwrap_or(i64::MAX);
    }
    if let Some(models) = rb.fallback {
        for (i, m) in models.iter().enumerate() {
            if m.trim().is_empty() || m.len() > 200 {
                return Err(ctx.err(
                    format!("{path}.breaker.fallback[{i}]"),
                    "a model name is 1-200 characters",
                ));
            }
        }
        b.fallback = models.into_iter().map(std::sync::Arc::from).collect();
    }
    let rc = raw.cascade.unwrap_or_default();
    if let Some(n) = rc.denials {
        let max = crate::upstream::cascade::MAX_DENIALS;
        c.cascade.denials = u8::try_from(n)
            .ok()
            .filter(|&n| usize::from(n) <= max)
            .ok_or_else(|| {
                ctx.err(
                    format!("{path}.cascade.denials"),
                    format!("{n}: at most {max} (0 turns the detector off)"),
                )
            })?;
    }
    c.cascade.within = time(&rc.within, "cascade.within", c.cascade.within, false)?;
    c.cascade.cooldown = time(&rc.cooldown, "cascade.cooldown", c.cascade.cooldown, false)?;
    Ok(c)
}

/// Validates a resource's `pricing:`: one price list (a mapping) or dated
/// ones (a sequence of mappings, each with `from`).
fn build_pricing(
    ctx: &Ctx<'_>,
    path: &str,
    v: &Value,
    units: &Map<UnitDef>,
) -> Result<crate::pricing::Pricing> {
    use crate::pricing::{Prices, Pricing, read_price};
    let lists: Vec<(String, &Value)> = match v {
        Value::Object(_) => vec![(path.to_owned(), v)],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, item)| (format!("{path}[{i}]"), item))
            .collect(),
        Value::Array(_) => return Err(ctx.err(path, "has no price list")),
        other => {
            return Err(ctx.err(
                path,
                format!(
                    "expected a price list (a mapping) or dated price lists (a sequence), found {}",
                    kind_of(other)
                ),
            ));
        }
    };
    let dated = lists.len() > 1;
    let mut versions = Vec::with_capacity(lists.len());
    for (lpath, item) in &lists {
        let Value::Object(map) = item else {
            return Err(ctx.err(
                lpath,
                format!("expected a price list (a mapping), found {}", kind_of(item)),
            ));
        };
        let unit = match map.get("unit") {
            None => "usd".to_owned(),
            Some(Value::String(u)) => u.clone(),
            Some(other) => {
                return Err(ctx.err(
                    format!("{lpath}.unit"),
                    format!("expected a unit name, found {}", kind_of(other)),
                ));
            }
        };
        let decimals = lookup(units, &unit)
            .ok_or_else(|| {
                ctx.err(
                    format!("{lpath}.unit"),
                    format!(
                        "unit `{unit}` is not declared under `units` (declared: {})",
                        units.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?
            .decimals;
        let mut prices = Prices {
            from: None,
            unit: unit.into(),
            decimals,
            input: Amount::units(0),
            cached_input: None,
            output: Amount::units(0),
            image: Amount::units(0),
            second: Amount::units(0),
            call: Amount::units(0),
        };
        for (key, value) in map {
            let fpath = format!("{lpath}.{key}");
            let price = || read_price(value).map_err(|m| ctx.err(&fpath, m));
            match key.as_str() {
                "unit" => {}
                "from" => prices.from = Some(read_from(value).map_err(|m| ctx.err(&fpath, m))?),
                "input" => prices.input = price()?,
                "cached_input" => prices.cached_input = Some(price()?),
                "output" => prices.output = price()?,
                "image" => prices.image = price()?,
                "second" => prices.second = price()?,
                "call" => prices.call = price()?,
                other => {
                    return Err(ctx.err(
                        &fpath,
                        format!("unknown field `{other}`, expected one of `from`, `unit`, `input`, `cached_input`, `output`, `image`, `second`, `call`"),
                    ));
                }
            }
        }
        if dated && prices.from.is_none() && versions.iter().any(|p: &Prices| p.from.is_none()) {
            return Err(ctx.err(
                lpath,
                "needs `from`: only one price list may apply from the start",
            ));
        }
        versions.push(prices);
    }
    Pricing::new(versions).map_err(|e| match e {
        Error::InvalidArgument { message, .. } => ctx.err(path, message),
        other => other,
    })
}

/// A price list's `from`: a date (`2024-08-06`, midnight UTC) or an RFC 3339
/// time (`2024-08-06T12:00:00Z`).
fn read_from(v: &Value) -> std::result::Result<Micros, String> {
    let Value::String(s) = v else {
        return Err(format!(
            "expected a date like `2024-08-06` (quoted in TOML), found {}",
            kind_of(v)
        ));
    };
    let t = s.trim();
    let parsed = if t.len() == 10 {
        crate::upstream::headers::rfc3339(&format!("{t}T00:00:00Z"))
    } else {
        crate::upstream::headers::rfc3339(t)
    };
    parsed.ok_or_else(|| {
        format!(
            "`{}` is not a date like `2024-08-06` or a time like `2024-08-06T12:00:00Z`",
            crate::error::truncate(t)
        )
    })
}
