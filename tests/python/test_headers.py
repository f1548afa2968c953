"""The provider header vectors (tests/vectors/headers/*.json), parsed from
Python exactly as core/tests/upstream.rs and tests/node/headers.test.mjs do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import httpx
import pytest

import ratewarden

VECTORS = sorted((Path(__file__).resolve().parents[1] / "vectors" / "headers").glob("*.json"))


def shape(parsed: Dict[str, Any]) -> Dict[str, Any]:
    ms = lambda s: None if s is None else round(s * 1000)  # noqa: E731
    return {
        "quotas": [
            {
                "dimension": q["dimension"],
                "name": q["name"],
                "limit": q["limit"],
                "remaining": q["remaining"],
                "reset_ms": ms(q["reset"]),
            }
            for q in parsed["quotas"]
        ],
        "retry_after_ms": ms(parsed["retry_after"]),
        "warnings": len(parsed["warnings"]),
    }


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_header_vectors(path: Path) -> None:
    v = json.loads(path.read_text())
    now = v["now_us"] / 1e6
    pairs = [tuple(h) for h in v["headers"]]
    assert shape(ratewarden.parse_headers(pairs, now=now)) == v["expect"]
    # As an httpx.Headers (what an SDK response carries), case and repeats kept.
    assert shape(ratewarden.parse_headers(httpx.Headers(pairs), now=now)) == v["expect"]


def test_bad_input_is_typed() -> None:
    assert len(VECTORS) >= 12
    for bad in (5, [("a",)], [("a", "b", "c")]):
        with pytest.raises(ratewarden.InvalidInput):
            ratewarden.parse_headers(bad)
    with pytest.raises(ratewarden.InvalidInput):
        ratewarden.parse_headers({}, now=float("nan"))
    assert ratewarden.parse_headers({"content-type": "text/plain"}) == {
        "quotas": [],
        "retry_after": None,
        "warnings": [],
    }
