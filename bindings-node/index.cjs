'use strict';
// CommonJS entry point of `ratewarden` for Node: the public API over the native
// addon that `napi build --platform` puts next to this file as
// `ratewarden.<platform>-<arch>[-<abi>].node`. Every decision is made by the Rust
// core; this file converts, maps errors to classes and adds the Express
// middleware and `wrap()`.
const { AsyncLocalStorage } = require('node:async_hooks');
const { existsSync } = require('node:fs');
const { join } = require('node:path');

const { platform, arch } = process;
const linux = arch === 'arm' ? ['gnueabihf', 'musleabihf'] : ['gnu', 'musl'];
const abis = { linux, win32: ['msvc', 'gnu'] }[platform] ?? [undefined];
const candidates = abis.map((abi) =>
  join(__dirname, `ratewarden.${[platform, arch, abi].filter(Boolean).join('-')}.node`),
);
const addon = candidates.find((file) => existsSync(file));
if (addon === undefined) {
  throw new Error(
    `ratewarden: native addon not found (run \`npm run build\`); looked for:\n  ${candidates.join('\n  ')}`,
  );
}
const native = require(addon);

// --- errors ---------------------------------------------------------------------

/**
 * Base class of every error ratewarden throws. Besides the message it carries
 * data (null when not about one): `code` (stable: `unknown`, `invalid_amount`,
 * `reservation_expired`, `reservation_not_found`, `backend`…), `kind`
 * (`policy`, `invalid_input`, `not_found`, `conflict`, `backend`, `internal`,
 * `denied`), `path` / `source` (where in which policy), `argument` / `unit`
 * (what input was wrong), `reservation` (the id) and `operation` (an operation
 * whose outcome is unknown: ask again with it).
 */
class WardenError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
    this.code = new.target.CODE;
    this.kind = new.target.KIND;
    this.path = null;
    this.source = null;
    this.argument = options?.argument ?? null;
    this.unit = null;
    this.reservation = null;
    this.operation = null;
  }
}
WardenError.CODE = 'internal';
WardenError.KIND = 'internal';
/** The policy is invalid; `path` says where (`scopes.tenant.limits[2].per`), `source` in which file. */
class PolicyError extends WardenError {}
PolicyError.CODE = 'policy';
PolicyError.KIND = 'policy';
/** An argument is invalid; the message and `argument` name it. */
class InvalidInputError extends WardenError {}
InvalidInputError.CODE = 'invalid_argument';
InvalidInputError.KIND = 'invalid_input';
/** The shared backend (Redis) failed or could not be reached. */
class BackendError extends WardenError {}
BackendError.CODE = 'backend';
BackendError.KIND = 'backend';
/** A reservation id that does not exist (or no longer does); `reservation` is the id. */
class ReservationNotFoundError extends WardenError {}
ReservationNotFoundError.CODE = 'reservation_not_found';
ReservationNotFoundError.KIND = 'not_found';
/** A reservation whose lease ran out before this call (its holds were already returned). */
class ReservationExpiredError extends ReservationNotFoundError {}
ReservationExpiredError.CODE = 'reservation_expired';
/** An operation that conflicts with a reservation's state (commit after release…). */
class ReservationConflictError extends WardenError {}
ReservationConflictError.CODE = 'reservation_closed';
ReservationConflictError.KIND = 'conflict';
/** A request was denied: `retryAfter` (seconds, or null if it never can succeed) and the `decision`. */
class RateLimitedError extends WardenError {
  constructor(decision) {
    const by = decision.deniedBy ? `denied by ${decision.deniedBy}` : 'denied';
    const after = decision.retryAfter == null ? '' : `; retry after ${decision.retryAfter.toFixed(3)}s`;
    super(`${by}${after}${decision.reason ? ` (${decision.reason})` : ''}`);
    this.decision = decision;
    this.retryAfter = decision.retryAfter;
  }
}
RateLimitedError.CODE = 'rate_limited';
RateLimitedError.KIND = 'denied';
/** Denied by a budget (money, tokens, risk points) rather than a rate. */
class BudgetExceededError extends RateLimitedError {}
BudgetExceededError.CODE = 'budget_exceeded';

const KINDS = {
  Policy: PolicyError,
  InvalidInput: InvalidInputError,
  Backend: BackendError,
  NotFound: ReservationNotFoundError,
  Conflict: ReservationConflictError,
};

// Every native error's message is this marker then a JSON object (src/lib.rs `to_js`).
const ERROR_MARK = 'ratewarden\x1f';

/** The typed error for a native error: its class, `code` and data come from the JSON the addon sends. */
function typed(e) {
  if (e instanceof WardenError) return e;
  const message = typeof e?.message === 'string' ? e.message : '';
  if (message.startsWith(ERROR_MARK)) {
    let data;
    try {
      data = JSON.parse(message.slice(ERROR_MARK.length));
    } catch {
      return new WardenError(message.slice(ERROR_MARK.length));
    }
    const Class = data.code === 'reservation_expired' ? ReservationExpiredError : (KINDS[data.kind] ?? WardenError);
    const err = new Class(data.message);
    err.code = data.code;
    for (const k of ['path', 'source', 'argument', 'unit', 'reservation', 'operation']) err[k] = data[k] ?? null;
    return err;
  }
  // napi's own conversion errors (a wrong argument type): still bad input.
  if (e?.code === 'InvalidArg' || e?.code === 'NumberExpected' || e?.code === 'StringExpected' || e?.code === 'ObjectExpected') {
    return new InvalidInputError(`invalid argument: ${e.message}`);
  }
  return e;
}

function isThenable(v) {
  return v !== null && (typeof v === 'object' || typeof v === 'function') && typeof v.then === 'function';
}

/** Request headers overriding one governed request's priority / scope (removed before sending), from the core. */
const { priority: PRIORITY_HEADER, scope: SCOPE_HEADER } = native.governedHeaders();

/**
 * A copy of an `openai` npm client (or any client with `withOptions({ fetch })`)
 * whose every request goes through `warden.fetcher(resource, options)`.
 */
function governOpenAI(client, warden, resource, options) {
  if (client === null || typeof client !== 'object' || typeof client.withOptions !== 'function') {
    throw new InvalidInputError(`invalid client: expected an openai client (with withOptions), got ${describe(client)}`, { argument: 'client' });
  }
  if (!(warden instanceof Warden)) {
    throw new InvalidInputError(`invalid warden: expected a Warden, got ${describe(warden)}`, { argument: 'warden' });
  }
  const inner = options?.fetch ?? (typeof client.fetch === 'function' ? client.fetch.bind(client) : undefined);
  return client.withOptions({ fetch: warden.fetcher(resource, { ...options, ...(inner ? { fetch: inner } : {}) }) });
}

function denied(decision) {
  return decision.deniedKind === 'budget' ? new BudgetExceededError(decision) : new RateLimitedError(decision);
}

function rethrow(e) {
  throw typed(e);
}

/** A clock that moves only when told to (`advance(seconds)`, `now()`), for deterministic tests. */
class ManualClock extends native.ManualClock {
  constructor(start) {
    try {
      super(start);
    } catch (e) {
      throw typed(e);
    }
  }

  advance(seconds) {
    try {
      return super.advance(seconds);
    } catch (e) {
      throw typed(e);
    }
  }
}

// --- helpers --------------------------------------------------------------------

