"""``Warden.on_event``: a Python callback receiving events on a thread of its
own — the filter, the envelope, a raising callback that never reaches the
warden, closing (also from inside the callback), and events from decisions on
a real Redis."""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
from typing import Any, Dict, List

import pytest

import ratewarden

POLICY = {
    "scopes": {"tenant": {"limits": [{"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"}]}}
}
WAIT = 10.0  # a failure guard, never a synchronisation


def test_a_callback_gets_each_crossing_as_a_webhook_shaped_dict() -> None:
    w = ratewarden.Warden(POLICY)
    got: queue.Queue[Dict[str, Any]] = queue.Queue()
    listener = w.on_event(got.put, events=["limit."])
    assert listener.events == ["limit."] and listener.is_open
    w.acquire("tenant:a", cost={"usd": "4.99"})
    w.acquire("tenant:a", cost={"usd": "5.01"})  # 50%, 80% and exhausted
    events = [got.get(timeout=WAIT) for _ in range(3)]
    assert [(e["type"], e["data"]["threshold"]) for e in events] == [
        ("limit.threshold_crossed", 0.5),
        ("limit.threshold_crossed", 0.8),
        ("limit.exhausted", 1.0),
    ]
    first = events[0]
    assert set(first) == {"id", "type", "timestamp", "at", "data"}
    assert re.fullmatch(r"msg_[0-9a-f]{32}", first["id"])
    assert first["id"] == "msg_" + first["data"]["event_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
    d = first["data"]
    assert (d["owner"], d["limit"], d["unit"], d["before_text"], d["after_text"]) == (
        "tenant:a",
        "usd",
        "usd",
        "4.99",
        "10",
    )
    assert len({e["id"] for e in events}) == 3
    listener.close()
    assert listener.stats() == {"delivered": 3, "dropped": 0, "failed": 0, "last_error": None}


def test_the_filter_keeps_other_types_out() -> None:
    w = ratewarden.Warden(POLICY)
    got: queue.Queue[Dict[str, Any]] = queue.Queue()
    only_exhausted = w.on_event(got.put, events="limit.exhausted")
    w.acquire("tenant:a", cost={"usd": "10"})
    assert got.get(timeout=WAIT)["type"] == "limit.exhausted"
    only_exhausted.close()
    assert got.empty()
    assert only_exhausted.stats()["delivered"] == 1


def test_a_raising_callback_is_reported_counted_and_keeps_receiving(monkeypatch: pytest.MonkeyPatch) -> None:
    reported: List[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))
    w = ratewarden.Warden(POLICY)
    seen: queue.Queue[float] = queue.Queue()

    def flaky(event: Dict[str, Any]) -> None:
        seen.put(event["data"]["threshold"])
        if event["data"]["threshold"] < 1:
            raise RuntimeError(f"cannot handle {event['data']['threshold']}")

    listener = w.on_event(flaky)
    for _ in range(10):
        assert w.acquire("tenant:a", cost={"usd": "1"}).allowed  # the warden never sees the error
    assert [seen.get(timeout=WAIT) for _ in range(3)] == [0.5, 0.8, 1.0]
    listener.close()
    stats = listener.stats()
    assert (stats["delivered"], stats["failed"]) == (3, 2)
    assert "cannot handle 0.8" in stats["last_error"]
    assert [str(e) for e in reported] == ["cannot handle 0.5", "cannot handle 0.8"]


def test_closed_listeners_get_nothing_and_close_works_from_inside() -> None:
    w = ratewarden.Warden(POLICY)
    got: queue.Queue[str] = queue.Queue()
    holder: Dict[str, ratewarden.Listener] = {}

    def once(event: Dict[str, Any]) -> None:
        holder["l"].close()  # from its own thread: stops the next calls, no deadlock
        got.put(event["type"])

    holder["l"] = w.on_event(once)
    w.acquire("tenant:a", cost={"usd": "10"})  # three events at once
    assert got.get(timeout=WAIT) == "limit.threshold_crossed"
    holder["l"].close()
    assert not holder["l"].is_open
    w.acquire("tenant:b", cost={"usd": "10"})
    assert holder["l"].stats()["delivered"] == 1 and got.empty()
    with w.on_event(lambda e: None) as scoped:
        assert scoped.is_open
    assert not scoped.is_open


