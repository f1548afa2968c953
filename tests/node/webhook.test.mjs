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
