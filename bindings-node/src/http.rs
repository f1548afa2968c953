//! The Express middleware's native half: prepared requests, client identity,
//! header styles and the one-call decisions that return only header pairs.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// A decision for an HTTP request: the decision, its response headers and, when
/// denied, the JSON body of the 429.
#[napi(object)]
pub struct HttpDecision {
    /// The decision.
    pub decision: Decision,
    /// Header names, in order (`RateLimit-Policy`, `RateLimit`, `Retry-After`…).
    pub header_names: Vec<String>,
    /// Header values, same order.
    pub header_values: Vec<String>,
    /// The 429 body when denied.
    pub body: Option<String>,
}

pub(crate) fn http_of(d: &CoreDecision, style: HeaderStyle) -> HttpDecision {
    let (header_names, header_values) = rate_limit_headers(d, style)
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .unzip();
    HttpDecision {
        decision: decision_of(d),
        header_names,
        header_values,
        body: (!d.allowed()).then(|| denial_body(d)),
    }
}

#[napi]
impl NativeWarden {
    /// Validates a middleware's constant request fields and header style once
    /// — types, then resource, action, units and amounts against the policy —
    /// and returns their index for `decideHttpPrepared`. `cost` is an object.
    #[napi]
    pub fn prepare_http(
        &self,
        resource: Option<String>,
        action: Option<String>,
        cost: Option<serde_json::Value>,
        priority: Option<String>,
        style: String,
    ) -> Result<u32> {
        let cost = cost.map(|c| cost_of(Some(&c), "cost")).transpose()?;
        let request = ops::request(
            "prepared:request",
            resource.as_deref(),
            action.as_deref(),
            cost,
            priority.as_deref(),
        )
        .or_throw()?;
        // Resource, action and cost against the policy: a typo fails here, once.
        ratewarden::plan::check_parts(&self.warden.policy(), &request).or_throw()?;
        let template = Template {
            request,
            style: style_of(&style)?,
        };
        let mut all = self
            .templates
            .write()
            .map_err(|_| invalid("template", "a previous preparation panicked"))?;
        all.push(template);
        u32::try_from(all.len() - 1).map_err(|_| invalid("template", "too many prepared requests"))
    }

    /// An HTTP request's acquire with a prepared request (`prepareHttp`), at
    /// once on the embedded engine: when allowed, its response headers as one
    /// string `name\nvalue\nname\nvalue…` (one value crossing instead of an
    /// array of strings: in a busy server each N-API crossing is cold and
    /// costs ~0.2 µs); when denied, the whole `HttpDecision`.
    #[napi]
    pub fn decide_http_prepared(
        &self,
        scope: Option<String>,
        peer: Option<String>,
        forwarded_for: Option<String>,
        identity: &ClientIdentity,
        template: u32,
    ) -> Result<Either<String, HttpDecision>> {
        let (req, style) = self.prepared(template, scope, peer, forwarded_for, identity)?;
        let d = self.sync(self.warden.admit(&req))?;
        Ok(http_joined(&d, style))
    }

    /// `decideHttpPrepared` for any backend, as a Promise.
    #[napi(ts_return_type = "Promise<string | HttpDecision>")]
    pub fn decide_http_prepared_async<'env>(
        &self,
        env: &'env Env,
        scope: Option<String>,
        peer: Option<String>,
        forwarded_for: Option<String>,
        identity: &ClientIdentity,
        template: u32,
    ) -> Result<PromiseRaw<'env, Either<String, HttpDecision>>> {
        let (req, style) = self.prepared(template, scope, peer, forwarded_for, identity)?;
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let d = warden.admit(&req).await.or_throw()?;
            Ok(http_joined(&d, style))
        })
    }
}

