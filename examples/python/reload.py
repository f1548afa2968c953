"""A policy edited while the warden runs: new prices and a bigger budget take
effect at the next decision, and what was spent stays spent
(run: python examples/python/reload.py)."""

import json
import tempfile
from pathlib import Path

from ratewarden import Warden


def policy(budget: str, input_price: str) -> dict:
    return {
        "scopes": {
            "tenant": {
                "limits": [{"name": "tenant-usd", "kind": "budget", "unit": "usd", "limit": budget, "per": "day"}]
            }
        },
        "resources": {"openai:gpt-4o": {"pricing": {"input": input_price, "output": "10.00"}}},
    }


path = Path(tempfile.mkdtemp()) / "policy.json"
path.write_text(json.dumps(policy(budget="10", input_price="2.50")))
warden = Warden.from_file(path)
ask = {"input_tokens": 1_000_000, "max_output_tokens": 100_000}
print(f"estimate: ${warden.estimate('openai:gpt-4o', ask)['amount_text']}")
warden.acquire("tenant:acme", cost={"usd": "6"})

# Later: the provider raised its prices and the tenant bought more budget.
path.write_text(json.dumps(policy(budget="20", input_price="5.00")))
changes = warden.reload(path)
print(f"changed: {changes['changed']}, repriced: {changes['repriced']}")
print(f"estimate: ${warden.estimate('openai:gpt-4o', ask)['amount_text']}")
left = {b["name"]: b["remaining_text"] for b in warden.balances("tenant:acme")}
print(f"left: ${left['tenant-usd']} of $20 (the $6 spent stays spent)")
