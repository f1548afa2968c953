// Coordination on the upstream's observed state from Node: observe / report
// with fetch Headers, objects and pairs; the traffic light in decisions; bad
// calls; and one state shared with a Python process over Redis and Cluster.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { InvalidInputError, ManualClock, Warden } from '../../bindings-node/index.mjs';
import { startRedis } from './helpers.mjs';

const POLICY = {
  scopes: { agent: { limits: [] } },
  resources: {
    openai: { upstream: {}, limits: [{ name: 'calls', kind: 'quota', limit: 1000, per: 'day' }] },
    plain: { limits: [] },
  },
};

const openai = (remaining, limit = 100, reset = '60s') => ({
  'x-ratelimit-limit-requests': String(limit),
  'x-ratelimit-remaining-requests': String(remaining),
  'x-ratelimit-reset-requests': reset,
});

let redis;
let n = 0;
before(() => { redis = startRedis(); });
after(() => redis.stop());

test('a limited stage names itself in the caps of the stages after it', async () => {
  const w = new Warden({
    scopes: { agent: { limits: [] } },
    resources: { github: { upstream: {} }, openai: { upstream: {} }, mailer: {} },
    workflows: {
      research: {
        stages: {
          fetch: { resource: 'github' },
          summarize: { resource: 'openai', after: ['fetch'] },
          publish: { resource: 'mailer', after: ['summarize'] },
        },
      },
    },
  }, { clock: new ManualClock(1_700_000_000) });
  assert.equal((await w.acquire('agent:a', { resource: 'mailer' })).outcome, 'allow');
  await w.report('openai', 429, { 'retry-after': '30' });
  const d = await w.acquire('agent:a', { resource: 'mailer' });
  assert.equal(d.outcome, 'allow_with_caps');
  assert.deepEqual(d.caps, { backpressure: ['research/summarize'] });
  assert.deepEqual((await w.acquire('agent:a', { resource: 'github' })).caps, {});
});

test('the light follows what responses say, per tier', async () => {
  const clock = new ManualClock(1_700_000_000);
  const w = new Warden(POLICY, { clock });
  let v = await w.observe('openai', new Headers(openai(90)));
  assert.deepEqual([v.zone, v.previous, v.left, v.quotas[0].remaining], ['green', 'unknown', 0.9, 90]);
  let d = await w.acquire('agent:a', { resource: 'openai', priority: 'background' });
  assert.equal(d.outcome, 'allow');
  assert.deepEqual(d.light, { zone: 'green', left: 0.9, dimension: 'requests', breaker: 'closed', sequential: false });

  await w.observe('openai', openai(275, 1000, '61s'));
  d = await w.acquire('agent:a', { resource: 'openai' });
  assert.equal(d.outcome, 'allow_with_caps');
  assert.equal(d.caps.delayMs, 250);
  assert.equal((await w.acquire('agent:a', { resource: 'openai', priority: 'critical' })).outcome, 'allow');

  await w.observe('openai', Object.entries(openai(5, 100, '90s')));
  d = await w.acquire('agent:a', { resource: 'openai', priority: 'background' });
  assert.equal(d.allowed, false);
  assert.equal(d.retryAfter, 90);
  assert.ok((await w.acquire('agent:a', { resource: 'openai' })).allowed, 'the paced turn');
  d = await w.acquire('agent:b', { resource: 'openai' });
  assert.deepEqual([d.allowed, d.retryAfter], [false, 1]);
  clock.advance(1);
  assert.ok((await w.acquire('agent:b', { resource: 'openai' })).allowed);
  assert.equal((await w.upstream('openai')).quotas[0].remaining, 3);
});

test('a reported 429 stops every tier until Retry-After', async () => {
  const clock = new ManualClock(1_700_000_000);
  const w = new Warden(POLICY, { clock });
  const v = await w.report('openai', 429, { 'retry-after': '4' });
  assert.deepEqual([v.zone, v.blocked], ['red', 4]);
  const d = await w.acquire('agent:a', { resource: 'openai', priority: 'critical' });
  assert.deepEqual([d.allowed, d.retryAfter], [false, 4]);
  clock.advance(4);
  assert.ok((await w.acquire('agent:a', { resource: 'openai', priority: 'critical' })).allowed);
});

