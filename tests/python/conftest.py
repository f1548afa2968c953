"""Shared fixtures: real Redis servers from scripts/redis_harness.py (never 6379)."""

from __future__ import annotations

import hashlib
import re
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
    name = request.node.name
    # Truncated names could collide (long names differing in their parameters only).
    plain = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:40]
    return f"py-{plain}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
