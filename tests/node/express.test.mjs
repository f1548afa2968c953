// The Express middleware over real HTTP (fetch), on the embedded engine and on Redis.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { InvalidInputError, ManualClock, Warden } from '../../bindings-node/index.mjs';
import { policy, serve, startRedis } from './helpers.mjs';

let redis;
before(() => { redis = startRedis(); });
after(() => redis?.stop());

const backends = {
  memory: () => ({}),
  redis: () => ({ backend: redis.url, namespace: `node-${Math.random().toString(36).slice(2)}`, timeout: 10 }),
  cluster: () => ({ backend: redis.cluster_url, namespace: `node-${Math.random().toString(36).slice(2)}`, timeout: 10 }),
};

for (const [name, options] of Object.entries(backends)) {
  describe(`express middleware on ${name}`, () => {
    test('headers on 200 and 429, the JSON body, and denied requests never reach the app', async () => {
      const clock = new ManualClock(1_700_000_000);
      const w = await Warden.connect(policy(2), { ...options(), clock });
      const app = await serve(w.express());
      try {
        const first = await fetch(`${app.url}/a`);
        assert.equal(first.status, 200);
        assert.equal(await first.text(), 'hello');
        assert.equal(first.headers.get('ratelimit-policy'), '"per-ip";q=2;w=60');
        assert.equal(first.headers.get('ratelimit'), '"per-ip";r=1;t=30');
        assert.equal(first.headers.get('retry-after'), null);
        await (await fetch(`${app.url}/b`)).text();
        const denied = await fetch(`${app.url}/c`);
        assert.equal(denied.status, 429);
        assert.equal(denied.headers.get('retry-after'), '30');
        assert.equal(denied.headers.get('ratelimit'), '"per-ip";r=0;t=60');
        assert.match(denied.headers.get('content-type'), /application\/json/);
        const body = await denied.json();
        assert.equal(body.error, 'rate_limited');
        assert.equal(body.limit, 'per-ip');
        assert.equal(body.retry_after, 30);
        assert.deepEqual(app.served, ['/a', '/b']);
        clock.advance(30);
        assert.equal((await fetch(`${app.url}/d`)).status, 200);
      } finally {
        await app.close();
        w.close();
      }
    });

    test('user callbacks never crash the process: throwing or async onLimited, async skip, a closed warden', async () => {
      const w = await Warden.connect(policy(1), { ...options(), clock: new ManualClock(1_700_000_000) });
      const apps = {
        throws: await serve(w.express({ scope: () => 'ip:throws', onLimited: () => { throw new Error('boom'); } })),
        later: await serve(w.express({
          scope: () => 'ip:later',
          onLimited: async (req, res) => { await new Promise((r) => setImmediate(r)); res.status(429).json({ later: true }); return true; },
        })),
        rejects: await serve(w.express({ scope: () => 'ip:rejects', onLimited: async () => { throw new Error('async boom'); } })),
        fallsThrough: await serve(w.express({ scope: () => 'ip:falls', onLimited: async () => undefined })),
        skipNo: await serve(w.express({ scope: () => 'ip:skipno', skip: async () => false })),
        skipYes: await serve(w.express({ scope: () => 'ip:skipyes', skip: async () => true })),
        skipRejects: await serve(w.express({ scope: () => 'ip:skiprej', skip: async () => { throw new Error('skip boom'); } })),
      };
      const get = async (app) => { const r = await fetch(app.url); return [r.status, await r.text()]; };
      try {
        for (const app of Object.values(apps)) await get(app); // each spends its one request (or is skipped)
        assert.deepEqual((await get(apps.throws))[0], 500, 'a throwing onLimited is next(err)');
        assert.deepEqual(await get(apps.later), [429, '{"later":true}'], 'an async onLimited is awaited');
        assert.equal((await get(apps.rejects))[0], 500, 'a rejecting onLimited is next(err)');
        assert.equal((await get(apps.fallsThrough))[0], 429, 'an async onLimited that does not answer: the default 429');
        assert.equal((await get(apps.skipNo))[0], 429, 'skip resolving to false does not disable the limiter');
        assert.equal((await get(apps.skipYes))[0], 200);
        assert.equal((await get(apps.skipRejects))[0], 500);
        assert.equal((await get(apps.throws))[0], 500, 'the server keeps serving');
        // A middleware made before close() stops deciding after it.
        w.close();
        const [status, body] = await get(apps.skipNo);
        assert.equal(status, 500);
        assert.match(body, /closed/);
      } finally {
        for (const app of Object.values(apps)) await app.close();
        w.close();
      }
    });

    test('a concurrency limit holds its slot for the request\'s lifetime: served, failed or aborted', async () => {
      const w = await Warden.connect({
        scopes: { ip: { limits: [
          { name: 'one-at-a-time', kind: 'concurrency', limit: 1 },
          { name: 'per-ip', kind: 'rate', limit: 100, per: '1m' },
        ] } },
      }, options());
      const express = (await import('../../bindings-node/node_modules/express/index.js')).default;
      const app = express();
      app.use(w.express());
      let entered;
      let release;
      const gate = () => {
        const inside = new Promise((resolve) => { entered = resolve; });
        const open = new Promise((resolve) => { release = resolve; });
        return { inside, open };
      };
      let g = gate();
      app.get('/slow', async (req, res) => {
        entered();
        await g.open;
        if (!res.destroyed) res.send('slow');
      });
      app.get('/fails', (req, res, next) => next(new Error('the handler broke')));
      app.get('/fast', (req, res) => res.send('fast'));
      app.use((err, req, res, _next) => res.status(500).send(err.message));
      const server = await new Promise((resolve) => { const s = app.listen(0, '127.0.0.1', () => resolve(s)); });
      const url = `http://127.0.0.1:${server.address().port}`;
      // The slot is free again: read without charging (bounded; on Redis the
      // release lands a round trip after the response).
      const freed = async () => {
        for (let i = 0; i < 1000; i++) {
          const d = await w.check('ip:127.0.0.1', { cost: { requests: 0 } });
          if (d.limits.find((l) => l.name === 'one-at-a-time').remaining === 1) return true;
          await new Promise((resolve) => setImmediate(resolve)); // let the server see the socket
        }
        return false;
      };
      try {
        const slow = fetch(`${url}/slow`);
        await g.inside;
        const refused = await Promise.all([1, 2, 3, 4].map(() => fetch(`${url}/fast`)));
        assert.deepEqual(refused.map((r) => r.status), [429, 429, 429, 429]);
        for (const r of refused) assert.match(r.headers.get('ratelimit'), /"one-at-a-time";r=0/);
        release();
        const done = await slow;
        assert.equal(done.status, 200);
        assert.equal(await done.text(), 'slow');
        assert.match(done.headers.get('ratelimit'), /"one-at-a-time";r=0/, 'held while it ran');
        assert.ok(await freed(), 'freed once answered');
        assert.equal((await fetch(`${url}/fast`)).status, 200);
        assert.ok(await freed());
        const failed = await fetch(`${url}/fails`);
        assert.equal(failed.status, 500);
        assert.ok(await freed(), 'freed when the handler failed');
        // A client that goes away: freed when the connection closes.
        g = gate();
        const abort = new AbortController();
        const gone = fetch(`${url}/slow`, { signal: abort.signal }).catch((e) => e.name);
        await g.inside;
        assert.equal((await fetch(`${url}/fast`)).status, 429);
        abort.abort();
        assert.equal(await gone, 'AbortError');
        assert.ok(await freed(), 'freed when the client aborted');
        release();
      } finally {
        await new Promise((resolve) => { server.close(resolve); server.closeAllConnections?.(); });
        w.close();
      }
    });

    test('exactly the limit under 1,000 concurrent requests', async () => {
      const w = await Warden.connect(policy(250), { ...options(), clock: new ManualClock(1_700_000_000) });
      const app = await serve(w.express());
      try {
        const codes = await Promise.all(
          Array.from({ length: 1000 }, (_, i) => fetch(`${app.url}/${i}`).then(async (r) => { await r.arrayBuffer(); return r.status; })),
        );
        assert.equal(codes.filter((c) => c === 200).length, 250);
        assert.equal(codes.filter((c) => c === 429).length, 750);
        assert.equal(app.served.length, 250);
      } finally {
        await app.close();
        w.close();
      }
    });
  });
}

