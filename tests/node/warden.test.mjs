// The Warden API from Node: decisions, reservations, wrap(), typed errors, the
// shared vectors on the embedded engine, Redis and a Redis Cluster, and a script
// that exits by itself.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  BudgetExceededError, InvalidInputError, ManualClock, PolicyError, RateLimitedError,
  ReservationConflictError, ReservationExpiredError, ReservationNotFoundError, Warden, WardenError, scope,
} from '../../bindings-node/index.mjs';
import { addon, policy, startRedis } from './helpers.mjs';

let redis;
before(() => { redis = startRedis(); });
after(() => redis?.stop());

const budget = {
  scopes: { tenant: { limits: [{ name: 'tenant-usd', kind: 'budget', unit: 'usd', limit: '1', per: 'day' }] } },
};

describe('Warden', () => {
  test('decisions are plain objects and embedded promises are already settled', async () => {
    const w = new Warden(policy(2), { clock: new ManualClock() });
    let settled = false;
    const p = w.acquire('ip:1').then((d) => { settled = true; return d; });
    await null; // one microtask turn: no thread hop, no macrotask
    await null;
    assert.equal(settled, true);
    const d = await p;
    assert.equal(d.allowed, true);
    assert.equal(d.outcome, 'allow');
    assert.deepEqual(d.limits.map((l) => [l.name, l.remaining, l.reset]), [['per-ip', 1, 30]]);
    assert.equal(Object.getPrototypeOf(d), Object.prototype);
    await w.acquire('ip:1');
    const no = await w.acquire('ip:1');
    assert.equal(no.allowed, false);
    assert.equal(no.retryAfter, 30);
    assert.equal(no.deniedBy, 'per-ip');
    assert.equal(w.backend, 'memory');
  });

  test('the compact path (allowed check/acquire in whole units) reads exactly like the general one', async () => {
    const whole = {
      scopes: {
        tenant: { limits: [
          { name: 'tenant-tokens', kind: 'budget', unit: 'tokens', limit: 1000, per: 'day' },
          { name: 'tenant-huge', kind: 'budget', unit: 'tokens', limit: 9000000000000000, per: 'day' },
        ] },
      },
      resources: { llm: { limits: [{ name: 'llm-rpm', kind: 'rate', unit: 'requests', limit: 60, per: '1m' }] } },
    };
    const w = new Warden(whole, { clock: new ManualClock() });
    const request = { resource: 'llm', cost: { tokens: 250 }, priority: 'background' };
    // wait() answers through the general conversion; acquire() through the compact one.
    const general = await w.wait('tenant:a', { ...request, maxWait: 1 });
    const compact = await w.acquire('tenant:b', request);
    assert.deepStrictEqual(compact, { ...general, limits: compact.limits });
    // The resource's rate is shared by both tenants: one more request used.
    assert.deepStrictEqual(
      compact.limits,
      general.limits.map((l) => (l.name === 'llm-rpm' ? { ...l, remaining: 58, remainingText: '58', reset: 2 } : l)),
    );
    assert.deepEqual(compact.limits.map((l) => [l.name, l.remainingText]), [
      ['tenant-tokens', '750'], ['tenant-huge', '8999999999999750'], ['llm-rpm', '58'],
    ]);
    assert.equal(compact.limits[1].remaining, 8999999999999750); // near 2^53, exact
    // check() changes nothing on the compact path either.
    assert.equal((await w.check('tenant:b', { cost: { tokens: 500 } })).limits[0].remainingText, '250');
    assert.equal((await w.check('tenant:b')).limits[0].remainingText, '750');

    // Which path answered, seen from the addon: a number is the compact code.
    const n = new addon.NativeWarden(JSON.stringify(whole), null, {}, null);
    const buf = new Float64Array(257);
    assert.equal(n.decide(1, 'tenant:c', 'llm', undefined, 'tokens\x1f10\x1e', undefined, buf), 1);
    assert.deepEqual([...buf.slice(0, 4)], [3, 0, 990, 10]); // 3 limits; tenant-tokens (id 0): 990 left, 10 taken
    assert.ok(buf[4] > 0 && buf[4] <= 86400); // its reset: the rest of the (real) day
    // A unit with decimals is answered whole, its text formatted by core.
    const usd = { scopes: { tenant: { limits: [{ name: 'tenant-usd', kind: 'budget', unit: 'usd', limit: '1', per: 'day' }] } } };
    const nu = new addon.NativeWarden(JSON.stringify(usd), null, {}, null);
    const d = nu.decide(1, 'tenant:c', undefined, undefined, 'usd\x1f0.000001\x1e', undefined, buf);
    assert.equal(typeof d, 'object');
    assert.equal(d.limits[0].remainingText, '0.999999');
  });

  test('reserve, commit the actual (refund), idempotent commit, release', async () => {
    const w = new Warden(budget, { clock: new ManualClock() });
    const r = await w.reserve('tenant:a', { cost: { usd: '0.40' } });
    assert.equal(r.limits[0].remaining, 600000);
    const receipt = await w.commit(r.reservation, { usd: '0.10' });
    assert.deepEqual(receipt.charges.map((c) => [c.name, c.reserved, c.charged]), [['tenant-usd', 400000, 100000]]);
    assert.equal((await w.commit(r.reservation, { usd: '0.10' })).duplicate, true);
    assert.equal((await w.check('tenant:a', { cost: { usd: 0 } })).limits[0].remaining, 900000);
    const r2 = await w.reserve('tenant:a', { cost: { usd: '0.5' } });
    assert.equal(await w.release(r2.reservation), true);
    assert.equal(await w.release(r2.reservation), false);
    await assert.rejects(w.commit(r2.reservation), ReservationConflictError);
    await assert.rejects(w.commit('0'.repeat(32)), ReservationNotFoundError);
  });

  test('wrap() commits the actual cost, releases on throw, rejects when denied', async () => {
    const w = new Warden(budget, { clock: new ManualClock() });
    const ask = w.wrap(async (tenant, tokens) => ({ usage: tokens }), {
      scope: (tenant) => scope({ tenant }),
      cost: { usd: '0.30' },
      actual: (result) => ({ usd: (result.usage * 0.0001).toFixed(4) }),
    });
    assert.deepEqual(await ask('a', 1000), { usage: 1000 }); // charged 0.10
    const left = async () => (await w.check('tenant:a', { cost: { usd: 0 } })).limits[0].remaining;
    assert.equal(await left(), 900000);
    const failing = w.wrap(async () => { throw new Error('model down'); }, { scope: 'tenant:a', cost: { usd: '0.30' } });
    await assert.rejects(failing(), /model down/);
    assert.equal(await left(), 900000, 'released on throw');
    const big = w.wrap(async () => 'never', { scope: 'tenant:a', cost: { usd: '0.95' } });
    const e = await big().then(() => null, (err) => err);
    assert.ok(e instanceof BudgetExceededError && e instanceof RateLimitedError && e instanceof WardenError);
    assert.equal(e.decision.deniedBy, 'tenant-usd');
    assert.equal(await left(), 900000);
  });

  test('1,000 concurrent wrapped calls on one budget admit exactly the limit', async () => {
    const w = new Warden(budget, { clock: new ManualClock() });
    const tool = w.wrap(async (i) => i, { scope: 'tenant:a', cost: { usd: '0.004' } });
    const results = await Promise.allSettled(Array.from({ length: 1000 }, (_, i) => tool(i)));
    assert.equal(results.filter((r) => r.status === 'fulfilled').length, 250);
    assert.ok(results.filter((r) => r.status === 'rejected').every((r) => r.reason instanceof BudgetExceededError));
  });

  test('an operation id is decided once (the general path reads it)', async () => {
    const w = new Warden(budget, { clock: new ManualClock() });
    const op = '0123456789abcdef0123456789abcdef';
    const first = await w.acquire('tenant:a', { cost: { usd: '0.4' }, operation: op });
    const again = await w.acquire('tenant:a', { cost: { usd: '0.4' }, operation: op });
    assert.equal(first.allowed, true);
    assert.deepEqual(again, first);
    assert.equal(first.unconfirmed ?? null, null);
    const left = await w.check('tenant:a', { cost: { usd: 0 } });
    assert.equal(left.limits[0].remaining, 600000, 'charged once');
    await assert.rejects(w.acquire('tenant:a', { cost: { usd: '0.5' }, operation: op }), (e) =>
      e instanceof InvalidInputError && /already answered a different request/.test(e.message));
  });

  test('wait() resolves once capacity returns', async () => {
    const clock = new ManualClock();
    const w = new Warden(policy(1), { clock });
    await w.acquire('ip:1');
    const waiting = w.wait('ip:1', { maxWait: 120 });
    setImmediate(() => clock.advance(61));
    assert.equal((await waiting).allowed, true);
  });
});

