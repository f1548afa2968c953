// Overage rules at commit from Node: reject rejects with a typed error and keeps
// the reservation; allow_if_available / allow_with_overdraft charge as far as
// they allow; a wrapped call refused by reject is charged its estimate.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { PolicyError, ReservationConflictError, Warden } from '../../bindings-node/index.mjs';

const warden = (overage, extra = {}) => new Warden({
  scopes: { tenant: { limits: [{ name: 'usd', kind: 'budget', unit: 'usd', limit: '10', overage, ...extra }] } },
});
const charged = (r) => [r.charges[0].charged, r.charges[0].uncharged];

test('reject refuses the commit and keeps the reservation live', async () => {
  const w = warden('reject');
  const d = await w.reserve('tenant:a', { cost: { usd: '1' } });
  await assert.rejects(w.commit(d.reservation, { usd: '1.5' }), (e) => e instanceof ReservationConflictError
    && e.code === 'overage_rejected' && e.unit === 'usd' && e.reservation === d.reservation);
  assert.deepEqual(charged(await w.commit(d.reservation, { usd: '0.75' })), [750000, 0]);
});

test('allow_if_available and allow_with_overdraft charge as far as they allow', async () => {
  let w = warden('allow_if_available');
  await w.acquire('tenant:a', { cost: { usd: '8' } });
  let d = await w.reserve('tenant:a', { cost: { usd: '1' } });
  assert.deepEqual(charged(await w.commit(d.reservation, { usd: '5' })), [2000000, 3000000]);
  w = warden('allow_with_overdraft', { overdraft: '2.5' });
  await w.acquire('tenant:a', { cost: { usd: '8' } });
  d = await w.reserve('tenant:a', { cost: { usd: '1' } });
  assert.deepEqual(charged(await w.commit(d.reservation, { usd: '5' })), [4500000, 500000]);
  assert.equal((await w.acquire('tenant:a', { cost: { usd: '0.01' } })).allowed, false);
});

test('a wrapped call refused by reject is charged its estimate, with a warning', async () => {
  const w = warden('reject');
  const warnings = [];
  const onWarning = (wn) => warnings.push(wn);
  process.on('warning', onWarning);
  try {
    const call = w.wrap(async (used) => used, { scope: 'tenant:a', cost: { usd: '1' }, actual: (used) => ({ usd: used }) });
    assert.equal(await call('3'), '3');
    await new Promise((resolve) => setImmediate(resolve));
  } finally {
    process.off('warning', onWarning);
  }
  assert.equal(warnings.length, 1);
  assert.match(warnings[0].message, /overage rule is `reject`; charged the estimate/);
  assert.equal((await w.balances('tenant:a'))[0].remaining, 9000000);
});

test('an overdraft without its amount is a policy error naming where', () => {
  assert.throws(() => warden('allow_with_overdraft'), (e) => e instanceof PolicyError && /limits\[0\]\.overdraft/.test(e.message));
});

test('a limit in debt admits again once topped up', async () => {
  const w = new Warden({ scopes: { tenant: { limits: [{ name: 'credits', kind: 'budget', unit: 'usd', limit: '10' }] } } });
  const d = await w.reserve('tenant:a', { cost: { usd: 5 } });
  const receipt = await w.commit(d.reservation, { usd: 12 });
  assert.equal(receipt.charges[0].debt, 2000000);
  assert.ok(!(await w.acquire('tenant:a', { cost: { usd: '0.01' } })).allowed);
  const t = await w.topUp('tenant:a', 'credits', '3');
  assert.deepEqual([t.creditedText, t.spentText, t.unit], ['3', '9', 'usd']);
  assert.ok((await w.acquire('tenant:a', { cost: { usd: 1 } })).allowed);
  await assert.rejects(w.topUp('tenant:a', 'nope', 1), /is not a limit that requests by tenant:a touch/);
  await assert.rejects(w.topUp('tenant:a', 'credits', {}), /invalid amount/);
});
