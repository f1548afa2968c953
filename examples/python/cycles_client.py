"""Cycles' published Python SDK (`pip install runcycles`), unchanged, against
`ratewarden serve --policy examples/agents.yaml` (CYCLES_BASE_URL, default
http://127.0.0.1:8080)."""

import os

import runcycles
from runcycles import CyclesClient, CyclesConfig, CyclesProtocolError

client = CyclesClient(
    CyclesConfig(base_url=os.environ.get("CYCLES_BASE_URL", "http://127.0.0.1:8080"), api_key="local")
)


# 1 USD = 100,000,000 USD_MICROCENTS. Reserve 5 cents, run, commit 1.2 cents.
@runcycles.cycles(
    estimate=5_000_000,
    actual=lambda summary: 1_200_000,
    action_kind="llm.completion",
    action_name="openai:gpt-4o",
    tenant="acme",
    agent="scout",
    client=client,
)
def summarize(text: str) -> str:
    ctx = runcycles.get_cycles_context()
    assert ctx is not None
    print(f"reserved {ctx.estimate} on {ctx.scope_path}, decision {ctx.decision.value}")
    return text[:24]


print(summarize("Quarterly revenue rose 12% on strong agent adoption."))

[tenant] = [b for b in client.get_balances(tenant="acme").body["balances"] if b["scope_path"] == "tenant:acme"]
print(f"tenant:acme spent {tenant['spent']['amount']}, remaining {tenant['remaining']['amount']} USD_MICROCENTS")


# More than the tenant's monthly budget: refused before the call runs.
@runcycles.cycles(
    estimate=60_000_000_000,
    action_kind="llm.completion",
    action_name="openai:gpt-4o",
    tenant="acme",
    client=client,
)
def research() -> None:
    raise AssertionError("never runs")


try:
    research()
except CyclesProtocolError as e:
    print(f"denied: {e.error_code}")
