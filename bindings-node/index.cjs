'use strict';
// CommonJS entry point: loads the addon that `napi build --platform` puts next
// to this file as `ratewarden.<platform>-<arch>[-<abi>].node`.
const { existsSync } = require('node:fs');
const { join } = require('node:path');

const { platform, arch } = process;
const linux = arch === 'arm' ? ['gnueabihf', 'musleabihf'] : ['gnu', 'musl'];
const abis = { linux, win32: ['msvc', 'gnu'] }[platform] ?? [undefined];
const candidates = abis.map((abi) =>
  join(__dirname, `ratewarden.${[platform, arch, abi].filter(Boolean).join('-')}.node`),
);
const addon = candidates.find((file) => existsSync(file));
if (addon === undefined) {
  throw new Error(
    `ratewarden: native addon not found (run \`npm run build\`); looked for:\n  ${candidates.join('\n  ')}`,
  );
}

module.exports = require(addon);