/**
 * A scope string from raw ids, escaping what needs it:
 * `scope({ tenant: 'acme', user: 'a/b' })` → `'tenant:acme/user:a%2Fb'`;
 * pairs work too: `scope(['ip', '::1'])`.
 */
/** An id given to `scope()`: a string, or a finite number; anything else (undefined, null, objects) would make every such caller share one bucket. */
function scopeId(kind, v) {
  if (typeof v === 'string' || (typeof v === 'number' && Number.isFinite(v)) || typeof v === 'bigint') return String(v);
  const got = describe(v);
  throw new InvalidInputError(`invalid scope: the id of \`${kind}\` must be a string or a number, got ${got}`);
}

function scope(...parts) {
  const segments = [];
  for (const p of parts) {
    if (Array.isArray(p)) segments.push(p.length === 2 ? [String(p[0]), scopeId(p[0], p[1])] : p.map(String));
    else if (p && typeof p === 'object') for (const [k, v] of Object.entries(p)) segments.push([k, scopeId(k, v)]);
    else throw new InvalidInputError(`invalid scope: expected { kind: id } objects or [kind, id] pairs, got ${typeof p}`);
  }
  try {
    return native.scopeOf(segments);
  } catch (e) {
    throw typed(e);
  }
}

// --- compact decisions ----------------------------------------------------------
// An allowed, plain decision comes back as numbers — in a Float64Array this
// layer owns on the embedded engine (`decide` in src/lib.rs), as a number array
// from Redis (`decideAsync`) — and is built here as an object literal: ~10x
// cheaper than field by field through N-API. Names come from the limit table.

// The layout comes from the addon (src/compact.rs), never a copy of our own:
// numbers per limit (id, remaining, amount, reset), priority names by code.
const { stride: STRIDE, priorities: PRIORITIES, maxLimits: MAX_COMPACT_LIMITS } = native.compactLayout();
const SLOW = Symbol('slow');

/** `unit\x1famount\x1e…` for the fast path, SLOW when the general conversion must judge it. */
const SEPARATORS = /[\x1e\x1f]/;

function encodeCost(cost) {
  if (cost === undefined || cost === null) return undefined;
  if (typeof cost !== 'object' || Array.isArray(cost)) return SLOW;
  let text = '';
  for (const unit of Object.keys(cost)) {
    const v = cost[unit];
    // The separators may not occur inside a field: such input takes the
    // general path, which validates it exactly as every other path does.
    if (SEPARATORS.test(unit)) return SLOW;
    if (typeof v === 'string' && !SEPARATORS.test(v)) text += `${unit}\x1f${v}\x1e`;
    else if (typeof v === 'number' && Number.isSafeInteger(v)) text += `${unit}\x1f${v}\x1e`;
    else return SLOW; // fractions, NaN, wrong types: the general path's exact conversion and errors
  }
  return text;
}

class Compact {
  constructor(n) {
    this.table = [];
    this.learn(n);
    this.buf = new Float64Array(1 + STRIDE * MAX_COMPACT_LIMITS);
  }

  /**
   * Adds the policy in force's limits to the table. Serials are never reused by
   * a reloaded policy, so entries of an earlier one stay valid for decisions
   * made under it.
   */
  learn(n) {
    for (const l of n.limitTable()) this.table[l.id] = l;
  }

  /** The decision encoded in `buf` from `base` (the embedded engine's shared buffer, or an async answer). */
  decision(code, buf = this.buf, base = 0) {
    const { table } = this;
    const count = buf[base];
    const limits = new Array(count);
    for (let i = 0, at = base + 1; i < count; i++, at += STRIDE) {
      const t = table[buf[at]];
      const remaining = buf[at + 1];
      limits[i] = {
        name: t.name, kind: t.kind, unit: t.unit, limit: t.limit, remaining,
        remainingText: String(remaining), amount: buf[at + 2], reset: buf[at + 3], denied: false,
      };
    }
    return { allowed: true, outcome: 'allow', caps: {}, limits, priority: PRIORITIES[code] };
  }
}

/**
 * The cost as the core takes it, or an InvalidInputError naming `what.unit` for
 * a value that cannot be an amount (NaN, infinities, objects…): napi's own
 * conversion error would not say which. A BigInt is an exact whole amount
 * (passed on as its decimal text).
 */
function checkCost(cost, what) {
  if (cost === undefined || cost === null) return cost;
  if (typeof cost !== 'object' || Array.isArray(cost)) {
    throw new InvalidInputError(`invalid ${what}: expected an object of unit to amount, got ${describe(cost)}`, { argument: what });
  }
  let out = cost;
  for (const unit of Object.keys(cost)) {
    const v = cost[unit];
    if (typeof v === 'string' || (typeof v === 'number' && Number.isFinite(v))) continue;
    if (typeof v === 'bigint') {
      if (out === cost) out = { ...cost };
      out[unit] = v.toString();
      continue;
    }
    const got = typeof v === 'number' ? String(v) : describe(v);
    throw new InvalidInputError(`invalid ${what}.${unit}: expected a finite number or a decimal string, got ${got}`, { argument: what });
  }
  return out;
}

/** A usage object checked for types (field names and counts are judged by the core); BigInts as decimal strings. */
function checkUsage(usage, what) {
  if (usage === undefined || usage === null) return usage;
  if (typeof usage !== 'object' || Array.isArray(usage)) {
    throw new InvalidInputError(`invalid ${what}: expected an object of usage field to count, got ${describe(usage)}`, { argument: what });
  }
  let out = usage;
  for (const field of Object.keys(usage)) {
    const v = usage[field];
    if (typeof v === 'string' || (typeof v === 'number' && Number.isFinite(v))) continue;
    if (typeof v === 'bigint') {
      if (out === usage) out = { ...usage };
      out[field] = v.toString();
      continue;
    }
    const got = typeof v === 'number' ? String(v) : describe(v);
    throw new InvalidInputError(`invalid ${what}.${field}: expected a finite number, got ${got}`, { argument: what });
  }
  return out;
}

function requireUsage(usage) {
  if (usage === undefined || usage === null) {
    throw new InvalidInputError(`invalid usage: expected an object of usage field to count, got ${describe(usage)}`, { argument: 'usage' });
  }
  return checkUsage(usage, 'usage');
}

/** `null`, `an array`, or the typeof of a value, for messages. */
function describe(v) {
  return v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v;
}

function optionalString(value, what) {
  if (value !== undefined && value !== null && typeof value !== 'string') {
    throw new InvalidInputError(`invalid ${what}: expected a string, got ${describe(value)}`, { argument: what });
  }
}

function optionalSeconds(value, what) {
  if (value !== undefined && value !== null && typeof value !== 'number') {
    throw new InvalidInputError(`invalid ${what}: expected seconds as a number, got ${describe(value)}`, { argument: what });
  }
}

/** A request's scope and options checked for types (the core judges the values); the options as the addon takes them. */
function checkRequest(scope, options) {
  requireString(scope, 'scope');
  if (options === undefined || options === null) return options;
  requireOptions(options, 'options');
  for (const k of ['resource', 'action', 'priority', 'operation']) optionalString(options[k], k);
  optionalSeconds(options.lease, 'lease');
  const cost = checkCost(options.cost, 'cost');
  const usage = checkUsage(options.usage, 'usage');
  return cost === options.cost && usage === options.usage ? options : { ...options, cost, usage };
}

