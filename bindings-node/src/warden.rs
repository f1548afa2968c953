//! `NativeWarden`: every operation of the JS `Warden`, at once on the embedded
//! engine (`*Sync`) or as a Promise on the runtime (`*Async`). An async
//! operation reads its JS arguments on the calling thread and runs a future that
//! owns everything it uses: nothing it touches is freed with a worker's
//! environment.

#[allow(clippy::wildcard_imports)]
use crate::*;

/// The native warden behind the JS `Warden`.
#[napi]
pub struct NativeWarden {
    pub(crate) warden: Warden,
    pub(crate) embedded: bool,
    /// Requests prepared once by a middleware (`prepareHttp`), by index.
    pub(crate) templates: std::sync::RwLock<Vec<Template>>,
}

/// A middleware's constant request fields and header style, resolved once.
pub(crate) struct Template {
    /// resource, action, cost and priority, with a placeholder scope.
    pub(crate) request: Request,
    pub(crate) style: HeaderStyle,
}

#[napi]
impl NativeWarden {
    /// A warden for a policy (JSON text, or a file path). With a Redis backend
    /// it starts connecting in the background (decisions follow
    /// `onBackendError` until Redis answers); `NativeWarden.connect` waits.
    #[napi(constructor)]
    pub fn new(
        json: Option<String>,
        path: Option<String>,
        options: Option<WardenOptions>,
        clock: Option<&ManualClock>,
    ) -> Result<Self> {
        let policy = policy_of(json, path)?;
        let setup = setup_of(options.as_ref(), clock, true)?;
        let warden = if setup.embedded() {
            ratewarden::backend::at_once(setup.connect(policy)).or_throw()?
        } else {
            // connect_lazy needs a Tokio context: napi's runtime.
            block_on(async { setup.connect(policy).await }).or_throw()?
        };
        Ok(Self {
            embedded: setup.embedded(),
            warden,
            templates: std::sync::RwLock::default(),
        })
    }

