// Shared helpers of the Node tests (not itself a test file): real Redis servers
// from scripts/redis_harness.py, and a real Express app on a free loopback port.
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

import express from '../../bindings-node/node_modules/express/index.js';

/** The native addon itself (index.cjs's loader), for tests of the binding's internals. */
export const addon = createRequire(import.meta.url)('../../bindings-node/index.cjs')[Symbol.for('ratewarden.native')];

const harness = fileURLToPath(new URL('../../scripts/redis_harness.py', import.meta.url));

/** Starts a standalone Redis and a 3-master cluster; `stop()` removes them. */
export function startRedis() {
  const info = JSON.parse(execFileSync('python3', [harness, 'start', '--cluster'], { encoding: 'utf8' }));
  return { ...info, stop: () => execFileSync('python3', [harness, 'stop', info.dir]) };
}

/** Serves an Express app whose every route answers 200 "hello" behind `middleware`. */
export async function serve(middleware, served = []) {
  const app = express();
  app.use(middleware);
  app.use((req, res) => {
    served.push(req.path);
    res.set('x-app', '1').send('hello');
  });
  app.use((err, req, res, _next) => res.status(500).json({ error: err.name, message: err.message }));
  const server = await new Promise((resolve) => {
    const s = app.listen(0, '127.0.0.1', () => resolve(s));
  });
  const url = `http://127.0.0.1:${server.address().port}`;
  return { url, served, close: () => new Promise((resolve) => server.close(resolve)) };
}

export const policy = (limit = 3) => ({
  scopes: {
    ip: { limits: [{ name: 'per-ip', kind: 'rate', unit: 'requests', limit, per: '1m' }] },
    tenant: { limits: [{ name: 'tenant-rpm', kind: 'rate', unit: 'requests', limit, per: '1m' }] },
  },
  resources: {
    llm: { limits: [{ name: 'llm-usd', kind: 'budget', unit: 'usd', limit: '1', per: 'day' }] },
  },
});
