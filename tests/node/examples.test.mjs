// examples/node run as shown (importing `ratewarden` by name through
// examples/node/node_modules), and the README's Node examples are those files.
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const example = (name) => fileURLToPath(new URL(`../../examples/node/${name}`, import.meta.url));
const run = (name) => execFileSync(process.execPath, [example(name)], { encoding: 'utf8', timeout: 30_000 });

test('examples/node/tool.mjs prints what it says', () => {
  const out = run('tool.mjs');
  assert.match(out, /answered 14, then tenant-usd ran out/);
  assert.match(out, /middleware ready/);
});

test('examples/node/express.mjs: five 200s with draft-11 headers, then a 429 with Retry-After and a JSON body', () => {
  const lines = run('express.mjs').trim().split('\n');
  assert.equal(lines.length, 6);
  lines.slice(0, 5).forEach((line, i) => {
    assert.match(line, new RegExp(`^200 "per-ip";r=${4 - i};t=\\d+ - \\{"hello":"world"\\}$`));
  });
  const [status, header, retryAfter, ...body] = lines[5].split(' ');
  assert.equal(status, '429');
  assert.match(header, /^"per-ip";r=0;t=\d+$/);
  assert.ok(Number(retryAfter) >= 11 && Number(retryAfter) <= 12, retryAfter);
  const json = JSON.parse(body.join(' '));
  assert.equal(json.error, 'rate_limited');
  assert.equal(json.limit, 'per-ip');
});

test("the README's Node examples are examples/node/tool.mjs, express.mjs, governed_fetch.mjs and pricing.mjs", () => {
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  const blocks = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
  assert.deepEqual(blocks, ['tool.mjs', 'express.mjs', 'governed_fetch.mjs', 'pricing.mjs'].map((f) => readFileSync(example(f), 'utf8')));
});

test('examples/node/pricing.mjs shrinks the second call and denies the third', () => {
  const out = execFileSync(process.execPath, [example('pricing.mjs')], { encoding: 'utf8', timeout: 60_000 });
  assert.deepEqual(out.trim().split('\n'), [
    'estimate: $0.011',
    'call 1: allow, max_tokens=800, charged $0.011',
    'call 2: allow_with_caps, max_tokens=600, charged $0.009',
    'call 3: denied (tenant-usd is spent)',
  ]);
});

test('examples/node/governed_fetch.mjs never hits the fake upstream\'s 429', async () => {
  const proc = spawn('python3', [fileURLToPath(new URL('../fakes/upstream.py', import.meta.url)), '--limit', '6', '--window', '1.5'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  try {
    const [line] = await once(createInterface({ input: proc.stdout }), 'line');
    const { url } = JSON.parse(line);
    const out = execFileSync(process.execPath, [example('governed_fetch.mjs')], {
      encoding: 'utf8', timeout: 60_000, env: { ...process.env, UPSTREAM_URL: url },
    });
    assert.match(out, /^12 of 12 answered; the upstream is \w+/);
    const stats = await (await fetch(`${url}/stats`)).json();
    assert.deepEqual([stats.ok, stats.rejected], [13, 0]);
  } finally {
    proc.kill();
  }
});
