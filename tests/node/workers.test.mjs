// Worker threads with their own wardens, terminated mid-flight, never crash the
// process: every async operation owns what it uses (nothing it touches is freed
// with the worker's environment). It used to die with SIGSEGV on Redis.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { startRedis } from './helpers.mjs';

const script = fileURLToPath(new URL('./workers/terminate.mjs', import.meta.url));
let redis;
before(() => { redis = startRedis(); });
after(() => redis?.stop());

for (const name of ['memory', 'redis', 'cluster']) {
  test(`terminating workers with ${name} wardens mid-flight exits cleanly, every time`, () => {
    const backend = { memory: 'memory', redis: redis.url, cluster: redis.cluster_url }[name];
    for (let run = 0; run < 5; run++) {
      const r = spawnSync(process.execPath, [script, backend], { encoding: 'utf8', timeout: 60_000 });
      assert.equal(r.signal, null, `run ${run}: killed by ${r.signal}\n${r.stderr}`);
      assert.equal(r.status, 0, `run ${run}: exit ${r.status}\n${r.stderr}`);
      assert.equal(r.stdout.trim(), 'terminated 4', r.stderr);
    }
  });
}
