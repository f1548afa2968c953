"""ratewarden: runtime governor for AI agents and the APIs they call.

Before an agent spends anything — an API request, LLM tokens, dollars, a risky
action — it asks a :class:`Warden` for one atomic decision: allow, allow with
caps, or deny with a retry time. Every limit the request touches is checked and
charged together or not at all, in this process (``backend="memory"``, the
default) or across processes and machines (``backend="redis://…"``).

    from ratewarden import Warden

    warden = Warden({"scopes": {"tenant": {"limits": [
        {"name": "usd", "kind": "budget", "unit": "usd", "limit": "5", "per": "day"}]}}})

    @warden.guard("tenant:acme", cost={"usd": "0.02"})
    async def call_model(prompt: str) -> str: ...

Every operation has a sync form and an ``_async`` form (``acquire`` /
``acquire_async``). On the embedded engine the async form is decided on the
calling thread and returns an already-completed awaitable; on Redis, sync calls
release the GIL while they wait and async calls never block the event loop.
The compiled extension is ``ratewarden._native``.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import inspect
import json
import logging
import os
import re
import types
import weakref
from typing import Any, Awaitable, Callable, Dict, Generator, List, Mapping, Optional, Tuple, TypeVar, Union

from ratewarden._errors import (
    BackendError,
    BudgetExceeded,
    InvalidInput,
    PolicyError,
    RateLimited,
    ReservationConflict,
    ReservationExpired,
    ReservationNotFound,
    WardenError,
    denied,
)
from ratewarden._native import (
    Decision,
    ManualClock,
    NativeListener,
    NativeWarden,
    Prepared,
    __version__,
    scope_of,
    version,
)
from ratewarden._native import parse_headers as _parse_headers
from ratewarden._native import retry_delay as _retry_delay
from ratewarden._native import sign_webhook as _sign_webhook

__all__ = [
    "BackendError",
    "BudgetExceeded",
    "Decision",
    "InvalidInput",
    "Listener",
    "ManualClock",
    "PolicyError",
    "RateLimited",
    "Reservation",
    "ReservationConflict",
    "ReservationExpired",
    "ReservationNotFound",
    "Sequential",
    "Warden",
    "WardenError",
    "__version__",
    "current_caps",
    "parse_headers",
    "retry_delay",
    "scope",
    "sign_webhook",
    "version",
]

F = TypeVar("F", bound=Callable[..., Any])
#: An amount: an int (units), a decimal string (``"0.25"``), a ``Decimal`` or a float.
Amount = Union[int, float, str, Any]
#: A cost: amount per unit, e.g. ``{"tokens": 800, "usd": "0.0125"}``.
Cost = Mapping[str, Amount]
#: What an LLM (or any priced) call uses: ``input_tokens``, ``cached_input_tokens``
#: (how many of the input tokens were cached), ``output_tokens``,
#: ``max_output_tokens`` (what an estimate prices), ``images``, ``seconds``, ``calls``.
Usage = Mapping[str, Amount]


_NO_CAPS: Mapping[str, Any] = types.MappingProxyType({})
_CAPS: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("ratewarden_caps", default=_NO_CAPS)


def current_caps() -> Dict[str, Any]:
    """The caps of the ``@warden.guard`` call running now, as
    :attr:`Decision.caps` (``max_tokens``, ``model``, ``delay_ms``…): empty
    outside a guarded call and for one allowed as asked. A guarded call that
    was shrunk (``shrink:`` in the policy) must honour them — call with
    ``max_tokens`` at most ``caps["max_tokens"]``, on ``caps["model"]`` when
    given — or its usage exceeds what was reserved."""
    return dict(_CAPS.get())


def _caps_enter(caps: Optional[Dict[str, Any]]) -> Optional[contextvars.Token[Mapping[str, Any]]]:
    """Makes ``caps`` the current ones for a guarded call (none: hides an
    enclosing call's); the token to restore them, or None when nothing changed."""
    if caps:
        return _CAPS.set(types.MappingProxyType(caps))
    if _CAPS.get():
        return _CAPS.set(_NO_CAPS)
    return None


def _caps_exit(token: contextvars.Token[Mapping[str, Any]]) -> None:
    _CAPS.reset(token)


def _policy_source(policy: Any) -> Dict[str, Any]:
    """The native arguments for a policy given as a dict (``json=``) or a path (``path=``)."""
    if isinstance(policy, Mapping):
        try:
            return {"json": json.dumps(policy)}
        except (TypeError, ValueError) as e:
            raise PolicyError(f"policy: not a JSON-like document: {e}") from None
    if isinstance(policy, (str, os.PathLike)):
        return {"path": os.fspath(policy)}
    raise InvalidInput(f"invalid policy: expected a dict or a file path, got {type(policy).__name__}")


class Reservation:
    """A held reservation: what :meth:`Warden.reserve` returns.

    Every :class:`Decision` attribute is available on it (``allowed``,
    ``retry_after``, ``limits``…). Use it as a context manager to make sure it
    ends: ``with warden.reserve(...) as r: ... r.commit({"tokens": used})`` —
    entering raises :class:`RateLimited` (or :class:`BudgetExceeded`) if it was
    denied; leaving without :meth:`commit` releases it, so an exception never
    keeps capacity held. ``async with warden.reserve_async(...) as r`` likewise.
    """

    __slots__ = ("_ended", "_resource", "_warden", "decision")

    def __init__(self, warden: Warden, decision: Decision, resource: Optional[str] = None) -> None:
        self._warden = warden
        self.decision = decision
        self._resource = resource
        self._ended = decision.reservation is None

    # The decision's fields, typed (they were reached through __getattr__ as Any).
    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def outcome(self) -> str:
        return self.decision.outcome

    @property
    def caps(self) -> Dict[str, Any]:
        return self.decision.caps

    @property
    def retry_after(self) -> Optional[float]:
        return self.decision.retry_after

    @property
    def limits(self) -> List[Dict[str, Any]]:
        return self.decision.limits

    @property
    def reason(self) -> Optional[str]:
        return self.decision.reason

    @property
    def reservation(self) -> Optional[str]:
        return self.decision.reservation

    @property
    def expires_at(self) -> Optional[float]:
        return self.decision.expires_at

    @property
    def priority(self) -> str:
        return self.decision.priority

    @property
    def degraded(self) -> Optional[str]:
        return self.decision.degraded

    @property
    def unconfirmed(self) -> Optional[str]:
        return self.decision.unconfirmed

    @property
    def denied_by(self) -> Optional[str]:
        return self.decision.denied_by

    @property
    def denied_kind(self) -> Optional[str]:
        return self.decision.denied_kind

    def __repr__(self) -> str:
        return f"Reservation({self.decision!r})"

    @property
    def id(self) -> Optional[str]:
        """The reservation id, or ``None`` if it was denied."""
        return self.decision.reservation

    def commit(self, actual: Optional[Cost] = None, *, usage: Optional[Usage] = None) -> Dict[str, Any]:
        """Charges the actual cost (units left out are charged as reserved) and ends
        it; or, with ``usage``, the price of what the call used on the reserved
        resource (``{"input_tokens": 1200, "output_tokens": 95}``)."""
        receipt = self._warden.commit(self._require(), actual, usage=usage, resource=self._resource)
        self._ended = True
        return receipt

    async def commit_async(self, actual: Optional[Cost] = None, *, usage: Optional[Usage] = None) -> Dict[str, Any]:
        """Async form of :meth:`commit`."""
        receipt = await self._warden.commit_async(self._require(), actual, usage=usage, resource=self._resource)
        self._ended = True
        return receipt

    def release(self) -> bool:
        """Hands everything back without charging; ``False`` if it had already ended."""
        if self.id is None:
            return False
        self._ended = True
        return self._warden.release(self.id)

    async def release_async(self) -> bool:
        """Async form of :meth:`release`."""
        if self.id is None:
            return False
        self._ended = True
        return await self._warden.release_async(self.id)

    def extend(self, lease: float) -> float:
        """Renews the lease to ``lease`` seconds from now; returns the new expiry (epoch seconds)."""
        return self._warden.extend(self._require(), lease)

    def _require(self) -> str:
        if self.id is None:
            raise denied(self.decision)
        return self.id

    def __enter__(self) -> Reservation:
        self._require()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._ended:
            self.release()

    async def __aenter__(self) -> Reservation:
        self._require()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._ended:
            await self.release_async()


class _ReserveCall:
    """``reserve_async(...)``: await it for a :class:`Reservation`, or ``async with`` it."""

    __slots__ = ("_pending", "_reservation", "_resource", "_warden")

    def __init__(self, warden: Warden, pending: Awaitable[Decision], resource: Optional[str] = None) -> None:
        self._warden = warden
        self._pending = pending
        self._resource = resource
        self._reservation: Optional[Reservation] = None

    def __await__(self) -> Generator[Any, None, Reservation]:
        decision = yield from self._pending.__await__()
        self._reservation = Reservation(self._warden, decision, self._resource)
        return self._reservation

    async def __aenter__(self) -> Reservation:
        r = await self
        return await r.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        if self._reservation is not None:
            await self._reservation.__aexit__(*exc)


#: What the native module raises for an argument of the wrong type or range
#: before it is ours to judge (pyo3's conversions): reraised as InvalidInput.
_CONVERSION_ERRORS = (TypeError, OverflowError, UnicodeError, ValueError)


def _bad_argument(e: BaseException) -> InvalidInput:
    """An :class:`InvalidInput` for a conversion error, naming the argument."""
    text = str(e)
    # pyo3 names the argument in a note ("while processing 'scope'") or the text.
    where = " ".join([*getattr(e, "__notes__", ()), text])
    m = re.search(r"(?:processing|argument) '(\w+)'", where)
    name = m.group(1) if m else None
    m = re.match(r"argument '\w+': ", text)
    if isinstance(e, UnicodeError):
        text = "not valid text (lone surrogates cannot be encoded)"
    elif isinstance(e, OverflowError):
        text = f"out of range ({text})"
    elif m:
        text = text[m.end() :].lstrip(": ")
    err = InvalidInput(f"invalid {name or 'argument'}: {text}")
    err.argument = name
    return err


def _header_pairs(headers: Any) -> List[Tuple[str, str]]:
    """``(name, value)`` pairs of a mapping, an ``httpx.Headers`` (repeated fields
    kept), or pairs."""
    if headers is None:
        return []
    if hasattr(headers, "multi_items"):
        pairs = list(headers.multi_items())
    elif isinstance(headers, Mapping):
        pairs = list(headers.items())
    else:
        pairs = list(headers)
    return [(str(k), str(v)) for k, v in pairs]


def parse_headers(headers: Any, now: Optional[float] = None) -> Dict[str, Any]:
    """What an upstream response's headers say about its rate limits: OpenAI, Azure
    OpenAI, Anthropic, GitHub, the IETF drafts, generic ``X-RateLimit-*`` and
    ``Retry-After``. ``headers`` is a mapping, an ``httpx.Headers`` (repeated fields
    kept) or ``(name, value)`` pairs; ``now`` the response's time (seconds since the
    epoch; default: now). Returns ``{"quotas": [...], "retry_after": s | None,
    "warnings": [...]}``, one quota per dimension (``requests``, ``tokens``,
    ``input_tokens``, ``output_tokens``) with ``limit``, ``remaining`` and ``reset``
    (seconds) as far as the headers tell; malformed values are warnings, never
    numbers."""
    try:
        return _parse_headers(_header_pairs(headers), now)
    except WardenError:
        raise
    except _CONVERSION_ERRORS as e:
        raise _bad_argument(e) from None


def retry_delay(attempt: int, priority: str = "standard", retry_after: Optional[float] = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first) of a refused
    upstream call: the upstream's ``retry_after`` (seconds) when it said, else an
    exponential backoff (0.5 s doubling, at most 60 s), plus a jittered offset from
    the caller's tier — critical 0 to 0.5 s, standard 0.5 to 3.5 s, background 3.5 to 9.5 s.
    The bands never overlap, so agents' retries never collide across tiers."""
    try:
        return _retry_delay(attempt, priority, retry_after)
    except WardenError:
        raise
    except _CONVERSION_ERRORS as e:
        raise _bad_argument(e) from None


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: Union[bytes, str]) -> Dict[str, str]:
    """The headers of a webhook message signed per the Standard Webhooks
    specification: ``webhook-id`` (``msg_id``), ``webhook-timestamp`` (seconds
    since the epoch) and ``webhook-signature`` (``v1,`` and the base64
    HMAC-SHA256 of ``"<id>.<timestamp>.<body>"`` under ``secret``, written
    ``whsec_<base64>``). Receivers verify it with the ``standardwebhooks``
    package (or any Standard Webhooks library). Raises :class:`InvalidInput`
    for a secret that is not one (its value is never repeated)."""
    try:
        data = body.encode() if isinstance(body, str) else body
        return _sign_webhook(secret, msg_id, timestamp, data)
    except WardenError:
        raise
    except _CONVERSION_ERRORS as e:
        raise _bad_argument(e) from None


