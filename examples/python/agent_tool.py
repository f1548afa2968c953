"""A governed LLM tool: each call reserves its estimated tokens and dollars,
then commits what the model actually used (run: python examples/python/agent_tool.py)."""

import asyncio

from ratewarden import BudgetExceeded, Warden

warden = Warden(
    {
        "scopes": {
            "tenant": {
                "limits": [
                    {"name": "tenant-usd", "kind": "budget", "unit": "usd", "limit": "0.05", "per": "day"},
                ]
            },
            "run": {},
        },
        "resources": {
            "openai": {"limits": [{"name": "tpm", "kind": "rate", "unit": "tokens", "limit": 90000, "per": "1m"}]}
        },
    }
)


def price(usage: dict) -> dict:
    """What a response cost: tokens, and dollars at $2.50 per million tokens."""
    tokens = usage["total_tokens"]
    return {"tokens": tokens, "usd": f"{tokens * 2.5 / 1_000_000:.6f}"}


@warden.guard(
    lambda tenant, prompt: f"tenant:{tenant}/run:r1",
    resource="openai",
    cost={"tokens": 4000, "usd": "0.01"},  # the estimate, held while the call runs
    actual=lambda response: price(response["usage"]),  # what is charged afterwards
)
async def ask_model(tenant: str, prompt: str) -> dict:
    await asyncio.sleep(0)  # the real SDK call goes here
    return {"text": "…", "usage": {"total_tokens": 1200}}


async def main() -> None:
    answered = 0
    try:
        while True:
            await ask_model("acme", "Summarise the ticket")
            answered += 1
    except BudgetExceeded as e:
        print(f"answered {answered} prompts, then: {e.decision.denied_by} is spent")
    left = warden.check("tenant:acme", cost={"usd": 0}).limits[0]["remaining_text"]
    print(f"tenant-usd left: {left}")


asyncio.run(main())
