"""Exceptions raised by ratewarden (the native module raises these classes too)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ratewarden._native import Decision


class WardenError(Exception):
    """Base class of every ratewarden error."""


class PolicyError(WardenError, ValueError):
    """The policy is invalid; the message names the file, the path and the problem."""


class InvalidInput(WardenError, ValueError):
    """A bad argument (scope, amount, unit, lease…); the message names it and why."""


class ReservationNotFound(WardenError, LookupError):
    """No such reservation: never made, expired, or forgotten."""


class ReservationConflict(WardenError):
    """The reservation is in the wrong state (already committed or released)."""


class BackendError(WardenError):
    """The shared backend (Redis) could not be used."""


class RateLimited(WardenError):
    """A guarded call or reservation was denied.

    ``retry_after`` is in seconds (``None``: waiting cannot help); ``decision``
    is the full :class:`ratewarden.Decision`.
    """

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.retry_after: Optional[float] = decision.retry_after
        by = decision.denied_by
        msg = f"denied by {by}" if by else "denied"
        if self.retry_after is not None:
            msg += f"; retry after {self.retry_after:.3f}s"
        if decision.reason:
            msg += f" ({decision.reason})"
        super().__init__(msg)


class BudgetExceeded(RateLimited):
    """Denied by a budget (money, tokens, risk points) rather than a rate."""


def denied(decision: Decision) -> RateLimited:
    """The exception for a denial: `BudgetExceeded` when a budget refused it."""
    if decision.denied_kind == "budget":
        return BudgetExceeded(decision)
    return RateLimited(decision)