describe('bad input: typed errors that name the problem, nothing changed', () => {
  const cases = [
    ['a scope without kind', (w) => w.acquire('nokind'), InvalidInputError, /scope/],
    ['a scope that is not a string', (w) => w.acquire(42), InvalidInputError, /invalid scope: expected a string, got number/],
    ['no scope at all', (w) => w.acquire(), InvalidInputError, /invalid scope: expected a string, got undefined/],
    ['a resource that is a number', (w) => w.acquire('ip:1', { resource: 5 }), InvalidInputError, /invalid resource: expected a string/],
    ['a NaN amount', (w) => w.acquire('ip:1', { cost: { requests: Number.NaN } }), InvalidInputError, /cost\.requests.*NaN/],
    ['a lease that is text', (w) => w.reserve('ip:1', { lease: '10' }), InvalidInputError, /invalid lease: expected seconds/],
    ['a reservation id that is not a string', (w) => w.commit(undefined), InvalidInputError, /invalid reservation: expected a string/],
    ['release without an id', (w) => w.release(), InvalidInputError, /invalid reservation/],
    ['extend with a text lease', (w) => w.extend('0'.repeat(32), '5'), InvalidInputError, /invalid lease/],
    ['delegate to a number', (w) => w.delegate(5, { requests: 1 }, { fromScope: 'ip:1' }), InvalidInputError, /invalid child/],
    ['wait for undefined', (w) => w.wait(undefined), InvalidInputError, /invalid scope/],
    ['an operation id that is a number', (w) => w.acquire('ip:1', { operation: 5 }), InvalidInputError, /invalid operation/],
    ['a boolean amount', (w) => w.acquire('ip:1', { cost: { requests: true } }), InvalidInputError, /cost\.requests.*boolean/],
    ['a non-decimal string amount', (w) => w.acquire('ip:1', { cost: { requests: 'lots' } }), InvalidInputError, /lots.*decimal/],
    ['a negative amount', (w) => w.acquire('ip:1', { cost: { requests: -1 } }), InvalidInputError, /negative|must be/],
    ['an unknown priority', (w) => w.acquire('ip:1', { priority: 'urgent' }), InvalidInputError, /urgent/],
    ['a cost that is an array', (w) => w.acquire('ip:1', { cost: [1] }), InvalidInputError, /array/],
    ['a malformed reservation id', (w) => w.commit('xyz'), InvalidInputError, /reservation id/],
    ['a negative lease', (w) => w.reserve('ip:1', { lease: -1 }), InvalidInputError, /lease/],
    ['a NaN lease on extend', (w) => w.extend('0'.repeat(32), Number.NaN), InvalidInputError, /lease/],
    ['delegate without a source', (w) => w.delegate('ip:1/sub:2', { requests: 1 }, {}), InvalidInputError, /fromScope/],
    ['wait with a negative maxWait', (w) => w.wait('ip:1', { maxWait: -5 }), InvalidInputError, /maxWait/],
    ["an amount carrying the fast path's separators", (w) => w.acquire('ip:1', { cost: { requests: '1\x1erequests\x1f5' } }), InvalidInputError, /decimal/],
    ['a unit carrying them', (w) => w.acquire('ip:1', { cost: { 'requests\x1f5\x1erequests': 1 } }), InvalidInputError, /unit/],
    ['options that are a string', (w) => w.acquire('ip:1', 'x'), InvalidInputError, /options.*string/],
    ['options that are an array', (w) => w.acquire('ip:1', [1]), InvalidInputError, /options.*array/],
    ['check options that are a number', (w) => w.check('ip:1', 5), InvalidInputError, /options.*number/],
    ['reserve options that are a boolean', (w) => w.reserve('ip:1', true), InvalidInputError, /options.*boolean/],
    ['delegate options that are a string', (w) => w.delegate('ip:1/sub:2', { requests: 1 }, 'ip:1'), InvalidInputError, /options.*string/],
  ];
  for (const [what, call, cls, message] of cases) {
    test(what, async () => {
      const w = new Warden(policy(5), { clock: new ManualClock() });
      const e = await call(w).then(() => null, (err) => err);
      assert.ok(e instanceof cls, `${what}: got ${e?.constructor?.name}: ${e?.message}`);
      assert.match(e.message, message);
      assert.equal((await w.check('ip:1', { cost: { requests: 0 } })).limits[0].remaining, 5, 'nothing changed');
    });
  }

  test('errors carry code, kind and data; an expired reservation is not an unknown one', async () => {
    const clock = new ManualClock();
    const w = new Warden(policy(5), { clock });
    const r = await w.reserve('ip:1', { lease: 1 });
    clock.advance(2);
    const expired = await w.commit(r.reservation).catch((e) => e);
    assert.ok(expired instanceof ReservationExpiredError && expired instanceof ReservationNotFoundError, expired?.constructor?.name);
    assert.deepEqual([expired.code, expired.kind, expired.reservation], ['reservation_expired', 'not_found', r.reservation]);
    const unknown = await w.release('0'.repeat(31) + '1').catch((e) => e);
    assert.ok(unknown instanceof ReservationNotFoundError && !(unknown instanceof ReservationExpiredError));
    assert.deepEqual([unknown.code, unknown.reservation], ['reservation_not_found', '0'.repeat(31) + '1']);
    const u = await w.acquire('ip:1', { cost: { eur: 1 } }).catch((e) => e);
    assert.deepEqual([u.code, u.kind, u.argument], ['unknown', 'invalid_input', 'unit']);
    const a = await w.acquire('ip:1', { cost: { requests: '0.5' } }).catch((e) => e);
    assert.deepEqual([a.code, a.unit], ['invalid_amount', 'requests']);
    const t = await w.acquire(42).catch((e) => e);
    assert.deepEqual([t.code, t.argument], ['invalid_argument', 'scope']);
    const p = (() => { try { new Warden({ scopes: { ip: { limits: [{ name: 'x', kind: 'nope' }] } } }); } catch (e) { return e; } return null; })();
    assert.deepEqual([p.code, p.kind, p.path], ['policy', 'policy', 'scopes.ip.limits[0].kind']);
    const d = await w.wrap(async () => 1, { scope: 'ip:1', cost: { requests: 99 } })().catch((e) => e);
    assert.deepEqual([d.code, d.kind], ['rate_limited', 'denied']);
    // A BigInt amount is an exact whole amount; a BigInt or circular policy a PolicyError.
    assert.equal((await w.acquire('ip:1', { cost: { requests: 2n } })).limits[0].amount, 2);
    const circular = { scopes: {} };
    circular.self = circular;
    for (const bad of [{ scopes: { ip: { limits: [{ name: 'x', kind: 'rate', limit: 5n, per: '1s' }] } } }, circular]) {
      assert.throws(() => new Warden(bad), (e) => e instanceof PolicyError && e.code === 'policy' && /not a JSON document/.test(e.message));
    }
  });

  test('bad constant middleware options fail when the middleware is made', () => {
    const w = new Warden({ ...policy(5), resources: { llm: { limits: [] } } });
    const cases = [
      [{ trustProxy: 'yes' }, /trust_proxy/],
      [{ scope: 5 }, /invalid scope/],
      [{ resource: 'nope' }, /unknown resource `nope`/],
      [{ cost: { requests: Number.NaN } }, /cost\.requests/],
      [{ cost: { eur: 1 } }, /unknown unit `eur`/],
      [{ cost: { requests: '0.5' } }, /finer than/],
      [{ priority: 5 }, /invalid priority/],
    ];
    for (const [options, message] of cases) {
      assert.throws(() => w.express(options), (e) => e instanceof InvalidInputError && message.test(e.message), JSON.stringify(options));
    }
    assert.equal(typeof w.express({ resource: 'llm', cost: { usd: 0.5 } }), 'function');
  });

  test('policies and options', () => {
    assert.throws(() => new Warden({ scopes: { ip: { limits: [{ name: 'x', kind: 'nope' }] } } }), (e) => e instanceof PolicyError && /scopes\.ip\.limits\[0\]\.kind/.test(e.message));
    assert.throws(() => new Warden('p.yaml'), InvalidInputError);
    assert.throws(() => Warden.fromFile('/nonexistent/p.yaml'), (e) => e instanceof PolicyError && /nonexistent/.test(e.message));
    assert.throws(() => new Warden(policy(), { onBackendError: 'maybe' }), (e) => e instanceof InvalidInputError && /maybe/.test(e.message));
    assert.throws(() => new Warden(policy(), { backend: 'http://x' }), InvalidInputError);
    assert.throws(() => new ManualClock(Number.NaN), InvalidInputError);
    assert.throws(() => scope({ Tenant: 'a' }), InvalidInputError);
    // Ids that would make every anonymous caller share one bucket.
    for (const id of [undefined, null, {}, [], Number.NaN, () => 1]) {
      assert.throws(() => scope({ user: id }), (e) => e instanceof InvalidInputError && /id of `user`/.test(e.message), String(id));
      assert.throws(() => scope(['user', id]), InvalidInputError, String(id));
    }
    assert.equal(scope({ tenant: 'acme', user: 42 }), 'tenant:acme/user:42');
  });

  test('a closed warden says so', async () => {
    const w = new Warden(policy());
    w.close();
    await assert.rejects(w.acquire('ip:1'), /closed/);
  });
});

