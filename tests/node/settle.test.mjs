// The settlement rule of `wrap()` — the same cases as core/tests/settle.rs and
// tests/python/test_settle.py: a call that ran is always charged (its actual
// usage rounded up to the unit, else the estimate) and returns its result; a
// call that threw releases its hold and its error propagates unchanged. On the
// embedded engine and on a real Redis.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Warden } from '../../bindings-node/index.mjs';
import { startRedis } from './helpers.mjs';

const POLICY = {
  scopes: {
    tenant: {
      limits: [
        { name: 'usd', kind: 'budget', unit: 'usd', limit: '10', per: 'month' },
        { name: 'calls', kind: 'quota', limit: 100, per: 'day' },
      ],
    },
  },
};

let redis;
let n = 0;
before(() => { redis = startRedis(); });
after(() => redis.stop());

async function left(w) {
  const d = await w.check('tenant:a', { cost: { requests: 0 } });
  const by = Object.fromEntries(d.limits.map((l) => [l.name, l.remaining]));
  return [by.usd, by.calls];
}

/** The process warnings emitted while `fn` runs (settlement problems only). */
async function warnings(fn) {
  const seen = [];
  const on = (w) => { if (w.code === 'RATEWARDEN_SETTLEMENT') seen.push(w.message); };
  process.on('warning', on);
  try {
    const r = await fn();
    // emitWarning delivers on the next tick.
    await new Promise((resolve) => setImmediate(resolve));
    return [r, seen];
  } finally {
    process.off('warning', on);
  }
}

for (const backend of ['memory', 'redis']) {
  describe(`wrap() settlement on ${backend}`, () => {
    const make = async () => (backend === 'memory'
      ? new Warden(POLICY)
      : Warden.connect(POLICY, { backend: redis.url, namespace: `node-settle-${process.pid}-${n++}` }));

    test('a call that throws releases its hold; its error propagates unchanged', async () => {
      const w = await make();
      const err = new TypeError('upstream said no');
      const f = w.wrap(async () => { throw err; }, { scope: 'tenant:a', cost: { usd: '1' } });
      const [, seen] = await warnings(() => assert.rejects(f(), (e) => e === err));
      assert.deepEqual(seen, []);
      assert.deepEqual(await left(w), [10_000_000, 100]);
      w.close();
    });

    test('the actual is charged; finer amounts round up; none → the estimate', async () => {
      const w = await make();
      const call = (actual, value = 1234) => w.wrap(async () => value, { scope: 'tenant:a', cost: { usd: '1' }, actual })();
      assert.equal(await call(() => ({ usd: '0.25' })), 1234);
      assert.deepEqual(await left(w), [9_750_000, 99]);
      await call((r) => ({ usd: r * 2.5e-6 })); // 0.003085
      assert.equal((await left(w))[0], 9_750_000 - 3_085);
      await call(() => ({ usd: 0.0030851 })); // finer than 6 decimals: 0.003086
      assert.equal((await left(w))[0], 9_750_000 - 3_085 - 3_086);
      await call(async () => ({ usd: '0.5' })); // an async actual is awaited
      await call(undefined);
      await call(() => null);
      assert.deepEqual(await left(w), [9_750_000 - 3_085 - 3_086 - 500_000 - 2_000_000, 94]);
      w.close();
    });

    test('an unusable actual charges the estimate, returns the result and warns', async () => {
      const w = await make();
      const circular = {};
      circular.self = circular;
      const bad = [
        [(r) => r.usage.tokens, 'TypeError'],
        [() => 0.5, 'not an object'],
        [() => [1], 'not an object'],
        [() => ({ 'gpu-seconds': 5 }), 'gpu-seconds'],
        [() => ({ usd: -1 }), 'negative'],
        [() => ({ usd: Number.NaN }), 'actual.usd: expected a finite number'],
        [() => ({ usd: 2 ** 60 }), 'actual.usd'],
        [() => ({ usd: {} }), 'actual.usd: expected a finite number or a decimal string, got object'],
        [() => circular, 'actual.self'],
        [async () => { throw new RangeError('late'); }, 'RangeError'],
      ];
      let i = 0;
      for (const [actual, why] of bad) {
        i += 1;
        const f = w.wrap(async () => ({ answer: 42 }), { scope: 'tenant:a', cost: { usd: '1' }, actual });
        const [result, seen] = await warnings(() => f());
        assert.deepEqual(result, { answer: 42 });
        assert.deepEqual(await left(w), [10_000_000 - i * 1_000_000, 100 - i], why);
        assert.equal(seen.length, 1, `${why}: ${seen}`);
        assert.match(seen[0], /charged the estimate/);
        assert.ok(seen[0].includes(why), `${why} in ${seen[0]}`);
      }
      w.close();
    });
  });
}

for (const backend of ['memory', 'redis']) {
  test(`balances on ${backend}: every limit read without charging anything`, async () => {
    const w = backend === 'memory'
      ? new Warden(POLICY)
      : await Warden.connect(POLICY, { backend: redis.url, namespace: `node-bal-${process.pid}-${n++}` });
    const r = await w.reserve('tenant:a', { cost: { usd: '2.5' } });
    assert.ok(r.allowed);
    for (let i = 0; i < 3; i++) {
      const by = Object.fromEntries((await w.balances('tenant:a')).map((b) => [b.name, b]));
      assert.deepEqual([by.usd.remaining, by.usd.held, by.usd.limit], [7_500_000, 2_500_000, 10_000_000]);
      assert.deepEqual([by.usd.remainingText, by.usd.heldText, by.usd.owner], ['7.5', '2.5', 'tenant:a']);
      assert.ok(by.usd.reset > 0);
      assert.deepEqual([by.calls.remaining, by.calls.held], [99, 1], "the reservation's call, nothing more");
    }
    await w.release(r.reservation);
    assert.ok((await w.balances('tenant:a')).every((b) => b.held === 0));
    await assert.rejects(w.balances('tenant:a', { resource: 'nope' }), (e) => e.code === 'unknown');
    await assert.rejects(w.balances(5), (e) => e.argument === 'scope');
    w.close();
  });
}
