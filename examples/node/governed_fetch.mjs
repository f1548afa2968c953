// A Node service's calls to an LLM upstream, governed: each request waits for
// the upstream's traffic light (from the rate-limit headers of earlier
// responses, shared by every process on the same backend), then goes out, and
// its response is reported. Run against any OpenAI-compatible server:
// UPSTREAM_URL=http://127.0.0.1:8000 node examples/node/governed_fetch.mjs
import { Warden } from 'ratewarden';

const warden = new Warden({
  scopes: { service: {} },
  resources: { openai: { upstream: {} } },
});
const governed = warden.fetcher('openai', { scope: 'service:search' });

const ask = (priority) => governed(`${process.env.UPSTREAM_URL}/v1/chat/completions`, {
  method: 'POST',
  headers: { 'content-type': 'application/json', 'ratewarden-priority': priority },
  body: JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] }),
});

await ask('standard'); // the first response tells every caller the upstream's state
const statuses = await Promise.all(
  ['critical', 'standard', 'background'].flatMap((p) => [ask(p), ask(p), ask(p), ask(p)]),
);
const state = await warden.upstream('openai');
console.log(`${statuses.filter((r) => r.status === 200).length} of 12 answered; the upstream is ${state.zone}`);
