// Node benchmarks: ratewarden beside rate-limiter-flexible and express-rate-limit,
// same run, same machine. Run through bench/node/run.sh (release build, its own
// Redis, peers from bench/package.json). Prints one Markdown table per section and
// writes bench/out/node.json.
//
// Workload (as in ../shared/PEERS.md §3): keys rotate over 10,000 ids, 1000/min
// each, so every call is admitted (the write path).
//
// Usage: node bench/node/bench.mjs [memory] [redis] [express]   (default: all)
import { spawn, execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const require = createRequire(join(ROOT, 'bench', 'package.json'));
const { Warden, version } = require(join(ROOT, 'bindings-node', 'index.cjs'));
const { RateLimiterMemory, RateLimiterRedis } = require('rate-limiter-flexible');
const Redis = require('ioredis');

const PASSES = Number(process.env.PASSES ?? 3);
const SECONDS = Number(process.env.SECONDS ?? 2); // per measured loop
const KEYS = 10_000;
const keys = Array.from({ length: KEYS }, (_, i) => `ip:10.0.${i >> 8}.${i & 255}`);
const POLICY = { scopes: { ip: { limits: [{ name: 'per-ip', kind: 'rate', unit: 'requests', limit: 1000, per: '1m' }] } } };
const RESULTS = {};

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const us = (rate) => `${(1e6 / rate).toFixed(2)} µs`;
const k = (rate) => (rate >= 1e6 ? `${(rate / 1e6).toFixed(2)}M/s` : `${(rate / 1e3).toFixed(1)}k/s`);

function table(title, header, rows) {
  console.log(`\n### ${title}\n`);
  console.log(`| ${header.join(' | ')} |`);
  console.log(`|${' --- |'.repeat(header.length)}`);
  for (const r of rows) console.log(`| ${r.join(' | ')} |`);
}

/** Operations per second of `inFlight` loops each awaiting `op(i)` back to back for SECONDS. */
async function rate(op, inFlight, seconds = SECONDS) {
  let done = 0;
  let stop = false;
  const deadline = performance.now() + seconds * 1000;
  const loop = async (start) => {
    for (let i = start; !stop; i += inFlight) {
      await op(keys[i % KEYS]);
      done++;
      // Check the clock every 256 calls: cheap, and bounds the overshoot.
      if ((done & 255) === 0 && performance.now() >= deadline) stop = true;
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: inFlight }, (_, s) => loop(s)));
  return done / ((performance.now() - t0) / 1000);
}

/**
 * Median of PASSES passes, peers interleaved within each pass (same conditions).
 * `variants` maps a name to a factory `(pass) => op` that starts from fresh state
 * (a fresh limiter, or a fresh key prefix), so no key runs out of its 1000/min.
 */
async function compare(variants, inFlight, seconds) {
  const passes = Object.fromEntries(Object.keys(variants).map((v) => [v, []]));
  for (const [, make] of Object.entries(variants)) await rate(await make(-1), inFlight, 0.5); // warm-up (JIT)
  for (let p = 0; p < PASSES; p++) {
    for (const [v, make] of Object.entries(variants)) passes[v].push(await rate(await make(p), inFlight, seconds));
  }
  return { median: Object.fromEntries(Object.entries(passes).map(([v, xs]) => [v, median(xs)])), passes };
}

/** Every call must be admitted (the write path): a denial means the workload is wrong. */
const admitted = (d) => {
  if (!d.allowed) throw new Error(`ratewarden denied a benchmark call: ${d.reason}`);
};

async function benchMemory() {
  const out = {};
  const rows = [];
  for (const inFlight of [1, 64]) {
    const wardens = [];
    const r = await compare({
      ratewarden: () => {
        const w = new Warden(POLICY);
        wardens.push(w);
        return (key) => w.acquire(key).then(admitted);
      },
      rlf: () => {
        const rl = new RateLimiterMemory({ points: 1000, duration: 60 });
        return (key) => rl.consume(key, 1);
      },
    }, inFlight);
    for (const w of wardens) w.close();
    out[inFlight] = r;
    const { ratewarden, rlf } = r.median;
    rows.push([inFlight === 1 ? 'sequential' : `${inFlight} in flight`, `${k(ratewarden)} (${us(ratewarden)})`, `${k(rlf)} (${us(rlf)})`, `**${(ratewarden / rlf).toFixed(2)}×**`]);
  }
  RESULTS.memory = out;
  table(`In-process: \`await warden.acquire(key)\` vs \`await RateLimiterMemory.consume(key)\`, median of ${PASSES} (target ≥ 1×)`,
    ['', 'ratewarden', 'rate-limiter-flexible', 'ratio'], rows);
}

function startRedis() {
  const info = JSON.parse(execFileSync('python3', [join(ROOT, 'scripts', 'redis_harness.py'), 'start'], { encoding: 'utf8' }));
  return { ...info, stop: () => execFileSync('python3', [join(ROOT, 'scripts', 'redis_harness.py'), 'stop', info.dir]) };
}

