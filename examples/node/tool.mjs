// A wrapped LLM tool: reserves the estimate, commits the actual usage, and an
// Express route behind the middleware. Run: node examples/node/tool.mjs
import { BudgetExceededError, Warden, scope } from 'ratewarden';

const warden = new Warden({
  scopes: {
    tenant: { limits: [{ name: 'tenant-usd', kind: 'budget', unit: 'usd', limit: '0.05', per: 'day' }] },
    ip: { limits: [{ name: 'per-ip', kind: 'rate', unit: 'requests', limit: 100, per: '1m' }] },
  },
  resources: { openai: { limits: [{ name: 'tpm', kind: 'rate', unit: 'tokens', limit: 90000, per: '1m' }] } },
});

const askModel = warden.wrap(
  async (tenant, prompt) => ({ text: '…', usage: { total_tokens: 1200 } }), // the SDK call goes here
  {
    scope: (tenant) => scope({ tenant }),
    resource: 'openai',
    cost: { tokens: 4000, usd: '0.01' }, // the estimate, held while the call runs
    actual: (r) => ({ tokens: r.usage.total_tokens, usd: (r.usage.total_tokens * 2.5e-6).toFixed(6) }),
  },
);

let answered = 0;
try {
  for (;;) {
    await askModel('acme', 'Summarise the ticket');
    answered += 1;
  }
} catch (e) {
  if (!(e instanceof BudgetExceededError)) throw e;
  console.log(`answered ${answered}, then ${e.decision.deniedBy} ran out`); // answered 14, …
}

// Express: app.use(warden.express()) — 429 + Retry-After + RateLimit headers.
const middleware = warden.express({ scope: (req) => (req.headers['x-tenant'] ? scope({ tenant: req.headers['x-tenant'] }) : null) });
console.log(typeof middleware === 'function' ? 'middleware ready' : 'no middleware');
