// Webhook signatures from Node, verified by an independent implementation: the
// `standardwebhooks` npm package (the specification's reference library).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import { test } from 'node:test';

import { InvalidInputError, signWebhook } from '../../bindings-node/index.mjs';

const { Webhook } = createRequire(new URL('../../bindings-node/package.json', import.meta.url))('standardwebhooks');
const secret = () => `whsec_${randomBytes(32).toString('base64')}`;

test('a signed message verifies with the standard library, and nothing else does', () => {
  const key = secret();
  const body = JSON.stringify({ type: 'limit.exhausted', data: { limit: 'usd' } });
  const now = Math.floor(Date.now() / 1000);
  const headers = signWebhook(key, 'msg_0123456789abcdef', now, body);
  assert.deepEqual(Object.keys(headers).sort(), ['webhook-id', 'webhook-signature', 'webhook-timestamp']);
  assert.deepEqual(new Webhook(key).verify(body, headers), JSON.parse(body));
  assert.deepEqual(signWebhook(key, 'msg_0123456789abcdef', now, Buffer.from(body)), headers);
  assert.throws(() => new Webhook(key).verify(`${body} `, headers));
  assert.throws(() => new Webhook(key).verify(body, { ...headers, 'webhook-id': 'msg_other' }));
  assert.throws(() => new Webhook(secret()).verify(body, headers));
  // The library signs what we sign.
  const theirs = new Webhook(key).sign('msg_x', new Date(now * 1000), '{"a":1}');
  assert.equal(signWebhook(key, 'msg_x', now, '{"a":1}')['webhook-signature'], theirs);
});

test('bad arguments are refused by name, the secret never repeated', () => {
  assert.throws(() => signWebhook('whsec_!!secret!!', 'msg_1', 1, '{}'), (e) => e instanceof InvalidInputError && /secret/.test(e.message) && !e.message.includes('!!secret!!'));
  assert.throws(() => signWebhook(secret(), 'msg_1', 1.5, '{}'), (e) => e instanceof InvalidInputError && e.argument === 'timestamp');
  assert.throws(() => signWebhook(secret(), 'msg_1', 1, 42), (e) => e instanceof InvalidInputError && e.argument === 'body');
});

test('a policy with webhooks delivers signed events a receiver verifies, and logs them', async () => {
  const { createServer } = await import('node:http');
  const key = secret();
  const got = [];
  let answered;
  const done = new Promise((resolve) => { answered = resolve; });
  const server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      got.push(new Webhook(key).verify(body, req.headers).type);
      res.statusCode = got.length === 1 ? 500 : 204; // the first attempt fails: retried
      res.end();
      if (got.length === 2) answered();
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const { Warden } = await import('../../bindings-node/index.mjs');
    const w = new Warden({
      scopes: { tenant: { limits: [{ name: 'usd', kind: 'budget', unit: 'usd', limit: '10' }] } },
      webhooks: [{ url: `http://127.0.0.1:${server.address().port}/`, secret: key, events: ['limit.exhausted'], backoff: '10ms' }],
    });
    assert.ok((await w.acquire('tenant:a', { cost: { usd: '10' } })).allowed);
    await done;
    assert.deepEqual(got, ['limit.exhausted', 'limit.exhausted']);
    let log = w.webhookLog();
    for (let i = 0; i < 1000 && log.deliveries.length < 2; i++) {
      await new Promise((resolve) => setTimeout(resolve, 10));
      log = w.webhookLog();
    }
    assert.deepEqual(log.deliveries.map((d) => [d.attempt, d.status]), [[1, 500], [2, 204]]);
    assert.equal(log.deadLetters.length, 0);
    w.close();
  } finally {
    server.close();
  }
});
