// An Express API behind ratewarden: 5 requests per minute per client address,
// RateLimit headers on every response, a 429 with Retry-After once spent.
// Run: node examples/node/express.mjs
import express from 'express';
import { Warden } from 'ratewarden';

const warden = new Warden({
  scopes: { ip: { limits: [{ name: 'per-ip', kind: 'rate', unit: 'requests', limit: 5, per: '1m' }] } },
});

const app = express();
app.use(warden.express()); // scope ip:<socket address>; IETF draft-11 headers
app.get('/', (req, res) => res.json({ hello: 'world' }));

const server = app.listen(0, '127.0.0.1', async () => {
  const url = `http://127.0.0.1:${server.address().port}/`;
  for (let i = 1; i <= 6; i++) {
    const r = await fetch(url);
    console.log(r.status, r.headers.get('ratelimit'), r.headers.get('retry-after') ?? '-', await r.text());
  }
  // 200 "per-ip";r=4;t=12 - {"hello":"world"}    … four more 200s, then:
  // 429 "per-ip";r=0;t=60 12 {"error":"rate_limited","limit":"per-ip","kind":"rate",…,"retry_after":11.98…}
  server.close();
  warden.close();
});
