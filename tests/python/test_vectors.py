"""The shared conformance vectors (tests/vectors/*.json) through the Python API,
on the embedded engine, a standalone Redis and a 3-master Redis Cluster."""

from __future__ import annotations

import calendar
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

import ratewarden
from ratewarden import ManualClock, Warden

VECTORS = sorted((Path(__file__).resolve().parents[2] / "tests" / "vectors").glob("*.json"))
ERRORS = {
    "policy": ratewarden.PolicyError,
    "invalid_input": ratewarden.InvalidInput,
    "not_found": ratewarden.ReservationNotFound,
    "conflict": ratewarden.ReservationConflict,
}


def start_of(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def lease(step: Dict[str, Any]) -> Optional[float]:
    ms = step.get("lease_ms")
    return None if ms is None else ms / 1000


def run_step(w: Warden, clock: ManualClock, names: Dict[str, str], step: Dict[str, Any]) -> Any:
    op = step["op"]
    rid = lambda key: names.get(step[key], step[key])  # noqa: E731
    req = dict(
        resource=step.get("resource"), action=step.get("action"), cost=step.get("cost"), priority=step.get("priority")
    )
    if op == "advance":
        clock.advance(step["ms"] / 1000)
        return None
    if op == "check":
        return w.check(step["scope"], **req)
    if op == "acquire":
        return w.acquire(step["scope"], **req)
    if op == "reserve":
        return w.reserve(step["scope"], **req, lease=lease(step)).decision
    if op == "commit":
        return w.commit(rid("reservation"), step.get("actual"))
    if op == "release":
        return w.release(rid("reservation"))
    if op == "extend":
        w.extend(rid("reservation"), lease(step))
        return None
    if op == "delegate":
        if "from_scope" in step:
            return w.delegate(step["child"], step.get("amounts", {}), from_scope=step["from_scope"], lease=lease(step))
        return w.delegate(
            step["child"], step.get("amounts", {}), from_reservation=rid("from_reservation"), lease=lease(step)
        )
    raise AssertionError(f"unknown op {op}")


def check(at: str, expect: Dict[str, Any], got: Any) -> None:
    if isinstance(got, ratewarden.Decision):
        if "outcome" in expect:
            assert got.outcome == expect["outcome"], f"{at}: outcome; {got.reason}"
        if "retry_after_ms" in expect:
            want = expect["retry_after_ms"]
            assert got.retry_after == (None if want is None else pytest.approx(want / 1000)), f"{at}: retry_after"
        for name, value in expect.get("remaining", {}).items():
            limit = next((l for l in got.limits if l["name"] == name), None)
            assert limit is not None, f"{at}: no limit {name}"
            assert limit["remaining"] == value, f"{at}: remaining of {name}"
        if "denied_by" in expect:
            assert got.denied_by == expect["denied_by"], f"{at}: denied_by"
        if "priority" in expect:
            assert got.priority == expect["priority"], f"{at}: served priority"
        for cap, value in expect.get("caps", {}).items():
            assert got.caps.get(cap) == value, f"{at}: caps.{cap}"
    elif isinstance(got, dict):
        for name, value in expect.get("charged", {}).items():
            charge = next((c for c in got["charges"] if c["name"] == name), None)
            assert charge is not None, f"{at}: no charge for {name}"
            assert charge["charged"] == value, f"{at}: charged {name}"
        if "duplicate" in expect:
            assert got["duplicate"] == expect["duplicate"], f"{at}: duplicate"
    elif isinstance(got, bool) and "released" in expect:
        assert got == expect["released"], f"{at}: released"


def run_file(path: Path, backend: Optional[str], namespace: str) -> int:
    doc = json.loads(path.read_text())
    clock = ManualClock(start_of(doc["start"]))
    w = Warden(doc["policy"], backend=backend, namespace=namespace, clock=clock)
    names: Dict[str, str] = {}
    for i, step in enumerate(doc["steps"]):
        at = f"{path.name} step {i} ({step['op']}) on {w.backend}"
        expect = step.get("expect", {})
        if "error" in expect:
            with pytest.raises(ERRORS[expect["error"]]):
                run_step(w, clock, names, step)
            continue
        got = run_step(w, clock, names, step)
        if isinstance(got, ratewarden.Decision) and "as" in step and got.reservation:
            names[step["as"]] = got.reservation
        check(at, expect, got)
    return len(doc["steps"])


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vectors_on_the_embedded_engine(path: Path) -> None:
    assert run_file(path, None, "unused") > 0


@pytest.mark.parametrize("target", ["url", "cluster_url"])
def test_vectors_on_redis(redis_servers: Any, target: str, namespace: str) -> None:
    url = redis_servers.info[target]
    steps = sum(run_file(p, url, f"{namespace}-{p.stem}") for p in VECTORS)
    assert steps > 50 and len(VECTORS) >= 8