async function benchRedis() {
  const redis = startRedis();
  try {
    const out = {};
    const rows = [];
    const client = new Redis(redis.url, { enableOfflineQueue: true, maxRetriesPerRequest: 1 });
    await client.ping();
    const wardens = [];
    for (const inFlight of [1, 64]) {
      const r = await compare({
        ratewarden: async (p) => {
          const w = await Warden.connect(POLICY, { backend: redis.url, namespace: `rw${inFlight}p${p}`, timeout: 2 });
          wardens.push(w);
          return (key) => w.acquire(key).then(admitted);
        },
        rlf: (p) => {
          const rl = new RateLimiterRedis({ storeClient: client, points: 1000, duration: 60, keyPrefix: `rlf${inFlight}p${p}` });
          return (key) => rl.consume(key, 1);
        },
      }, inFlight, SECONDS + 1);
      out[inFlight] = r;
      const { ratewarden, rlf } = r.median;
      rows.push([inFlight === 1 ? 'sequential' : `${inFlight} in flight`, k(ratewarden), k(rlf), `**${(ratewarden / rlf).toFixed(2)}×**`]);
    }
    for (const w of wardens) w.close();
    client.disconnect();
    RESULTS.redis = out;
    table(`Redis (own redis-server on loopback): \`acquire\` vs \`RateLimiterRedis\` (ioredis), median of ${PASSES} (target ≥ 1.5×)`,
      ['', 'ratewarden', 'rate-limiter-flexible', 'ratio'], rows);
  } finally {
    redis.stop();
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitForServer(child, port) {
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`express app exited with ${child.exitCode}`);
    try {
      await fetch(`http://127.0.0.1:${port}/`);
      return;
    } catch {
      if (Date.now() > deadline) throw new Error('express app did not start');
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

function autocannon(url, seconds) {
  const tool = join(ROOT, 'bench', 'node_modules', '.bin', 'autocannon');
  return JSON.parse(execFileSync(tool, ['-c', '50', '-d', String(seconds), '-j', url], { encoding: 'utf8', timeout: (seconds + 60) * 1000, stdio: ['ignore', 'pipe', 'ignore'] }));
}

async function benchExpress() {
  const seconds = Number(process.env.HTTP_SECONDS ?? 5);
  const variants = ['bare', 'noop', 'ratewarden', 'express-rate-limit'];
  const passes = Object.fromEntries(variants.map((v) => [v, []]));
  const cpu = Object.fromEntries(variants.map((v) => [v, []]));
  const codes = {};
  // Pass -1 warms the machine up (the first server of a run is often slow) and is discarded.
  for (let p = -1; p < PASSES; p++) {
    for (const v of p < 0 ? ['bare'] : variants) {
      const port = await freePort();
      const child = spawn(process.execPath, [join(ROOT, 'bench', 'node', 'express_app.mjs'), v, String(port)], { stdio: ['ignore', 'pipe', 'inherit'] });
      let printed = '';
      child.stdout.on('data', (b) => { printed += b; });
      try {
        await waitForServer(child, port);
        autocannon(`http://127.0.0.1:${port}/`, 1); // warm-up
        child.kill('SIGUSR2');
        const r = autocannon(`http://127.0.0.1:${port}/`, seconds);
        child.kill('SIGTERM');
        await new Promise((res) => (child.exitCode !== null ? res() : child.once('exit', res)));
        if (p < 0) continue;
        passes[v].push(r.requests.average);
        codes[v] = { '2xx': r['2xx'], non2xx: r.non2xx, errors: r.errors };
        cpu[v].push(JSON.parse(printed).cpu_us / (r['2xx'] + r.non2xx));
      } finally {
        if (child.exitCode === null) child.kill('SIGKILL');
      }
    }
  }
  const med = Object.fromEntries(variants.map((v) => [v, median(passes[v])]));
  const cpuMed = Object.fromEntries(variants.map((v) => [v, median(cpu[v])]));
  RESULTS.express = { req_per_s: med, passes, server_cpu_us_per_request: cpuMed, cpu_passes: cpu, codes };
  const cost = (v) => `**${((1 - med[v] / med.bare) * 100).toFixed(1)} %**`;
  const extra = (v) => `${cpuMed[v].toFixed(1)} µs (+${(cpuMed[v] - cpuMed.bare).toFixed(1)} µs, +${((cpuMed[v] / cpuMed.bare - 1) * 100).toFixed(1)} %)`;
  const rows = [['bare Express 5', med.bare.toFixed(0), '–', `${cpuMed.bare.toFixed(1)} µs`, JSON.stringify(codes.bare)]];
  for (const v of variants.slice(1)) rows.push([v === 'noop' ? 'a no-op middleware' : v, med[v].toFixed(0), cost(v), extra(v), JSON.stringify(codes[v])]);
  table(`Express 5: autocannon -c 50 -d ${seconds} on loopback, median of ${PASSES} (target ≤ 10 % cost)`,
    ['app', 'req/s', 'cost vs bare', 'server CPU per request', 'responses (last pass)'], rows);
}

const sections = process.argv.slice(2);
const all = sections.length === 0;
console.log(`ratewarden ${version()}, Node ${process.version}, ${PASSES} passes`);
if (all || sections.includes('memory')) await benchMemory();
if (all || sections.includes('redis')) await benchRedis();
if (all || sections.includes('express')) await benchExpress();
mkdirSync(join(ROOT, 'bench', 'out'), { recursive: true });
writeFileSync(join(ROOT, 'bench', 'out', 'node.json'), JSON.stringify(RESULTS, null, 2));