// --- the shared vectors ----------------------------------------------------------

const vectorsDir = fileURLToPath(new URL('../vectors/', import.meta.url));
const vectors = readdirSync(vectorsDir).filter((f) => f.endsWith('.json')).sort();
const ERRORS = { policy: PolicyError, invalid_input: InvalidInputError, not_found: ReservationNotFoundError, conflict: ReservationConflictError };

async function runStep(w, clock, names, step) {
  const id = (k) => names[step[k]] ?? step[k];
  const req = { resource: step.resource, action: step.action, cost: step.cost, priority: step.priority };
  const lease = step.lease_ms == null ? undefined : step.lease_ms / 1000;
  switch (step.op) {
    case 'advance': clock.advance(step.ms / 1000); return undefined;
    case 'check': return w.check(step.scope, req);
    case 'acquire': return w.acquire(step.scope, req);
    case 'reserve': return w.reserve(step.scope, { ...req, lease });
    case 'commit': return w.commit(id('reservation'), step.actual);
    case 'release': return w.release(id('reservation'));
    case 'extend': await w.extend(id('reservation'), lease); return undefined;
    case 'delegate': return w.delegate(step.child, step.amounts ?? {}, step.from_scope
      ? { fromScope: step.from_scope, lease } : { fromReservation: id('from_reservation'), lease });
    default: throw new Error(`unknown op ${step.op}`);
  }
}

