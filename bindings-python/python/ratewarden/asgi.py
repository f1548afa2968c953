"""ASGI middleware for Starlette and FastAPI: every HTTP request asks the warden first.

    from starlette.applications import Starlette
    from ratewarden import Warden
    from ratewarden.asgi import RateLimitMiddleware

    warden = Warden({"scopes": {"ip": {"limits": [
        {"name": "per-ip", "kind": "rate", "unit": "requests", "limit": 100, "per": "minute"}]}}})
    app = Starlette(routes=[...])
    app.add_middleware(RateLimitMiddleware, warden=warden)

Each request is acquired (one atomic decision, one unit of ``requests`` unless
``cost`` says otherwise) against the limits of its scope — by default
``ip:<client address>``. When it touches a concurrency limit, its slot is held
for as long as the app handles the request (until the response is sent, the app
raises, or the client disconnects), leased for the limit's ``lease``. An
admitted request goes on to the app and its response gets the
``RateLimit-Policy`` / ``RateLimit`` headers; a denied one gets a 429 with
the same headers, ``Retry-After`` and a JSON body
(``{"error": "rate_limited", "limit": …, "kind": …, "reason": …, "retry_after": …}``).
Header formats come from the core, identical to the Node middleware's.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable, List, MutableMapping, Optional, Sequence, Tuple, Union

from ratewarden import Cost, Decision, InvalidInput, Warden, WardenError, _cost
from ratewarden._native import ClientIdentity, header_style

__all__ = ["RateLimitMiddleware"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

_JSON = (b"content-type", b"application/json")


class RateLimitMiddleware:
    """Governs every HTTP request of an ASGI app (websocket and lifespan pass through).

    ``warden`` decides. ``scope``, ``resource``, ``action``, ``cost`` and
    ``priority`` are values, or callables receiving the request (a Starlette
    ``Request``: ``request.headers``, ``request.url``…); ``scope`` defaults to
    ``ip:<client address>``, and a callable returning ``None`` lets the request
    through unlimited. The client address is the socket peer; behind proxies,
    ``trust_proxy`` says which to believe (Express's model: ``X-Forwarded-For`` is
    read right to left and the first address that is not a trusted proxy is the
    client, so an entry a client forged is never reached): ``True`` = one proxy in
    front (nginx appending), an int = that many hops, or proxy networks
    (``"10.0.0.0/8"``, ``["loopback", "uniquelocal"]``). Entries that are not
    addresses are never keys; ``::ffff:127.0.0.1`` is ``127.0.0.1``; IPv6 clients
    are keyed by their ``/ipv6_subnet`` (default 56: one host can rotate through a
    whole /64). ``cost`` defaults to one unit of ``requests`` (``{"requests": 1}``).

    ``headers`` is ``"draft-11"`` (default: Structured-Field lists, one item per
    limit), ``"draft-7"``, ``"draft-6"`` or ``None`` (no rate-limit headers; a 429
    still says ``Retry-After``). ``skip(request) -> bool`` exempts requests.
    ``on_limited(request, decision)`` (sync or async) runs on each denial; if it
    returns an ASGI response (e.g. a Starlette ``Response``) that is sent instead of
    the default JSON 429 — the rate-limit headers are added to it.

    When the warden's backend cannot be asked the decision follows its
    ``on_backend_error``; an error (e.g. a ``scope`` callable returning an
    invalid scope) propagates to the server, which answers 500.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        warden: Warden,
        scope: Union[str, Callable[[Any], Optional[str]], None] = None,
        resource: Union[str, Callable[[Any], Optional[str]], None] = None,
        action: Union[str, Callable[[Any], Optional[str]], None] = None,
        cost: Union[Cost, Callable[[Any], Optional[Cost]], None] = None,
        priority: Union[str, Callable[[Any], Optional[str]], None] = None,
        headers: Optional[str] = "draft-11",
        trust_proxy: Union[bool, int, str, Sequence[str]] = False,
        ipv6_subnet: int = 56,
        skip: Optional[Callable[[Any], Union[bool, Awaitable[bool]]]] = None,
        on_limited: Optional[Callable[[Any, Decision], Any]] = None,
    ) -> None:
        if not isinstance(warden, Warden):
            raise InvalidInput(f"RateLimitMiddleware: warden must be a ratewarden.Warden, got {type(warden).__name__}")
        try:
            style = "off" if headers is None else header_style(headers)
        except WardenError as e:
            raise InvalidInput(f"RateLimitMiddleware: headers={headers!r}: {e}") from None
        for name, value in (("scope", scope), ("resource", resource), ("action", action), ("priority", priority)):
            if value is not None and not isinstance(value, str) and not callable(value):
                raise InvalidInput(f"RateLimitMiddleware: {name} must be a string or a callable of the request")
        for name, hook in (("skip", skip), ("on_limited", on_limited)):
            if hook is not None and not callable(hook):
                raise InvalidInput(f"RateLimitMiddleware: {name} must be callable")
        if isinstance(ipv6_subnet, bool) or not isinstance(ipv6_subnet, int):
            raise InvalidInput(f"invalid ipv6_subnet: expected an int from 1 to 128, got {type(ipv6_subnet).__name__}")
        # Who the client is: proxies trusted, addresses normalised, IPv6 by subnet (core).
        self._identity = ClientIdentity(trust_proxy, ipv6_subnet)
        if cost is not None and not callable(cost):
            cost = _cost(cost)
        self.app = app
        self._native = warden._native
        self._embedded = warden.backend == "memory"
        self._fields = (scope, resource, action, {"requests": 1} if cost is None else cost, priority)
        self._dynamic = any(callable(f) for f in self._fields) or skip is not None or on_limited is not None
        self._style = style
        self._trust_proxy = self._identity.trusts_proxies
        self._skip = skip
        self._on_limited = on_limited
        if self._dynamic:
            # Starlette is only needed to hand callables a Request.
            try:
                from starlette.requests import Request
            except ImportError:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "RateLimitMiddleware: callables receive a starlette Request; install starlette "
                    "(pip install 'ratewarden[asgi]')"
                ) from None
            self._request = Request

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = self._request(scope, receive) if self._dynamic else None
        if self._skip is not None:
            skipped = self._skip(request)
            if inspect.isawaitable(skipped):  # an async skip is awaited, not taken as true
                skipped = await skipped
            if skipped:
                await self.app(scope, receive, send)
                return
        if self._dynamic:
            who, resource, action, cost, priority = (
                (f(request) if callable(f) else f)
                for f in self._fields  # type: ignore[operator]
            )
            cost = _cost(cost)
        else:
            who, resource, action, cost, priority = self._fields
        if who is None:
            if self._fields[0] is not None:  # a callable said: not limited
                await self.app(scope, receive, send)
                return
            who = self._client_scope(scope)
        # The embedded engine decides at once: no awaitable needed. `admit`
        # holds a concurrency slot (a reservation) when the request touches a
        # concurrency limit; it is freed when the app is done with the request.
        native = self._native
        decision = native.admit(who, resource, action, cost, priority, not self._embedded)
        if not self._embedded:
            decision = await decision
        extra = decision.headers(self._style, True)
        if not decision.allowed:
            await self._limited(scope, receive, send, request, decision, extra)
            return
        held = decision.reservation
        if held is None:
            await self.app(scope, receive, _with_headers(send, extra) if extra else send)
            return
        try:
            await self.app(scope, receive, _with_headers(send, extra) if extra else send)
        finally:
            # Served, failed or the client went away: the slot is freed and the
            # request stays charged (it was served, at least in part).
            settled = native.finish(int(held, 16), False, None, None, not self._embedded)
            problem = settled if self._embedded else await settled
            if problem is not None:
                logging.getLogger("ratewarden").warning("ratewarden.asgi: %s", problem)

    def _client_scope(self, scope: MutableMapping[str, Any]) -> str:
        forwarded = None
        if self._trust_proxy:
            # Every X-Forwarded-For field, in order, as one list.
            forwarded = ",".join(v.decode("latin-1") for n, v in scope.get("headers", ()) if n == b"x-forwarded-for")
        client = scope.get("client")
        return self._identity.scope(str(client[0]) if client else None, forwarded)

    async def _limited(
        self,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
        request: Any,
        decision: Decision,
        extra: List[Tuple[bytes, bytes]],
    ) -> None:
        if self._on_limited is not None:
            response = self._on_limited(request, decision)
            if inspect.isawaitable(response):
                response = await response
            if response is not None:
                await response(scope, receive, _with_headers(send, extra))
                return
        await _respond(send, 429, [_JSON, *extra], decision.denial_body())


def _with_headers(send: Send, extra: List[Tuple[bytes, bytes]]) -> Send:
    """``send`` adding ``extra`` to the response's headers."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *extra]
        await send(message)

    return send_with_headers


async def _respond(send: Send, status: int, headers: List[Tuple[bytes, bytes]], body: str) -> None:
    data = body.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
