// Compiled (not run) by types.test.mjs with `tsc --strict`: the README's uses
// of the package type-check against index.d.ts, with Express's own types.
import express from 'express';
import {
  BudgetExceededError, ManualClock, RateLimitedError, Warden, WardenError, scope, currentCaps,
  type Decision, type LimitInfo, type Listener, type ListenerStats, type Priced, type Receipt, type UpstreamInfo, type Usage,
  type WardenEvent, type AuditRecord, type AuditStats, type OutletStats, type PolicyChanges,
} from 'ratewarden';

const warden = new Warden(
  { scopes: { tenant: { limits: [{ name: 'tenant-usd', kind: 'budget', unit: 'usd', limit: '5', per: 'day' }] } } },
  { backend: 'memory', onBackendError: 'local', localShare: 2, clock: new ManualClock() },
);

async function decisions(): Promise<number> {
  const d: Decision = await warden.acquire(scope({ tenant: 'acme' }), { cost: { usd: '0.01' }, priority: 'critical' });
  const allowed: boolean = d.allowed;
  const remaining: number[] = d.limits.map((l: LimitInfo) => l.remaining);
  const after: number | undefined = d.retryAfter ?? undefined;
  const r = await warden.reserve('tenant:acme', { cost: { usd: 1 }, lease: 30 });
  if (r.reservation !== undefined && r.reservation !== null) {
    const receipt: Receipt = await warden.commit(r.reservation, { usd: '0.5' });
    const charged: number = receipt.charges[0].charged;
    const released: boolean = await warden.release(r.reservation);
    const expires: number = await warden.extend(r.reservation, 10);
    return charged + expires + (released ? 1 : 0);
  }
  return (allowed ? 1 : 0) + remaining.length + (after ?? 0);
}
void upstream;

async function upstream(response: Response): Promise<string> {
  const seen: UpstreamInfo = await warden.observe('openai', response.headers);
  const after429: UpstreamInfo = await warden.report('openai', 429, { 'retry-after': '2' });
  const now: UpstreamInfo = await warden.upstream('openai');
  const d: Decision = await warden.acquire('tenant:acme', { resource: 'openai' });
  const left: number | undefined = d.light?.left ?? undefined;
  const governed: typeof fetch = warden.fetcher('openai', { scope: 'agent:1', priority: 'critical', maxWait: 5 });
  await governed('http://127.0.0.1:1/v1/models', { headers: { 'ratewarden-priority': 'background' } });
  return `${seen.zone} ${after429.blocked ?? 0} ${now.quotas.map((q) => q.remaining).join()} ${left}`;
}

const ask = warden.wrap(async (tenant: string, prompt: string) => ({ text: prompt, usd: '0.002' }), {
  scope: (tenant) => `tenant:${tenant}`,
  cost: { usd: '0.01' },
  actual: (result) => ({ usd: result.usd }),
});
const answer: Promise<{ text: string; usd: string }> = ask('acme', 'hello');

function handle(e: unknown): number | null | undefined {
  if (e instanceof BudgetExceededError) return e.retryAfter;
  if (e instanceof RateLimitedError) return e.decision.retryAfter;
  if (e instanceof WardenError) return null;
  return undefined;
}

const app = express();
app.use(warden.express({ headers: 'draft-7', trustProxy: true, skip: (req) => req.path === '/health' }));
app.use(
  warden.express<express.Request, express.Response>({
    scope: (req) => (req.get('x-tenant') ? `tenant:${req.get('x-tenant')}` : undefined),
    onLimited: (req, res, decision) => res.status(429).json({ retryAfter: decision.retryAfter }),
  }),
);

// Declared first, or mounted on a path: the callbacks still see Express's
// request and response methods without explicit generics.
const declaredFirst = warden.express({
  scope: (req) => req.header('x-tenant') ?? undefined,
  onLimited: (req, res) => res.status(429).json({ path: req.path }),
});
app.use(declaredFirst);
app.use('/api', warden.express({ scope: (req) => req.get('x-tenant'), skip: async (req) => req.method === 'OPTIONS' }));
app.use(warden.express({ trustProxy: ['loopback', '10.0.0.0/8'], ipv6Subnet: 64 }));
app.use(warden.express({ trustProxy: 2 }));

async function errors(): Promise<string | null> {
  try {
    await warden.release('0'.repeat(32));
  } catch (e) {
    if (e instanceof WardenError && e.code === 'reservation_expired') return e.reservation;
    if (e instanceof WardenError) return `${e.kind}:${e.code}:${e.argument ?? ''}`;
  }
  return null;
}

// Pricing: usage instead of money, priced by the policy's tables.
async function priced(): Promise<number> {
  const est: Priced = warden.estimate('openai', { input_tokens: 1200, max_output_tokens: 800 });
  const d = await warden.reserve('tenant:acme', { resource: 'openai', usage: { input_tokens: 1200, max_output_tokens: 800n } });
  const r = await warden.commitUsage(d.reservation!, 'openai', { input_tokens: 1200, output_tokens: 95 });
  const llm = warden.wrap(async (prompt: string) => ({ usage: { input_tokens: prompt.length, output_tokens: 12 } }), {
    scope: 'tenant:acme',
    resource: 'openai',
    usage: (prompt) => ({ input_tokens: prompt.length, max_output_tokens: 256 }),
    actual: (reply) => reply.usage,
  });
  await llm('hello');
  const cost: Usage = { input_tokens: 1, seconds: '1.5' };
  return est.amount + r.charges.length + warden.cost('openai', cost).amount;
}

// Events: a callback on the event loop, closed when done.
function events(): number {
  const l: Listener = warden.onEvent((e: WardenEvent) => {
    if (e.type === 'limit.exhausted') console.log(e.id, e.timestamp, e.at, e.data.owner);
  }, { events: ['limit.'] });
  const all = warden.onEvent(async () => {}, { events: 'backend.unavailable' });
  const s: ListenerStats = l.stats();
  const audit = warden.onAudit((r: AuditRecord) => {
    if (r.outcome === 'deny') console.log(r.request_id, r.scope, r.amounts.usd, r.reason);
  });
  audit.close();
  const a: AuditStats = warden.auditStats();
  const o: OutletStats = warden.outletStats();
  void warden.flushAudit(1).then((done: boolean) => done && a.written + o.appended > 0);
  void warden.flushOutlets();
  l.close();
  all.close();
  return s.delivered + s.dropped + s.failed + (s.lastError ?? '').length + (l.isOpen ? 1 : 0) + l.events.length;
}

export { answer, decisions, errors, events, handle, priced };

function reloaded(): string[] {
  const changes: PolicyChanges = warden.reload('policy.yaml');
  const again: PolicyChanges = warden.reload({ scopes: { tenant: {} } });
  return [...changes.added, ...changes.removed, ...changes.changed, ...again.repriced];
}
void reloaded;

function capsOfTheWrappedCall(): number {
  const caps = currentCaps();
  return (caps.maxTokens ?? 0) + (caps.model?.length ?? 0);
}
void capsOfTheWrappedCall;