function expectStep(at, expect, got) {
  if (got && typeof got === 'object' && 'outcome' in got) {
    if ('outcome' in expect) assert.equal(got.outcome, expect.outcome, `${at}: outcome; ${got.reason}`);
    if ('retry_after_ms' in expect) {
      const want = expect.retry_after_ms;
      if (want === null) assert.equal(got.retryAfter ?? null, null, `${at}: retry_after`);
      else assert.ok(Math.abs(got.retryAfter - want / 1000) < 1e-6, `${at}: retry_after ${got.retryAfter} vs ${want / 1000}`);
    }
    for (const [name, value] of Object.entries(expect.remaining ?? {})) {
      const limit = got.limits.find((l) => l.name === name);
      assert.ok(limit, `${at}: no limit ${name}`);
      assert.equal(limit.remaining, value, `${at}: remaining of ${name}`);
    }
    if ('denied_by' in expect) assert.equal(got.deniedBy ?? null, expect.denied_by, `${at}: denied_by`);
    if ('priority' in expect) assert.equal(got.priority, expect.priority, `${at}: priority`);
    for (const [cap, value] of Object.entries(expect.caps ?? {})) {
      const key = cap.replace(/_(\w)/g, (_, c) => c.toUpperCase());
      assert.equal(got.caps[key], value, `${at}: caps.${cap}`);
    }
  } else if (got && typeof got === 'object' && 'charges' in got) {
    for (const [name, value] of Object.entries(expect.charged ?? {})) {
      const charge = got.charges.find((c) => c.name === name);
      assert.ok(charge, `${at}: no charge for ${name}`);
      assert.equal(charge.charged, value, `${at}: charged ${name}`);
    }
    if ('duplicate' in expect) assert.equal(got.duplicate, expect.duplicate, `${at}: duplicate`);
  } else if (typeof got === 'boolean' && 'released' in expect) {
    assert.equal(got, expect.released, `${at}: released`);
  }
}