test('malformed values are warnings and change nothing', async () => {
  const w = new Warden(POLICY);
  const v = await w.observe('openai', { 'x-ratelimit-remaining-requests': 'many', 'retry-after': 'later' });
  assert.deepEqual([v.zone, v.quotas, v.blocked], ['unknown', [], undefined]);
  assert.equal(v.warnings.length, 2);
});

describe('bad calls reject with a typed error and change nothing', () => {
  const cases = [
    ['an unknown resource', (w) => w.observe('opnai', {}), /opnai/],
    ['a resource without upstream', (w) => w.observe('plain', {}), /upstream: \{\}/],
    ['a status out of range', (w) => w.report('openai', 42), /42 is not an HTTP status/],
    ['a status past u16', (w) => w.report('openai', 70000), /70000 is not an HTTP status/],
    ['a status that is not an integer', (w) => w.report('openai', '429'), /invalid status/],
    ['headers of the wrong type', (w) => w.observe('openai', 7), /invalid headers/],
    ['a resource that is not a string', (w) => w.upstream(3), /resource/],
  ];
  for (const [name, call, message] of cases) {
    test(name, async () => {
      const w = new Warden(POLICY);
      await assert.rejects(call(w), (e) => e instanceof InvalidInputError && message.test(e.message));
      assert.equal((await w.upstream('openai')).zone, 'unknown');
    });
  }
});

// The Python package as scripts/test-bindings.sh builds it (the repository's .venv).
const python = process.env.RATEWARDEN_PYTHON ?? fileURLToPath(new URL('../../.venv/bin/python', import.meta.url));
const observeFromPython = `
import sys, ratewarden
w = ratewarden.Warden(${JSON.stringify(POLICY)}, backend=sys.argv[1], namespace=sys.argv[2])
print(w.observe("openai", {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1h"})["zone"])
`;

for (const target of ['url', 'cluster_url']) {
  test(`a Python process observes, Node obeys (${target})`, async () => {
    const ns = `node-up-${process.pid}-${n++}`;
    const zone = execFileSync(python, ['-c', observeFromPython, redis[target], ns], { encoding: 'utf8' }).trim();
    assert.equal(zone, 'red');
    const w = await Warden.connect(POLICY, { backend: redis[target], namespace: ns });
    try {
      const bg = await w.acquire('agent:a', { resource: 'openai', priority: 'background' });
      assert.equal(bg.allowed, false);
      assert.equal(bg.light.zone, 'red');
      assert.ok((await w.acquire('agent:a', { resource: 'openai', priority: 'critical' })).allowed);
      const v = await w.upstream('openai');
      assert.deepEqual([v.quotas[0].observed, v.quotas[0].remaining], [5, 4]);
    } finally {
      await w.close?.();
    }
  });
}


describe('the ordered lock', () => {
  for (const target of ['memory', 'url']) {
    test(`one holder at a time, first come first served (${target})`, async () => {
      const w = target === 'memory'
        ? new Warden(POLICY)
        : await Warden.connect(POLICY, { backend: redis[target], namespace: `node-line-${process.pid}-${n++}` });
      const log = [];
      const work = (i) => w.sequential('openai', async () => {
        log.push(`in ${i}`);
        await new Promise((resolve) => setImmediate(resolve));
        log.push(`out ${i}`);
        return i;
      });
      assert.deepEqual(await Promise.all([work(1), work(2), work(3)]), [1, 2, 3]);
      for (let k = 0; k < log.length; k += 2) {
        assert.equal(log[k].replace('in', 'out'), log[k + 1], log.join(', '));
      }
      // Held by someone else and no time to wait: a typed rejection.
      let release;
      let entered;
      const inside = new Promise((resolve) => { entered = resolve; });
      const held = w.sequential('openai', () => {
        entered();
        return new Promise((resolve) => { release = resolve; });
      });
      await inside;
      await assert.rejects(w.sequential('openai', () => 0, { maxWait: 0 }), (e) => e.code === 'sequential_timeout');
      release();
      await held;
      await assert.rejects(w.sequential('plain', () => 0), /upstream: \{\}/);
      await assert.rejects(w.sequential('openai', 5), /invalid fn/);
    });
  }
});