function requireString(value, what) {
  if (typeof value !== 'string') throw new InvalidInputError(`invalid ${what}: expected a string, got ${describe(value)}`, { argument: what });
}

function isOptions(value) {
  return value === undefined || value === null || (typeof value === 'object' && !Array.isArray(value));
}

function requireOptions(value, what) {
  if (!isOptions(value)) {
    throw new InvalidInputError(`invalid ${what}: expected an options object, got ${describe(value)}`, { argument: what });
  }
}

/** A rejected Promise for options that are not an object (nothing is decided or charged). */
function invalidOptions(value) {
  try {
    requireOptions(value, 'options');
  } catch (e) {
    return Promise.reject(e);
  }
  return undefined;
}

/** A policy object as JSON text; a PolicyError for one that is not a JSON document (BigInt, cycles). */
function policyJson(policy) {
  if (policy === null || typeof policy !== 'object' || Array.isArray(policy)) {
    throw new InvalidInputError(`invalid policy: expected a policy object (or use Warden.fromFile / connect with a path), got ${describe(policy)}`, { argument: 'policy' });
  }
  try {
    return JSON.stringify(policy);
  } catch (e) {
    throw new PolicyError(`invalid policy <object>: not a JSON document (${e.message.split('\n')[0]})`);
  }
}

// --- the warden -----------------------------------------------------------------

// Passed to the constructor by fromFile / connect, which fill in the native warden.
const UNBUILT = Symbol('unbuilt');
const LISTENER = Symbol('listener');

/**
 * A callback receiving a warden's events: what `warden.onEvent` returns. The
 * callback runs on the event loop, in event order, never on a decision's path.
 * What it throws (or the promise it returns rejects with) is counted in
 * `stats()` and reported with `process.emitWarning`; it never reaches the
 * warden or crashes the process, and the callback keeps receiving. A callback
 * more than 1024 events behind loses the oldest (`dropped`). It lives until
 * closed or its warden is closed, and never keeps the process alive.
 */
class Listener {
  #native = null;
  #callback;
  #events;
  #closed = false;
  #failed = 0;
  #lastError = null;

  constructor(token, callback, events) {
    if (token !== LISTENER) throw new TypeError('a Listener comes from warden.onEvent(callback)');
    this.#callback = callback;
    this.#events = events;
  }

  static start(n, callback, events, how = 'listen') {
    const l = new Listener(LISTENER, callback, events);
    const deliver = (text) => l.#deliver(text);
    l.#native = how === 'onAudit' ? n.onAudit(deliver) : n.listen(deliver, events);
    return l;
  }

  #deliver(text) {
    if (this.#closed) return; // queued before close
    let result;
    try {
      result = this.#callback(JSON.parse(text));
    } catch (e) {
      this.#fail(e);
      return;
    }
    if (result !== null && typeof result === 'object' && typeof result.then === 'function') {
      Promise.resolve(result).then(undefined, (e) => this.#fail(e));
    }
  }

  #fail(e) {
    this.#failed += 1;
    let text;
    try {
      text = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    } catch {
      text = 'a value that cannot be printed';
    }
    this.#lastError = text;
    process.emitWarning(`an event callback failed: ${text}`, { type: 'RatewardenWarning', code: 'RATEWARDEN_EVENT_CALLBACK' });
  }

  /** The event types and prefixes it receives (empty: every event). */
  get events() {
    return [...this.#events];
  }

  /** Whether it still receives events (not closed, and its warden lives). */
  get isOpen() {
    return !this.#closed && this.#native.isOpen;
  }

  /** `{ delivered, dropped, failed, lastError }` so far (kept after close). */
  stats() {
    const { delivered, dropped } = this.#native.stats();
    return { delivered, dropped, failed: this.#failed, lastError: this.#lastError };
  }

  /** Stops it: the callback is not called again, even for events already queued. Idempotent. */
  close() {
    this.#closed = true;
    this.#native.close();
  }
}

/**
 * The governor: a policy plus a backend. Every method returns a Promise; on the
 * embedded engine it is already settled when returned (decided on the calling
 * thread), with Redis the event loop never waits.
 */
class Warden {
  #native;
  #compact;
  #embedded = false;
  #listeners = new Set();

  /**
   * @param policy a policy object (as in the README) — or use `Warden.fromFile`.
   * @param options `{ backend: 'memory' | 'redis://…', namespace, onBackendError:
   *   'deny' | 'allow' | 'local', localShare, timeout (s), clock: ManualClock }`.
   *   With Redis the warden starts connecting in the background (decisions follow
   *   `onBackendError` until Redis answers); `await Warden.connect(...)` waits.
   */
  constructor(policy, options = {}) {
    requireOptions(options, 'options');
    if (policy === UNBUILT) return;
    this.#attach(Warden.#build(policyJson(policy), null, options));
  }

  /** Holds the native warden and its compact-decision reader (limit table and buffer, made once). */
  #attach(n) {
    this.#native = n;
    this.#embedded = n.embedded;
    this.#compact = new Compact(n);
  }

  static #build(json, path, options) {
    const { clock, ...rest } = options ?? {};
    try {
      return new native.NativeWarden(json, path, rest, clock ?? null);
    } catch (e) {
      throw typed(e);
    }
  }

  /** A warden for the policy file at `path` (YAML, JSON or TOML by extension). */
  static fromFile(path, options = {}) {
    requireString(path, 'path');
    requireOptions(options, 'options');
    const w = new Warden(UNBUILT);
    w.#attach(Warden.#build(null, path, options));
    return w;
  }

  /** Like the constructor, but resolves once Redis answered (rejects with a BackendError if it cannot be reached). */
  static async connect(policy, options = {}) {
    requireOptions(options, 'options');
    const { clock, ...rest } = options;
    const w = new Warden(UNBUILT);
    const json = typeof policy === 'string' ? null : policyJson(policy);
    const path = typeof policy === 'string' ? policy : null;
    w.#attach(await native.NativeWarden.connect(json, path, rest, clock ?? null).catch(rethrow));
    return w;
  }

  /**
   * Puts a new policy (an object, or a file path) in force; returns what changed
   * (`{ added, removed, changed, repriced }`). Throws a PolicyError and keeps the
   * policy in force when the new one is invalid or cannot replace it.
   */
  reload(policy) {
    const n = this.#live();
    const json = typeof policy === 'string' ? null : policyJson(policy);
    const path = typeof policy === 'string' ? policy : null;
    let changes;
    try {
      changes = n.reload(json, path);
    } catch (e) {
      throw typed(e);
    }
    this.#compact.learn(n);
    return changes;
  }

  /** `'memory'` or `'redis'`. */
  get backend() {
    return this.#live().backend;
  }

