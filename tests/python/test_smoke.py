"""Smoke tests for the ratewarden Python bindings."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli on older Pythons.
    import tomli as tomllib

import ratewarden
import ratewarden._native

ROOT = Path(__file__).resolve().parents[2]


def workspace_version() -> str:
    with (ROOT / "Cargo.toml").open("rb") as f:
        return str(tomllib.load(f)["workspace"]["package"]["version"])


def test_version_matches_workspace() -> None:
    assert ratewarden.version() == workspace_version()
    assert ratewarden.__version__ == workspace_version()


def test_facade_reexports_native() -> None:
    assert ratewarden.version is ratewarden._native.version
    assert ratewarden.Decision is ratewarden._native.Decision
    assert {"Warden", "Decision", "Reservation", "RateLimited", "BudgetExceeded", "PolicyError"} <= set(
        ratewarden.__all__
    )
    for name in ratewarden.__all__:
        assert hasattr(ratewarden, name), name