async function runFile(file, backend, namespace) {
  const doc = JSON.parse(readFileSync(vectorsDir + file, 'utf8'));
  const clock = new ManualClock(Date.parse(doc.start) / 1000);
  const w = backend
    ? await Warden.connect(doc.policy, { backend, namespace, clock })
    : new Warden(doc.policy, { clock });
  const names = {};
  for (const [i, step] of doc.steps.entries()) {
    const at = `${file} step ${i} (${step.op}) on ${w.backend}`;
    const expect = step.expect ?? {};
    if ('error' in expect) {
      await assert.rejects(runStep(w, clock, names, step), ERRORS[expect.error], at);
      continue;
    }
    const got = await runStep(w, clock, names, step);
    if (got && step.as && got.reservation) names[step.as] = got.reservation;
    expectStep(at, expect, got);
  }
  w.close();
  return doc.steps.length;
}

describe('shared vectors', () => {
  test('there are vectors', () => assert.ok(vectors.length >= 8));
  for (const file of vectors) {
    test(`${file} on the embedded engine`, async () => assert.ok((await runFile(file, null, 'unused')) > 0));
  }
  for (const target of ['url', 'cluster_url']) {
    test(`every vector on Redis (${target})`, async () => {
      let steps = 0;
      for (const file of vectors) steps += await runFile(file, redis[target], `node-vec-${target}-${file}-${Date.now()}`.replace(/[^A-Za-z0-9_.-]/g, '-'));
      assert.ok(steps > 50);
    });
  }
});

