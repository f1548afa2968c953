"""Six agents share one OpenAI organisation's quota through ratewarden.

Every response's rate-limit headers are reported, every request first waits for
the upstream's traffic light, and critical work goes first — no quota is
configured: the upstream's own headers say it. Runs against any
OpenAI-compatible server: ``OPENAI_BASE_URL=http://127.0.0.1:8000/v1
OPENAI_API_KEY=... python examples/python/openai_agents.py``.
"""

import threading

import openai

from ratewarden import Warden
from ratewarden.clients import govern

warden = Warden(
    {
        "scopes": {"agent": {}},
        # `upstream: {}`: coordinate on what the upstream's headers say (defaults:
        # green above 40% left, amber to 15%, red below; see the README).
        "resources": {"openai": {"upstream": {}}},
    }
)
client = govern(openai.OpenAI(), warden, "openai", scope="agent:research")


def agent(priority: str) -> None:
    for _ in range(4):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"ratewarden-priority": priority},
        )


# The first response tells every agent the upstream's state.
client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
threads = [threading.Thread(target=agent, args=(p,)) for p in ("critical", "standard", "background") * 2]
for t in threads:
    t.start()
for t in threads:
    t.join()
state = warden.upstream("openai")
print(f"25 calls made; the upstream is {state['zone']}, {state['quotas'][0]['remaining']} requests left")
