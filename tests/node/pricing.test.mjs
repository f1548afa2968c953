// Pricing from Node: cost / estimate from the policy's price tables, the shared
// bill vectors, reservations and wrapped calls by usage charged in dollars and
// tokens at once, bad usage refused by name — embedded, on Redis and Cluster.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, test } from 'node:test';

import { InvalidInputError, ManualClock, Warden, currentCaps } from '../../bindings-node/index.mjs';
import { startRedis } from './helpers.mjs';

const VECTORS = JSON.parse(readFileSync(new URL('../vectors/pricing/bills.json', import.meta.url), 'utf8'));

const POLICY = {
  scopes: {
    tenant: {
      limits: [
        { name: 'usd', kind: 'budget', unit: 'usd', limit: '1.00', per: 'month' },
        { name: 'tpm', kind: 'quota', unit: 'tokens', limit: 1000000, per: 'minute' },
      ],
    },
  },
  resources: {
    'openai:gpt-4o': { pricing: { input: 2.5, cached_input: 1.25, output: 10 } },
    plain: {},
  },
};

let redis;
before(() => { redis = startRedis(); });
after(() => redis.stop());

const remaining = (d) => Object.fromEntries(d.limits.map((l) => [l.name, l.remaining]));
const charged = (r) => Object.fromEntries(r.charges.map((c) => [c.name, c.charged]));

test('the bill vectors price exactly', () => {
  const policy = { resources: Object.fromEntries(Object.entries(VECTORS.prices).map(([n, p]) => [n, { pricing: p }])) };
  for (const c of VECTORS.cases) {
    const w = new Warden(policy, { clock: new ManualClock(Date.parse(`${c.at}T00:00:00Z`) / 1000) });
    const price = () => (c.estimate ? w.estimate(c.resource, c.usage) : w.cost(c.resource, c.usage));
    if (c.usd !== undefined) {
      const got = price();
      assert.equal(got.amountText, c.usd, JSON.stringify(c));
      assert.equal(got.unit, 'usd');
    } else {
      assert.throws(price, InvalidInputError, JSON.stringify(c));
    }
  }
});

test('cost says what a decision charges, and a reservation by usage commits at the actual', async () => {
  const w = new Warden(POLICY);
  const est = w.estimate('openai:gpt-4o', { input_tokens: 1200, max_output_tokens: 800 });
  assert.deepEqual(est, {
    unit: 'usd', amount: 11000, amountText: '0.011', decimals: 6, inputTokens: 1200, outputTokens: 800,
    cost: { usd: '0.011', tokens: 2000 },
  });
  const d = await w.reserve('tenant:a', { resource: 'openai:gpt-4o', usage: { input_tokens: 1200, max_output_tokens: 800n } });
  assert.deepEqual(remaining(d), { usd: 989000, tpm: 998000 });
  const r = await w.commitUsage(d.reservation, 'openai:gpt-4o', { input_tokens: 1200, output_tokens: 95 });
  assert.deepEqual(charged(r), { usd: 3950, tpm: 1295 });
  const left = Object.fromEntries((await w.balances('tenant:a')).map((b) => [b.name, b.remaining]));
  assert.deepEqual(left, { usd: 1_000_000 - 3950, tpm: 1_000_000 - 1295 });
  // acquire by usage goes through the general path and prices the same.
  const a = await w.acquire('tenant:b', { resource: 'openai:gpt-4o', usage: { input_tokens: 1200, output_tokens: 800 } });
  assert.deepEqual(remaining(a), { usd: 989000, tpm: 998000 });
});

test('a wrapped call by usage is settled at its priced actual, or at the estimate with a warning', async () => {
  const w = new Warden(POLICY);
  const complete = w.wrap(async (prompt, maxTokens) => ({ in: prompt.length, out: 7 }), {
    scope: 'tenant:a',
    resource: 'openai:gpt-4o',
    usage: (prompt, maxTokens) => ({ input_tokens: prompt.length, max_output_tokens: maxTokens }),
    actual: (reply) => ({ input_tokens: reply.in, output_tokens: reply.out }),
  });
  assert.deepEqual(await complete('x'.repeat(1000), 500), { in: 1000, out: 7 });
  const left = async () => Object.fromEntries((await w.balances('tenant:a')).map((b) => [b.name, b.remaining]));
  assert.deepEqual(await left(), { usd: 1_000_000 - 2570, tpm: 1_000_000 - 1007 });
  const warnings = [];
  const onWarning = (wn) => warnings.push(wn);
  process.on('warning', onWarning);
  try {
    const bad = w.wrap(async () => 1, {
      scope: 'tenant:a', resource: 'openai:gpt-4o',
      usage: { input_tokens: 100, max_output_tokens: 100 },
      actual: () => ({ input_tokens: 100, output_tokens: 1.5 }),
    });
    assert.equal(await bad(), 1);
    await new Promise((resolve) => setImmediate(resolve));
  } finally {
    process.off('warning', onWarning);
  }
  assert.equal(warnings.length, 1);
  assert.match(warnings[0].message, /output_tokens/);
  // The estimate: 100 in + 100 out = 250 + 1000 micro-dollars.
  assert.deepEqual((await left()).usd, 1_000_000 - 2570 - 1250);
});

