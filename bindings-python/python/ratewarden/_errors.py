"""Exceptions raised by ratewarden (the native module raises these classes too)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ratewarden._native import Decision


class WardenError(Exception):
    """Base class of every ratewarden error.

    Besides the message, every error carries data (``None`` when not about one):
    ``kind`` (``policy``, ``invalid_input``, ``not_found``, ``conflict``,
    ``backend``, ``internal``, ``denied``), ``code`` (finer: ``unknown``,
    ``invalid_amount``, ``reservation_expired``, ``reservation_not_found``…),
    ``path`` and ``source`` (where in which policy), ``argument`` and ``unit``
    (what input was wrong), ``reservation`` (the id) and ``operation`` (an
    operation whose outcome is unknown: ask again with it).
    """

    kind: str = "internal"
    code: str = "internal"
    path: Optional[str] = None
    source: Optional[str] = None
    argument: Optional[str] = None
    unit: Optional[str] = None
    reservation: Optional[str] = None
    operation: Optional[str] = None


class PolicyError(WardenError, ValueError):
    """The policy is invalid; ``path`` says where (``scopes.tenant.limits[2].per``), ``source`` in which file."""

    kind = "policy"
    code = "policy"


class InvalidInput(WardenError, ValueError, TypeError):
    """A bad argument (scope, amount, unit, lease, a wrong type…); the message and
    ``argument`` name it. Also a ``TypeError``, as a wrong type is one."""

    kind = "invalid_input"
    code = "invalid_argument"


class ReservationNotFound(WardenError, LookupError):
    """No such reservation (never made, or forgotten long after it ended);
    ``reservation`` is the id. :class:`ReservationExpired` when its lease ran out."""

    kind = "not_found"
    code = "reservation_not_found"


class ReservationExpired(ReservationNotFound):
    """The reservation's lease ran out before this call: its holds were already returned."""

    code = "reservation_expired"


class ReservationConflict(WardenError):
    """The reservation is in the wrong state (already committed or released)."""

    kind = "conflict"
    code = "reservation_closed"


class BackendError(WardenError):
    """The shared backend (Redis) could not be used; ``operation`` is set when a
    state-changing request may or may not have been applied."""

    kind = "backend"
    code = "backend"


class RateLimited(WardenError):
    """A guarded call or reservation was denied.

    ``retry_after`` is in seconds (``None``: waiting cannot help); ``decision``
    is the full :class:`ratewarden.Decision`.
    """

    kind = "denied"
    code = "rate_limited"

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.reservation = decision.reservation
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

    code = "budget_exceeded"


def denied(decision: Decision) -> RateLimited:
    """The exception for a denial: `BudgetExceeded` when a budget refused it."""
    if decision.denied_kind == "budget":
        return BudgetExceeded(decision)
    return RateLimited(decision)
