"""An LLM call reserved by what it uses, priced by the policy and shrunk to
what the budget covers (run: python examples/python/pricing.py)."""

from decimal import Decimal

from ratewarden import BudgetExceeded, Warden

warden = Warden(
    {
        "scopes": {
            "tenant": {
                "limits": [{"name": "tenant-usd", "kind": "budget", "unit": "usd", "limit": "0.02", "per": "day"}]
            }
        },
        "resources": {
            "openai:gpt-4o": {
                # USD per million tokens; exact decimals, no floats.
                "pricing": {"input": "2.50", "cached_input": "1.25", "output": "10.00"},
                # Not enough budget for max_output_tokens? Allow fewer, down to 64.
                "shrink": {"min_output_tokens": 64},
            }
        },
    }
)

ask = {"input_tokens": 1200, "max_output_tokens": 800}
print(f"estimate: ${warden.estimate('openai:gpt-4o', ask)['amount_text']}")
for call in range(1, 4):
    try:
        with warden.reserve("tenant:acme", resource="openai:gpt-4o", usage=ask) as r:
            max_tokens = r.caps.get("max_tokens", ask["max_output_tokens"])
            # reply = client.chat.completions.create(model="gpt-4o", max_tokens=max_tokens, ...)
            used = {"input_tokens": 1200, "output_tokens": max_tokens}  # reply.usage
            receipt = r.commit(usage=used)
        usd = Decimal(receipt["charges"][0]["charged"]).scaleb(-6).normalize()
        print(f"call {call}: {r.outcome}, max_tokens={max_tokens}, charged ${usd}")
    except BudgetExceeded as e:
        print(f"call {call}: denied ({e.decision.denied_by} is spent)")
