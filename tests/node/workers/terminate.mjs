// Run by workers.test.mjs in a child process (a crash must not take the test
// runner down): four worker threads, each with its own Warden on the backend
// named by argv[2], keep 50 decisions, reservations and wrapped calls in flight
// — and are terminated from the main thread mid-flight. Prints `terminated 4`.
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';

if (isMainThread) {
  const backend = process.argv[2];
  const workers = [];
  let busy = 0;
  for (let i = 0; i < 4; i++) {
    const w = new Worker(fileURLToPath(import.meta.url), { workerData: { i, backend } });
    w.on('error', (e) => { console.error('worker error', e); process.exitCode = 1; });
    w.once('message', async () => {
      busy += 1;
      if (busy === 4) {
        const codes = await Promise.all(workers.map((x) => x.terminate()));
        console.log(`terminated ${codes.length}`);
      }
    });
    workers.push(w);
  }
} else {
  const { Warden } = await import('../../../bindings-node/index.mjs');
  const policy = {
    scopes: { ip: { limits: [
      { name: 'rps', kind: 'rate', limit: 1_000_000, per: '1s' },
      { name: 'slots', kind: 'concurrency', limit: 1_000 },
    ] } },
  };
  const { i, backend } = workerData;
  // A generous timeout: the test is about teardown, not decisions under load.
  const options = backend === 'memory' ? {} : { backend, namespace: `wt-${process.pid}-${i}`, timeout: 10 };
  const w = await Warden.connect(policy, options);
  const tool = w.wrap(async (n) => n, { scope: `ip:${i}`, actual: () => ({ requests: 1 }) });
  for (let round = 0; ; round++) {
    // allSettled: a denial (a degraded one under load) is not what this tests.
    await Promise.allSettled(Array.from({ length: 50 }, (_, k) => {
      if (k % 3 === 0) return w.acquire(`ip:${i}`);
      if (k % 3 === 1) return w.reserve(`ip:${i}`).then((d) => d.allowed && w.commit(d.reservation));
      return tool(k);
    }));
    // In flight from here on while the main thread terminates us.
    if (round === 5) parentPort.postMessage('busy');
  }
}
