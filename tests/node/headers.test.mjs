// The provider header vectors (tests/vectors/headers/*.json), parsed from Node
// exactly as core/tests/upstream.rs and tests/python/test_headers.py do — as
// [name, value] pairs and as a fetch Headers.
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { InvalidInputError, parseHeaders } from '../../bindings-node/index.mjs';

const dir = fileURLToPath(new URL('../vectors/headers/', import.meta.url));
const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();

const ms = (s) => (s === undefined || s === null ? null : Math.round(s * 1000));
const shape = (p) => ({
  quotas: p.quotas.map((q) => ({
    dimension: q.dimension, name: q.name ?? null, limit: q.limit ?? null, remaining: q.remaining ?? null, reset_ms: ms(q.reset),
  })),
  retry_after_ms: ms(p.retryAfter),
  warnings: p.warnings.length,
});

for (const f of files) {
  test(`header vector ${f}`, () => {
    const v = JSON.parse(readFileSync(dir + f, 'utf8'));
    const now = v.now_us / 1e6;
    assert.deepEqual(shape(parseHeaders(v.headers, { now })), v.expect);
    // A fetch Headers joins repeated names; these vectors repeat none.
    assert.deepEqual(shape(parseHeaders(new Headers(v.headers), { now })), v.expect);
  });
}

test('bad input is typed; unrelated headers say nothing', () => {
  assert.ok(files.length >= 12);
  assert.throws(() => parseHeaders(5), (e) => e instanceof InvalidInputError && e.argument === 'headers');
  assert.throws(() => parseHeaders({}, { now: 'x' }), (e) => e instanceof InvalidInputError && e.argument === 'now');
  assert.deepEqual(parseHeaders({ 'content-type': 'text/plain' }), { quotas: [], warnings: [] });
});