test('bad usage is refused by name and changes nothing', async () => {
  const w = new Warden(POLICY);
  const cases = [
    [{ input_tokens: 1.5 }, /input_tokens/],
    [{ input_tokens: -1 }, /input_tokens/],
    [{ inptu_tokens: 1 }, /unknown field `inptu_tokens`/],
    [{ input_tokens: 2n ** 70n }, /input_tokens/],
    [{ input_tokens: 5, cached_input_tokens: 6 }, /cached_input_tokens/],
    [{ seconds: '0.0005' }, /seconds/],
    [{ input_tokens: NaN }, /input_tokens/],
    [{ input_tokens: true }, /input_tokens/],
    ['lots', /invalid usage/],
  ];
  for (const [usage, says] of cases) {
    await assert.rejects(w.acquire('tenant:a', { resource: 'openai:gpt-4o', usage }), (e) => e instanceof InvalidInputError && says.test(e.message));
    assert.throws(() => w.cost('openai:gpt-4o', usage), (e) => e instanceof InvalidInputError && says.test(e.message));
  }
  await assert.rejects(w.reserve('tenant:a', { resource: 'plain', usage: { input_tokens: 1 } }), /has no `pricing:`/);
  await assert.rejects(w.acquire('tenant:a', { usage: { input_tokens: 1 } }), /needs a resource/);
  assert.throws(() => w.cost('openai:gpt-4o'), /invalid usage/);
  assert.throws(() => w.estimate('nope', { input_tokens: 1 }), /unknown resource `nope`/);
  await assert.rejects(w.commitUsage('0'.repeat(32), 'openai:gpt-4o'), /invalid usage/);
  const left = Object.fromEntries((await w.balances('tenant:a')).map((b) => [b.name, b.remaining]));
  assert.deepEqual(left, { usd: 1_000_000, tpm: 1_000_000 });
});

for (const kind of ['url', 'cluster_url']) {
  test(`usage is priced the same on Redis (${kind})`, async () => {
    const w = await Warden.connect(POLICY, { backend: redis[kind], namespace: `price-${kind}-${process.pid}` });
    try {
      const d = await w.reserve('tenant:a', { resource: 'openai:gpt-4o', usage: { input_tokens: 1200, max_output_tokens: 800 } });
      assert.deepEqual(remaining(d), { usd: 989000, tpm: 998000 });
      const r = await w.commitUsage(d.reservation, 'openai:gpt-4o', { input_tokens: 1200, output_tokens: 95 });
      assert.deepEqual(charged(r), { usd: 3950, tpm: 1295 });
    } finally {
      w.close();
    }
  });
}

test('a reservation the budget cannot cover is shrunk: allowed with caps.maxTokens', async () => {
  const policy = structuredClone(POLICY);
  policy.resources['openai:gpt-4o'].shrink = { min_output_tokens: 100 };
  const w = new Warden(policy);
  assert.ok((await w.acquire('tenant:a', { cost: { usd: '0.995' } })).allowed);
  const d = await w.reserve('tenant:a', { resource: 'openai:gpt-4o', usage: { input_tokens: 1000, max_output_tokens: 1000 } });
  assert.equal(d.outcome, 'allow_with_caps');
  assert.equal(d.caps.maxTokens, 250);
  await w.commitUsage(d.reservation, 'openai:gpt-4o', { input_tokens: 1000, output_tokens: 250 });
  const denied = await w.reserve('tenant:a', { resource: 'openai:gpt-4o', usage: { input_tokens: 1, max_output_tokens: 10 } });
  assert.equal(denied.allowed, false);
});

test('a shrunk wrapped call reads its caps; one on a fallback model is priced there', async () => {
  const policy = structuredClone(POLICY);
  policy.resources['openai:gpt-4o'].shrink = { min_output_tokens: 100, fallback: ['openai:gpt-4o-mini'] };
  policy.resources['openai:gpt-4o-mini'] = { pricing: { input: '0.15', output: '0.60' } };
  const w = new Warden(policy);
  assert.ok((await w.acquire('tenant:a', { cost: { usd: '0.995' } })).allowed);
  const seen = [];
  const inner = w.wrap(async () => { seen.push(['inner', currentCaps()]); }, {
    scope: 'tenant:b', resource: 'openai:gpt-4o', usage: { input_tokens: 10, max_output_tokens: 10 },
  });
  const complete = w.wrap(async (out) => {
    seen.push(['outer', currentCaps()]);
    await inner(); // allowed as asked: sees no caps
    await new Promise((resolve) => setImmediate(resolve));
    seen.push(['outer after', currentCaps()]);
    return out;
  }, {
    scope: 'tenant:a', resource: 'openai:gpt-4o', usage: { input_tokens: 1000, max_output_tokens: 1000 },
    actual: (out) => ({ input_tokens: 1000, output_tokens: out }),
  });
  // $0.005 left: 250 of the 1 000 output tokens fit.
  assert.equal(await complete(250), 250);
  assert.deepEqual(seen, [['outer', { maxTokens: 250 }], ['inner', {}], ['outer after', { maxTokens: 250 }]]);
  assert.deepEqual(currentCaps(), {});
  // Nothing left on gpt-4o: the call falls back to gpt-4o-mini and is charged
  // there — 1 000 in + 400 out is $0.00039, not gpt-4o's $0.0065.
  await w.topUp('tenant:a', 'usd', '0.001');
  seen.length = 0;
  assert.equal(await complete(400), 400);
  assert.deepEqual(seen[0], ['outer', { model: 'openai:gpt-4o-mini' }]);
  const left = Object.fromEntries((await w.balances('tenant:a')).map((b) => [b.name, b.remaining]));
  assert.equal(left.usd, 1000 - 390);
});