def test_close_while_the_callback_waits_for_the_gil_does_not_deadlock() -> None:
    w = ratewarden.Warden(POLICY)
    entered = threading.Event()
    release = threading.Event()

    def slow(_event: Dict[str, Any]) -> None:
        entered.set()
        release.wait(WAIT)

    listener = w.on_event(slow)
    w.acquire("tenant:a", cost={"usd": "10"})
    assert entered.wait(WAIT)
    closer = threading.Thread(target=listener.close)
    closer.start()
    release.set()
    closer.join(WAIT)
    assert not closer.is_alive() and not listener.is_open


def test_bad_arguments_are_refused_by_name() -> None:
    w = ratewarden.Warden(POLICY)
    with pytest.raises(ratewarden.InvalidInput, match="callback: expected a callable, got int"):
        w.on_event(3)  # type: ignore[arg-type]
    with pytest.raises(ratewarden.InvalidInput, match=r"events\[1\]: `limits.exhausted` is no event type"):
        w.on_event(print, events=["limit.", "limits.exhausted"])
    with pytest.raises(ratewarden.InvalidInput, match=r"events\[0\]: expected an event type, got int"):
        w.on_event(print, events=[1])  # type: ignore[list-item]
    with pytest.raises(ratewarden.InvalidInput, match="events: expected a list"):
        w.on_event(print, events={"limit."})  # type: ignore[arg-type]


def test_events_of_decisions_on_redis(redis_servers: Any, namespace: str) -> None:
    for url in (redis_servers.url, redis_servers.cluster_url):
        w = ratewarden.Warden(POLICY, backend=url, namespace=namespace)
        got: queue.Queue[Dict[str, Any]] = queue.Queue()
        with w.on_event(got.put, events=["limit.exhausted"]):
            w.acquire("tenant:a", cost={"usd": "10"})
            e = got.get(timeout=WAIT)
        assert (e["type"], e["data"]["owner"], e["data"]["after_text"]) == ("limit.exhausted", "tenant:a", "10")


def test_a_stream_outlet_appends_each_event_for_a_consumer(redis_servers: Any, namespace: str) -> None:
    import json
    import subprocess

    port = redis_servers.url.rsplit(":", 1)[1]
    policy = {**POLICY, "events": {"stream": {"key": "audit-stream", "max_len": 100}}}
    w = ratewarden.Warden(policy, backend=redis_servers.url, namespace=namespace)
    w.acquire("tenant:a", cost={"usd": "10"})  # three crossings
    key = f"{namespace}:audit-stream"
    entries: List[List[Any]] = []
    last = "0"
    while len(entries) < 3:
        # A blocking read on the server (10 s at most), never a sleep.
        out = subprocess.run(
            ["redis-cli", "-p", port, "--json", "XREAD", "COUNT", "10", "BLOCK", "10000", "STREAMS", key, last],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        got = json.loads(out)
        assert got, f"only {len(entries)} entries"
        batch = got[key] if isinstance(got, dict) else got[0][1]
        entries.extend(batch)
        last = batch[-1][0]
    bodies = [json.loads(dict(zip(fields[::2], fields[1::2]))["body"]) for _, fields in entries]
    assert [b["type"] for b in bodies] == ["limit.threshold_crossed", "limit.threshold_crossed", "limit.exhausted"]
    assert w.flush_outlets(10) is True
    assert w.outlet_stats() == {"appended": 3, "published": 0, "dropped": 0, "failed": 0, "last_error": None}
    with pytest.raises(ratewarden.InvalidInput, match="give a Redis backend"):
        ratewarden.Warden(policy)


def test_the_audit_log_records_every_operation_to_a_callback_and_a_file(tmp_path: Any) -> None:
    path = tmp_path / "audit.jsonl"
    clock = ratewarden.ManualClock()
    w = ratewarden.Warden({**POLICY, "audit": {"file": str(path)}}, clock=clock)
    got: queue.Queue[Dict[str, Any]] = queue.Queue()
    listener = w.on_audit(got.put)
    assert w.acquire("tenant:a", cost={"usd": "4"}).allowed
    assert not w.acquire("tenant:a", cost={"usd": "7"}).allowed
    with w.reserve("tenant:a", cost={"usd": "1"}) as r:
        r.commit({"usd": "1.5"})
    lapsing = w.reserve("tenant:a", cost={"usd": "1"}, lease=5)
    clock.advance(6)
    with pytest.raises(ratewarden.ReservationExpired):
        lapsing.commit()
    records = [got.get(timeout=WAIT) for _ in range(6)]
    assert [(x["action"], x["outcome"]) for x in records] == [
        ("acquire", "allow"),
        ("acquire", "deny"),
        ("reserve", "allow"),
        ("commit", "ok"),
        ("reserve", "allow"),
        ("expire", "expired"),
    ]
    assert records[0]["amounts"] == {"usd": "4"} and records[0]["scope"] == "tenant:a"
    assert records[3]["amounts"] == {"usd": "1.5"} and records[3]["request_id"] == records[2]["request_id"]
    assert w.flush_audit(10) is True
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["action"] for x in lines] == [x["action"] for x in records]
    assert w.audit_stats()["written"] == 6
    listener.close()
    assert listener.stats()["delivered"] == 6