  /** Lets go of the backend and closes its event listeners; later calls throw. */
  close() {
    for (const l of this.#listeners) l.close();
    this.#listeners.clear();
    this.#native = undefined;
    this.#compact = undefined;
  }

  #live() {
    if (this.#native === undefined) throw new WardenError('this warden is closed');
    return this.#native;
  }

  #call(name, args) {
    try {
      const n = this.#live();
      // The embedded engine decides here and now: an already-settled Promise.
      if (this.#embedded) return Promise.resolve(n[`${name}Sync`](...args));
      return n[`${name}Async`](...args).catch(rethrow);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /** A request through the general path: argument types checked here (errors name the argument), values by the core. */
  #request(name, scope, options) {
    try {
      return this.#call(name, [scope, checkRequest(scope, options)]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /** check (op 0) / acquire (op 1) through the compact path (options it cannot encode take the general one). */
  #decide(op, name, scope, options) {
    const compact = this.#compact;
    if (compact === undefined || typeof scope !== 'string') return this.#request(name, scope, options); // closed, or a bad scope: the error
    const n = this.#native;
    let resource, action, cost, priority;
    if (options !== undefined && options !== null) {
      if (typeof options !== 'object' || Array.isArray(options)) return invalidOptions(options);
      // An operation id (a repeated request) and a usage are read by the general path.
      if (options.operation !== undefined || options.usage !== undefined) return this.#request(name, scope, options);
      ({ resource, action, priority } = options);
      if ((resource !== undefined && typeof resource !== 'string') || (action !== undefined && typeof action !== 'string')
        || (priority !== undefined && typeof priority !== 'string')) {
        return this.#request(name, scope, options);
      }
      cost = encodeCost(options.cost);
      if (cost === SLOW) return this.#request(name, scope, options);
    }
    try {
      if (!this.#embedded) {
        return n.decideAsync(op, scope, resource, action, cost, priority)
          .then((r) => (Array.isArray(r) ? compact.decision(r[0], r, 1) : r), rethrow);
      }
      const r = n.decide(op, scope, resource, action, cost, priority, compact.buf);
      return Promise.resolve(typeof r === 'number' ? compact.decision(r) : r);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /** Evaluates the request against every limit it touches, changing nothing. */
  check(scope, options) {
    return this.#decide(0, 'check', scope, options);
  }

  /** Admits the request and consumes its cost from every limit, or denies it and changes nothing. */
  acquire(scope, options) {
    return this.#decide(1, 'acquire', scope, options);
  }

  /** Holds the (estimated) cost under a lease until commit, release or expiry. */
  reserve(scope, options) {
    if (!isOptions(options)) return invalidOptions(options);
    return this.#request('reserve', scope, options);
  }

  /**
   * What is left of every limit a request by `scope` (on `options.resource`)
   * would touch, read without a request — nothing is charged or counted: per
   * limit `name`, `kind`, `unit`, `owner`, `limit` / `remaining` / `held` (base
   * units, with `*Text` decimals) and `reset` (seconds; absent when it never
   * resets). Rejects with a BackendError when Redis cannot be asked.
   */
  /**
   * Tops up the quota or budget `limit` of `scope` (`options.resource` for a
   * resource's limit): gives back up to `amount` (a number or a decimal string
   * in the limit's unit) of what it spent in its current window — its debt
   * first — never below zero, so a limit in debt admits again. Resolves to
   * `{ limit, unit, credited, creditedText, spent, spentText }`. Sent once: if
   * Redis's answer is lost it rejects with a BackendError and the top-up may
   * have landed.
   */
  topUp(scope, limit, amount, options) {
    try {
      requireString(scope, 'scope');
      requireString(limit, 'limit');
      if (typeof amount !== 'number' && typeof amount !== 'string') {
        throw new InvalidInputError(`invalid amount: expected a number or a decimal string, got ${describe(amount)}`, { argument: 'amount' });
      }
      requireOptions(options, 'options');
      optionalString(options?.resource, 'resource');
      return this.#call('topUp', [scope, limit, amount, options?.resource ?? null]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  balances(scope, options) {
    try {
      requireString(scope, 'scope');
      requireOptions(options, 'options');
      optionalString(options?.resource, 'resource');
      return this.#call('balances', [scope, options?.resource ?? null]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * Records what one response of `resource`'s upstream said in its rate-limit
   * headers (a fetch `Headers`, a plain object or `[name, value]` pairs; every
   * provider `parseHeaders` reads), where every process sharing the backend
   * sees it at once; call it once per response (or `report`, with the status).
   * Decisions on the resource then pass its traffic light: green (over 40%
   * left) nothing; amber delays standard and background callers
   * (`caps.delayMs`); red denies background until the reset and paces
   * standard to one per second across every process; critical passes. The
   * resource needs `upstream: {}` in the policy. Resolves to its state after
   * (`zone`, `previous`, `left`, `blocked`, `quotas`, `warnings`).
   */
  observe(resource, headers) {
    try {
      requireString(resource, 'resource');
      return this.#call('observe', [resource, headerPairs(headers), null]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * `observe` with the response's HTTP `status`: a 429 also stops every caller
   * on the resource until its `Retry-After` (or, without one, until an exhausted
   * quota resets, or for the breaker's `open_for`, 5 s, doubling) and opens
   * the circuit breaker: then exactly one request goes as its probe.
   */
  report(resource, status, headers) {
    try {
      requireString(resource, 'resource');
      if (!Number.isInteger(status)) {
        throw new InvalidInputError(`invalid status: expected an integer HTTP status, got ${describe(status)}`, { argument: 'status' });
      }
      return this.#call('observe', [resource, headerPairs(headers ?? []), status]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * Sets aside `amounts` of every window of `resource`'s shared pools (its
   * quotas and budgets without `scope:`) for the agent scope `agent` and the
   * scopes under it, active for `lease` seconds and renewed by `heartbeat`.
   * While active only its owner (and critical callers) draw on its unused
   * part; idle for a lease, standard callers may too; idle for two, it is
   * gone. Rejects when the other agents' allocations leave less than asked.
   */
  allocate(agent, resource, amounts, lease) {
    try {
      requireString(agent, 'agent');
      requireString(resource, 'resource');
      if (amounts === undefined || amounts === null) throw new InvalidInputError('invalid amounts: expected an object of unit to amount', { argument: 'amounts' });
      const checked = checkCost(amounts, 'amounts');
      optionalSeconds(lease, 'lease');
      if (lease === undefined || lease === null) throw new InvalidInputError('invalid lease: expected seconds', { argument: 'lease' });
      return this.#call('allocate', [agent, resource, checked, lease]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /** Keeps every allocation of `agent` active for another lease; resolves to how many (0: none left). */
  heartbeat(agent) {
    try {
      requireString(agent, 'agent');
      return this.#call('heartbeat', [agent]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /** Gives up `agent`'s allocation of `resource`'s pools; resolves `false` if it had none. */
  deallocate(agent, resource) {
    try {
      requireString(agent, 'agent');
      requireString(resource, 'resource');
      return this.#call('deallocate', [agent, resource]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /** `resource`'s upstream state as every process sees it now; changes nothing. */
  upstream(resource) {
    try {
      requireString(resource, 'resource');
      return this.#call('upstream', [resource]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * A `fetch` governed on `resource`: every request first waits for the
   * resource's traffic light and limits (`wait`, then any `caps.delayMs`),
   * then goes out through `options.fetch` (default: the global `fetch`), and
   * its response is reported (`report`: status and rate-limit headers), so
   * every agent sharing the backend sees the upstream's real state. A request
   * still denied after `maxWait` seconds (default 60) rejects with a
   * `RateLimitedError` and never reaches the upstream. Per request, the
   * headers `ratewarden-priority` and `ratewarden-scope` override
   * `options.priority` / `options.scope`; they are removed before sending.
   * The options are checked now: the resource must declare `upstream:`.
   */
  fetcher(resource, options) {
    requireString(resource, 'resource');
    requireOptions(options, 'options');
    const { scope, priority = 'standard', cost, maxWait = 60, fetch: send = globalThis.fetch } = options ?? {};
    requireString(scope, 'scope');
    requireString(priority, 'priority');
    if (typeof maxWait !== 'number' || !(maxWait >= 0) || maxWait === Infinity) {
      throw new InvalidInputError(`invalid maxWait: expected seconds >= 0, got ${describe(maxWait)}`, { argument: 'maxWait' });
    }
    if (typeof send !== 'function') {
      throw new InvalidInputError(`invalid fetch: expected a function, got ${describe(send)}`, { argument: 'fetch' });
    }
    const base = { resource, priority, ...(cost === undefined ? {} : { cost }) };
    try {
      this.#live().checkGoverned(scope, checkRequest(scope, base));
    } catch (e) {
      throw typed(e);
    }
    const warden = this;
    return async function governedFetch(input, init) {
      const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
      const ask = {
        ...base,
        priority: headers.get(PRIORITY_HEADER) ?? priority,
      };
      const who = headers.get(SCOPE_HEADER) ?? scope;
      headers.delete(PRIORITY_HEADER);
      headers.delete(SCOPE_HEADER);
      const d = await warden.wait(who, { ...ask, maxWait });
      if (!d.allowed) throw denied(d);
      const pause = d.caps?.delayMs ?? 0;
      if (pause > 0) await new Promise((resolve) => setTimeout(resolve, pause));
      const response = await send(input, { ...init, headers });
      try {
        await warden.report(resource, response.status, response.headers);
      } catch (e) {
        process.emitWarning(`could not report ${resource}'s response: ${e.message}`, { code: 'RATEWARDEN_REPORT' });
      }
      return response;
    };
  }

  /**
   * Runs `fn` holding `resource`'s ordered lock: what callers do when a
   * decision carries `caps.sequential` (the resource is in sequential mode
   * after a burst of denials). First come, first served across every process
   * sharing the backend; held for at most `options.hold` seconds (default 30;
   * a holder that never releases frees it then) and released when `fn`
   * settles. Rejects with a `WardenError` (code `sequential_timeout`) when
   * `options.maxWait` seconds (default 60) pass first. Resolves to `fn`'s result.
   */
  async sequential(resource, fn, options = {}) {
    requireString(resource, 'resource');
    if (typeof fn !== 'function') {
      throw new InvalidInputError(`invalid fn: expected a function, got ${describe(fn)}`, { argument: 'fn' });
    }
    requireOptions(options, 'options');
    const { hold = 30, maxWait = 60 } = options ?? {};
    optionalSeconds(hold, 'hold');
    optionalSeconds(maxWait, 'maxWait');
    const n = this.#live();
    const turn = await n.sequentialAsync(resource, hold, maxWait).catch(rethrow);
    if (turn === null) {
      const e = new WardenError(`${resource}'s ordered lock was not free within ${maxWait} s`);
      e.code = 'sequential_timeout';
      throw e;
    }
    try {
      return await fn();
    } finally {
      await n.releaseTurnAsync(resource, turn).catch(() => {});
    }
  }

  /** Charges a reservation's actual usage (units left out: as reserved); idempotent. */
  commit(reservation, actual) {
    try {
      requireString(reservation, 'reservation');
      return this.#call('commit', [reservation, checkCost(actual, 'actual')]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * Commits a reservation at the price of what the call used on `resource`
   * (`{ input_tokens: 1200, output_tokens: 95 }`; see `cost`): the money unit,
   * `tokens`… in one commit; less than reserved is refunded.
   */
  commitUsage(reservation, resource, usage) {
    try {
      requireString(reservation, 'reservation');
      requireString(resource, 'resource');
      return this.#call('commitUsage', [reservation, resource, requireUsage(usage)]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * Calls `callback(event)` on the event loop for each event of this warden
   * that `options.events` wants — types (`'limit.exhausted'`) or prefixes
   * ending in a dot (`'limit.'`); none: every event. `event` is what a webhook
   * receives: `{ id, type, timestamp, at, data }` (`id` is `msg_…`; a
   * threshold crossing's id is the same in every process and sink; `at` is µs
   * since the epoch). Returns a `Listener` (see there: a throwing callback is
   * counted and reported, never fatal). Throws an InvalidInputError for a
   * callback that is not a function or an unknown event type.
   */
  onEvent(callback, options = {}) {
    if (typeof callback !== 'function') {
      throw new InvalidInputError(`invalid callback: expected a function, got ${describe(callback)}`, { argument: 'callback' });
    }
    requireOptions(options, 'options');
    let events = options.events ?? null;
    if (typeof events === 'string') events = [events];
    if (events !== null) {
      if (!Array.isArray(events)) {
        throw new InvalidInputError(`invalid events: expected an array of event types, got ${describe(events)}`, { argument: 'events' });
      }
      events.forEach((e, i) => {
        if (typeof e !== 'string') {
          throw new InvalidInputError(`invalid events[${i}]: expected an event type, got ${describe(e)}`, { argument: 'events' });
        }
      });
    }
    let listener;
    try {
      listener = Listener.start(this.#live(), callback, events ?? []);
    } catch (e) {
      throw typed(e);
    }
    for (const l of this.#listeners) if (!l.isOpen) this.#listeners.delete(l);
    this.#listeners.add(listener);
    return listener;
  }

  /**
   * Calls `callback(record)` on the event loop for every decision (check,
   * acquire, reserve, delegate — allowed or denied), commit, release, extend
   * and expiry of this warden, in order. `record`: `{ at, timestamp,
   * request_id, action, scope, resource, policy_action, amounts, amounts_base,
   * outcome, reason, priority, backend, degraded }`. Returns a `Listener` (a
   * throwing callback is counted and reported, never fatal). The audit log
   * costs nothing until a callback or an `audit:` sink turns it on.
   */
  onAudit(callback) {
    if (typeof callback !== 'function') {
      throw new InvalidInputError(`invalid callback: expected a function, got ${describe(callback)}`, { argument: 'callback' });
    }
    let listener;
    try {
      listener = Listener.start(this.#live(), callback, [], 'onAudit');
    } catch (e) {
      throw typed(e);
    }
    for (const l of this.#listeners) if (!l.isOpen) this.#listeners.delete(l);
    this.#listeners.add(listener);
    return listener;
  }

  /** What the policy's `audit:` sinks did so far: `{ written, appended, dropped, failed, lastError }`. Synchronous. */
  auditStats() {
    try {
      return this.#live().auditStats();
    } catch (e) {
      throw typed(e);
    }
  }

  /** Resolves `true` once the `audit:` sinks wrote (or counted as failed) every record so far, `false` after `timeout` seconds (default 5). */
  flushAudit(timeout = 5) {
    try {
      optionalSeconds(timeout, 'timeout');
      return this.#live().flushAudit(timeout ?? 5).catch(rethrow);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * Resolves `true` once the Redis outlets have written (or counted as failed)
   * every event emitted so far, `false` after `timeout` seconds (default 5).
   * Await it before the process exits so the last events reach the stream.
   */
  flushOutlets(timeout = 5) {
    try {
      optionalSeconds(timeout, 'timeout');
      return this.#live().flushOutlets(timeout ?? 5).catch(rethrow);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * What the policy's Redis outlets (`events: { stream, publish }`) did so far:
   * `{ appended, published, dropped, failed, lastError }`. They write on a
   * thread of their own and never slow a decision. Synchronous.
   */
  outletStats() {
    try {
      return this.#live().outletStats();
    } catch (e) {
      throw typed(e);
    }
  }

  /**
   * What the policy's `webhooks:` deliveries did so far: `deliveries` (every
   * attempt), `deadLetters` (every attempt failed) and `dropped` (events an
   * endpoint never saw: it fell behind). Synchronous.
   */
  webhookLog() {
    try {
      return this.#live().webhookLog();
    } catch (e) {
      throw typed(e);
    }
  }

  /**
   * What `usage` costs on `resource` at its prices now (`pricing:` in the
   * policy; `output_tokens` priced — the bill a commit charges). Exact: every
   * line summed as a fraction, rounded up once to the money unit's base unit.
   * Synchronous (nothing is asked of the backend): `{ unit, amount, amountText,
   * decimals, inputTokens, outputTokens, cost }`, `cost` being what a decision
   * charges for it (`{ usd: '0.00395', tokens: 1295 }`).
   */
  cost(resource, usage) {
    try {
      requireString(resource, 'resource');
      return this.#live().cost(resource, requireUsage(usage));
    } catch (e) {
      throw typed(e);
    }
  }

  /** As `cost`, pricing `max_output_tokens` when given: what `reserve(scope, { usage })` holds. */
  estimate(resource, usage) {
    try {
      requireString(resource, 'resource');
      return this.#live().estimate(resource, requireUsage(usage));
    } catch (e) {
      throw typed(e);
    }
  }

  /** Ends a reservation or delegation without charging; resolves `false` if already released. */
  release(reservation) {
    try {
      requireString(reservation, 'reservation');
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#call('release', [reservation]);
  }

  /** Renews a reservation's lease to `lease` seconds from now; resolves to the new expiry (s since epoch). */
  extend(reservation, lease) {
    try {
      requireString(reservation, 'reservation');
      if (typeof lease !== 'number') throw new InvalidInputError(`invalid lease: expected seconds as a number, got ${describe(lease)}`, { argument: 'lease' });
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#call('extend', [reservation, lease]);
  }

  /** Carves a sub-budget for `child` out of `{ fromScope }` or `{ fromReservation }` (with optional `lease`). */
  delegate(child, amounts, options) {
    if (!isOptions(options)) return invalidOptions(options);
    try {
      requireString(child, 'child');
      if (amounts === undefined || amounts === null) throw new InvalidInputError('invalid amounts: expected an object of unit to amount', { argument: 'amounts' });
      const checked = checkCost(amounts, 'amounts');
      optionalString(options?.fromScope, 'fromScope');
      optionalString(options?.fromReservation, 'fromReservation');
      optionalSeconds(options?.lease, 'lease');
      return this.#call('delegate', [child, checked, options]);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * Waits up to `maxWait` seconds (default 30) until admitted, then acquires (or
   * reserves with `reserve: true`); resolves to the last denial if time runs out.
   */
  wait(scope, options = {}) {
    try {
      requireOptions(options, 'options');
      const { maxWait = 30, reserve = false, ...request } = options ?? {};
      optionalSeconds(maxWait, 'maxWait');
      return this.#live().waitAsync(scope, checkRequest(scope, request), maxWait, Boolean(reserve)).catch(rethrow);
    } catch (e) {
      return Promise.reject(typed(e));
    }
  }

  /**
   * Settles a wrapped call's reservation by core's settlement rule; what did
   * not go as reported becomes a process warning (`RATEWARDEN_SETTLEMENT`),
   * never an exception: the call already happened.
   */
  async #finish(fn, reservation, failed, used, unreadable, priced) {
    let problem;
    try {
      const n = this.#live();
      const settle = (args) => (this.#embedded ? n.finishSync(...args) : n.finishAsync(...args));
      try {
        problem = await settle([reservation, failed, used, unreadable ?? null, priced ?? null]);
      } catch (e) {
        // A usage that cannot even cross (BigInt, cycles, NaN) is unreadable:
        // settled at the estimate all the same.
        if (failed || used === undefined || !(typed(e) instanceof InvalidInputError)) throw e;
        problem = await settle([reservation, false, undefined, `actual() returned an object that is not a ${priced ? 'usage' : 'cost'} (${typed(e).message})`, null]);
      }
    } catch (e) {
      problem = `reservation ${reservation} could not be settled: ${typed(e).message}`;
    }
    if (problem) {
      process.emitWarning(`ratewarden: ${fn.name || 'anonymous'}: ${problem}`, {
        type: 'RatewardenWarning', code: 'RATEWARDEN_SETTLEMENT',
      });
    }
  }

  /**
   * Wraps an async function: each call reserves `cost` (an estimate; a value or a
   * function of the call's arguments) and runs `fn`. Denied calls reject with a
   * `RateLimitedError` / `BudgetExceededError`, or wait first with
   * `onLimit: 'wait'` (up to `maxWait` seconds).
   *
   * Settlement (the same rule in every binding, decided in core): if `fn` throws,
   * the hold is released, nothing is charged and its error propagates unchanged.
   * If it returns, its side effects happened, so something is always charged and
   * its result is always returned: `actual(result)` (may be async) when given and
   * valid, amounts finer than the unit rounded up to the next base unit; the
   * estimate when `actual` is absent or returns undefined/null — or throws,
   * returns something that is not an object of unit to amount, or names an unknown
   * unit or a bad amount. Those, and a commit the backend cannot confirm, are
   * reported as a process warning (`process.on('warning')`, code
   * `RATEWARDEN_SETTLEMENT`), never thrown: that would invite a retry and a
   * double spend.
   */
  wrap(fn, options = {}) {
    if (typeof fn !== 'function') throw new InvalidInputError(`invalid fn: wrap() needs a function, got ${typeof fn}`);
    requireOptions(options, 'options');
    const { scope: who, resource, action, cost, priority, actual, lease, usage, onLimit = 'raise', maxWait = 30 } = options;
    if (who === undefined) throw new InvalidInputError('invalid scope: wrap() needs options.scope');
    if (onLimit !== 'raise' && onLimit !== 'wait') throw new InvalidInputError(`invalid onLimit: ${JSON.stringify(onLimit)} is not 'raise' or 'wait'`);
    if (actual !== undefined && typeof actual !== 'function') throw new InvalidInputError('invalid actual: expected a function of the result');
    const pick = (v, args) => (typeof v === 'function' ? v(...args) : v);
    const warden = this;
    const wrapped = async function (...args) {
      const request = { resource: pick(resource, args), action: pick(action, args), cost: pick(cost, args), priority: pick(priority, args), lease };
      // Reserved by usage: the call's actual is a usage too, priced by the core.
      const u = pick(usage, args);
      if (u !== undefined && u !== null) request.usage = u;
      const priced = request.usage === undefined ? undefined : request.resource;
      const s = pick(who, args);
      const d = onLimit === 'wait'
        ? await warden.wait(s, { ...request, maxWait, reserve: true })
        : await warden.reserve(s, request);
      if (!d.allowed) throw denied(d);
      let result;
      try {
        // The call reads its caps with currentCaps(); one allowed as asked
        // hides an enclosing call's.
        const capped = d.caps !== undefined && Object.keys(d.caps).length > 0;
        result = capped || CAPS.getStore() !== undefined
          ? await CAPS.run(capped ? Object.freeze({ ...d.caps }) : NO_CAPS, () => fn.apply(this, args))
          : await fn.apply(this, args);
      } catch (e) {
        // Failed: released; the caller's error propagates unchanged.
        await warden.#finish(fn, d.reservation, true);
        throw e;
      }
      // Ran: always charged, its result always returned (see `wrap`).
      let used;
      let unreadable;
      if (actual) {
        try {
          used = actual(result);
          if (isThenable(used)) used = await used;
        } catch (e) {
          unreadable = `actual() threw ${e?.name ?? typeof e}: ${e?.message ?? String(e)}`;
        }
        if (unreadable === undefined && used !== undefined && used !== null
          && (typeof used !== 'object' || Array.isArray(used))) {
          unreadable = `actual() returned ${describe(used)}, not an object of ${priced ? 'usage field to count' : 'unit to amount'}`;
        }
        if (unreadable === undefined) {
          try {
            used = priced ? checkUsage(used, 'actual') : checkCost(used, 'actual');
          } catch (e) {
            unreadable = e.message;
          }
        }
      }
      await warden.#finish(fn, d.reservation, false, unreadable === undefined ? used : undefined, unreadable, priced);
      return result;
    };
    Object.defineProperty(wrapped, 'name', { value: fn.name });
    return wrapped;
  }

  /**
   * Express (or any `(req, res, next)`) middleware: every request asks the warden
   * (`acquire`, one `requests` unit unless `cost` says otherwise; when the request
   * touches a concurrency limit its slot is held until the response is done, the
   * handler fails or the client goes away, leased for the limit's `lease`) for its scope —
   * by default `ip:<client address>` from the socket. Behind proxies, `trustProxy`
   * says which to believe (Express's model: the right-most address that is not a
   * trusted proxy is the client): `true` = one proxy in front (nginx appending to
   * `X-Forwarded-For`), a number = that many hops, or a list of proxy networks
   * (`'10.0.0.0/8'`, `['loopback', 'uniquelocal']`). Addresses are normalised
   * (`::ffff:127.0.0.1` is `127.0.0.1`) and IPv6 clients are keyed by their
   * `/ipv6Subnet` (default 56): one host can rotate through a whole /64. Every response gets `RateLimit-Policy` / `RateLimit`
   * (`headers: 'draft-11'` default, `'draft-7'`, `'draft-6'`, or `false`); a denied
   * request gets a 429 with `Retry-After` and a JSON body, unless
   * `onLimited(req, res, decision)` answers it. `skip(req)` exempts requests;
   * `scope`, `resource`, `action`, `cost`, `priority` are values or functions of
   * `req` (a scope function returning null/undefined lets the request through).
   * A backend failure follows the warden's `onBackendError`; other errors go to
   * `next(err)` — the server never crashes.
   */
  express(options = {}) {
    requireOptions(options, 'options');
    const {
      scope: who, resource, action, cost = { requests: 1 }, priority,
      headers = 'draft-11', trustProxy = false, ipv6Subnet, skip, onLimited,
    } = options;
    if (ipv6Subnet !== undefined && !(Number.isInteger(ipv6Subnet) && ipv6Subnet >= 1 && ipv6Subnet <= 128)) {
      throw new InvalidInputError(`invalid ipv6Subnet: expected a prefix length from 1 to 128, got ${String(ipv6Subnet)}`);
    }
    // Who the client is: proxies trusted, addresses normalised, IPv6 by subnet (core).
    let identity;
    try {
      identity = new native.ClientIdentity(trustProxy ?? false, ipv6Subnet);
    } catch (e) {
      throw typed(e);
    }
    const readsForwarded = identity.trustsProxies;
    if (headers !== false && typeof headers !== 'string') {
      throw new InvalidInputError(`invalid headers: expected 'draft-11', 'draft-7', 'draft-6' or false, got ${typeof headers}`);
    }
    let style;
    try {
      style = native.headerStyle(headers === false ? 'off' : headers);
    } catch (e) {
      throw typed(e);
    }
    for (const [k, v] of Object.entries({ skip, onLimited })) {
      if (v !== undefined && typeof v !== 'function') throw new InvalidInputError(`invalid ${k}: expected a function`, { argument: k });
    }
    if (who !== undefined && typeof who !== 'string' && typeof who !== 'function') {
      throw new InvalidInputError(`invalid scope: expected a scope string or a function of the request, got ${describe(who)}`, { argument: 'scope' });
    }
    const n = this.#live();
    const isEmbedded = n.embedded;
    const pick = (v, req) => (typeof v === 'function' ? v(req) : v);
    const constant = [resource, action, cost, priority].every((v) => typeof v !== 'function');
    const tooMany = (res, http) => {
      if (res.headersSent || res.writableEnded) return;
      res.statusCode = 429;
      res.setHeader('Content-Type', 'application/json');
      res.end(http.body);
    };
    // A denial: `onLimited` may answer (also asynchronously: its promise is
    // awaited, and what it throws or rejects with goes to next(err)); else 429.
    const limited = (req, res, next, http) => {
      const { headerNames, headerValues } = http;
      for (let i = 0; i < headerNames.length; i++) res.setHeader(headerNames[i], headerValues[i]);
      if (!onLimited) return tooMany(res, http);
      const handled = onLimited(req, res, http.decision);
      if (isThenable(handled)) {
        handled.then((h) => { if (h !== true) tooMany(res, http); }, (e) => next(typed(e)));
        return undefined;
      }
      if (handled !== true) tooMany(res, http);
      return undefined;
    };

    // Allowed: the headers as one string `name\nvalue\n…`; denied, or allowed
    // holding a concurrency slot: the whole HttpDecision. Whatever a user
    // callback throws here goes to next(err), never up the stack.
    const respond = (req, res, next, r) => {
      try {
        if (typeof r !== 'string') {
          if (!r.decision.allowed) return limited(req, res, next, r);
          // The slot is held for the request's lifetime: freed once the
          // response is done or the connection closes (served, failed or
          // aborted alike — 'close' follows 'finish' too).
          const held = r.decision.reservation;
          res.once('close', () => { this.#finish(ratewardenMiddleware, held, false); });
          const { headerNames, headerValues } = r;
          for (let i = 0; i < headerNames.length; i++) res.setHeader(headerNames[i], headerValues[i]);
          return next();
        }
        if (r !== '') {
          const h = r.split('\n');
          for (let i = 0; i < h.length; i += 2) res.setHeader(h[i], h[i + 1]);
        }
      } catch (e) {
        return next(typed(e));
      }
      return next();
    };
    // Constant request fields (values, not functions of req) are validated once,
    // here — types, then resource, action, units and amounts against the policy —
    // and stay native: one index crosses per request.
    let template;
    if (constant) {
      try {
        for (const [k, v] of Object.entries({ resource, action, priority })) optionalString(v, k);
        template = n.prepareHttp(resource, action, checkCost(cost, 'cost'), priority, style);
      } catch (e) {
        throw typed(e);
      }
    }

    // One native call finds the client scope (when `s` is undefined), decides
    // and, when allowed, hands back only the header pairs.
    const decide = (req, res, next, s) => {
      let xff;
      if (s === undefined && readsForwarded) {
        xff = req.headers['x-forwarded-for'];
        if (Array.isArray(xff)) xff = xff.join(',');
      }
      const peer = s === undefined ? req.socket?.remoteAddress : undefined;
      if (template !== undefined) {
        if (isEmbedded) return respond(req, res, next, n.decideHttpPrepared(s, peer, xff, identity, template));
        n.decideHttpPreparedAsync(s, peer, xff, identity, template).then((r) => respond(req, res, next, r), (e) => next(typed(e)));
        return undefined;
      }
      // Fields computed per request: the general conversion.
      const target = s ?? identity.scope(peer ?? null, xff ?? null);
      const request = checkRequest(target, {
        resource: pick(resource, req), action: pick(action, req), cost: pick(cost, req), priority: pick(priority, req),
      });
      if (isEmbedded) return respond(req, res, next, n.acquireHttpSync(target, request, style));
      n.acquireHttpAsync(target, request, style).then((r) => respond(req, res, next, r), (e) => next(typed(e)));
      return undefined;
    };

    const proceed = (req, res, next) => {
      // A middleware outlives nothing: once the warden is closed it refuses.
      if (this.#native === undefined) return next(new WardenError('this warden is closed'));
      if (who === undefined) return decide(req, res, next, undefined); // the client's address
      const s = pick(who, req);
      if (s === undefined || s === null) return next(); // the scope function said: not limited
      return decide(req, res, next, s);
    };

    function ratewardenMiddleware(req, res, next) {
      try {
        if (skip) {
          const skipped = skip(req);
          // `skip` may be async (a Promise is truthy: awaited, not taken as true).
          if (isThenable(skipped)) {
            skipped.then((v) => {
              try {
                return v ? next() : proceed(req, res, next);
              } catch (e) {
                return next(typed(e));
              }
            }, (e) => next(typed(e)));
            return undefined;
          }
          if (skipped) return next();
        }
        return proceed(req, res, next);
      } catch (e) {
        return next(typed(e));
      }
    }
    return ratewardenMiddleware;
  }
}

/**
 * Seconds to wait before retry number `attempt` (1 for the first) of a refused
 * upstream call: `retryAfter` (seconds) when the upstream said, else an
 * exponential backoff (0.5 s doubling, at most 60 s), plus a jittered offset from
 * the caller's tier — critical 0–0.5 s, standard 0.5–3.5 s, background 3.5–9.5 s.
 * The bands never overlap, so retries never collide across tiers.
 */
function retryDelay(attempt, options = {}) {
  if (!Number.isInteger(attempt) || attempt < 0 || attempt > 0xffffffff) {
    throw new InvalidInputError(`invalid attempt: expected a whole number from 0, got ${String(attempt)}`, { argument: 'attempt' });
  }
  requireOptions(options, 'options');
  optionalString(options?.priority, 'priority');
  optionalSeconds(options?.retryAfter, 'retryAfter');
  try {
    return native.retryDelay(attempt, options?.priority ?? null, options?.retryAfter ?? null);
  } catch (e) {
    throw typed(e);
  }
}

/**
 * `[name, value]` string pairs of a fetch `Headers`, a plain object (array
 * values repeat the field) or pairs; entries without a value are skipped.
 */
function headerPairs(headers) {
  let pairs;
  if (headers !== null && typeof headers === 'object' && typeof headers.entries === 'function' && !Array.isArray(headers)) {
    pairs = [...headers.entries()];
  } else if (Array.isArray(headers)) {
    pairs = headers;
  } else if (headers !== null && typeof headers === 'object') {
    pairs = Object.entries(headers).flatMap(([k, v]) => (Array.isArray(v) ? v.map((x) => [k, x]) : [[k, v]]));
  } else {
    throw new InvalidInputError(`invalid headers: expected Headers, an object or [name, value] pairs, got ${describe(headers)}`, { argument: 'headers' });
  }
  const strings = [];
  for (const p of pairs) {
    if (!Array.isArray(p) || p.length !== 2 || p[1] === undefined || p[1] === null) continue;
    strings.push([String(p[0]), String(p[1])]);
  }
  return strings;
}

/**
 * What an upstream response's headers say about its rate limits: OpenAI, Azure
 * OpenAI, Anthropic, GitHub, the IETF drafts, generic `X-RateLimit-*` and
 * `Retry-After`. `headers` is a fetch `Headers`, a plain object or `[name, value]`
 * pairs; `options.now` the response's time (seconds since the epoch; default: now).
 * Resolves nothing: returns `{ quotas, retryAfter, warnings }`, one quota per
 * dimension with `limit`, `remaining`, `reset` (seconds) as far as the headers
 * tell; malformed values are warnings, never numbers.
 */
function parseHeaders(headers, options = {}) {
  requireOptions(options, 'options');
  optionalSeconds(options?.now, 'now');
  const strings = headerPairs(headers);
  try {
    return native.parseHeaders(strings, options?.now ?? null);
  } catch (e) {
    throw typed(e);
  }
}

/**
 * The headers of a webhook message signed per the Standard Webhooks
 * specification: `webhook-id` (`msgId`), `webhook-timestamp` (seconds since the
 * epoch) and `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of
 * `"<id>.<timestamp>.<body>"` under `secret`, written `whsec_<base64>`).
 * Receivers verify it with the `standardwebhooks` package (or any Standard
 * Webhooks library). Throws an `InvalidInputError` for a secret that is not
 * one (its value is never repeated).
 */
function signWebhook(secret, msgId, timestamp, body) {
  requireString(secret, 'secret');
  requireString(msgId, 'msgId');
  if (!Number.isSafeInteger(timestamp)) {
    throw new InvalidInputError(`invalid timestamp: expected whole seconds since the epoch, got ${describe(timestamp)}`, { argument: 'timestamp' });
  }
  let bytes;
  if (typeof body === 'string') bytes = Buffer.from(body, 'utf8');
  else if (body instanceof Uint8Array) bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  else throw new InvalidInputError(`invalid body: expected a string or bytes, got ${describe(body)}`, { argument: 'body' });
  try {
    return { ...native.signWebhook(secret, msgId, timestamp, bytes) };
  } catch (e) {
    throw typed(e);
  }
}

/** The caps of the `wrap()`ped call running now (see `currentCaps`). */
const CAPS = new AsyncLocalStorage();
const NO_CAPS = Object.freeze({});

/**
 * The caps of the `warden.wrap()`ped call running now, as `Decision.caps`
 * (`maxTokens`, `model`, `delayMs`…): empty outside a wrapped call and for one
 * allowed as asked. A shrunk call (`shrink:` in the policy) must honour them —
 * at most `maxTokens` output tokens, on `model` when given — or its usage
 * exceeds what was reserved.
 */
function currentCaps() {
  return { ...(CAPS.getStore() ?? NO_CAPS) };
}

module.exports = {
  currentCaps,
  // The addon itself, for the package's own tests (not part of the API).
  [Symbol.for('ratewarden.native')]: native,
  Warden,
  Listener,
  ManualClock,
  scope,
  retryDelay,
  parseHeaders,
  signWebhook,
  governOpenAI,
  version: native.version,
  WardenError,
  PolicyError,
  InvalidInputError,
  BackendError,
  ReservationNotFoundError,
  ReservationExpiredError,
  ReservationConflictError,
  RateLimitedError,
  BudgetExceededError,
};
