"""Governed HTTP clients: N agents as one coordinated client of an upstream.

Every request through them first waits for the upstream resource's traffic
light and limits (:meth:`ratewarden.Warden.wait`, in priority order, sleeping
any ``caps["delay_ms"]``), then goes out, and its response is reported
(:meth:`ratewarden.Warden.report`: status and rate-limit headers), so every
agent sharing the warden's backend — in this process or on another machine —
sees the upstream's real state at once. A request the warden still denies
after ``max_wait`` raises :class:`ratewarden.RateLimited` instead of reaching
the upstream.

- :class:`GovernedTransport` / :class:`AsyncGovernedTransport`: ``httpx``
  transports (``httpx.Client(transport=GovernedTransport(...))``).
- :func:`govern`: the one-line helper for the ``openai`` and ``anthropic`` SDK
  clients, sync or async: ``client = govern(OpenAI(), warden, "openai",
  scope="agent:7")``.

Per request, the headers ``ratewarden-priority`` and ``ratewarden-scope``
(e.g. the SDKs' ``extra_headers=``) override the defaults; they are removed
before the request is sent. Reporting never fails a call: a report the backend
refuses is logged on the ``ratewarden`` logger.

``httpx`` is needed (the SDKs bring it); it is imported when this module is.
SDK releases that send with ``httpx2`` get transports built on it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, TypeVar, Union

import httpx

from ._errors import InvalidInput, WardenError, denied
from ._native import governed_headers

if TYPE_CHECKING:  # pragma: no cover
    from . import Warden

__all__ = ["PRIORITY_HEADER", "SCOPE_HEADER", "AsyncGovernedTransport", "GovernedTransport", "govern"]

#: Request headers naming one request's priority and scope (removed before
#: sending), the same in every binding (from the core).
PRIORITY_HEADER, SCOPE_HEADER = governed_headers()

_log = logging.getLogger("ratewarden")

Cost = Dict[str, Union[int, float, str]]


def _bad(argument: str, message: str) -> InvalidInput:
    e = InvalidInput(message)
    e.argument = argument
    return e


class _Governor:
    """What both transports share: the defaults, and reading one request's."""

    def __init__(
        self,
        warden: Warden,
        resource: str,
        scope: str,
        priority: str,
        cost: Optional[Cost],
        max_wait: float,
    ) -> None:
        for name, value in (("resource", resource), ("scope", scope), ("priority", priority)):
            if not isinstance(value, str):
                raise _bad(name, f"invalid {name}: expected a string, got {type(value).__name__}")
        if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or not 0 <= max_wait < float("inf"):
            raise _bad("max_wait", f"invalid max_wait: expected seconds >= 0, got {max_wait!r}")
        # Checked now by the core (a typo fails here, not on the first call);
        # the resource must coordinate on its upstream.
        from . import _cost

        try:
            warden._native.check_governed(scope, resource, _cost(cost), priority)
        except WardenError:
            raise
        except (TypeError, ValueError, OverflowError) as e:
            raise _bad("cost", f"invalid cost: {e}") from None
        self.warden, self.resource, self.scope = warden, resource, scope
        self.priority, self.cost, self.max_wait = priority, cost, max_wait

    def ask(self, request: httpx.Request) -> Tuple[str, str]:
        """This request's scope and priority (its override headers removed)."""
        scope = request.headers.pop(SCOPE_HEADER, None) or self.scope
        priority = request.headers.pop(PRIORITY_HEADER, None) or self.priority
        return scope, priority

    @staticmethod
    def delay(decision: Any) -> float:
        """Seconds to wait before sending; raises the denial if not admitted."""
        if not decision.allowed:
            raise denied(decision)
        return float(decision.caps.get("delay_ms", 0)) / 1000.0

    def failed_report(self, e: Exception) -> None:
        _log.warning("ratewarden: could not report %s's response: %s", self.resource, e)