def test_exiting_with_busy_listeners_never_crashes_the_interpreter() -> None:
    import subprocess
    import sys

    script = """
import sys, time, ratewarden
policy = {"scopes": {"tenant": {"limits": [
    {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"}]}}}
w = ratewarden.Warden(policy)
seen = []
def slow(event):
    seen.append(event["type"])
    time.sleep(0.005)
def raising(event):
    raise SystemExit("a callback asking to exit is only reported")
w.on_event(slow)
w.on_event(raising)
w.on_audit(slow)
sys.unraisablehook = lambda u: None
for i in range(300):
    w.acquire(f"tenant:{i}", cost={"usd": "10"})
print("decided", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "decided"


@pytest.mark.parametrize("target", ["url", "cluster_url"])
def test_four_processes_append_each_crossing_once_to_the_stream(
    target: str, redis_servers: Any, namespace: str
) -> None:
    import subprocess
    import sys

    url = getattr(redis_servers, target)
    policy = {**POLICY, "events": {"stream": {"key": "crossings", "events": ["limit."]}}}
    script = f"""
import json, ratewarden
w = ratewarden.Warden({json.dumps(policy)}, backend={url!r}, namespace={namespace!r})
admitted = sum(w.acquire("tenant:a", cost={{"usd": "0.25"}}).allowed for _ in range(20))
assert w.flush_outlets(10)
print(admitted)
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    admitted = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(admitted) == 40  # 10 USD in quarters
    host_port = url.split("://", 1)[1].split(",")[0]
    port = host_port.rsplit(":", 1)[1]
    out = subprocess.run(
        ["redis-cli", "-c", "-p", port, "--json", "XRANGE", f"{namespace}:crossings", "-", "+"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries = json.loads(out)
    bodies = [json.loads(dict(zip(fields[::2], fields[1::2]))["body"]) for _, fields in entries]
    assert sorted(b["data"]["threshold"] for b in bodies) == [0.5, 0.8, 1.0], bodies
    assert len({b["id"] for b in bodies}) == 3


def test_a_forked_child_exits_cleanly_with_its_parents_listeners() -> None:
    import subprocess
    import sys

    script = """
import os, sys, queue, ratewarden
policy = {"scopes": {"tenant": {"limits": [
    {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"}]}}}
w = ratewarden.Warden(policy)
got = queue.Queue()
listener = w.on_event(got.put)
w.acquire("tenant:a", cost={"usd": "10"})
got.get(timeout=10)
pid = os.fork()
if pid == 0:
    # The listener's thread is the parent's: the child neither waits for it
    # nor counts it, and exits through atexit normally.
    assert not listener.is_open and listener.stats()["delivered"] == 0
    listener.close()
    w.acquire("tenant:b", cost={"usd": "10"})
    sys.exit(0)
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
assert listener.is_open
print("parent and child done")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "parent and child done"
