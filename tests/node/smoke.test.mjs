// ESM smoke test for the Node bindings: `import { version } from 'ratewarden'`.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';

import { version } from '../../bindings-node/index.mjs';
import helpers from './workspace.cjs';

const { packageDir, workspaceVersion } = helpers;

test('version() matches the workspace version', () => {
  assert.equal(version(), workspaceVersion());
});

test("the package name resolves through the exports map's import condition", () => {
  // Run inside the package so `ratewarden` resolves by self-reference.
  const out = execFileSync(
    process.execPath,
    ['--input-type=module', '-e', "import { version } from 'ratewarden'; console.log(version())"],
    { cwd: packageDir, encoding: 'utf8' },
  );
  assert.equal(out.trim(), workspaceVersion());
});