def _transports(mod: Any) -> Tuple[Any, Any]:
    """The sync and async governed transports for an ``httpx``-compatible
    module (``httpx``, or ``httpx2`` that newer SDK releases use)."""

    class Governed(mod.BaseTransport):  # type: ignore[misc, name-defined]
        __doc__ = _SYNC_DOC

        def __init__(
            self,
            warden: Warden,
            resource: str,
            *,
            scope: str,
            priority: str = "standard",
            cost: Optional[Cost] = None,
            max_wait: float = 60.0,
            transport: Any = None,
        ) -> None:
            self._g = _Governor(warden, resource, scope, priority, cost, max_wait)
            self._inner = transport if transport is not None else mod.HTTPTransport()

        def handle_request(self, request: Any) -> Any:
            g = self._g
            scope, priority = g.ask(request)
            d = g.warden.wait(scope, resource=g.resource, cost=g.cost, priority=priority, max_wait=g.max_wait)
            pause = g.delay(d)
            if pause > 0:
                time.sleep(pause)
            response = self._inner.handle_request(request)
            try:
                g.warden.report(g.resource, response.status_code, response.headers)
            except WardenError as e:
                g.failed_report(e)
            return response

        def close(self) -> None:
            self._inner.close()

    class AsyncGoverned(mod.AsyncBaseTransport):  # type: ignore[misc, name-defined]
        __doc__ = _ASYNC_DOC

        def __init__(
            self,
            warden: Warden,
            resource: str,
            *,
            scope: str,
            priority: str = "standard",
            cost: Optional[Cost] = None,
            max_wait: float = 60.0,
            transport: Any = None,
        ) -> None:
            self._g = _Governor(warden, resource, scope, priority, cost, max_wait)
            self._inner = transport if transport is not None else mod.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            g = self._g
            scope, priority = g.ask(request)
            d = await g.warden.wait_async(
                scope, resource=g.resource, cost=g.cost, priority=priority, max_wait=g.max_wait
            )
            pause = g.delay(d)
            if pause > 0:
                await asyncio.sleep(pause)
            response = await self._inner.handle_async_request(request)
            try:
                await g.warden.report_async(g.resource, response.status_code, response.headers)
            except WardenError as e:
                g.failed_report(e)
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    Governed.__name__ = Governed.__qualname__ = "GovernedTransport"
    AsyncGoverned.__name__ = AsyncGoverned.__qualname__ = "AsyncGovernedTransport"
    return Governed, AsyncGoverned


_SYNC_DOC = """A synchronous ``httpx`` transport that governs every request on
``resource`` (see the module docs): ``GovernedTransport(warden, resource,
scope=..., priority="standard", cost=None, max_wait=60.0, transport=None)``.
``transport`` is the one that sends (default: a new ``httpx.HTTPTransport``)."""
_ASYNC_DOC = """The asyncio form of :class:`GovernedTransport` (default inner
transport: ``httpx.AsyncHTTPTransport``); waiting never blocks the event loop."""

_BY_MODULE: Dict[str, Tuple[Any, Any]] = {"httpx": _transports(httpx)}

#: The governed transport for ``httpx.Client`` (see the module docs).
GovernedTransport: Any = _BY_MODULE["httpx"][0]
#: The governed transport for ``httpx.AsyncClient``.
AsyncGovernedTransport: Any = _BY_MODULE["httpx"][1]


def _http_module(client: Any) -> Any:
    """The ``httpx``-compatible module an SDK client sends with."""
    inner = getattr(client, "_client", None)
    for name in ("httpx", "httpx2"):
        mod = sys.modules.get(name)
        if mod is not None and isinstance(inner, (mod.Client, mod.AsyncClient)):
            return mod
    return httpx


C = TypeVar("C")


def govern(
    client: C,
    warden: Warden,
    resource: str,
    *,
    scope: str,
    priority: str = "standard",
    cost: Optional[Cost] = None,
    max_wait: float = 60.0,
) -> C:
    """A copy of an ``openai`` or ``anthropic`` SDK client (``OpenAI``,
    ``AsyncOpenAI``, ``Anthropic``, ``AsyncAnthropic``, or any client with the
    same ``with_options(http_client=...)``) whose every request is governed on
    ``resource`` (see the module docs). Per call, ``extra_headers={
    "ratewarden-priority": "critical"}`` raises one request's priority."""
    with_options = getattr(client, "with_options", None)
    if not callable(with_options):
        raise _bad("client", f"invalid client: expected an openai or anthropic SDK client, got {type(client).__name__}")
    mod = _http_module(client)
    if mod.__name__ not in _BY_MODULE:
        _BY_MODULE[mod.__name__] = _transports(mod)
    sync, asynchronous = _BY_MODULE[mod.__name__]
    options: Dict[str, Any] = {"scope": scope, "priority": priority, "cost": cost, "max_wait": max_wait}
    if inspect.iscoroutinefunction(getattr(client, "close", None)):
        http = mod.AsyncClient(transport=asynchronous(warden, resource, **options))
    else:
        http = mod.Client(transport=sync(warden, resource, **options))
    return with_options(http_client=http)  # type: ignore[no-any-return]
