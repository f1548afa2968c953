"""The governed clients over real HTTP: the real ``openai`` and ``anthropic``
SDKs (sync and async) and plain ``httpx``, against a local fake upstream that
enforces its own quota and sends real provider headers (tests/fakes/upstream.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import anthropic
import httpx
import openai
import pytest

import ratewarden
from ratewarden import Warden
from ratewarden.clients import AsyncGovernedTransport, GovernedTransport, govern

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "upstream.py"
POLICY: Dict[str, Any] = {
    "scopes": {"agent": {"limits": []}},
    "resources": {"llm": {"upstream": {}}, "plain": {}},
}


class Upstream:
    def __init__(self, limit: int, window: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--limit", str(limit), "--window", str(window)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url: str = json.loads(self.proc.stdout.readline())["url"]

    def stats(self) -> Dict[str, Any]:
        return httpx.get(f"{self.url}/stats").json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def upstream(request: pytest.FixtureRequest) -> Iterator[Upstream]:
    limit, window = getattr(request, "param", (6, 1.5))
    u = Upstream(limit, window)
    yield u
    u.stop()


def completion(client: Any, priority: str) -> str:
    r = client.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"ratewarden-priority": priority, "x-test-priority": priority},
    )
    return r.choices[0].message.content  # type: ignore[no-any-return]


def test_openai_agents_near_the_limit_never_hit_a_429_and_critical_goes_first(upstream: Upstream) -> None:
    w = Warden(POLICY)
    client = govern(openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="k"), w, "llm", scope="agent:a")
    assert completion(client, "standard") == "ok"  # the first response tells every agent the state
    done: List[str] = []
    lock = threading.Lock()

    def agent(priority: str) -> None:
        for _ in range(4):
            assert completion(client, priority) == "ok"
            with lock:
                done.append(priority)

    threads = [threading.Thread(target=agent, args=(p,)) for p in ["critical", "standard", "background"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stats = upstream.stats()
    assert (stats["ok"], stats["rejected"]) == (25, 0), stats
    rank = {p: sum(i for i, q in enumerate(done) if q == p) / 8 for p in ("critical", "background")}
    assert rank["critical"] < rank["background"], done
    assert w.upstream("llm")["quotas"][0]["limit"] == 6


def test_async_anthropic_through_the_helper(upstream: Upstream) -> None:
    w = Warden(POLICY)
    client = govern(anthropic.AsyncAnthropic(base_url=upstream.url, api_key="k"), w, "llm", scope="agent:b")

    async def main() -> List[str]:
        async def one() -> str:
            m = await client.messages.create(
                model="claude-fake", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
            return m.content[0].text  # type: ignore[union-attr]

        first = await one()
        return [first, *await asyncio.gather(*(one() for _ in range(11)))]

    assert asyncio.run(main()) == ["ok"] * 12
    stats = upstream.stats()
    assert (stats["ok"], stats["rejected"]) == (12, 0), stats
    assert w.upstream("llm")["quotas"][0]["dimension"] == "requests"


@pytest.mark.parametrize("upstream", [(2, 30.0)], indirect=True)
def test_a_request_still_denied_after_max_wait_raises_and_never_reaches_the_upstream(upstream: Upstream) -> None:
    w = Warden(POLICY)
    with httpx.Client(transport=GovernedTransport(w, "llm", scope="agent:c", max_wait=0)) as http:
        for _ in range(2):
            assert http.post(f"{upstream.url}/v1/chat/completions", json={}).status_code == 200
        with pytest.raises(ratewarden.RateLimited) as e:
            http.post(f"{upstream.url}/v1/chat/completions", json={})
    assert e.value.retry_after is not None and 0 < e.value.retry_after <= 30
    assert upstream.stats()["rejected"] == 0


def test_an_upstream_429_stops_every_agent_until_retry_after(upstream: Upstream) -> None:
    clock = ratewarden.ManualClock()
    w = Warden(POLICY, clock=clock)
    plain = httpx.Client()
    for _ in range(6):  # spent behind the warden's back
        plain.post(f"{upstream.url}/v1/chat/completions", json={})

    async def main() -> int:
        async with httpx.AsyncClient(transport=AsyncGovernedTransport(w, "llm", scope="agent:d", max_wait=0)) as http:
            r = await http.post(f"{upstream.url}/v1/chat/completions", json={})
            return r.status_code

    assert asyncio.run(main()) == 429
    assert w.upstream("llm")["blocked"] >= 1
    with pytest.raises(ratewarden.RateLimited):
        asyncio.run(main())
    assert upstream.stats()["rejected"] == 1, "the second never went out"


def test_bad_setups_fail_when_made() -> None:
    w = Warden(POLICY)
    with pytest.raises(ratewarden.InvalidInput, match="upstream"):
        GovernedTransport(w, "plain", scope="agent:a")
    with pytest.raises(ratewarden.InvalidInput, match="llmm"):
        GovernedTransport(w, "llmm", scope="agent:a")
    with pytest.raises(ratewarden.InvalidInput, match="priority"):
        GovernedTransport(w, "llm", scope="agent:a", priority="urgent")
    with pytest.raises(ratewarden.InvalidInput, match="max_wait"):
        AsyncGovernedTransport(w, "llm", scope="agent:a", max_wait=-1)
    with pytest.raises(ratewarden.InvalidInput, match="scope"):
        GovernedTransport(w, "llm", scope="agent")
    with pytest.raises(ratewarden.InvalidInput, match="client"):
        govern(object(), w, "llm", scope="agent:a")
