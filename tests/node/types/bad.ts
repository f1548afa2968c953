// Must NOT compile (types.test.mjs checks that tsc rejects it): proves the
// declarations constrain something.
import { Warden } from 'ratewarden';

const warden = new Warden({});
warden.acquire(42);
warden.express({ headers: 'draft-99' });
const n: string = (await warden.check('ip:1')).allowed;
warden.acquire('ip:1', { priority: 'urgent' });
warden.acquire('ip:1', { cost: { usd: {} } });
warden.reserve('ip:1', { usage: { input_tokens: '12' } });
const c: string = warden.cost('m', { output_tokens: 1 }).amount;
warden.onEvent((e) => e.type === 'limit.exhausted_', { events: ['limit.'] });
export { c };
export { n };
