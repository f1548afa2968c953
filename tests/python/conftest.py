"""Shared fixtures: real Redis servers from scripts/redis_harness.py (never 6379)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from redis_harness import RedisServers  # noqa: E402


@pytest.fixture(scope="session")
def redis_servers() -> Iterator[RedisServers]:
    """A standalone server and a 3-master cluster for the whole session."""
    with RedisServers(cluster=True) as servers:
        yield servers


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A key namespace of this test's own."""
    return "py-" + request.node.name.replace("[", "-").replace("]", "")[:60]
