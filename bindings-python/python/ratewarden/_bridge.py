"""Completes asyncio futures from the native runtime (called on the loop's thread)."""

from __future__ import annotations

import asyncio
from typing import Any


def complete(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # cancelled meanwhile: the native task was aborted too
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
