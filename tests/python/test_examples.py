"""The README's Python example and examples/python/ run as shown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Served over HTTP by test_asgi_example_*, run against the fake upstream or
# against `ratewarden serve` (test_cycles):
# not run as plain scripts.
SERVERS = {"asgi_app", "openai_agents", "cycles_client"}
# Print their own story (tested below).
OWN_OUTPUT = {"pricing", "webhook_receiver", "audit_and_events", "reload"}
EXAMPLES = sorted(p for p in (ROOT / "examples" / "python").glob("*.py") if p.stem not in SERVERS | OWN_OUTPUT)


def test_the_readme_python_example_runs_and_prints_what_it_says() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)  # not `python asgi`
    assert blocks, "the README has a Python example"
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert "answered 14, then tenant-usd ran out" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_run(path: Path) -> None:
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=True)
    assert "answered 14 prompts, then: tenant-usd is spent" in out.stdout
    assert "tenant-usd left: 0.008" in out.stdout


def test_the_readme_asgi_example_is_examples_asgi_app() -> None:
    blocks = re.findall(r"```python asgi\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks == [(ROOT / "examples" / "python" / "asgi_app.py").read_text()]


def test_asgi_example_serves_headers_and_429_over_http() -> None:
    import runpy

    import httpx

    from test_asgi import serve

    app = runpy.run_path(str(ROOT / "examples" / "python" / "asgi_app.py"))["app"]
    with serve(app) as url, httpx.Client(base_url=url) as http:
        codes = [http.get("/search", params={"q": "x"}) for _ in range(6)]
        assert [r.status_code for r in codes] == [200] * 5 + [429]
        assert codes[4].headers["ratelimit-policy"] == '"per-ip";q=5;w=60'
        assert codes[4].headers["ratelimit"] == '"per-ip";r=0;t=60'
        assert codes[5].json()["limit"] == "per-ip" and 1 <= int(codes[5].headers["retry-after"]) <= 12
        keyed = http.get("/search", params={"q": "x"}, headers={"x-api-key": "k1"})
        assert keyed.status_code == 200 and keyed.headers["ratelimit"].startswith('"per-key";r=59;')


def test_the_openai_agents_example_never_hits_a_429(tmp_path: Path) -> None:
    import os

    from test_clients import Upstream

    up = Upstream(6, 1.5)
    try:
        env = {**os.environ, "OPENAI_BASE_URL": f"{up.url}/v1", "OPENAI_API_KEY": "k"}
        path = ROOT / "examples" / "python" / "openai_agents.py"
        out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("25 calls made; the upstream is "), out.stdout
        stats = up.stats()
        assert (stats["ok"], stats["rejected"]) == (25, 0), stats
    finally:
        up.stop()


def test_the_readme_shows_the_openai_agents_example() -> None:
    blocks = re.findall(r"```python agents\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks == [(ROOT / "examples" / "python" / "openai_agents.py").read_text()]


def test_the_pricing_example_shrinks_the_second_call_and_denies_the_third() -> None:
    path = ROOT / "examples" / "python" / "pricing.py"
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == [
        "estimate: $0.011",
        "call 1: allow, max_tokens=800, charged $0.011",
        "call 2: allow_with_caps, max_tokens=600, charged $0.009",
        "call 3: denied (tenant-usd is spent)",
    ], out.stdout + out.stderr
    blocks = re.findall(r"```python pricing\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks == [path.read_text()], "the README shows examples/python/pricing.py as it is"


def test_the_webhook_example_verifies_three_budget_events() -> None:
    path = ROOT / "examples" / "python" / "webhook_receiver.py"
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == [
        "verified limit.threshold_crossed: tenant:acme tenant-usd at 6 of 10",
        "verified limit.threshold_crossed: tenant:acme tenant-usd at 8 of 10",
        "verified limit.exhausted: tenant:acme tenant-usd at 10 of 10",
    ], out.stdout + out.stderr
    blocks = re.findall(r"```python webhook\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks == [path.read_text()], "the README shows examples/python/webhook_receiver.py as it is"


def test_the_events_and_audit_example_prints_its_story() -> None:
    path = ROOT / "examples" / "python" / "audit_and_events.py"
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == [
        "limit.threshold_crossed: tenant:acme tenant-usd at 5 of 10",
        "reservation.overage: tenant:acme tenant-usd reserved 4, charged 5",
        "limit.threshold_crossed: tenant:acme tenant-usd at 8 of 10",
        "audit: reserve allow {'usd': '4'}",
        "audit: commit ok {'usd': '5'}",
        "audit: acquire allow {'usd': '3'}",
        "audit: acquire deny {'usd': '3'}",
    ], out.stdout + out.stderr
    blocks = re.findall(r"```python audit\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks == [path.read_text()], "the README shows examples/python/audit_and_events.py as it is"


def test_the_reload_example_changes_prices_and_keeps_the_spend() -> None:
    path = ROOT / "examples" / "python" / "reload.py"
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=True)
    readme = (ROOT / "README.md").read_text()
    shown = re.findall(r"```python reload\n.*?```\n\n```text\n(.*?)```", readme, re.S)
    assert shown and out.stdout.splitlines() == shown[0].splitlines(), out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "left: $14 of $20 (the $6 spent stays spent)"
    blocks = re.findall(r"```python reload\n(.*?)```", readme, re.S)
    assert blocks == [path.read_text()], "the README shows examples/python/reload.py as it is"
