"""An agent for the cross-language tests: threads calling the fake upstream
through the real ``openai`` SDK, governed by ratewarden on a shared backend.

``python openai_agent.py UPSTREAM_URL BACKEND NAMESPACE PRIORITY:N ...``
runs one thread per ``PRIORITY:N`` (N chat completions each) and prints
``{"ok": n, "errors": [...]}``. With ``RW_WAIT_GO=1`` it prints ``ready`` once
connected and starts when a line arrives on stdin."""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import List

import openai

from ratewarden import Warden
from ratewarden.clients import govern

POLICY = {"scopes": {"agent": {"limits": []}}, "resources": {"llm": {"upstream": {}}}}


def main() -> None:
    url, backend, namespace, *plan = sys.argv[1:]
    w = Warden(POLICY, backend=backend, namespace=namespace, timeout=5)
    client = govern(openai.OpenAI(base_url=f"{url}/v1", api_key="k"), w, "llm", scope="agent:py", max_wait=120)
    ok: List[int] = []
    errors: List[str] = []

    def run(priority: str, n: int) -> None:
        for _ in range(n):
            try:
                client.chat.completions.create(
                    model="gpt-fake",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"ratewarden-priority": priority, "x-test-priority": priority},
                )
                ok.append(1)
            except Exception as e:  # reported to the test
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(p.split(":")[0], int(p.split(":")[1]))) for p in plan]
    if os.environ.get("RW_WAIT_GO") == "1":
        print("ready", flush=True)
        sys.stdin.readline()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"ok": len(ok), "errors": errors}), flush=True)


if __name__ == "__main__":
    main()
