// Soft allocations of a shared pool from Node: allocate / heartbeat /
// deallocate on the embedded engine (manual clock) and on Redis and Cluster.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { InvalidInputError, ManualClock, Warden } from '../../bindings-node/index.mjs';
import { startRedis } from './helpers.mjs';

const POLICY = {
  defaults: { floors: { standard: 0, background: 0 } },
  scopes: { agent: { limits: [] } },
  resources: { llm: { limits: [{ name: 'pool', kind: 'quota', limit: 100, per: 'day' }] } },
};

let redis;
before(() => { redis = startRedis(); });
after(() => redis.stop());

test('an allocation is kept for its agent, then donated when it stops beating', async () => {
  const clock = new ManualClock(1_700_000_000);
  const w = new Warden(POLICY, { clock });
  const a = await w.allocate('agent:a', 'llm', { requests: 30 }, 10);
  assert.deepEqual(a, { pools: { pool: 30 }, activeUntil: 1_700_000_010 });
  assert.ok((await w.acquire('agent:b', { resource: 'llm', cost: { requests: 70 } })).allowed);
  assert.ok(!(await w.acquire('agent:b', { resource: 'llm' })).allowed);
  clock.advance(11);
  assert.ok(!(await w.acquire('agent:c', { resource: 'llm', priority: 'background' })).allowed);
  assert.ok((await w.acquire('agent:b', { resource: 'llm', cost: { requests: 5 } })).allowed);
  assert.equal(await w.heartbeat('agent:a'), 1);
  assert.ok(!(await w.acquire('agent:b', { resource: 'llm' })).allowed);
  assert.equal(await w.deallocate('agent:a', 'llm'), true);
  assert.equal(await w.deallocate('agent:a', 'llm'), false);
});

test('bad allocations say what is wrong', async () => {
  const w = new Warden(POLICY);
  await w.allocate('agent:a', 'llm', { requests: 60 }, 10);
  await assert.rejects(w.allocate('agent:b', 'llm', { requests: 41 }, 10), /40 of 100 left to allocate/);
  await assert.rejects(w.allocate('agent:b', 'llm', { requests: 1 }, 0), /lease/);
  await assert.rejects(w.allocate('agent:b', 'llm', { requests: 1 }), InvalidInputError);
  await assert.rejects(w.allocate(42, 'llm', { requests: 1 }, 10), InvalidInputError);
  await assert.rejects(w.allocate('agent:b', 'nope', { requests: 1 }, 10), /nope/);
});

for (const kind of ['url', 'cluster_url']) {
  test(`an allocation set from one warden binds another on ${kind}`, async () => {
    const ns = `node-pool-${kind}-${process.pid}`;
    const a = new Warden(POLICY, { backend: redis[kind], namespace: ns });
    const b = new Warden(POLICY, { backend: redis[kind], namespace: ns });
    try {
      await a.allocate('agent:a', 'llm', { requests: 40 }, 60);
      assert.ok(!(await b.acquire('agent:b', { resource: 'llm', cost: { requests: 61 } })).allowed);
      assert.ok((await b.acquire('agent:b', { resource: 'llm', cost: { requests: 60 } })).allowed);
      assert.ok((await b.acquire('agent:a', { resource: 'llm', cost: { requests: 40 } })).allowed);
      assert.equal(await b.heartbeat('agent:a'), 1);
    } finally {
      await a.close();
      await b.close();
    }
  });
}