impl NativeWarden {
    /// The prepared request `template` for this HTTP request's scope.
    fn prepared(
        &self,
        template: u32,
        scope: Option<String>,
        peer: Option<String>,
        forwarded_for: Option<String>,
        identity: &ClientIdentity,
    ) -> Result<(Request, HeaderStyle)> {
        let scope = http_scope(scope, peer, forwarded_for, identity)?;
        let scope = Scope::parse(&scope).or_throw()?;
        let all = self
            .templates
            .read()
            .map_err(|_| invalid("template", "a previous preparation panicked"))?;
        let t = usize::try_from(template)
            .ok()
            .and_then(|i| all.get(i))
            .ok_or_else(|| invalid("template", format!("no prepared request {template}")))?;
        let mut request = t.request.clone();
        request.scope = scope;
        Ok((request, t.style))
    }
}

/// Allowed: the header pairs joined by newlines (header names and values
/// never contain one); denied, or holding a concurrency slot the middleware
/// must free when the response ends (`Warden::admit`): the whole `HttpDecision`.
pub(crate) fn http_joined(d: &CoreDecision, style: HeaderStyle) -> Either<String, HttpDecision> {
    if !d.allowed() || d.reservation.is_some() {
        return Either::B(http_of(d, style));
    }
    let mut out = String::with_capacity(96);
    for (name, value) in rate_limit_headers(d, style) {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(name);
        out.push('\n');
        out.push_str(&value);
    }
    Either::A(out)
}

/// The scope of an HTTP request: the one given, or the client's (`clientScope`).
pub(crate) fn http_scope(
    scope: Option<String>,
    peer: Option<String>,
    forwarded_for: Option<String>,
    identity: &ClientIdentity,
) -> Result<String> {
    match scope {
        Some(s) => Ok(s),
        None => identity
            .inner
            .scope(peer.as_deref(), forwarded_for.as_deref())
            .or_throw(),
    }
}

pub(crate) fn style_of(style: &str) -> Result<HeaderStyle> {
    style.parse::<HeaderStyle>().or_throw()
}

/// The canonical name of a rate-limit header style (`draft-11`, `draft-7`,
/// `draft-6`, `off`); an InvalidInput error for anything else.
#[napi]
pub fn header_style(style: String) -> Result<&'static str> {
    style_of(&style).map(HeaderStyle::as_str)
}

/// The default scope of an HTTP request, `ip:<client address>`: the socket
/// `peer`, or with `trustProxy` the first `X-Forwarded-For` entry.
/// Who the client of an HTTP request is (core `http::ClientIdentity`): the
/// proxies trusted (`false`, `true` = one hop, a hop count, or networks) and
/// the IPv6 subnet clients are keyed by (default 56).
#[napi]
pub struct ClientIdentity {
    pub(crate) inner: ratewarden::http::ClientIdentity,
}

#[napi]
impl ClientIdentity {
    /// Validates the settings once (the middleware's `trustProxy`, `ipv6Subnet`).
    #[napi(constructor)]
    pub fn new(trust_proxy: serde_json::Value, ipv6_subnet: Option<u32>) -> Result<Self> {
        let trust = ratewarden::http::TrustProxy::from_json(&trust_proxy).or_throw()?;
        let subnet = match ipv6_subnet {
            None => ratewarden::http::DEFAULT_IPV6_SUBNET,
            Some(n) => u8::try_from(n).map_err(|_| {
                invalid(
                    "ipv6Subnet",
                    format!("{n} is not a prefix length from 1 to 128"),
                )
            })?,
        };
        let inner = ratewarden::http::ClientIdentity::new(trust, subnet).or_throw()?;
        Ok(Self { inner })
    }

    /// Whether `X-Forwarded-For` is read at all.
    #[napi(getter)]
    pub fn trusts_proxies(&self) -> bool {
        *self.inner.trust() != ratewarden::http::TrustProxy::Nobody
    }

    /// The default scope of a request: `ip:<client address>`.
    #[napi]
    pub fn scope(&self, peer: Option<String>, forwarded_for: Option<String>) -> Result<String> {
        http_scope(None, peer, forwarded_for, self)
    }
}
