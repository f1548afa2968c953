"""Completes asyncio futures from the native runtime (called on the loop's thread)."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from ratewarden._native import Undo


def complete(fut: asyncio.Future[Any], ok: bool, value: Any, undo: Optional[Undo] = None) -> None:
    """Delivers a native answer. `undo` gives back what the answer holds (a
    reservation) unless kept: if the future was cancelled meanwhile nobody will
    ever see it, so it is given back now (and if this never runs — the loop
    closed first — it is given back when `undo` is collected)."""
    if fut.done():
        if undo is not None:
            undo()
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
    if undo is not None:
        undo.keep()