def scope(*segments: tuple[str, str], **kinds: str) -> str:
    """Builds a scope string from raw ids, escaping what needs it: ``scope(tenant="acme",
    user="a/b")`` → ``"tenant:acme/user:a%2Fb"``; kinds that are not Python names go as
    pairs first: ``scope(("ip", "::1"))``. Raises :class:`InvalidInput` for bad kinds,
    empty ids or more than 8 segments."""
    return scope_of([*segments, *kinds.items()])


def _usage(usage: Optional[Usage]) -> Optional[Dict[str, Amount]]:
    if usage is None:
        return None
    if isinstance(usage, dict):
        return usage
    if isinstance(usage, Mapping):
        return dict(usage)
    raise InvalidInput(f"invalid usage: expected a mapping of field to count, got {type(usage).__name__}")


def _cost(cost: Optional[Cost]) -> Optional[Dict[str, Amount]]:
    if cost is None:
        return None
    if isinstance(cost, dict):
        return cost
    if isinstance(cost, Mapping):
        return dict(cost)
    raise InvalidInput(f"invalid cost: expected a mapping of unit to amount, got {type(cost).__name__}")


class Sequential:
    """A resource's ordered lock (:meth:`Warden.sequential`), as a context
    manager for ``with`` and ``async with``; ``turn`` is the holder's id while held."""

    def __init__(self, warden: Warden, resource: str, hold: float, max_wait: float) -> None:
        self._warden, self.resource, self._hold, self._max_wait = warden, resource, hold, max_wait
        self.turn: Optional[str] = None

    def _took(self, turn: Optional[str]) -> Sequential:
        if turn is None:
            raise TimeoutError(f"{self.resource}'s ordered lock was not free within {self._max_wait} s")
        self.turn = turn
        return self

    def __enter__(self) -> Sequential:
        try:
            turn = self._warden._native.sequential(self.resource, self._hold, self._max_wait)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None
        return self._took(turn)

    def __exit__(self, *_exc: object) -> None:
        turn, self.turn = self.turn, None
        if turn is not None:
            self._warden._native.release_turn(self.resource, turn)

    async def __aenter__(self) -> Sequential:
        try:
            pending = self._warden._native.sequential(self.resource, self._hold, self._max_wait, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None
        return self._took(await pending)

    async def __aexit__(self, *_exc: object) -> None:
        turn, self.turn = self.turn, None
        if turn is not None:
            await self._warden._native.release_turn(self.resource, turn, True)


class Listener:
    """A callback receiving a warden's events: what :meth:`Warden.on_event` returns.

    The callback runs on a thread of its own, in event order, never on a
    decision's path. An exception it raises is reported to
    ``sys.unraisablehook`` (printed by default) and counted in :meth:`stats`;
    it keeps receiving. A callback more than 1024 events behind loses the
    oldest (counted as ``dropped``). It lives as long as its warden unless
    closed; use it as a context manager to close it on exit. A forked child
    does not inherit it: call ``on_event`` again there.
    """

    __slots__ = ("__weakref__", "_native")

    def __init__(self, native: NativeListener) -> None:
        self._native = native

    @property
    def events(self) -> List[str]:
        """The event types and prefixes it receives (empty: every event)."""
        return self._native.events

    @property
    def is_open(self) -> bool:
        """Whether it still receives events (not closed, and its warden lives)."""
        return self._native.is_open

    def stats(self) -> Dict[str, Any]:
        """``delivered`` (calls made), ``failed`` (calls that raised),
        ``dropped`` (events missed by falling behind) and ``last_error``."""
        return self._native.stats()

    def close(self) -> None:
        """Stops it. When this returns no call is under way and none starts
        (unless called from inside the callback: then the next ones stop).
        Idempotent."""
        self._native.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ratewarden.Listener events={self.events!r} open={self.is_open} {self.stats()!r}>"


_LISTENERS: weakref.WeakSet[Listener] = weakref.WeakSet()


@atexit.register
def _close_listeners() -> None:
    # Before the interpreter finalizes, so no listener thread waits for it.
    for listener in list(_LISTENERS):
        listener.close()


class Warden:
    """The governor: a policy plus a backend. Safe to share between threads and tasks.

    ``policy`` is a policy document (a dict, as in the README) or a path to a
    YAML / JSON / TOML file. ``backend`` is ``"memory"`` (this process only, the
    default) or a Redis URL (``redis://host:port``, ``rediss://…``,
    ``redis+cluster://host:port,host:port``) shared by every process using it;
    ``namespace`` prefixes its keys. When Redis cannot be asked,
    ``on_backend_error`` decides: ``"deny"`` (default), ``"allow"``, or
    ``"local"`` (this process's embedded engine with ``1/local_share`` of each
    limit); ``timeout`` is the Redis command timeout in seconds (default 0.25).
    ``lazy=True`` starts without waiting for Redis (a service can boot while it
    is down): decisions follow ``on_backend_error`` until Redis answers.
    ``clock`` (a :class:`ManualClock`) replaces real time, for your own tests.

    Raises :class:`PolicyError` for an invalid policy (naming the file and the
    path inside it), :class:`InvalidInput` for bad options and
    :class:`BackendError` if Redis cannot be reached (unless ``lazy``).
    """

    def __init__(
        self,
        policy: Union[Mapping[str, Any], str, os.PathLike[str]],
        *,
        backend: Optional[str] = None,
        namespace: str = "rw",
        on_backend_error: str = "deny",
        local_share: int = 1,
        timeout: Optional[float] = None,
        clock: Optional[ManualClock] = None,
        lazy: bool = False,
    ) -> None:
        options: Dict[str, Any] = dict(
            lazy=lazy,
            backend=backend,
            namespace=namespace,
            on_backend_error=on_backend_error,
            local_share=local_share,
            timeout=timeout,
            clock=clock,
        )
        source = _policy_source(policy)
        if clock is not None and not isinstance(clock, ManualClock):
            raise InvalidInput(f"invalid clock: expected a ratewarden.ManualClock, got {type(clock).__name__}")
        self._listeners: List[Listener] = []
        try:
            self._native = NativeWarden(**source, **options)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike[str]], backend: Optional[str] = None, **options: Any) -> Warden:
        """A warden for the policy file at ``path`` (YAML, JSON or TOML by extension)."""
        return cls(os.fspath(path), backend=backend, **options)

    def reload(self, policy: Union[Mapping[str, Any], str, os.PathLike[str]]) -> Dict[str, List[str]]:
        """Puts a new policy (a dict, or a file path) in force without a restart.

        Every decision that starts afterwards uses its prices, limits, caps and
        rules; one under way finishes under the old policy. What was counted
        carries over (a budget half spent stays half spent of its new size), and
        reservations made before settle under the limits they hold. Emits a
        ``policy.reloaded`` event. Returns what changed: a dict of the limits
        ``added``, ``removed`` and ``changed`` and the resources ``repriced``.

        Raises :class:`PolicyError` — and keeps the policy in force — for an
        invalid policy or one a running warden cannot take: a unit's decimals,
        a limit's unit or kind, or the ``webhooks:`` / ``events:`` / ``audit:``
        sinks changed.
        """
        return self._native.reload(**_policy_source(policy))

    @property
    def backend(self) -> str:
        """``"memory"`` or ``"redis"``."""
        return self._native.backend

    def close(self) -> None:
        """Lets go of the backend. Nothing is held open that needs closing today;
        provided so ``with Warden(...) as w:`` reads naturally."""

    def __enter__(self) -> Warden:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Warden(backend={self.backend!r})"

    # -- decisions ---------------------------------------------------------

    def check(
        self,
        scope: str,
        *,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: Optional[Cost] = None,
        priority: Optional[str] = None,
        usage: Optional[Usage] = None,
    ) -> Decision:
        """Evaluates the request against every limit it touches, changing nothing."""
        try:
            return self._native.check(scope, resource, action, _cost(cost), priority, usage=_usage(usage))
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def check_async(
        self,
        scope: str,
        *,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: Optional[Cost] = None,
        priority: Optional[str] = None,
        usage: Optional[Usage] = None,
    ) -> Awaitable[Decision]:
        """Async form of :meth:`check`."""
        try:
            return self._native.check(scope, resource, action, _cost(cost), priority, True, usage=_usage(usage))
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def acquire(
        self,
        scope: str,
        *,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: Optional[Cost] = None,
        priority: Optional[str] = None,
        operation: Optional[str] = None,
        usage: Optional[Usage] = None,
    ) -> Decision:
        """Admits the request and consumes its cost from every limit, or denies it and
        changes nothing. A denial is a :class:`Decision` with ``allowed == False``.

        ``operation`` (32 hex digits) names the request: repeated with the id of an
        earlier admitted one — e.g. a decision's ``unconfirmed`` after a lost
        answer — it returns that decision and charges nothing more."""
        try:
            return self._native.acquire(
                scope, resource, action, _cost(cost), priority, False, operation, usage=_usage(usage)
            )
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def acquire_async(
        self,
        scope: str,
        *,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: Optional[Cost] = None,
        priority: Optional[str] = None,
        operation: Optional[str] = None,
        usage: Optional[Usage] = None,
    ) -> Awaitable[Decision]:
        """Async form of :meth:`acquire`."""
        try:
            return self._native.acquire(
                scope, resource, action, _cost(cost), priority, True, operation, usage=_usage(usage)
            )
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def reserve(
        self,
        scope: str,
        *,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: Optional[Cost] = None,
        priority: Optional[str] = None,
        lease: Optional[float] = None,
        operation: Optional[str] = None,
        usage: Optional[Usage] = None,
    ) -> Reservation:
        """Holds the request's (estimated) cost under a lease (seconds) until it is
        committed, released or expires. Returns a :class:`Reservation` (check
        ``.allowed``), usable as a context manager. ``operation`` as for
        :meth:`acquire`: a repeated reserve names the same reservation."""
        try:
            return Reservation(
                self,
                self._native.reserve(
                    scope, resource, action, _cost(cost), priority, lease, False, operation, usage=_usage(usage)
                ),
                resource,
            )
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def reserve_async(
        self,
        scope: str,
        *,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: Optional[Cost] = None,
        priority: Optional[str] = None,
        lease: Optional[float] = None,
        operation: Optional[str] = None,
        usage: Optional[Usage] = None,
    ) -> _ReserveCall:
        """Async form of :meth:`reserve`: ``await`` it, or ``async with`` it."""
        try:
            return _ReserveCall(
                self,
                self._native.reserve(
                    scope, resource, action, _cost(cost), priority, lease, True, operation, usage=_usage(usage)
                ),
                resource,
            )
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def commit(
        self,
        reservation: str,
        actual: Optional[Cost] = None,
        *,
        usage: Optional[Usage] = None,
        resource: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Charges a reservation's actual cost (units left out: as reserved) and ends it
        — or, with ``usage`` and ``resource``, the price of what the call used
        (the money unit, ``tokens``…; see :meth:`cost`). Idempotent: a repeated
        commit charges nothing and returns the first receipt with ``duplicate=True``."""
        try:
            return self._native.commit(reservation, _cost(actual), False, _usage(usage), resource)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def commit_async(
        self,
        reservation: str,
        actual: Optional[Cost] = None,
        *,
        usage: Optional[Usage] = None,
        resource: Optional[str] = None,
    ) -> Awaitable[Dict[str, Any]]:
        """Async form of :meth:`commit`."""
        try:
            return self._native.commit(reservation, _cost(actual), True, _usage(usage), resource)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    # -- events --------------------------------------------------------------

    def on_event(
        self,
        callback: Callable[[Dict[str, Any]], Any],
        events: Union[str, List[str], Tuple[str, ...], None] = None,
    ) -> Listener:
        """Calls ``callback(event)`` for each event of this warden that ``events``
        wants — types (``"limit.exhausted"``) or prefixes ending in a dot
        (``"limit."``); ``None``: every event. ``event`` is a dict: ``id``
        (``msg_…``; a threshold crossing's id is the same in every process and
        sink), ``type``, ``timestamp`` (RFC 3339), ``at`` (µs since the epoch)
        and ``data`` (scope, limit, amounts before and after…) — the body a
        webhook receives. Runs on a thread of its own (see :class:`Listener`);
        the warden keeps the listener until it is closed.

        Raises :class:`InvalidInput` for a callback that is not callable or an
        unknown event type."""
        if not callable(callback):
            raise InvalidInput(f"invalid callback: expected a callable, got {type(callback).__name__}")
        if isinstance(events, str):
            events = [events]
        if events is not None:
            if not isinstance(events, (list, tuple)):
                raise InvalidInput(f"invalid events: expected a list of event types, got {type(events).__name__}")
            for i, e in enumerate(events):
                if not isinstance(e, str):
                    raise InvalidInput(f"invalid events[{i}]: expected an event type, got {type(e).__name__}")
            events = list(events)

        def deliver(text: str) -> None:
            callback(json.loads(text))

        deliver.__qualname__ = getattr(callback, "__qualname__", deliver.__qualname__)
        listener = Listener(self._native.listen(deliver, events))
        self._listeners = [x for x in self._listeners if x.is_open] + [listener]
        _LISTENERS.add(listener)
        return listener

    def on_audit(self, callback: Callable[[Dict[str, Any]], Any]) -> Listener:
        """Calls ``callback(record)`` for every decision (check, acquire,
        reserve, delegate — allowed or denied), commit, release, extend and
        expiry of this warden, in order, on a thread of its own (as
        :meth:`on_event`: exceptions are reported and counted, never raised
        into the warden). ``record`` is a dict: ``at`` (µs), ``timestamp``,
        ``request_id`` (the reservation's id, or the operation's), ``action``,
        ``scope``, ``resource``, ``policy_action``, ``amounts`` (unit → decimal
        text), ``amounts_base``, ``outcome`` (``allow``, ``allow_with_caps``,
        ``deny``, ``ok``, ``error``, ``expired``), ``reason``, ``priority``,
        ``backend`` and ``degraded``. The audit log costs nothing until a
        callback or an ``audit:`` sink turns it on."""
        if not callable(callback):
            raise InvalidInput(f"invalid callback: expected a callable, got {type(callback).__name__}")

        def deliver(text: str) -> None:
            callback(json.loads(text))

        deliver.__qualname__ = getattr(callback, "__qualname__", deliver.__qualname__)
        listener = Listener(self._native.on_audit(deliver))
        self._listeners = [x for x in self._listeners if x.is_open] + [listener]
        _LISTENERS.add(listener)
        return listener

    def audit_stats(self) -> Dict[str, Any]:
        """What the policy's ``audit:`` sinks did so far: ``written`` (file
        lines), ``appended`` (stream entries), ``dropped``, ``failed`` and
        ``last_error``."""
        return self._native.audit_stats()

    def flush_audit(self, timeout: float = 5.0) -> bool:
        """Waits up to ``timeout`` seconds until the ``audit:`` sinks wrote (or
        counted as failed) every record so far; ``True`` if they did."""
        try:
            return bool(self._native.flush_audit(timeout))
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def flush_outlets(self, timeout: float = 5.0) -> bool:
        """Waits up to ``timeout`` seconds until the Redis outlets have written
        (or counted as failed) every event emitted so far; ``True`` if they
        did. Call it before the process exits so the last events reach the
        stream. Immediate without outlets."""
        try:
            return bool(self._native.flush_outlets(timeout))
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def outlet_stats(self) -> Dict[str, Any]:
        """What the policy's Redis outlets (``events: {stream, publish}``) did so
        far: ``appended`` (stream entries), ``published`` (pub/sub messages),
        ``dropped`` (events lost falling behind), ``failed`` (not written after
        retries) and ``last_error``. They write on a thread of their own and
        never slow a decision."""
        return self._native.outlet_stats()

    def webhook_log(self) -> Dict[str, Any]:
        """What the policy's ``webhooks:`` deliveries did so far: ``deliveries``
        (every attempt: ``message_id``, ``event_type``, ``url``, ``attempt``,
        ``status`` or ``error``, ``at``), ``dead_letters`` (messages every attempt
        failed: ``message_id``, ``event_type``, ``url``, ``attempts``, ``last``,
        ``body``) and ``dropped`` (events an endpoint never saw: it fell behind).
        Deliveries run on their own threads and never slow a decision."""
        return self._native.webhook_log()

    # -- pricing -------------------------------------------------------------

    def cost(self, resource: str, usage: Usage) -> Dict[str, Any]:
        """What ``usage`` costs on ``resource`` at its prices now (``pricing:`` in
        the policy; ``output_tokens`` priced — the bill a commit charges). Exact:
        every line summed as a fraction, rounded up once to the money unit's base
        unit. A dict: ``unit``, ``amount`` (base units, e.g. micro-dollars),
        ``amount_text`` (the decimal), ``decimals``, ``input_tokens``,
        ``output_tokens`` and ``cost`` — what a decision charges for it
        (``{"usd": "0.00395", "tokens": 1295}``), usable as a ``cost=``."""
        try:
            return self._native.cost(resource, _usage(usage))
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def estimate(self, resource: str, usage: Usage) -> Dict[str, Any]:
        """What a call with ``usage`` may cost on ``resource`` now: as :meth:`cost`,
        pricing ``max_output_tokens`` when given — what ``reserve(usage=...)`` holds."""
        try:
            return self._native.estimate(resource, _usage(usage))
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def release(self, reservation: str) -> bool:
        """Ends a reservation (or delegation) without charging; ``False`` if already released."""
        try:
            return self._native.release(reservation)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def release_async(self, reservation: str) -> Awaitable[bool]:
        """Async form of :meth:`release`."""
        try:
            return self._native.release(reservation, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def extend(self, reservation: str, lease: float) -> float:
        """Renews a reservation's lease to ``lease`` seconds from now; returns the expiry."""
        try:
            return self._native.extend(reservation, lease)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def extend_async(self, reservation: str, lease: float) -> Awaitable[float]:
        """Async form of :meth:`extend`."""
        try:
            return self._native.extend(reservation, lease, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def delegate(
        self,
        child: str,
        amounts: Cost,
        *,
        from_scope: Optional[str] = None,
        from_reservation: Optional[str] = None,
        lease: Optional[float] = None,
    ) -> Decision:
        """Carves a sub-budget for the ``child`` scope out of ``from_scope`` (a parent
        scope's free capacity) or ``from_reservation``. The child can never spend more
        than ``amounts``; what it spends counts at the parent; releasing the
        delegation (``release(decision.reservation)``) returns the unspent part."""
        try:
            return self._native.delegate(child, _cost(amounts), from_scope, from_reservation, lease)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def delegate_async(
        self,
        child: str,
        amounts: Cost,
        *,
        from_scope: Optional[str] = None,
        from_reservation: Optional[str] = None,
        lease: Optional[float] = None,
    ) -> Awaitable[Decision]:
        """Async form of :meth:`delegate`."""
        try:
            return self._native.delegate(child, _cost(amounts), from_scope, from_reservation, lease, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def wait(
        self,
        scope: str,
        *,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: Optional[Cost] = None,
        priority: Optional[str] = None,
        max_wait: float = 30.0,
        reserve: bool = False,
        lease: Optional[float] = None,
        usage: Optional[Usage] = None,
    ) -> Decision:
        """Waits (up to ``max_wait`` seconds) until the request is admitted, then acquires
        it (or reserves it with ``reserve=True``). Waiters are served in priority order,
        first come first served within a tier — on Redis across every process. Returns
        the last denial if the time runs out."""
        try:
            return self._native.wait(
                scope, resource, action, _cost(cost), priority, max_wait, reserve, lease, usage=_usage(usage)
            )
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def wait_async(
        self,
        scope: str,
        *,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: Optional[Cost] = None,
        priority: Optional[str] = None,
        max_wait: float = 30.0,
        reserve: bool = False,
        lease: Optional[float] = None,
        usage: Optional[Usage] = None,
    ) -> Awaitable[Decision]:
        """Async form of :meth:`wait`; cancelling it leaves nothing held."""
        try:
            return self._native.wait(
                scope, resource, action, _cost(cost), priority, max_wait, reserve, lease, True, usage=_usage(usage)
            )
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def balances(self, scope: str, *, resource: Optional[str] = None) -> List[Dict[str, Any]]:
        """What is left of every limit a request by ``scope`` (on ``resource``) would
        touch, read without a request — nothing is charged or counted. One dict per
        limit: ``name``, ``kind``, ``unit``, ``owner`` (the scope prefix whose counter
        it is; None for a shared pool), ``limit``, ``remaining`` and ``held`` (held by
        live reservations and concurrency slots) in integer base units with their
        ``*_text`` decimals, and ``reset`` (seconds until fully available; None for
        lifetime budgets and concurrency). Raises :class:`BackendError` when Redis
        cannot be asked (never a fallback's estimate)."""
        try:
            return self._native.balances(scope, resource)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def balances_async(self, scope: str, *, resource: Optional[str] = None) -> Awaitable[List[Dict[str, Any]]]:
        """Async form of :meth:`balances`."""
        try:
            return self._native.balances(scope, resource, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def top_up(self, scope: str, limit: str, amount: Amount, *, resource: Optional[str] = None) -> Dict[str, Any]:
        """Tops up the quota or budget ``limit`` of ``scope`` (on ``resource``, for a
        resource's limit): gives back up to ``amount`` (in the limit's unit) of what
        it spent in its current window — its debt first — never below zero, so a
        limit in debt admits again. A dict: ``limit``, ``unit``, ``credited`` and
        ``spent`` (base units) with ``*_text`` decimals. Sent once: if Redis's answer
        is lost it raises :class:`BackendError` and the top-up may have landed."""
        try:
            return self._native.top_up(scope, limit, amount, resource)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def top_up_async(
        self, scope: str, limit: str, amount: Amount, *, resource: Optional[str] = None
    ) -> Awaitable[Dict[str, Any]]:
        """Async form of :meth:`top_up`."""
        try:
            return self._native.top_up(scope, limit, amount, resource, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    # -- the upstream's own state ------------------------------------------

    def observe(self, resource: str, headers: Any) -> Dict[str, Any]:
        """Records what one response of ``resource``'s upstream said in its
        rate-limit headers (a mapping, an ``httpx.Headers`` or ``(name, value)``
        pairs; every provider :func:`parse_headers` reads), where every process
        sharing the backend sees it at once; call it once per response (or
        :meth:`report`, with the status). Decisions on the resource then pass its
        traffic light: green (more than 40% left) nothing, amber delays standard
        and background callers (``caps["delay_ms"]``), red denies background until
        the reset and paces standard to one per second across every process,
        critical passes. The resource needs ``upstream: {}`` in the policy.

        Returns the state after: ``resource``, ``zone`` (``unknown``, ``green``,
        ``amber``, ``red``), ``previous`` (before this response), ``left`` (share
        of the tightest dimension, 0-1), ``blocked`` (seconds everyone still
        waits, or None), ``quotas`` (each fresh dimension's ``limit``,
        ``remaining`` — observed less what was admitted since —, ``observed``,
        ``reset``, ``age``) and ``warnings`` (header values that were ignored)."""
        try:
            return self._native.observe(resource, _header_pairs(headers))
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def observe_async(self, resource: str, headers: Any) -> Awaitable[Dict[str, Any]]:
        """Async form of :meth:`observe`."""
        try:
            return self._native.observe(resource, _header_pairs(headers), None, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def report(self, resource: str, status: int, headers: Any = None) -> Dict[str, Any]:
        """:meth:`observe` with the response's HTTP ``status``: a 429 also stops
        every caller on the resource until its ``Retry-After`` (or, without one,
        until an exhausted quota resets, or for the breaker's ``open_for``, 5 s, doubling)
        and opens the circuit breaker: then exactly one request goes as its probe."""
        try:
            return self._native.observe(resource, _header_pairs(headers), status)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def report_async(self, resource: str, status: int, headers: Any = None) -> Awaitable[Dict[str, Any]]:
        """Async form of :meth:`report`."""
        try:
            return self._native.observe(resource, _header_pairs(headers), status, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def allocate(self, agent: str, resource: str, amounts: Cost, lease: float) -> Dict[str, Any]:
        """Sets aside ``amounts`` of every window of ``resource``'s shared pools (its
        quotas and budgets without ``scope:``) for the agent scope ``agent`` and the
        scopes under it, active for ``lease`` seconds and renewed by :meth:`heartbeat`;
        calling it again resizes it. While active only its owner (and critical callers)
        draw on its unused part; idle for a lease, standard callers may too (it is
        donated); idle for two, it is gone. Returns ``{"pools": {limit: amount},
        "active_until": seconds}``; raises when the other agents' allocations leave
        less than asked."""
        try:
            return self._native.allocate(agent, resource, _cost(amounts), lease)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def allocate_async(self, agent: str, resource: str, amounts: Cost, lease: float) -> Awaitable[Dict[str, Any]]:
        """Async form of :meth:`allocate`."""
        try:
            return self._native.allocate(agent, resource, _cost(amounts), lease, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def heartbeat(self, agent: str) -> int:
        """Keeps every allocation of ``agent`` active for another lease; returns how
        many it renewed (0: none is left — allocate again)."""
        try:
            return self._native.heartbeat(agent)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def heartbeat_async(self, agent: str) -> Awaitable[int]:
        """Async form of :meth:`heartbeat`."""
        try:
            return self._native.heartbeat(agent, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def deallocate(self, agent: str, resource: str) -> bool:
        """Gives up ``agent``'s allocation of ``resource``'s pools; ``False`` if it had none."""
        try:
            return self._native.deallocate(agent, resource)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def deallocate_async(self, agent: str, resource: str) -> Awaitable[bool]:
        """Async form of :meth:`deallocate`."""
        try:
            return self._native.deallocate(agent, resource, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def upstream(self, resource: str) -> Dict[str, Any]:
        """``resource``'s upstream state as every process sees it now (the dict
        :meth:`observe` returns); changes nothing."""
        try:
            return self._native.upstream(resource)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def upstream_async(self, resource: str) -> Awaitable[Dict[str, Any]]:
        """Async form of :meth:`upstream`."""
        try:
            return self._native.upstream(resource, True)
        except WardenError:
            raise
        except _CONVERSION_ERRORS as e:
            raise _bad_argument(e) from None

    def sequential(self, resource: str, *, hold: float = 30.0, max_wait: float = 60.0) -> Sequential:
        """``resource``'s ordered lock, for ``with`` or ``async with``: what callers
        take when a decision carries ``caps["sequential"]`` (the resource is in
        sequential mode after a burst of denials). First come, first served across
        every process sharing the backend; held for at most ``hold`` seconds (a
        holder that never releases frees it then); raises ``TimeoutError`` when
        ``max_wait`` seconds pass first. The resource needs ``upstream:`` in the
        policy."""
        return Sequential(self, resource, hold, max_wait)

    # -- the decorator -----------------------------------------------------

    def guard(
        self,
        scope: Union[str, Callable[..., str]],
        *,
        resource: Union[str, Callable[..., Optional[str]], None] = None,
        action: Union[str, Callable[..., Optional[str]], None] = None,
        cost: Union[Cost, Callable[..., Optional[Cost]], None] = None,
        priority: Union[str, Callable[..., Optional[str]], None] = None,
        actual: Optional[Callable[[Any], Optional[Cost]]] = None,
        on_limit: str = "raise",
        max_wait: float = 30.0,
        lease: Optional[float] = None,
        usage: Union[Usage, Callable[..., Optional[Usage]], None] = None,
    ) -> Callable[[F], F]:
        """Governs every call of a function (sync or ``async``, plain or method).

        ``scope``, ``resource``, ``action``, ``cost`` (the estimate) and ``priority``
        are values, or callables receiving the call's arguments. Before each call the
        estimate is reserved; ``on_limit="raise"`` raises :class:`RateLimited` (or
        :class:`BudgetExceeded`) when denied, ``on_limit="wait"`` waits up to
        ``max_wait`` seconds first. The wrapper keeps the function's name,
        docstring and signature.

        Settlement (the same rule in every binding, decided in core): if the call
        raises, the hold is released, nothing is charged and the error propagates
        unchanged. If it returns, its side effects happened, so something is always
        charged and its result is always returned: ``actual(result)`` (e.g. the
        tokens or dollars an LLM response reports) when given and valid, amounts
        finer than the unit rounded **up** to the next base unit; the estimate when
        ``actual`` is not given or returns None — or raises, returns something that
        is not a mapping, or names an unknown unit or a bad amount (then logged as a
        warning on the ``ratewarden`` logger). A commit the backend cannot confirm
        is logged too, never raised: raising would invite a retry and a double spend.

        Priced resources (``pricing:`` in the policy): give ``usage`` instead of a
        cost (``{"input_tokens": n, "max_output_tokens": 800}``, or a callable) and
        the estimate is its price; ``actual(result)`` then returns the usage the
        response reports (``{"input_tokens": ..., "output_tokens": ...}``), priced
        by the same table. A call allowed with caps (``shrink:`` — fewer output
        tokens, or a cheaper fallback model) reads them with
        :func:`current_caps` and must honour them; a call on a fallback model
        is priced on it.
        """
        if on_limit not in ("raise", "wait"):
            raise InvalidInput(f"invalid on_limit: {on_limit!r} is not 'raise' or 'wait'")
        native = self._native
        wait_for = max_wait if on_limit == "wait" else None
        fields = (scope, resource, action, cost, priority, usage)
        if any(callable(f) for f in fields):

            def prepare(args: tuple, kwargs: dict) -> Prepared:
                s, r, a, c, p, u = (f(*args, **kwargs) if callable(f) else f for f in fields)
                return _prepared(native, s, r, a, c, p, lease, wait_for, u)

        else:
            # Constant request: converted (and validated) once, here.
            const = _prepared(native, scope, resource, action, cost, priority, lease, wait_for, usage)

            def prepare(args: tuple, kwargs: dict) -> Prepared:
                return const

        # The embedded engine decides on the calling thread without waiting, so an
        # async guard need not await it (unless it may wait for capacity).
        decides_at_once = native.backend == "memory" and wait_for is None

        def decorate(fn: F) -> F:
            if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
                raise TypeError(
                    f"ratewarden.guard cannot govern generator {fn.__qualname__}: "
                    "its body runs after the call returns; guard the function that consumes it"
                )
            if inspect.iscoroutinefunction(fn) and decides_at_once:

                @functools.wraps(fn)
                async def guarded_at_once(*args: Any, **kwargs: Any) -> Any:
                    prepared = prepare(args, kwargs)
                    held = native.hold(prepared)
                    caps = None
                    if type(held) is tuple:
                        held, caps = held
                    elif type(held) is not int:
                        raise denied(held)  # type: ignore[arg-type]
                    token = _caps_enter(caps)
                    try:
                        result = await fn(*args, **kwargs)
                    except BaseException:
                        _settlement_problem(fn, native.finish(held, True))
                        raise
                    finally:
                        if token is not None:
                            _caps_exit(token)
                    _settlement_problem(fn, native.finish(held, False, actual, result, False, prepared))
                    return result

                return guarded_at_once  # type: ignore[return-value]

            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                    prepared = prepare(args, kwargs)
                    held = await native.hold(prepared, True)
                    caps = None
                    if type(held) is tuple:
                        held, caps = held
                    elif type(held) is not int:
                        raise denied(held)  # type: ignore[arg-type]
                    token = _caps_enter(caps)
                    try:
                        result = await fn(*args, **kwargs)
                    except BaseException:
                        _settlement_problem(fn, await native.finish(held, True, None, None, True))
                        raise
                    finally:
                        if token is not None:
                            _caps_exit(token)
                    _settlement_problem(fn, await native.finish(held, False, actual, result, True, prepared))
                    return result

                return guarded_async  # type: ignore[return-value]

            # The whole guard of a sync function in one native call: reserve (or
            # wait), call, commit or release.
            guarded_call = native.guarded_call

            @functools.wraps(fn)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                return guarded_call(prepare(args, kwargs), fn, args, kwargs, actual)

            return guarded  # type: ignore[return-value]

        return decorate


def _prepared(
    native: NativeWarden,
    scope: Any,
    resource: Any,
    action: Any,
    cost: Any,
    priority: Any,
    lease: Any,
    max_wait: Optional[float],
    usage: Any = None,
) -> Prepared:
    """A guard's request converted by the native module (wrong types: InvalidInput)."""
    try:
        return native.prepare(scope, resource, action, _cost(cost), priority, lease, max_wait, _usage(usage))
    except WardenError:
        raise
    except _CONVERSION_ERRORS as e:
        raise _bad_argument(e) from None


def _settlement_problem(fn: Callable[..., Any], problem: Optional[str]) -> None:
    """Logs what did not go as reported when a guarded call was settled (see
    ``Warden.guard``): the call's result is returned (or its error raised)
    regardless — the spend already happened."""
    if problem is not None:
        logging.getLogger("ratewarden").warning("ratewarden.guard: %s: %s", getattr(fn, "__qualname__", fn), problem)