    /// Connects first (rejects with a BackendError if Redis cannot be reached).
    #[napi(ts_return_type = "Promise<NativeWarden>")]
    pub fn connect<'env>(
        env: &'env Env,
        json: Option<String>,
        path: Option<String>,
        options: Option<WardenOptions>,
        clock: Option<&ManualClock>,
    ) -> Result<PromiseRaw<'env, NativeWarden>> {
        // Everything borrowed from JS is read here: the future owns what it uses.
        let policy = policy_of(json, path)?;
        let setup = setup_of(options.as_ref(), clock, false)?;
        env.spawn_future(async move {
            let warden = setup.connect(policy).await.or_throw()?;
            Ok(Self {
                embedded: setup.embedded(),
                warden,
                templates: std::sync::RwLock::default(),
            })
        })
    }

    /// Puts a new policy (JSON text or a file path) in force; what changed.
    #[napi]
    pub fn reload(&self, json: Option<String>, path: Option<String>) -> Result<PolicyChanges> {
        let changes = self.warden.reload(policy_of(json, path)?).or_throw()?;
        Ok(PolicyChanges {
            added: changes.added,
            removed: changes.removed,
            changed: changes.changed,
            repriced: changes.repriced,
        })
    }

    /// Whether decisions are made in this process (every call answers at once).
    #[napi(getter)]
    pub fn embedded(&self) -> bool {
        self.embedded
    }

    /// `memory` or `redis`.
    #[napi(getter)]
    pub fn backend(&self) -> &'static str {
        self.warden.backend_name()
    }

    /// Runs an operation at once on the embedded engine (only there).
    pub(crate) fn sync<T>(
        &self,
        op: impl std::future::Future<Output = ratewarden::Result<T>>,
    ) -> Result<T> {
        if !self.embedded {
            return Err(invalid(
                "call",
                "only the embedded engine decides synchronously; use the async form",
            ));
        }
        ratewarden::backend::at_once(op).or_throw()
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn check_sync(&self, scope: String, options: Option<RequestOptions>) -> Result<Decision> {
        let req = request_of(&scope, options.as_ref())?;
        self.sync(self.warden.check(&req)).map(|d| decision_of(&d))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn acquire_sync(&self, scope: String, options: Option<RequestOptions>) -> Result<Decision> {
        let req = request_of(&scope, options.as_ref())?;
        self.sync(self.warden.acquire(&req))
            .map(|d| decision_of(&d))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn reserve_sync(&self, scope: String, options: Option<RequestOptions>) -> Result<Decision> {
        let (req, lease) = reserve_args(&scope, options.as_ref())?;
        self.sync(self.warden.reserve(&req, lease))
            .map(|d| decision_of(&d))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn commit_sync(
        &self,
        reservation: String,
        actual: Option<serde_json::Value>,
    ) -> Result<Receipt> {
        let (id, actual) = commit_args(&reservation, actual.as_ref())?;
        self.sync(self.warden.commit(id, &actual))
            .map(|r| receipt_of(&r))
    }

    /// Commits at the price of `usage` on `resource`; decides at once on the embedded engine.
    #[napi]
    pub fn commit_usage_sync(
        &self,
        reservation: String,
        resource: String,
        #[napi(ts_arg_type = "Usage")] usage: serde_json::Value,
    ) -> Result<Receipt> {
        let id = reservation_id(&reservation)?;
        let usage = usage_of(&usage, "usage")?;
        self.sync(self.warden.commit_usage(id, &resource, &usage))
            .map(|r| receipt_of(&r))
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Receipt>")]
    pub fn commit_usage_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
        resource: String,
        #[napi(ts_arg_type = "Usage")] usage: serde_json::Value,
    ) -> Result<PromiseRaw<'env, Receipt>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let id = reservation_id(&reservation)?;
            let usage = usage_of(&usage, "usage")?;
            warden
                .commit_usage(id, &resource, &usage)
                .await
                .or_throw()
                .map(|r| receipt_of(&r))
        })
    }

    /// Calls `callback` (on the event loop) with the JSON text of each event
    /// `events` wants (types or prefixes; none: all).
    #[napi(
        ts_args_type = "callback: (event: string) => unknown, events?: string[] | undefined | null"
    )]
    pub fn listen(
        &self,
        callback: EventCallback,
        events: Option<Vec<String>>,
    ) -> Result<NativeListener> {
        NativeListener::start(&self.warden, callback, events)
    }

    /// Resolves `true` once the Redis outlets handled every event emitted so
    /// far, `false` after `timeout` seconds.
    #[napi]
    pub fn flush_outlets<'env>(
        &self,
        env: &'env Env,
        timeout: f64,
    ) -> Result<PromiseRaw<'env, bool>> {
        let warden = self.warden.clone();
        let timeout = seconds(timeout, "timeout")?;
        env.spawn_future(async move { Ok(warden.flush_outlets(timeout).await) })
    }

    /// Calls `callback` (on the event loop) with the JSON text of each audit record.
    #[napi(ts_args_type = "callback: (record: string) => unknown")]
    pub fn on_audit(&self, callback: EventCallback) -> Result<NativeListener> {
        NativeListener::audit(&self.warden, callback)
    }

    /// What the policy's audit sinks (`audit:`) did.
    #[napi]
    #[allow(clippy::cast_precision_loss)]
    pub fn audit_stats(&self) -> AuditStats {
        let s = self.warden.audit_stats();
        AuditStats {
            written: s.written as f64,
            appended: s.appended as f64,
            dropped: s.dropped as f64,
            failed: s.failed as f64,
            last_error: s.last_error,
        }
    }

    /// Resolves `true` once the audit sinks wrote every record made so far,
    /// `false` after `timeout` seconds.
    #[napi]
    pub fn flush_audit<'env>(
        &self,
        env: &'env Env,
        timeout: f64,
    ) -> Result<PromiseRaw<'env, bool>> {
        let warden = self.warden.clone();
        let timeout = seconds(timeout, "timeout")?;
        env.spawn_future(async move { Ok(warden.flush_audit(timeout).await) })
    }

    /// What the policy's Redis outlets (`events:`) did (see `Warden::outlet_stats`).
    #[napi]
    #[allow(clippy::cast_precision_loss)]
    pub fn outlet_stats(&self) -> OutletStats {
        let s = self.warden.outlet_stats();
        OutletStats {
            appended: s.appended as f64,
            published: s.published as f64,
            dropped: s.dropped as f64,
            failed: s.failed as f64,
            last_error: s.last_error,
        }
    }

    /// What the policy's `webhooks:` deliveries did (see `Warden::webhook_log`).
    #[napi]
    pub fn webhook_log(&self) -> WebhookLog {
        webhook_log_of(&self.warden.webhook_log())
    }

    /// What `usage` costs on `resource` at its prices now (`output_tokens`
    /// priced: the bill a commit charges).
    #[napi]
    pub fn cost(
        &self,
        resource: String,
        #[napi(ts_arg_type = "Usage")] usage: serde_json::Value,
    ) -> Result<Priced> {
        let usage = usage_of(&usage, "usage")?;
        let p = self.warden.cost(&resource, &usage).or_throw()?;
        Ok(priced_of(&p, &self.warden.charge_of(&p)))
    }

    /// What a call with `usage` may cost on `resource` now
    /// (`max_output_tokens` priced when given: what a reservation holds).
    #[napi]
    pub fn estimate(
        &self,
        resource: String,
        #[napi(ts_arg_type = "Usage")] usage: serde_json::Value,
    ) -> Result<Priced> {
        let usage = usage_of(&usage, "usage")?;
        let p = self.warden.estimate(&resource, &usage).or_throw()?;
        Ok(priced_of(&p, &self.warden.charge_of(&p)))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn release_sync(&self, reservation: String) -> Result<bool> {
        self.sync(self.warden.release(reservation_id(&reservation)?))
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn extend_sync(&self, reservation: String, lease: f64) -> Result<f64> {
        let (id, lease) = (reservation_id(&reservation)?, seconds(lease, "lease")?);
        self.sync(self.warden.extend(id, lease)).map(seconds_of)
    }

    /// Decides at once on the embedded engine.
    #[napi]
    pub fn delegate_sync(
        &self,
        child: String,
        amounts: serde_json::Value,
        options: Option<DelegateOptions>,
    ) -> Result<Decision> {
        let (child, amounts, from, lease) = delegate_args(&child, &amounts, options.as_ref())?;
        self.sync(
            self.warden
                .delegate(from.as_from(), &child, &amounts, lease),
        )
        .map(|d| decision_of(&d))
    }

    /// Runs any operation on the runtime (Redis, waits).
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn check_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let req = request_of(&scope, options.as_ref())?;
            warden.check(&req).await.or_throw().map(|d| decision_of(&d))
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn acquire_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let req = request_of(&scope, options.as_ref())?;
            warden
                .acquire(&req)
                .await
                .or_throw()
                .map(|d| decision_of(&d))
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn reserve_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (req, lease) = reserve_args(&scope, options.as_ref())?;
            warden
                .reserve(&req, lease)
                .await
                .or_throw()
                .map(|d| decision_of(&d))
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Receipt>")]
    pub fn commit_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
        actual: Option<serde_json::Value>,
    ) -> Result<PromiseRaw<'env, Receipt>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (id, actual) = commit_args(&reservation, actual.as_ref())?;
            warden
                .commit(id, &actual)
                .await
                .or_throw()
                .map(|r| receipt_of(&r))
        })
    }

    /// Records what one upstream response's headers (`[name, value]` pairs)
    /// said about `resource`'s upstream — `Warden::report` with `status`,
    /// `Warden::observe` without — and answers its state after.
    #[napi]
    pub fn observe_sync(
        &self,
        resource: String,
        headers: Vec<Vec<String>>,
        status: Option<i64>,
    ) -> Result<UpstreamInfo> {
        let status = status_of(status)?;
        self.sync(observed(&self.warden, &resource, &headers, status))
            .map(upstream_of)
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<UpstreamInfo>")]
    pub fn observe_async<'env>(
        &self,
        env: &'env Env,
        resource: String,
        headers: Vec<Vec<String>>,
        status: Option<i64>,
    ) -> Result<PromiseRaw<'env, UpstreamInfo>> {
        let status = status_of(status)?;
        let warden = self.warden.clone();
        env.spawn_future(async move {
            observed(&warden, &resource, &headers, status)
                .await
                .or_throw()
                .map(upstream_of)
        })
    }

    /// Throws unless the request is valid for the policy and its resource
    /// coordinates on its upstream (`upstream:` in the policy); asks no
    /// backend (a governed fetch checks its options when it is made).
    #[napi]
    pub fn check_governed(&self, scope: String, options: Option<RequestOptions>) -> Result<()> {
        let req = request_of(&scope, options.as_ref())?;
        self.warden.check_governed(&req).or_throw()
    }

    /// Sets aside `amounts` of `resource`'s pools for `agent` (see `pool.rs`).
    #[napi]
    pub fn allocate_sync(
        &self,
        agent: String,
        resource: String,
        amounts: serde_json::Value,
        lease: f64,
    ) -> Result<AllocationInfo> {
        let (agent, amounts, lease) = allocate_args(&agent, &amounts, lease)?;
        self.sync(self.warden.allocate(&agent, &resource, &amounts, lease))
            .map(allocation_of)
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<AllocationInfo>")]
    pub fn allocate_async<'env>(
        &self,
        env: &'env Env,
        agent: String,
        resource: String,
        amounts: serde_json::Value,
        lease: f64,
    ) -> Result<PromiseRaw<'env, AllocationInfo>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (agent, amounts, lease) = allocate_args(&agent, &amounts, lease)?;
            warden
                .allocate(&agent, &resource, &amounts, lease)
                .await
                .or_throw()
                .map(allocation_of)
        })
    }

    /// Renews every allocation of `agent`; how many.
    #[napi]
    pub fn heartbeat_sync(&self, agent: String) -> Result<u32> {
        let agent = Scope::parse(&agent).or_throw()?;
        self.sync(self.warden.heartbeat(&agent))
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn heartbeat_async<'env>(
        &self,
        env: &'env Env,
        agent: String,
    ) -> Result<PromiseRaw<'env, u32>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let agent = Scope::parse(&agent).or_throw()?;
            let n = warden.heartbeat(&agent).await.or_throw()?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
    }

    /// Gives up `agent`'s allocation of `resource`.
    #[napi]
    pub fn deallocate_sync(&self, agent: String, resource: String) -> Result<bool> {
        let agent = Scope::parse(&agent).or_throw()?;
        self.sync(self.warden.deallocate(&agent, &resource))
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn deallocate_async<'env>(
        &self,
        env: &'env Env,
        agent: String,
        resource: String,
    ) -> Result<PromiseRaw<'env, bool>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let agent = Scope::parse(&agent).or_throw()?;
            warden.deallocate(&agent, &resource).await.or_throw()
        })
    }

    /// `resource`'s upstream state, changing nothing.
    #[napi]
    pub fn upstream_sync(&self, resource: String) -> Result<UpstreamInfo> {
        self.sync(self.warden.upstream(&resource)).map(upstream_of)
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<UpstreamInfo>")]
    pub fn upstream_async<'env>(
        &self,
        env: &'env Env,
        resource: String,
    ) -> Result<PromiseRaw<'env, UpstreamInfo>> {
        let warden = self.warden.clone();
        env.spawn_future(
            async move { warden.upstream(&resource).await.or_throw().map(upstream_of) },
        )
    }

    /// Takes `resource`'s ordered lock, waiting up to `max_wait` seconds;
    /// resolves to the turn's id (32 hex digits), or null when the time ran
    /// out. Held for at most `hold` seconds. Runs on the runtime (it may wait).
    #[napi(ts_return_type = "Promise<string | null>")]
    pub fn sequential_async<'env>(
        &self,
        env: &'env Env,
        resource: String,
        hold: f64,
        max_wait: f64,
    ) -> Result<PromiseRaw<'env, Option<String>>> {
        let hold = ratewarden::ops::seconds(hold, "hold").or_throw()?;
        let max_wait = ratewarden::ops::seconds(max_wait, "maxWait").or_throw()?;
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let turn = warden
                .sequential(&resource, hold, max_wait)
                .await
                .or_throw()?;
            Ok(turn.map(|t| format!("{:032x}", t.id())))
        })
    }

    /// Releases a turn taken with `sequentialAsync`: whether it still held the lock.
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn release_turn_async<'env>(
        &self,
        env: &'env Env,
        resource: String,
        turn: String,
    ) -> Result<PromiseRaw<'env, bool>> {
        let id = ratewarden::ReservationId::parse(&turn).or_throw()?;
        let warden = self.warden.clone();
        env.spawn_future(async move {
            warden
                .release_turn(&ratewarden::Turn::from_parts(&resource, id.0))
                .await
                .or_throw()
        })
    }

    /// Tops up `limit` of `scope` (on `resource`) by `amount` (a number or a
    /// decimal string in the limit's unit), at once on the embedded engine.
    #[napi(
        ts_args_type = "scope: string, limit: string, amount: number | string, resource?: string | undefined | null"
    )]
    pub fn top_up_sync(
        &self,
        scope: String,
        limit: String,
        amount: serde_json::Value,
        resource: Option<String>,
    ) -> Result<TopUpInfo> {
        let scope = Scope::parse(&scope).or_throw()?;
        let amount = amount_of(&amount, "amount")?;
        self.sync(
            self.warden
                .top_up(&scope, resource.as_deref(), &limit, amount),
        )
        .map(|t| top_up_of(&t))
    }

    /// Runs on the runtime.
    #[napi(
        ts_args_type = "scope: string, limit: string, amount: number | string, resource?: string | undefined | null",
        ts_return_type = "Promise<TopUpInfo>"
    )]
    pub fn top_up_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        limit: String,
        amount: serde_json::Value,
        resource: Option<String>,
    ) -> Result<PromiseRaw<'env, TopUpInfo>> {
        let scope = Scope::parse(&scope).or_throw()?;
        let amount = amount_of(&amount, "amount")?;
        let warden = self.warden.clone();
        env.spawn_future(async move {
            warden
                .top_up(&scope, resource.as_deref(), &limit, amount)
                .await
                .or_throw()
                .map(|t| top_up_of(&t))
        })
    }

    /// What is left of every limit `scope` (on `resource`) touches, charging nothing.
    #[napi]
    pub fn balances_sync(
        &self,
        scope: String,
        resource: Option<String>,
    ) -> Result<Vec<BalanceInfo>> {
        let scope = Scope::parse(&scope).or_throw()?;
        self.sync(self.warden.balances(&scope, resource.as_deref()))
            .map(|b| b.iter().map(balance_of).collect())
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Array<BalanceInfo>>")]
    pub fn balances_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        resource: Option<String>,
    ) -> Result<PromiseRaw<'env, Vec<BalanceInfo>>> {
        let scope = Scope::parse(&scope).or_throw()?;
        let warden = self.warden.clone();
        env.spawn_future(async move {
            warden
                .balances(&scope, resource.as_deref())
                .await
                .or_throw()
                .map(|b| b.iter().map(balance_of).collect())
        })
    }

    /// Settles a wrapped call's reservation by the settlement rule of
    /// `ratewarden::settle` (the same in every binding): `failed` → released;
    /// else committed at `actual` (rounded up to each unit) — or at the
    /// estimate when `actual` is undefined, or `unreadable` says why the call's
    /// usage could not be read, or `actual` is not a valid cost. Resolves to
    /// the problem to report, or null; never rejects for the settlement itself.
    #[napi]
    pub fn finish_sync(
        &self,
        reservation: String,
        failed: bool,
        actual: Option<serde_json::Value>,
        unreadable: Option<String>,
        priced: Option<String>,
    ) -> Result<Option<String>> {
        let (id, outcome) = finish_args(&reservation, failed, actual, unreadable, priced)?;
        self.sync(async move { Ok(self.warden.finish(id, outcome).await) })
            .map(|s| s.problem())
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<string | null>")]
    pub fn finish_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
        failed: bool,
        actual: Option<serde_json::Value>,
        unreadable: Option<String>,
        priced: Option<String>,
    ) -> Result<PromiseRaw<'env, Option<String>>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (id, outcome) = finish_args(&reservation, failed, actual, unreadable, priced)?;
            Ok(warden.finish(id, outcome).await.problem())
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn release_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
    ) -> Result<PromiseRaw<'env, bool>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            warden
                .release(reservation_id(&reservation)?)
                .await
                .or_throw()
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn extend_async<'env>(
        &self,
        env: &'env Env,
        reservation: String,
        lease: f64,
    ) -> Result<PromiseRaw<'env, f64>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (id, lease) = (reservation_id(&reservation)?, seconds(lease, "lease")?);
            warden.extend(id, lease).await.or_throw().map(seconds_of)
        })
    }

    /// Runs on the runtime.
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn delegate_async<'env>(
        &self,
        env: &'env Env,
        child: String,
        amounts: serde_json::Value,
        options: Option<DelegateOptions>,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (child, amounts, from, lease) = delegate_args(&child, &amounts, options.as_ref())?;
            warden
                .delegate(from.as_from(), &child, &amounts, lease)
                .await
                .or_throw()
                .map(|d| decision_of(&d))
        })
    }

    /// Waits up to `maxWait` seconds for admission, then acquires (or reserves).
    #[napi(ts_return_type = "Promise<Decision>")]
    pub fn wait_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
        max_wait: f64,
        reserve: bool,
    ) -> Result<PromiseRaw<'env, Decision>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let req = request_of(&scope, options.as_ref())?;
            let what = if reserve {
                WaitFor::Reserve(optional_seconds(
                    options.as_ref().and_then(|o| o.lease),
                    "lease",
                )?)
            } else {
                WaitFor::Acquire
            };
            let max_wait = seconds(max_wait, "maxWait")?;
            warden
                .wait(&req, what, max_wait)
                .await
                .or_throw()
                .map(|d| decision_of(&d))
        })
    }

    /// An HTTP request's acquire with its response headers in `style`
    /// (`draft-11`, `draft-7`, `draft-6`, `off`), at once on the embedded
    /// engine, for request fields computed per request: answers as
    /// `decideHttpPrepared` does.
    #[napi]
    pub fn acquire_http_sync(
        &self,
        scope: String,
        options: Option<RequestOptions>,
        style: String,
    ) -> Result<Either<String, HttpDecision>> {
        let (req, style) = (request_of(&scope, options.as_ref())?, style_of(&style)?);
        if !self.embedded {
            return Err(invalid("call", "use acquireHttpAsync with Redis"));
        }
        let d = ratewarden::backend::at_once(self.warden.admit(&req)).or_throw()?;
        Ok(http_joined(&d, style))
    }

    /// Async form of `acquireHttpSync`.
    #[napi(ts_return_type = "Promise<string | HttpDecision>")]
    pub fn acquire_http_async<'env>(
        &self,
        env: &'env Env,
        scope: String,
        options: Option<RequestOptions>,
        style: String,
    ) -> Result<PromiseRaw<'env, Either<String, HttpDecision>>> {
        let warden = self.warden.clone();
        env.spawn_future(async move {
            let (req, style) = (request_of(&scope, options.as_ref())?, style_of(&style)?);
            let d = warden.admit(&req).await.or_throw()?;
            Ok(http_joined(&d, style))
        })
    }
}

/// A status the core can be given: anything outside `u16` is named here
/// (the core names 100-599 violations the same way).
fn status_of(status: Option<i64>) -> Result<Option<u16>> {
    status
        .map(|s| {
            u16::try_from(s)
                .map_err(|_| invalid("status", format!("{s} is not an HTTP status (100-599)")))
        })
        .transpose()
}

/// `observe` (no status) or `report`.
async fn observed(
    warden: &Warden,
    resource: &str,
    headers: &[Vec<String>],
    status: Option<u16>,
) -> ratewarden::Result<ratewarden::UpstreamView> {
    let pairs = crate::header_pairs(headers);
    match status {
        None => warden.observe(resource, &pairs).await,
        Some(s) => warden.report(resource, s, &pairs).await,
    }
}

/// What a reload changed, by name.
#[napi(object)]
pub struct PolicyChanges {
    /// Limits the new policy declares and the old one did not.
    pub added: Vec<String>,
    /// Limits the old policy declared and the new one does not.
    pub removed: Vec<String>,
    /// Limits in both whose definition differs.
    pub changed: Vec<String>,
    /// Resources whose prices (or `shrink:`) differ.
    pub repriced: Vec<String>,
}
