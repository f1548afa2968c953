"""`ratewarden serve` speaking the Cycles runtime protocol, driven by the
published `runcycles` SDK, unchanged, over real HTTP: reserve → commit /
release / extend (the decorator's heartbeats included), balances, decide,
events, reservations read back, idempotent replays, API keys, bad input; on
the embedded engine and on a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import runcycles
from runcycles import (
    Action,
    Amount,
    CommitRequest,
    CyclesClient,
    CyclesConfig,
    CyclesProtocolError,
    DecisionRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    Subject,
    Unit,
)
from runcycles.models import (
    BalanceResponse,
    CommitResponse,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseResponse,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
)

from redis_harness import RedisServers

ROOT = Path(__file__).resolve().parents[2]

# One dollar is 10^8 USD_MICROCENTS; `usd` here has 8 decimals, so every
# microcent is exact.
USD = 100_000_000

POLICY = """
version: 1
units:
  usd: { decimals: 8 }
scopes:
  tenant:
    limits:
      - { name: tenant-usd, kind: budget, unit: usd, limit: 10 }
  workspace: {}
  agent:
    limits:
      - { name: agent-tokens, kind: budget, unit: tokens, limit: 1000 }
"""


def binary() -> Path:
    """The `ratewarden` CLI (built by the suite's `cargo test`; built here if not)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    exe = target / "debug" / "ratewarden"
    if not exe.exists():
        subprocess.run(["cargo", "build", "-q", "-p", "ratewarden-cli"], cwd=ROOT, check=True)
    return exe


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]

    def client(self, api_key: str = "none") -> CyclesClient:
        return CyclesClient(CyclesConfig(base_url=self.url, api_key=api_key))


