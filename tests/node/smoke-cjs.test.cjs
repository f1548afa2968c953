'use strict';
// CommonJS smoke test for the Node bindings: `require('ratewarden')`.
const assert = require('node:assert/strict');
const { createRequire } = require('node:module');
const { join } = require('node:path');
const { test } = require('node:test');

const { packageDir, workspaceVersion } = require('./workspace.cjs');

test('version() matches the workspace version', () => {
  assert.equal(require('../../bindings-node/index.cjs').version(), workspaceVersion());
});

test("the package name resolves through the exports map's require condition", () => {
  // A require rooted inside the package resolves `ratewarden` by self-reference.
  const requireInPackage = createRequire(join(packageDir, 'package.json'));
  assert.equal(requireInPackage.resolve('ratewarden'), join(packageDir, 'index.cjs'));
  assert.equal(requireInPackage('ratewarden').version(), workspaceVersion());
});

test('package.json version matches the workspace version', () => {
  assert.equal(require(join(packageDir, 'package.json')).version, workspaceVersion());
});
