// `warden.onEvent`: a JS callback receiving events on the event loop — the
// filter, the envelope, a throwing or rejecting callback that never crashes the
// process, closing (queued events too), a listener that never keeps the process
// alive, and events of decisions on a real Redis and Cluster.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { after, before, test } from 'node:test';

import { InvalidInputError, Listener, Warden } from '../../bindings-node/index.mjs';
import { startRedis } from './helpers.mjs';

const policy = {
  scopes: { tenant: { limits: [{ name: 'usd', kind: 'budget', unit: 'usd', limit: '10', per: 'month' }] } },
};

/** A callback and a way to await the events it got, one by one. */
function inbox() {
  const got = [];
  const waiting = [];
  const put = (e) => {
    const w = waiting.shift();
    if (w) w(e);
    else got.push(e);
  };
  // A listener never keeps the process alive; the timer does while we wait
  // (and fails the test if the event never comes).
  const next = () => {
    if (got.length) return Promise.resolve(got.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no event within 10 s')), 10_000);
      waiting.push((e) => { clearTimeout(timer); resolve(e); });
    });
  };
  return { put, next, got };
}

let redis;
before(() => { redis = startRedis(); });
after(() => redis?.stop());

test('a callback gets each crossing as a webhook-shaped event', async () => {
  const w = new Warden(policy);
  const box = inbox();
  const l = w.onEvent(box.put, { events: ['limit.'] });
  assert.ok(l instanceof Listener && l.isOpen);
  assert.deepEqual(l.events, ['limit.']);
  await w.acquire('tenant:a', { cost: { usd: '4.99' } });
  await w.acquire('tenant:a', { cost: { usd: '5.01' } });
  const events = [await box.next(), await box.next(), await box.next()];
  assert.deepEqual(events.map((e) => [e.type, e.data.threshold]), [
    ['limit.threshold_crossed', 0.5],
    ['limit.threshold_crossed', 0.8],
    ['limit.exhausted', 1],
  ]);
  const [first] = events;
  assert.deepEqual(Object.keys(first).sort(), ['at', 'data', 'id', 'timestamp', 'type']);
  assert.match(first.id, /^msg_[0-9a-f]{32}$/);
  assert.equal(first.id, `msg_${first.data.event_id}`);
  assert.match(first.timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  assert.deepEqual([first.data.owner, first.data.limit, first.data.before_text, first.data.after_text], ['tenant:a', 'usd', '4.99', '10']);
  assert.equal(new Set(events.map((e) => e.id)).size, 3);
  l.close();
  assert.deepEqual(l.stats(), { delivered: 3, dropped: 0, failed: 0, lastError: null });
  assert.throws(() => new Listener(), TypeError);
});

test('a throwing or rejecting callback is counted and reported, never fatal, and keeps receiving', async () => {
  const warnings = [];
  let threeWarnings;
  const reported = new Promise((resolve) => { threeWarnings = resolve; });
  const onWarning = (w) => {
    if (w.code !== 'RATEWARDEN_EVENT_CALLBACK') return;
    warnings.push(w.message);
    if (warnings.length === 3) threeWarnings();
  };
  process.on('warning', onWarning);
  const guard = setTimeout(() => threeWarnings(), 10_000); // never a hang
  try {
    const w = new Warden(policy);
    const box = inbox();
    const l = w.onEvent(async (e) => {
      box.put(e.data.threshold);
      if (e.data.threshold === 0.5) throw new RangeError('cannot handle 0.5');
      if (e.data.threshold === 0.8) throw 'a string';
    });
    for (let i = 0; i < 10; i++) assert.ok((await w.acquire('tenant:a', { cost: { usd: 1 } })).allowed);
    assert.deepEqual([await box.next(), await box.next(), await box.next()], [0.5, 0.8, 1]);
    l.close();
    assert.deepEqual(l.stats(), { delivered: 3, dropped: 0, failed: 2, lastError: 'a string' });
    const sync = w.onEvent(() => { throw new Error('sync throw'); });
    await w.acquire('tenant:b', { cost: { usd: 5 } }); // one crossing
    await reported;
    assert.deepEqual(warnings.sort(), [
      'an event callback failed: Error: sync throw',
      'an event callback failed: RangeError: cannot handle 0.5',
      'an event callback failed: a string',
    ]);
    assert.deepEqual(sync.stats(), { delivered: 1, dropped: 0, failed: 1, lastError: 'Error: sync throw' });
    w.close();
    assert.ok(!sync.isOpen, 'closing the warden closes its listeners');
  } finally {
    clearTimeout(guard);
    process.off('warning', onWarning);
  }
});

test('a closed listener gets nothing, not even events already queued', async () => {
  const w = new Warden(policy);
  const calls = [];
  const first = inbox();
  const l = w.onEvent((e) => {
    calls.push(e.type);
    l.close(); // from inside: the two other events of the same decision are dropped
    first.put(e);
  });
  const seen = inbox();
  const other = w.onEvent(seen.put);
  await w.acquire('tenant:a', { cost: { usd: 10 } }); // three events at once
  await first.next();
  for (let i = 0; i < 3; i++) await seen.next(); // the other listener got all three
  assert.deepEqual(calls, ['limit.threshold_crossed']);
  assert.ok(!l.isOpen && other.isOpen);
  other.close();
});

test('a listener never keeps the process alive', () => {
  const script = `
    const { Warden } = require(${JSON.stringify(new URL('../../bindings-node/index.cjs', import.meta.url).pathname)});
    const w = new Warden(${JSON.stringify(policy)});
    w.onEvent(() => {});
    w.acquire('tenant:a', { cost: { usd: 10 } }).then(() => console.log('decided'));
  `;
  // Exits on its own (the timeout only guards against a hang).
  const out = execFileSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(out.trim(), 'decided');
});

test('bad arguments are refused by name', () => {
  const w = new Warden(policy);
  const refused = (f, pattern) => assert.throws(f, (e) => e instanceof InvalidInputError && pattern.test(e.message));
  refused(() => w.onEvent(3), /invalid callback: expected a function/);
  refused(() => w.onEvent(() => {}, { events: ['limit.', 'limits.exhausted'] }), /events\[1\]: `limits\.exhausted` is no event type/);
  refused(() => w.onEvent(() => {}, { events: [1] }), /invalid events\[0\]: expected an event type/);
  refused(() => w.onEvent(() => {}, { events: new Set(['limit.']) }), /invalid events: expected an array/);
  refused(() => w.onEvent(() => {}, 'limit.'), /invalid options/);
});

for (const target of ['url', 'cluster_url']) {
  test(`events of decisions on Redis (${target})`, async () => {
    const w = await Warden.connect(policy, { backend: redis[target], namespace: `ev-${Math.random().toString(36).slice(2)}`, timeout: 10 });
    const box = inbox();
    const l = w.onEvent(box.put, { events: 'limit.exhausted' });
    await w.acquire('tenant:a', { cost: { usd: 10 } });
    const e = await box.next();
    assert.deepEqual([e.type, e.data.owner, e.data.after_text], ['limit.exhausted', 'tenant:a', '10']);
    l.close();
    w.close();
  });
}

test('a stream outlet appends each event, and outletStats counts them', async () => {
  const namespace = `ev-${Math.random().toString(36).slice(2)}`;
  const w = await Warden.connect(
    { ...policy, events: { stream: { key: 'feed', max_len: 100 }, publish: { events: ['limit.exhausted'] } } },
    { backend: redis.url, namespace, timeout: 10 },
  );
  await w.acquire('tenant:a', { cost: { usd: 10 } }); // three crossings
  const port = redis.url.split(':').pop();
  const key = `${namespace}:feed`;
  const entries = [];
  let last = '0';
  while (entries.length < 3) {
    // A blocking read on the server (10 s at most), never a sleep.
    const out = execFileSync('redis-cli', ['-p', port, '--json', 'XREAD', 'COUNT', '10', 'BLOCK', '10000', 'STREAMS', key, last], { encoding: 'utf8' });
    const got = JSON.parse(out);
    assert.ok(got, `only ${entries.length} entries`);
    const batch = Array.isArray(got) ? got[0][1] : got[key];
    entries.push(...batch);
    last = batch.at(-1)[0];
  }
  const types = entries.map(([, fields]) => JSON.parse(fields[fields.indexOf('body') + 1]).type);
  assert.deepEqual(types, ['limit.threshold_crossed', 'limit.threshold_crossed', 'limit.exhausted']);
  assert.equal(await w.flushOutlets(10), true);
  const s = w.outletStats();
  assert.equal(s.appended, 3);
  assert.equal(s.published, 1);
  assert.equal(s.failed + s.dropped, 0);
  assert.throws(() => new Warden({ ...policy, events: { stream: true } }), (e) => e instanceof InvalidInputError && /give a Redis backend/.test(e.message));
  w.close();
});

test('onAudit records every operation, and a throwing audit callback is not fatal', async () => {
  const clock = new (await import('../../bindings-node/index.mjs')).ManualClock();
  const w = new Warden(policy, { clock });
  const box = inbox();
  const l = w.onAudit((r) => {
    box.put(r);
    if (r.outcome === 'deny') throw new Error('audit consumer failed');
  });
  const warned = new Promise((resolve) => process.once('warning', resolve));
  assert.ok((await w.acquire('tenant:a', { cost: { usd: 4 } })).allowed);
  assert.ok(!(await w.acquire('tenant:a', { cost: { usd: 7 } })).allowed);
  const r = await w.reserve('tenant:a', { cost: { usd: 1 } });
  await w.commit(r.reservation, { usd: '1.5' });
  const records = [];
  for (let i = 0; i < 4; i++) records.push(await box.next());
  assert.deepEqual(records.map((x) => [x.action, x.outcome]), [['acquire', 'allow'], ['acquire', 'deny'], ['reserve', 'allow'], ['commit', 'ok']]);
  assert.deepEqual(records[3].amounts, { usd: '1.5' });
  assert.equal(records[3].request_id, r.reservation);
  assert.match((await warned).message, /audit consumer failed/);
  l.close();
  assert.deepEqual(l.stats(), { delivered: 4, dropped: 0, failed: 1, lastError: 'Error: audit consumer failed' });
  assert.equal(await w.flushAudit(), true); // no sinks: at once
});

test('a worker thread torn down while its listeners are busy never crashes the process', async () => {
  const { Worker } = await import('node:worker_threads');
  const index = new URL('../../bindings-node/index.cjs', import.meta.url).pathname;
  const code = `
    const { parentPort } = require('node:worker_threads');
    const { Warden } = require(${JSON.stringify(index)});
    const w = new Warden(${JSON.stringify(policy)});
    w.onEvent(() => { const until = Date.now() + 2; while (Date.now() < until); });
    w.onEvent(() => { throw new Error('thrown in a worker'); });
    w.onAudit(async () => { throw new Error('rejected in a worker'); });
    (async () => {
      for (let i = 0; i < 300; i++) await w.acquire('tenant:' + i, { cost: { usd: 10 } });
      parentPort.postMessage('decided');
    })();
  `;
  for (const how of ['terminate', 'exit']) {
    const worker = new Worker(how === 'exit' ? `${code}; setImmediate(() => process.exit(0));` : code, { eval: true, stderr: true });
    worker.stderr.resume();
    const decided = new Promise((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    if (how === 'terminate') {
      assert.equal(await decided, 'decided');
      await worker.terminate(); // with events still queued for the listeners
    } else {
      const code = await new Promise((resolve) => worker.once('exit', resolve));
      assert.equal(code, 0);
    }
  }
  // The process is alive and a warden here still works.
  const w = new Warden(policy);
  assert.ok((await w.acquire('tenant:a', { cost: { usd: 1 } })).allowed);
});
