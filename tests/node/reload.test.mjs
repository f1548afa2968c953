// `warden.reload`: a new policy put in force in a running warden — the next
// decision uses it (on the compact path too, whose limit table is indexed by
// serials a reload never reuses), what was counted carries over, a refused
// reload changes nothing, and a `policy.reloaded` event says what changed.
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { InvalidInputError, PolicyError, Warden } from '../../bindings-node/index.mjs';
import { startRedis } from './helpers.mjs';

const policy = (limits) => ({ scopes: { tenant: { limits } } });
const rpm = (limit) => ({ name: 'rpm', kind: 'rate', limit, per: '1m' });
const daily = { name: 'daily', kind: 'quota', limit: 100, per: 'day' };
const remaining = (d) => Object.fromEntries(d.limits.map((l) => [l.name, l.remaining]));

let redis;
before(() => { redis = startRedis(); });
after(() => redis.stop());

test('the compact path names the limits of the policy in force after a reload', async () => {
  const w = new Warden(policy([rpm(10), daily]));
  assert.deepEqual(remaining(await w.acquire('tenant:a')), { rpm: 9, daily: 99 });
  // The same ids now belong to other limits: `daily` first, `rpm` gone, `hourly` added.
  const changes = w.reload(policy([{ ...daily, limit: 200 }, { name: 'hourly', kind: 'quota', limit: 5, per: 'hour' }]));
  assert.deepEqual(changes, { added: ['hourly'], removed: ['rpm'], changed: ['daily'], repriced: [] });
  const d = await w.acquire('tenant:a');
  assert.deepEqual(remaining(d), { daily: 198, hourly: 4 });
  assert.deepEqual(d.limits.map((l) => [l.name, l.kind, l.limit]), [['daily', 'quota', 200], ['hourly', 'quota', 5]]);
  assert.deepEqual(remaining(await w.check('tenant:a')), { daily: 197, hourly: 3 });
});

test('a reload from a file; a refused one throws a PolicyError and changes nothing', async () => {
  const w = new Warden(policy([rpm(10)]));
  for (let i = 0; i < 10; i++) assert.equal((await w.acquire('tenant:a')).allowed, true);
  const dir = mkdtempSync(join(tmpdir(), 'rw-reload-'));
  const file = join(dir, 'v2.json');
  writeFileSync(file, JSON.stringify(policy([rpm(15)])));
  assert.deepEqual(w.reload(file).changed, ['rpm']);
  // The 10 taken carry over: 5 more of the new 15.
  for (let i = 0; i < 5; i++) assert.equal((await w.acquire('tenant:a')).allowed, true, `request ${i}`);
  assert.equal((await w.acquire('tenant:a')).allowed, false);
  assert.throws(() => w.reload(policy([{ name: 'rpm', kind: 'quota', limit: 10, per: 'minute' }])),
    (e) => e instanceof PolicyError && /limit `rpm`/.test(e.message) && /rate limit into a quota limit/.test(e.message));
  assert.throws(() => w.reload(policy([{ name: 'rpm', kind: 'rate' }])), PolicyError);
  assert.throws(() => w.reload(7), InvalidInputError);
  assert.throws(() => w.reload(join(dir, 'missing.yaml')), PolicyError);
  const d = await w.check('tenant:a');
  assert.equal(d.allowed, false);
  assert.equal(d.limits[0].limit, 15);
});

test('a reload is a policy.reloaded event', async () => {
  const w = new Warden(policy([rpm(10)]));
  let timer;
  // A listener never keeps the process alive: the timer does while we wait.
  const got = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error('no event within 10 s')), 10_000);
    w.onEvent(resolve, { events: 'policy.' });
  });
  w.reload(policy([rpm(20)]));
  const e = await got.finally(() => clearTimeout(timer));
  assert.equal(e.type, 'policy.reloaded');
  assert.deepEqual(e.data, { source: '<object>', added: [], removed: [], changed: ['rpm'], repriced: [] });
  w.close();
});

for (const where of ['url', 'cluster_url']) {
  test(`on Redis (${where}) a decision in flight across a reload is read with its own limits`, async () => {
    const ns = `node-reload-${where}-${process.pid}`;
    const w = await Warden.connect(policy([rpm(10), daily]), { backend: redis[where], namespace: ns });
    const before = w.acquire('tenant:a');
    w.reload(policy([{ ...daily, limit: 300 }]));
    const [first, second] = [await before, await w.acquire('tenant:a')];
    // Decided under whichever policy it met (the race is the runtime's); it
    // must read as that policy's limits, never the other's under its ids.
    const shape = (d) => d.limits.map((l) => [l.name, l.limit, l.remaining]);
    if (first.limits.length === 2) {
      assert.deepEqual(shape(first), [['rpm', 10, 9], ['daily', 100, 99]]);
      assert.deepEqual(shape(second), [['daily', 300, 298]]);
    } else {
      assert.deepEqual(shape(first), [['daily', 300, 299]]);
      assert.deepEqual(shape(second), [['daily', 300, 298]]);
    }
    w.close();
  });
}
