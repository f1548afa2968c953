// TypeScript: index.d.ts (with the napi-generated native.d.ts) type-checks the
// README's uses under `tsc --strict`, Express's own types included, imported by
// package name from ESM and CommonJS, and rejects misuse. The files are compiled
// in a scratch project whose node_modules links to the package, as a user's would.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const pkg = fileURLToPath(new URL('../../bindings-node', import.meta.url));
const here = fileURLToPath(new URL('./types', import.meta.url));
const tsc = join(pkg, 'node_modules', 'typescript', 'bin', 'tsc');
let project;

before(() => {
  project = mkdtempSync(join(tmpdir(), 'rw-types-'));
  mkdirSync(join(project, 'node_modules'));
  symlinkSync(pkg, join(project, 'node_modules', 'ratewarden'), 'dir');
  for (const dep of ['@types', 'express']) symlinkSync(join(pkg, 'node_modules', dep), join(project, 'node_modules', dep), 'dir');
  writeFileSync(join(project, 'package.json'), JSON.stringify({ type: 'module', private: true }));
  for (const f of ['tsconfig.json', 'usage.ts', 'usage-cjs.cts', 'bad.ts']) copyFileSync(join(here, f), join(project, f));
});
after(() => project && rmSync(project, { recursive: true, force: true }));

function run(args) {
  return spawnSync(process.execPath, [tsc, ...args], { cwd: project, encoding: 'utf8' });
}

test('the declarations type-check real usage under --strict (ESM and CommonJS)', () => {
  const r = run(['-p', 'tsconfig.json']);
  assert.equal(r.status, 0, r.stdout + r.stderr);
});

test('the declarations reject misuse', () => {
  const r = run(['--strict', '--noEmit', '--target', 'ES2022', '--module', 'NodeNext', '--moduleResolution', 'NodeNext', '--types', 'node', 'bad.ts']);
  assert.notEqual(r.status, 0);
  const lines = r.stdout.trim().split('\n');
  assert.equal(lines.length, 8, r.stdout);
  assert.match(lines[0], /^bad\.ts\(6,\d+\): error TS2345/); // acquire(42)
  assert.match(lines[1], /^bad\.ts\(7,\d+\): error TS2820: Type '"draft-99"'/); // headers: 'draft-99'
  assert.match(lines[2], /^bad\.ts\(8,\d+\): error TS2322/); // a boolean is not a string
  assert.match(lines[3], /^bad\.ts\(9,\d+\): error TS2322: Type '"urgent"'/); // priority: 'urgent'
  assert.match(lines[4], /^bad\.ts\(10,\d+\): error TS2322/); // an object is not an amount
  assert.match(lines[5], /^bad\.ts\(11,\d+\): error TS2322/); // a usage count is not a string
  assert.match(lines[6], /^bad\.ts\(12,\d+\): error TS2322/); // a bill's amount is a number
  assert.match(lines[7], /^bad\.ts\(13,\d+\): error TS2367/); // no such event type
});
