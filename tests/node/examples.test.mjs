// examples/node run as shown, and the README's Node example is that file.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const example = fileURLToPath(new URL('../../examples/node/tool.mjs', import.meta.url));

test('examples/node/tool.mjs prints what it says', () => {
  const out = execFileSync(process.execPath, [example], { encoding: 'utf8', timeout: 30_000 });
  assert.match(out, /answered 14, then tenant-usd ran out/);
  assert.match(out, /middleware ready/);
});

test("the README's Node example is examples/node/tool.mjs", () => {
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  const block = /```js\n([\s\S]*?)```/.exec(readme)?.[1];
  assert.equal(block, readFileSync(example, 'utf8'));
});