// --- process lifetime -----------------------------------------------------------------

test('a script that uses a Redis warden and closes it exits by itself', () => {
  const entry = fileURLToPath(new URL('../../bindings-node/index.cjs', import.meta.url));
  const script = `
    const { Warden } = require(${JSON.stringify(entry)});
    (async () => {
      const w = await Warden.connect({ scopes: { ip: { limits: [{ name: 'r', kind: 'rate', unit: 'requests', limit: 5, per: '1m' }] } } },
        { backend: ${JSON.stringify(redis.url)}, namespace: 'node-exit-${Date.now()}' });
      const d = await w.acquire('ip:1');
      w.close();
      console.log(d.allowed ? 'allowed' : 'denied');
    })();`;
  // A dangling handle would keep it running: the timeout would kill it and fail.
  const out = execFileSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 20_000 });
  assert.equal(out.trim(), 'allowed');
});

test('retryDelay: the tiers\' bands never overlap; Retry-After honoured; bad input typed', async () => {
  const { retryDelay } = await import('../../bindings-node/index.mjs');
  const draws = Object.fromEntries(['critical', 'standard', 'background'].map((p) => [p, Array.from({ length: 2000 }, () => retryDelay(3, { priority: p, retryAfter: 20 }))]));
  assert.ok(Math.min(...draws.critical) >= 20 && Math.max(...draws.critical) < 20.5);
  assert.ok(Math.max(...draws.critical) < Math.min(...draws.standard) && Math.max(...draws.standard) < 23.5);
  assert.ok(Math.max(...draws.standard) < Math.min(...draws.background) && Math.max(...draws.background) < 29.5);
  const first = retryDelay(3, { priority: 'critical' });
  assert.ok(first >= 2 && first < 2.5, String(first));
  assert.throws(() => retryDelay(1, { priority: 'urgent' }), (e) => e instanceof InvalidInputError && /urgent/.test(e.message));
  assert.throws(() => retryDelay(-1), (e) => e instanceof InvalidInputError && e.argument === 'attempt');
  assert.throws(() => retryDelay(1, { retryAfter: '5' }), (e) => e.argument === 'retryAfter');
  assert.throws(() => retryDelay(1, { retryAfter: -5 }), InvalidInputError);
});