def start(tmp: Path, *extra: str, policy: str = POLICY) -> Server:
    path = tmp / "policy.yaml"
    path.write_text(policy)
    proc = subprocess.Popen(
        [str(binary()), "serve", "--policy", str(path), "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return Server(line.split()[-1], proc)


def stop(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServers]:
    with RedisServers() as servers:
        yield servers


@pytest.fixture(params=["embedded", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Server]:
    extra: list[str] = []
    if request.param == "redis":
        extra = ["--backend", request.getfixturevalue("redis").url, "--namespace", namespace]
    s = start(tmp_path, *extra)
    yield s
    stop(s)


def key() -> str:
    return str(uuid.uuid4())


def reserve_body(amount: int, **kw: Any) -> ReservationCreateRequest:
    return ReservationCreateRequest(
        idempotency_key=kw.pop("idempotency_key", key()),
        subject=kw.pop("subject", Subject(tenant="acme", agent="scout")),
        action=Action(kind="llm.completion", name="openai:gpt-4o"),
        estimate=Amount(unit=kw.pop("unit", Unit.USD_MICROCENTS), amount=amount),
        **kw,
    )


def tenant_balance(c: CyclesClient, tenant: str = "acme") -> dict[str, Any]:
    r = c.get_balances(tenant=tenant)
    assert r.status == 200, r.body
    body = BalanceResponse.model_validate(r.body)
    [b] = [b for b in body.balances if b.scope_path == f"tenant:{tenant}"]
    return b.model_dump(mode="json", exclude_none=True)


def amount(b: dict[str, Any], field: str) -> int:
    return int(b[field]["amount"])


def test_reserve_commit_release_extend_and_balances_through_the_sdk(server: Server) -> None:
    with server.client() as c:
        r = c.create_reservation(reserve_body(3 * USD))
        assert r.status == 200, r.body
        # Exactly the protocol's fields, no nulls: the SDK's strict parse accepts it.
        res = ReservationCreateResponse.model_validate_json(json.dumps(r.body), strict=True)
        assert res.decision.value == "ALLOW"
        assert res.scope_path == "tenant:acme/agent:scout"
        assert res.affected_scopes == ["tenant:acme", "tenant:acme/agent:scout"]
        assert res.reserved is not None and res.reserved.amount == 3 * USD
        held = tenant_balance(c)
        assert amount(held, "reserved") == 3 * USD
        assert amount(held, "remaining") == 7 * USD
        assert res.reservation_id is not None and res.expires_at_ms is not None

        # Extend: from the current expiry, not from now.
        e = c.extend_reservation(
            res.reservation_id, ReservationExtendRequest(idempotency_key=key(), extend_by_ms=5_000)
        )
        assert e.status == 200, e.body
        ext = ReservationExtendResponse.model_validate(e.body)
        assert ext.expires_at_ms == res.expires_at_ms + 5_000

        # Commit less than reserved: the rest is released.
        cm = c.commit_reservation(
            res.reservation_id,
            CommitRequest(idempotency_key=key(), actual=Amount(unit=Unit.USD_MICROCENTS, amount=USD + 7)),
        )
        assert cm.status == 200, cm.body
        done = CommitResponse.model_validate(cm.body)
        assert done.charged.amount == USD + 7
        assert done.released is not None and done.released.amount == 2 * USD - 7
        after = tenant_balance(c)
        assert amount(after, "spent") == USD + 7
        assert amount(after, "reserved") == 0
        assert amount(after, "remaining") == 9 * USD - 7
        assert amount(after, "allocated") == 10 * USD

        # Read back, and listed.
        g = c.get_reservation(res.reservation_id)
        detail = ReservationDetail.model_validate(g.body)
        assert detail.status.value == "COMMITTED"
        assert detail.committed is not None and detail.committed.amount == USD + 7
        lst = c.list_reservations(status="COMMITTED")
        listed = ReservationListResponse.model_validate(lst.body)
        assert [x.reservation_id for x in listed.reservations] == [res.reservation_id]

        # A finalized reservation: another commit, release or extend is refused.
        again = c.commit_reservation(
            res.reservation_id,
            CommitRequest(idempotency_key=key(), actual=Amount(unit=Unit.USD_MICROCENTS, amount=1)),
        )
        assert (again.status, again.body["error"]) == (409, "RESERVATION_FINALIZED")
        rel = c.release_reservation(res.reservation_id, ReleaseRequest(idempotency_key=key()))
        assert (rel.status, rel.body["error"]) == (409, "RESERVATION_FINALIZED")
        assert amount(tenant_balance(c), "spent") == USD + 7

        # Release gives everything back.
        r2 = ReservationCreateResponse.model_validate(c.create_reservation(reserve_body(USD)).body)
        assert r2.reservation_id is not None
        rel = c.release_reservation(r2.reservation_id, ReleaseRequest(idempotency_key=key()))
        assert rel.status == 200, rel.body
        assert ReleaseResponse.model_validate(rel.body).released.amount == USD
        assert amount(tenant_balance(c), "remaining") == 9 * USD - 7


def test_the_decorator_reserves_heartbeats_and_commits(server: Server) -> None:
    client = server.client()
    seen: dict[str, Any] = {}

    @runcycles.cycles(
        estimate=2 * USD,
        actual=lambda result: result,
        action_kind="llm.completion",
        action_name="openai:gpt-4o",
        tenant="acme",
        agent="writer",
        ttl_ms=1_000,
        client=client,
    )
    def call() -> int:
        ctx = runcycles.get_cycles_context()
        assert ctx is not None and ctx.reservation_id is not None
        seen["id"] = ctx.reservation_id
        first = ctx.expires_at_ms
        # The work outlives the 1 s lease: the SDK's heartbeat must extend it.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            g = client.get_reservation(ctx.reservation_id)
            if g.status == 200 and g.body["expires_at_ms"] > first:
                seen["extended"] = g.body["expires_at_ms"]
                break
        return USD // 2

    assert call() == USD // 2
    assert "extended" in seen, "the SDK's heartbeat never extended the reservation"
    detail = ReservationDetail.model_validate(client.get_reservation(seen["id"]).body)
    assert detail.status.value == "COMMITTED"
    assert detail.committed is not None and detail.committed.amount == USD // 2
    assert amount(tenant_balance(client), "spent") == USD // 2
    client.close()


def test_a_live_reserve_past_the_budget_is_409_and_dry_run_and_decide_deny(server: Server) -> None:
    with server.client() as c:
        denied = c.create_reservation(reserve_body(11 * USD))
        assert denied.status == 409
        assert denied.body["error"] == "BUDGET_EXCEEDED"
        with pytest.raises(CyclesProtocolError) as e:

            @runcycles.cycles(estimate=11 * USD, tenant="acme", client=c, action_kind="k", action_name="n")
            def spend() -> None:
                raise AssertionError("must not run")

            spend()
        assert e.value.is_budget_exceeded()

        dry = c.create_reservation(reserve_body(11 * USD, dry_run=True))
        assert dry.status == 200
        body = ReservationCreateResponse.model_validate_json(json.dumps(dry.body), strict=True)
        assert body.decision.value == "DENY" and body.reason_code == "BUDGET_EXCEEDED"
        assert body.reservation_id is None and body.expires_at_ms is None

        d = c.decide(
            DecisionRequest(
                idempotency_key=key(),
                subject=Subject(tenant="acme"),
                action=Action(kind="k", name="n"),
                estimate=Amount(unit=Unit.USD_MICROCENTS, amount=10 * USD),
            )
        )
        assert DecisionResponse.model_validate(d.body).decision.value == "ALLOW"
        d = c.decide(
            DecisionRequest(
                idempotency_key=key(),
                subject=Subject(workspace="w"),
                action=Action(kind="k", name="n"),
                estimate=Amount(unit=Unit.USD_MICROCENTS, amount=1),
            )
        )
        assert (d.body["decision"], d.body["reason_code"]) == ("DENY", "BUDGET_NOT_FOUND")
        # Nothing was charged by any of it.
        assert amount(tenant_balance(c), "remaining") == 10 * USD


def test_no_budget_is_404_and_a_unit_without_one_is_unit_mismatch(server: Server) -> None:
    with server.client() as c:
        nf = c.create_reservation(reserve_body(1, subject=Subject(workspace="w")))
        assert (nf.status, nf.body["error"]) == (404, "NOT_FOUND")
        mm = c.create_reservation(reserve_body(1, subject=Subject(tenant="acme"), unit=Unit.TOKENS))
        assert (mm.status, mm.body["error"]) == (400, "UNIT_MISMATCH")
        assert mm.body["details"]["expected_units"] == ["USD_MICROCENTS"]
        # An agent's token budget is found under the tenant's.
        ok = c.create_reservation(reserve_body(10, unit=Unit.TOKENS))
        assert ok.status == 200, ok.body
        assert amount(tenant_balance(c), "remaining") == 10 * USD


@pytest.mark.parametrize("clients", [16])
def test_concurrent_reserves_admit_exactly_the_budget(server: Server, clients: int) -> None:
    """16 clients x 10 reserves of 0.10 USD on a 10 USD budget: exactly 100 pass."""
    outcomes: list[int] = []
    lock = threading.Lock()

    def run() -> None:
        with server.client() as c:
            for _ in range(10):
                r = c.create_reservation(reserve_body(USD // 10))
                with lock:
                    outcomes.append(r.status)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(200) == 100
    assert outcomes.count(409) == clients * 10 - 100
    with server.client() as c:
        b = tenant_balance(c)
        assert amount(b, "reserved") == 10 * USD and amount(b, "remaining") == 0


def test_idempotent_replays_answer_as_the_first_and_charge_once(server: Server) -> None:
    with server.client() as c:
        body = reserve_body(USD, idempotency_key="order-7")
        first = c.create_reservation(body)
        second = c.create_reservation(body)
        assert first.status == second.status == 200
        assert first.body == second.body
        assert amount(tenant_balance(c), "reserved") == USD
        other = c.create_reservation(reserve_body(2 * USD, idempotency_key="order-7"))
        assert (other.status, other.body["error"]) == (409, "IDEMPOTENCY_MISMATCH")

        rid = first.body["reservation_id"]
        commit = CommitRequest(idempotency_key="c-1", actual=Amount(unit=Unit.USD_MICROCENTS, amount=USD // 4))
        a, b = c.commit_reservation(rid, commit), c.commit_reservation(rid, commit)
        assert a.status == b.status == 200 and a.body == b.body
        assert amount(tenant_balance(c), "spent") == USD // 4

        # The header, when given, must match the body's key.
        r = httpx.post(
            f"{server.url}/v1/decide",
            headers={"X-Idempotency-Key": "x"},
            json={
                "idempotency_key": "y",
                "subject": {"tenant": "acme"},
                "action": {"kind": "k", "name": "n"},
                "estimate": {"unit": "USD_MICROCENTS", "amount": 1},
            },
        )
        assert (r.status_code, r.json()["error"]) == (400, "INVALID_REQUEST")


def test_events_charge_without_a_reservation(server: Server) -> None:
    with server.client() as c:
        req = EventCreateRequest(
            idempotency_key="ev-1",
            subject=Subject(tenant="acme"),
            action=Action(kind="tool.search", name="web"),
            actual=Amount(unit=Unit.USD_MICROCENTS, amount=USD // 5),
        )
        first, again = c.create_event(req), c.create_event(req)
        assert first.status == again.status == 201
        assert EventCreateResponse.model_validate(first.body).event_id == again.body["event_id"]
        assert amount(tenant_balance(c), "spent") == USD // 5


def test_reservations_lapse_after_their_grace(tmp_path: Path) -> None:
    s = start(tmp_path)
    try:
        with s.client() as c:
            r = c.create_reservation(reserve_body(USD, ttl_ms=1_000, grace_period_ms=0))
            rid = r.body["reservation_id"]
            deadline = time.monotonic() + 20
            while c.get_reservation(rid).status != 410:
                assert time.monotonic() < deadline, "the reservation never expired"
            late = c.commit_reservation(
                rid,
                CommitRequest(idempotency_key=key(), actual=Amount(unit=Unit.USD_MICROCENTS, amount=1)),
            )
            assert (late.status, late.body["error"]) == (410, "RESERVATION_EXPIRED")
            ext = c.extend_reservation(rid, ReservationExtendRequest(idempotency_key=key(), extend_by_ms=1_000))
            assert (ext.status, ext.body["error"]) == (410, "RESERVATION_EXPIRED")
            listed = c.list_reservations(status="EXPIRED").body["reservations"]
            assert [x["reservation_id"] for x in listed] == [rid]
            # Its hold is back.
            assert amount(tenant_balance(c), "remaining") == 10 * USD
    finally:
        stop(s)


def test_api_keys_name_the_tenant_and_refuse_others(tmp_path: Path) -> None:
    made = subprocess.run(
        [str(binary()), "api-key", "--tenant", "acme"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    api_key = made[0].removeprefix("key:").strip()
    line = made[1].removeprefix("line:").strip()
    assert api_key not in line  # only its hash is kept
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# tenants' keys\n{line}\n")
    s = start(tmp_path, "--api-keys", str(keys))
    try:
        with s.client("wrong") as bad:
            r = bad.create_reservation(reserve_body(USD))
            assert (r.status, r.body["error"]) == (401, "UNAUTHORIZED")
        no_key = httpx.get(f"{s.url}/v1/balances", params={"tenant": "acme"})
        assert no_key.status_code == 401
        with s.client(api_key) as c:
            other = c.create_reservation(reserve_body(USD, subject=Subject(tenant="globex")))
            assert (other.status, other.body["error"]) == (403, "FORBIDDEN")
            assert c.get_balances(tenant="globex").status == 403
            # A subject without a tenant is under the key's.
            ok = c.create_reservation(reserve_body(USD, subject=Subject(agent="scout")))
            assert ok.status == 200, ok.body
            assert ok.body["scope_path"] == "tenant:acme/agent:scout"
            assert amount(tenant_balance(c), "reserved") == USD
        # Our own API checks the key too.
        own = httpx.post(
            f"{s.url}/rw/v1/acquire",
            headers={"X-Cycles-API-Key": api_key},
            json={"scope": "tenant:globex", "cost": {"usd": "1"}},
        )
        assert own.status_code == 403
    finally:
        stop(s)


BAD_BODIES: list[tuple[str, bytes | dict[str, Any]]] = [
    ("malformed JSON", b'{"idempotency_key": "k",'),
    ("a string amount", {"estimate": {"unit": "USD_MICROCENTS", "amount": "5"}}),
    ("a negative amount", {"estimate": {"unit": "USD_MICROCENTS", "amount": -1}}),
    ("an amount past int64", {"estimate": {"unit": "USD_MICROCENTS", "amount": 2**63}}),
    ("an amount past the ledger's range", {"estimate": {"unit": "USD_MICROCENTS", "amount": 2**62}}),
    ("an unknown unit", {"estimate": {"unit": "EUR", "amount": 1}}),
    ("an unknown field", {"priority": "high"}),
    ("ttl_ms below the minimum", {"ttl_ms": 999}),
    ("ttl_ms above the maximum", {"ttl_ms": 86_400_001}),
    ("a negative grace", {"grace_period_ms": -1}),
    ("an unknown overage policy", {"overage_policy": "SOMETIMES"}),
    ("an empty subject", {"subject": {}}),
    ("a subject with a slash", {"subject": {"tenant": "a/b"}}),
    ("a subject level the policy lacks", {"subject": {"tenant": "acme", "app": "x"}}),
    ("an empty idempotency key", {"idempotency_key": ""}),
    ("a long action kind", {"action": {"kind": "k" * 65, "name": "n"}}),
]


@pytest.mark.parametrize(("what", "change"), BAD_BODIES, ids=[w for w, _ in BAD_BODIES])
def test_bad_input_is_400_naming_it_and_charges_nothing(
    server: Server, what: str, change: bytes | dict[str, Any]
) -> None:
    good = {
        "idempotency_key": key(),
        "subject": {"tenant": "acme"},
        "action": {"kind": "k", "name": "n"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": USD},
    }
    content = change if isinstance(change, bytes) else json.dumps({**good, **change}).encode()
    r = httpx.post(
        f"{server.url}/v1/reservations",
        content=content,
        headers={"content-type": "application/json", "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"},
    )
    assert r.status_code == 400, (what, r.text)
    body = r.json()
    assert body["error"] == "INVALID_REQUEST", body
    assert set(body) <= {"error", "message", "request_id", "trace_id", "details"}
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["trace_id"] == r.headers["x-cycles-trace-id"] == "ab" * 16
    with server.client() as c:
        b = tenant_balance(c)
        assert amount(b, "remaining") == 10 * USD and amount(b, "reserved") == 0


def test_an_oversized_body_is_413(tmp_path: Path) -> None:
    s = start(tmp_path, "--max-body", "1024")
    try:
        r = httpx.post(
            f"{s.url}/v1/reservations",
            json={"idempotency_key": "k", "metadata": {"pad": "x" * 4096}},
        )
        assert r.status_code == 413
        assert r.json()["error"] == "INVALID_REQUEST"
    finally:
        stop(s)


CAPPED = """
version: 1
units:
  usd: { decimals: 8 }
scopes:
  tenant:
    limits:
      - name: tenant-usd
        kind: budget
        unit: usd
        limit: 10
        caps:
          - { when_remaining_below: 50%, model: gpt-4o-mini, max_tokens: 256 }
"""


def test_caps_come_as_cycles_caps_and_the_model_in_a_header(tmp_path: Path) -> None:
    s = start(tmp_path, policy=CAPPED)
    try:
        with s.client() as c:
            plain = c.create_reservation(reserve_body(USD, subject=Subject(tenant="acme")))
            assert plain.body["decision"] == "ALLOW" and "caps" not in plain.body
            r = httpx.post(
                f"{s.url}/v1/reservations",
                json=reserve_body(5 * USD, subject=Subject(tenant="acme")).model_dump(mode="json", exclude_none=True),
            )
            body = r.json()
            assert r.status_code == 200, body
            parsed = ReservationCreateResponse.model_validate_json(r.text, strict=True)
            assert parsed.decision.value == "ALLOW_WITH_CAPS"
            assert parsed.caps is not None and parsed.caps.max_tokens == 256
            assert r.headers["x-ratewarden-model"] == "gpt-4o-mini"
    finally:
        stop(s)


def test_the_readme_cycles_example_and_curl_exchange_run_as_shown(tmp_path: Path) -> None:
    import re
    import subprocess as sp
    import sys

    readme = (ROOT / "README.md").read_text()
    example = ROOT / "examples" / "python" / "cycles_client.py"
    [block] = re.findall(r"```python cycles\n(.*?)```", readme, re.S)
    assert block == example.read_text(), "the README shows examples/python/cycles_client.py as it is"
    [shown] = re.findall(r"```python cycles\n.*?```\n\n```text\n(.*?)```", readme, re.S)
    s = start(tmp_path, policy=(ROOT / "examples" / "agents.yaml").read_text())
    try:
        out = sp.run(
            [sys.executable, str(example)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "CYCLES_BASE_URL": s.url},
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == shown.splitlines()

        # The curl exchange: the same requests, the same answers (ids aside).
        section = readme[readme.index("### The Cycles protocol") :]
        [exchange] = re.findall(r"```text\n(\$ curl.*?)```", section, re.S)
        sent = re.findall(r"(/v1/[^ ]+) .*?\n\s+-d '(.*?)'\n(.*?)\n", exchange, re.S)
        assert len(sent) == 2
        rid = ""
        for path, body, answer in sent:
            shown_id = re.search(r"reservations/([0-9a-f]{32})/", path)
            path = path.replace(shown_id.group(1), rid) if shown_id else path
            r = httpx.post(s.url + path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            got, expected = r.json(), json.loads(answer)
            rid = got.get("reservation_id", rid)
            for volatile in ("reservation_id", "expires_at_ms"):
                assert (volatile in got) == (volatile in expected)
                got.pop(volatile, None), expected.pop(volatile, None)
            assert got == expected
    finally:
        stop(s)
