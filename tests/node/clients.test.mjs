// The governed fetch and the openai npm helper over real HTTP, against the
// local fake upstream (tests/fakes/upstream.py) that enforces its own quota
// and sends real OpenAI headers; and the cross-language case: a Python agent
// on the real openai SDK and a Node service on the governed fetch, sharing
// one Redis, never hit the upstream's 429s near its limit, critical first.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import OpenAI from '../../bindings-node/node_modules/openai/index.js';
import { InvalidInputError, RateLimitedError, Warden, governOpenAI } from '../../bindings-node/index.mjs';
import { startRedis } from './helpers.mjs';

const POLICY = { scopes: { agent: { limits: [] } }, resources: { llm: { upstream: {} }, plain: {} } };
const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const python = process.env.RATEWARDEN_PYTHON ?? here('../../.venv/bin/python');

/** Starts the fake upstream: `limit` requests per `window` seconds. */
async function upstream(limit = 6, window = 1.5) {
  const proc = spawn('python3', [here('../fakes/upstream.py'), '--limit', String(limit), '--window', String(window)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const [line] = await once(createInterface({ input: proc.stdout }), 'line');
  const { url } = JSON.parse(line);
  return {
    url,
    stats: async () => (await fetch(`${url}/stats`)).json(),
    stop: () => proc.kill(),
  };
}

const call = (f, url, priority) => f(`${url}/v1/chat/completions`, {
  method: 'POST',
  headers: { 'content-type': 'application/json', 'ratewarden-priority': priority, 'x-test-priority': priority },
  body: JSON.stringify({ model: 'gpt-fake', messages: [] }),
});

/** Mean position of `priority`'s requests among the upstream's admitted ones. */
function rank(log, priority) {
  const served = log.filter((r) => r[2] === 200);
  const at = served.flatMap((r, i) => (r[1] === priority ? [i] : []));
  return at.reduce((a, b) => a + b, 0) / at.length;
}

test('agents on the governed fetch near the limit never hit a 429, critical first', async () => {
  const up = await upstream();
  try {
    const w = new Warden(POLICY);
    const f = w.fetcher('llm', { scope: 'agent:a' });
    assert.equal((await call(f, up.url, 'standard')).status, 200); // the first response tells everyone
    const agents = ['critical', 'standard', 'background', 'critical', 'standard', 'background'].map(async (p) => {
      for (let i = 0; i < 4; i++) assert.equal((await call(f, up.url, p)).status, 200);
    });
    await Promise.all(agents);
    const s = await up.stats();
    assert.deepEqual([s.ok, s.rejected], [25, 0]);
    assert.ok(rank(s.log, 'critical') < rank(s.log, 'background'), JSON.stringify(s.log));
  } finally {
    up.stop();
  }
});

test('the openai npm client through governOpenAI', async () => {
  const up = await upstream();
  try {
    const w = new Warden(POLICY);
    const client = governOpenAI(new OpenAI({ baseURL: `${up.url}/v1`, apiKey: 'k' }), w, 'llm', { scope: 'agent:b' });
    const ask = () => client.chat.completions.create({ model: 'gpt-fake', messages: [{ role: 'user', content: 'hi' }] });
    assert.equal((await ask()).choices[0].message.content, 'ok');
    const answers = await Promise.all(Array.from({ length: 11 }, ask));
    assert.ok(answers.every((a) => a.choices[0].message.content === 'ok'));
    const s = await up.stats();
    assert.deepEqual([s.ok, s.rejected], [12, 0]);
    assert.equal((await w.upstream('llm')).quotas[0].limit, 6);
  } finally {
    up.stop();
  }
});

test('a request still denied after maxWait rejects and never reaches the upstream', async () => {
  const up = await upstream(2, 30);
  try {
    const w = new Warden(POLICY);
    const f = w.fetcher('llm', { scope: 'agent:c', maxWait: 0 });
    for (let i = 0; i < 2; i++) assert.equal((await call(f, up.url, 'standard')).status, 200);
    await assert.rejects(call(f, up.url, 'standard'), (e) => e instanceof RateLimitedError && e.retryAfter > 0 && e.retryAfter <= 30);
    assert.equal((await up.stats()).rejected, 0);
  } finally {
    up.stop();
  }
});

describe('bad fetcher options throw when it is made', () => {
  const cases = [
    ['a resource without upstream', { scope: 'agent:a' }, 'plain', /upstream: \{\}/],
    ['an unknown resource', { scope: 'agent:a' }, 'lm', /lm/],
    ['an unknown priority', { scope: 'agent:a', priority: 'urgent' }, 'llm', /urgent/],
    ['an unknown unit', { scope: 'agent:a', cost: { dollars: 1 } }, 'llm', /dollars/],
    ['a bad scope', { scope: 'agent' }, 'llm', /scope/],
    ['a negative maxWait', { scope: 'agent:a', maxWait: -1 }, 'llm', /maxWait/],
    ['a fetch that is not a function', { scope: 'agent:a', fetch: 3 }, 'llm', /fetch/],
  ];
  for (const [name, options, resource, message] of cases) {
    test(name, () => {
      const w = new Warden(POLICY);
      assert.throws(() => w.fetcher(resource, options), (e) => e instanceof InvalidInputError && message.test(e.message));
    });
  }
  test('a client without withOptions', () => {
    assert.throws(() => governOpenAI({}, new Warden(POLICY), 'llm', { scope: 'agent:a' }), /withOptions/);
  });
});

describe('a Python agent and a Node service sharing one Redis', () => {
  let redis;
  before(() => { redis = startRedis(); });
  after(() => redis.stop());

  for (const target of ['url', 'cluster_url']) {
    test(`in the red zone critical calls of both go first, background ones wait for the reset (${target})`, async () => {
      // 20 per 20 s: drained to 2 left (red), then each side sends one
      // critical and one background call at once.
      const up = await upstream(20, 20);
      const namespace = `node-red-${process.pid}-${target}`;
      const w = await Warden.connect(POLICY, { backend: redis[target], namespace, timeout: 5 });
      const py = spawn(python, [here('../fakes/openai_agent.py'), up.url, redis[target], namespace, 'critical:1', 'background:1'], {
        stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env, RW_WAIT_GO: '1' },
      });
      try {
        const lines = createInterface({ input: py.stdout });
        const [ready] = await once(lines, 'line');
        assert.equal(ready, 'ready');
        const f = w.fetcher('llm', { scope: 'agent:node', maxWait: 120 });
        let drained = 0;
        while ((await w.upstream('llm')).quotas.find((q) => q.dimension === 'requests')?.observed !== 2 || drained === 0) {
          assert.equal((await call(f, up.url, 'critical')).status, 200);
          drained += 1;
          assert.ok(drained < 60, 'drained');
        }
        const before = (await up.stats()).log.length;
        let out = '';
        lines.on('line', (l) => { out += l; });
        py.stdin.write('go\n');
        const node = ['critical', 'background'].map(async (p) => assert.equal((await call(f, up.url, p)).status, 200));
        await Promise.all(node);
        const [code] = await once(py, 'exit');
        assert.equal(code, 0);
        assert.deepEqual(JSON.parse(out), { ok: 2, errors: [] });
        const s = await up.stats();
        assert.equal(s.rejected, 0, JSON.stringify(s.log));
        const rush = s.log.slice(before).map((r) => r[1]);
        assert.deepEqual(rush, ['critical', 'critical', 'background', 'background'], JSON.stringify(s.log));
      } finally {
        py.kill();
        up.stop();
        await w.close?.();
      }
    });
  }

  for (const target of ['url', 'cluster_url']) {
    test(`stop hitting the upstream's 429s near its limit, critical first (${target})`, async () => {
      const up = await upstream(6, 1.5);
      const namespace = `node-clients-${process.pid}-${target}`;
      const w = await Warden.connect(POLICY, { backend: redis[target], namespace, timeout: 5 });
      try {
        const f = w.fetcher('llm', { scope: 'agent:node', maxWait: 120 });
        assert.equal((await call(f, up.url, 'standard')).status, 200); // the state is known before the rush
        const py = spawn(python, [here('../fakes/openai_agent.py'), up.url, redis[target], namespace,
          'critical:3', 'standard:3', 'background:3'], { stdio: ['ignore', 'pipe', 'inherit'] });
        let out = '';
        py.stdout.on('data', (b) => { out += b; });
        const node = ['critical', 'standard', 'background'].map(async (p) => {
          for (let i = 0; i < 3; i++) assert.equal((await call(f, up.url, p)).status, 200);
        });
        await Promise.all(node);
        const [code] = await once(py, 'exit');
        assert.equal(code, 0);
        assert.deepEqual(JSON.parse(out), { ok: 9, errors: [] });
        const s = await up.stats();
        assert.deepEqual([s.ok, s.rejected], [19, 0], JSON.stringify(s.log));
        // No order between tiers is asserted in this rush: each agent's
        // three calls are sequential, a reset lets every tier in at once, and
        // the Python client waits for the reset its headers round up to whole
        // seconds, so a mean rank came out tied or inverted in about 1 run of
        // 8. Critical-first across the two languages is asserted where it is
        // deterministic: the red-zone test above.
        assert.equal(s.log.filter((r) => r[1] === 'critical').length, 6, JSON.stringify(s.log));
      } finally {
        up.stop();
        await w.close?.();
      }
    });
  }
});