describe('express middleware options', () => {
  test('trustProxy: the right-most untrusted address is the client; forged entries, bad entries and spellings change nothing', async () => {
    // Behind one proxy that appends (nginx $proxy_add_x_forwarded_for): the
    // socket peer (127.0.0.1 here) is the proxy, the last entry the client.
    const attempt = async (trustProxy, xffs, extra = {}) => {
      const w = new Warden(policy(3), { clock: new ManualClock() });
      const app = await serve(w.express({ trustProxy, ...extra }));
      try {
        const codes = [];
        for (const xff of xffs) codes.push((await fetch(app.url, { headers: { 'x-forwarded-for': xff } })).status);
        return codes.filter((c) => c === 200).length;
      } finally {
        await app.close();
      }
    };
    const forged = Array.from({ length: 10 }, (_, i) => `10.9.9.${i}, 203.0.113.7`);
    assert.equal(await attempt(true, forged), 3, 'a rotating forged first entry gains nothing');
    assert.equal(await attempt(1, forged), 3);
    assert.equal(await attempt('loopback', forged), 3);
    assert.equal(await attempt(['127.0.0.1/32'], forged), 3);
    // Two hops trusted: the forged entry is taken as the client (as configured).
    assert.equal(await attempt(2, forged), 10);
    // Not trusted: X-Forwarded-For is ignored, everything is the socket's.
    assert.equal(await attempt(false, ['198.51.100.1', '198.51.100.2', '198.51.100.3', '198.51.100.4']), 3);
    // Different clients behind the proxy are kept apart.
    assert.equal(await attempt(true, ['198.51.100.1', '198.51.100.2', '198.51.100.3', '198.51.100.4']), 4);
    // Entries that are not addresses are never keys (the proxy's address is).
    assert.equal(await attempt(true, ['garbage', '1.2.3.4:5555', 'x, ', 'unknown']), 3);
    // One client, many spellings; one IPv6 /56, many hosts.
    assert.equal(await attempt(true, ['203.0.113.7', '::ffff:203.0.113.7', '::FFFF:203.0.113.7', '203.0.113.7 ']), 3);
    assert.equal(await attempt(true, ['2001:db8:0:100::1', '2001:DB8:0:1ff::2', '2001:db8:0:1aa:0:0:0:3', '[2001:db8:0:100::4]']), 3);
    assert.equal(await attempt(true, ['2001:db8:0:100::1', '2001:db8:0:100::2', '2001:db8:0:100::3', '2001:db8:0:100::4'], { ipv6Subnet: 128 }), 4);
  });

  test('scope and resource from the request, skip, and a scope function returning null', async () => {
    const w = new Warden(policy(1), { clock: new ManualClock() });
    const app = await serve(w.express({
      scope: (req) => (req.headers['x-tenant'] ? `tenant:${req.headers['x-tenant']}` : null),
      resource: (req) => (req.path.startsWith('/llm') ? 'llm' : undefined),
      cost: (req) => (req.path.startsWith('/llm') ? { requests: 1, usd: '0.25' } : { requests: 1 }),
      skip: (req) => req.path === '/health',
    }));
    try {
      const first = await fetch(`${app.url}/llm/x`, { headers: { 'x-tenant': 'acme' } });
      assert.equal(first.status, 200);
      assert.equal(first.headers.get('ratelimit-policy'), '"tenant-rpm";q=1;w=60, "llm-usd";q=1000000;w=86400;qu="usd"');
      assert.match(first.headers.get('ratelimit'), /"llm-usd";r=750000;/);
      assert.equal((await fetch(`${app.url}/other`, { headers: { 'x-tenant': 'acme' } })).status, 429);
      assert.equal((await fetch(`${app.url}/other`, { headers: { 'x-tenant': 'globex' } })).status, 200);
      for (let i = 0; i < 3; i++) {
        const health = await fetch(`${app.url}/health`, { headers: { 'x-tenant': 'acme' } });
        assert.equal(health.status, 200);
        assert.equal(health.headers.get('ratelimit'), null);
        assert.equal((await fetch(`${app.url}/anon`)).status, 200);
      }
    } finally {
      await app.close();
    }
  });

  test('older header drafts by option, and headers: false', async () => {
    const cases = [
      ['draft-7', { 'ratelimit-policy': '2;w=60', ratelimit: 'limit=2, remaining=1, reset=30' }],
      ['draft-6', { 'ratelimit-policy': '2;w=60', 'ratelimit-limit': '2', 'ratelimit-remaining': '1', 'ratelimit-reset': '30' }],
      [false, { 'ratelimit-policy': null, ratelimit: null }],
    ];
    for (const [headers, expected] of cases) {
      const w = new Warden(policy(2), { clock: new ManualClock() });
      const app = await serve(w.express({ headers }));
      try {
        const r = await fetch(app.url);
        for (const [k, v] of Object.entries(expected)) assert.equal(r.headers.get(k), v, `${headers} ${k}`);
      } finally {
        await app.close();
      }
    }
  });

  test('onLimited sees the decision and may answer', async () => {
    const seen = [];
    const w = new Warden(policy(1), { clock: new ManualClock() });
    const app = await serve(w.express({
      onLimited: (req, res, decision) => {
        seen.push([req.path, decision.deniedBy, decision.retryAfter]);
        res.status(429).json({ slow: 'down' });
      },
    }));
    try {
      await (await fetch(`${app.url}/x`)).text();
      const r = await fetch(`${app.url}/y`);
      assert.equal(r.status, 429);
      assert.deepEqual(await r.json(), { slow: 'down' });
      assert.equal(r.headers.get('retry-after'), '60');
      assert.deepEqual(seen, [['/y', 'per-ip', 60]]);
    } finally {
      await app.close();
    }
  });

  test('a bad scope from a function is a 500 via next(err), the server keeps serving', async () => {
    const w = new Warden(policy());
    const app = await serve(w.express({ scope: () => 'not a scope' }));
    try {
      for (let i = 0; i < 2; i++) {
        const r = await fetch(app.url);
        assert.equal(r.status, 500);
        assert.equal((await r.json()).error, 'InvalidInputError');
      }
    } finally {
      await app.close();
    }
  });

  test('Redis down follows onBackendError', async () => {
    for (const [mode, status] of [['deny', 429], ['allow', 200]]) {
      const w = new Warden(policy(), { backend: 'redis://127.0.0.1:1', onBackendError: mode });
      const app = await serve(w.express());
      try {
        const r = await fetch(app.url);
        assert.equal(r.status, status, mode);
        if (status === 429) assert.match((await r.json()).reason, /on_backend_error = deny/);
      } finally {
        await app.close();
      }
    }
  });

  test('a 429 reports the true state of the limits that did not deny', async () => {
    const w = new Warden({
      scopes: { ip: { limits: [{ name: 'per-ip', kind: 'rate', limit: 2, per: '1m' }] } },
      resources: { llm: { limits: [{ name: 'llm-usd', kind: 'budget', unit: 'usd', limit: '1', per: 'day' }] } },
    }, { clock: new ManualClock() });
    const app = await serve(w.express({ resource: 'llm', cost: { requests: 1, usd: '0.25' } }));
    try {
      const seen = [];
      for (let i = 0; i < 3; i++) {
        const r = await fetch(app.url);
        seen.push([r.status, r.headers.get('ratelimit')]);
      }
      assert.deepEqual(seen.map(([s]) => s), [200, 200, 429]);
      assert.match(seen[1][1], /"llm-usd";r=500000;/);
      // Denied by the rate: the budget was not charged and says so (not r=250000).
      assert.match(seen[2][1], /"per-ip";r=0;t=\d+, "llm-usd";r=500000;t=\d+/);
    } finally {
      await app.close();
    }
  });

  test('bad options are refused with typed errors', () => {
    const w = new Warden(policy());
    assert.throws(() => w.express({ headers: 'draft-9' }), (e) => e instanceof InvalidInputError && /draft-9/.test(e.message));
    assert.throws(() => w.express({ skip: true }), (e) => e instanceof InvalidInputError && /skip/.test(e.message));
    assert.throws(() => w.express('nope'), InvalidInputError);
    // Constant request fields are validated when the middleware is made, not per request.
    assert.throws(() => w.express({ priority: 'urgent' }), (e) => e instanceof InvalidInputError && /urgent/.test(e.message));
    assert.throws(() => w.express({ cost: { requests: '1.5.2' } }), (e) => e instanceof InvalidInputError && /cost\.requests/.test(e.message));
    assert.throws(() => w.express({ resource: 42 }), InvalidInputError);
    assert.throws(() => w.express({ trustProxy: 'yes' }), (e) => e instanceof InvalidInputError && /trust_proxy.*yes/.test(e.message));
    assert.throws(() => w.express({ trustProxy: -1 }), (e) => e instanceof InvalidInputError && /hop count/.test(e.message));
    assert.throws(() => w.express({ trustProxy: { a: 1 } }), InvalidInputError);
    assert.throws(() => w.express({ ipv6Subnet: 0 }), (e) => e instanceof InvalidInputError && /ipv6Subnet/.test(e.message));
    assert.throws(() => w.express({ ipv6Subnet: '56' }), InvalidInputError);
  });
});
