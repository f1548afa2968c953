// An LLM call wrapped by what it uses: priced by the policy, shrunk to what the
// budget covers. Run: node examples/node/pricing.mjs
import { Warden } from 'ratewarden';

const warden = new Warden({
  scopes: { tenant: { limits: [{ name: 'tenant-usd', kind: 'budget', unit: 'usd', limit: '0.02', per: 'day' }] } },
  resources: {
    'openai:gpt-4o': {
      pricing: { input: '2.50', cached_input: '1.25', output: '10.00' }, // USD per million tokens
      shrink: { min_output_tokens: 64 }, // not enough for max_output_tokens? allow fewer, down to 64
    },
  },
});

const ask = { input_tokens: 1200, max_output_tokens: 800 };
console.log(`estimate: $${warden.estimate('openai:gpt-4o', ask).amountText}`);
for (let call = 1; call <= 3; call++) {
  const d = await warden.reserve('tenant:acme', { resource: 'openai:gpt-4o', usage: ask });
  if (!d.allowed) {
    console.log(`call ${call}: denied (${d.deniedBy} is spent)`);
    continue;
  }
  const maxTokens = d.caps.maxTokens ?? ask.max_output_tokens;
  // const reply = await client.chat.completions.create({ model: 'gpt-4o', max_tokens: maxTokens, ... });
  const used = { input_tokens: 1200, output_tokens: maxTokens }; // reply.usage
  await warden.commitUsage(d.reservation, 'openai:gpt-4o', used);
  const bill = warden.cost('openai:gpt-4o', used); // what the commit charged, exactly
  console.log(`call ${call}: ${d.outcome}, max_tokens=${maxTokens}, charged $${bill.amountText}`);
}
