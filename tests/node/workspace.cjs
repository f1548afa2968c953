'use strict';
// Helpers shared by the Node smoke tests (not itself a test file).
const { readFileSync } = require('node:fs');
const { join } = require('node:path');

const root = join(__dirname, '..', '..');

/** The `[workspace.package] version` from the root Cargo.toml. */
function workspaceVersion() {
  const toml = readFileSync(join(root, 'Cargo.toml'), 'utf8');
  const section = toml.split(/^\[workspace\.package\]\s*$/m)[1]?.split(/^\[/m)[0] ?? '';
  const match = section.match(/^version\s*=\s*"([^"]+)"/m);
  if (!match) throw new Error('no [workspace.package] version in Cargo.toml');
  return match[1];
}

module.exports = { packageDir: join(root, 'bindings-node'), workspaceVersion };
