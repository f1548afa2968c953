// One Express 5 app for the HTTP benchmark: `node express_app.mjs <variant> <port>`
// with variant `bare`, `ratewarden` (its middleware, embedded engine) or
// `express-rate-limit` (memory store), or `noop` (one middleware that only calls
// next(): the floor of any middleware). Both limiters get a limit the load never
// reaches, so every request is admitted (the write path, as in the rest of bench/).
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const require = createRequire(join(ROOT, 'bench', 'package.json'));
const express = require('express');
const { rateLimit } = require('express-rate-limit');
const { Warden } = require(join(ROOT, 'bindings-node', 'index.cjs'));

const [variant, port] = process.argv.slice(2);
const LIMIT = 1_000_000_000; // per minute: never reached, every request is admitted
const app = express();
if (variant === 'ratewarden') {
  const warden = new Warden({ scopes: { ip: { limits: [{ name: 'per-ip', kind: 'rate', unit: 'requests', limit: LIMIT, per: '1m' }] } } });
  app.use(warden.express());
} else if (variant === 'express-rate-limit') {
  app.use(rateLimit({ windowMs: 60_000, limit: LIMIT, standardHeaders: 'draft-8', legacyHeaders: false }));
} else if (variant === 'noop') {
  app.use((req, res, next) => next());
} else if (variant !== 'bare') {
  throw new Error(`unknown variant ${variant}`);
}
app.get('/', (req, res) => res.json({ ok: true }));
app.listen(Number(port), '127.0.0.1');

// CPU time of this process between SIGUSR2 (after the warm-up) and SIGTERM,
// printed as JSON: a steadier measure than req/s on a shared 2-vCPU machine.
let since = process.cpuUsage();
process.on('SIGUSR2', () => { since = process.cpuUsage(); });
process.on('SIGTERM', () => {
  const { user, system } = process.cpuUsage(since);
  process.stdout.write(`${JSON.stringify({ cpu_us: user + system })}\n`);
  process.exit(0);
});
