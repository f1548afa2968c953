// The shared Redis harness works from Node: real servers, real sockets.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createConnection } from 'node:net';
import { fileURLToPath } from 'node:url';

const harness = fileURLToPath(new URL('../../scripts/redis_harness.py', import.meta.url));

function ping(port) {
  return new Promise((resolve, reject) => {
    const socket = createConnection({ host: '127.0.0.1', port }, () => socket.write('*1\r\n$4\r\nPING\r\n'));
    socket.once('data', (data) => { socket.end(); resolve(data.toString()); });
    socket.once('error', reject);
  });
}

test('a cluster node and a standalone server answer, then are gone after stop', async () => {
  const info = JSON.parse(execFileSync('python3', [harness, 'start', '--cluster'], { encoding: 'utf8' }));
  const port = Number(info.url.split(':').pop());
  const nodePort = Number(info.cluster[0].split(':').pop());
  try {
    assert.notEqual(port, 6379);
    assert.equal(await ping(port), '+PONG\r\n');
    assert.equal(await ping(nodePort), '+PONG\r\n');
    assert.equal(info.cluster.length, 3);
  } finally {
    execFileSync('python3', [harness, 'stop', info.dir]);
  }
  await assert.rejects(ping(port));
});
