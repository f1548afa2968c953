"""Type stub for the compiled ``ratewarden._native`` extension module.

Use the ``ratewarden`` package; this module is its implementation.
"""

import os
from typing import Any, Callable, Dict, Generator, List, Mapping, Optional, Tuple, Union, final

from typing_extensions import TypeAlias

__all__ = [
    "Canceller",
    "ClientIdentity",
    "Decision",
    "ManualClock",
    "NativeListener",
    "NativeWarden",
    "Prepared",
    "Ready",
    "Undo",
    "__version__",
    "governed_headers",
    "header_style",
    "parse_headers",
    "retry_delay",
    "scope_of",
    "sign_webhook",
    "version",
]

__version__: str

_Cost: TypeAlias = Optional[Mapping[str, Any]]

def header_style(style: str) -> str:
    """The canonical name of a rate-limit header style."""

def parse_headers(headers: List[Tuple[str, str]], now: Optional[float] = None) -> Dict[str, Any]:
    """An upstream response's rate-limit headers, parsed."""

def retry_delay(attempt: int, priority: str = "standard", retry_after: Optional[float] = None) -> float:
    """Seconds to wait before a retry, in the caller's tier's band."""

def sign_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> Dict[str, str]:
    """The Standard Webhooks headers of a message."""

def scope_of(segments: List[Tuple[str, str]]) -> str:
    """A scope string from ``(kind, id)`` pairs, ids escaped."""

def governed_headers() -> Tuple[str, str]: ...
def version() -> str:
    """Return the version of the ratewarden core library."""

@final
class Decision:
    """The answer to check / acquire / reserve / delegate / wait."""

    @property
    def allowed(self) -> bool: ...
    @property
    def outcome(self) -> str: ...
    @property
    def caps(self) -> Dict[str, Any]: ...
    @property
    def retry_after(self) -> Optional[float]: ...
    @property
    def limits(self) -> List[Dict[str, Any]]: ...
    @property
    def reason(self) -> Optional[str]: ...
    @property
    def reservation(self) -> Optional[str]: ...
    @property
    def expires_at(self) -> Optional[float]: ...
    @property
    def priority(self) -> str: ...
    @property
    def degraded(self) -> Optional[str]: ...
    @property
    def unconfirmed(self) -> Optional[str]: ...
    @property
    def light(self) -> Optional[Dict[str, Any]]: ...
    @property
    def denied_by(self) -> Optional[str]: ...
    @property
    def denied_kind(self) -> Optional[str]: ...
    def headers(self, style: str = "draft-11", raw: bool = False) -> List[Tuple[Any, Any]]:
        """``RateLimit-Policy`` / ``RateLimit`` (and ``Retry-After`` when denied)."""
    def denial_body(self) -> str:
        """The JSON body of a 429 response for this decision."""
    def to_dict(self) -> Dict[str, Any]: ...

@final
class Ready:
    """An awaitable that is already complete."""

    def __await__(self) -> Generator[Any, None, Any]: ...
    def __iter__(self) -> Ready: ...
    def __next__(self) -> Any: ...
    def send(self, _value: Any) -> Any: ...
    def throw(self, exc: BaseException, *_rest: Any) -> Any: ...
    def close(self) -> None: ...

@final
class Canceller:
    """Aborts the native task behind an asyncio future when it is cancelled."""

    def __call__(self, fut: Any, /) -> None: ...

@final
class Prepared:
    """A guard's request, converted once."""

@final
class NativeWarden:
    """The native warden behind ``ratewarden.Warden``."""

    def __new__(
        cls,
        json: Optional[str] = None,
        path: Union[str, os.PathLike[str], None] = None,
        backend: Optional[str] = None,
        namespace: str = "rw",
        on_backend_error: str = "deny",
        local_share: int = 1,
        timeout: Optional[float] = None,
        clock: Optional[ManualClock] = None,
        lazy: bool = False,
    ) -> NativeWarden: ...
    @property
    def backend(self) -> str: ...
    # Every operation returns its answer, or with asynchronous=True an awaitable of it.
    def check(
        self,
        scope: str,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: _Cost = None,
        priority: Optional[str] = None,
        asynchronous: bool = False,
        usage: _Cost = None,
    ) -> Any: ...
    def balances(self, scope: str, resource: Optional[str] = None, asynchronous: bool = False) -> Any: ...
    def top_up(
        self, scope: str, limit: str, amount: Any, resource: Optional[str] = None, asynchronous: bool = False
    ) -> Any: ...
    def observe(
        self,
        resource: str,
        headers: List[Tuple[str, str]],
        status: Optional[int] = None,
        asynchronous: bool = False,
    ) -> Any: ...
    def allocate(
        self, agent: str, resource: str, amounts: Dict[str, Any], lease: float, asynchronous: bool = False
    ) -> Any: ...
    def heartbeat(self, agent: str, asynchronous: bool = False) -> Any: ...
    def deallocate(self, agent: str, resource: str, asynchronous: bool = False) -> Any: ...
    def upstream(self, resource: str, asynchronous: bool = False) -> Any: ...
    def sequential(self, resource: str, hold: float, max_wait: float, asynchronous: bool = False) -> Any: ...
    def release_turn(self, resource: str, turn: str, asynchronous: bool = False) -> Any: ...
    def check_governed(self, scope: str, resource: str, cost: _Cost = None, priority: Optional[str] = None) -> None: ...
    def admit(
        self,
        scope: str,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: _Cost = None,
        priority: Optional[str] = None,
        asynchronous: bool = False,
        usage: _Cost = None,
    ) -> Any: ...
    def acquire(
        self,
        scope: str,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: _Cost = None,
        priority: Optional[str] = None,
        asynchronous: bool = False,
        operation: Optional[str] = None,
        usage: _Cost = None,
    ) -> Any: ...
    def reserve(
        self,
        scope: str,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: _Cost = None,
        priority: Optional[str] = None,
        lease: Optional[float] = None,
        asynchronous: bool = False,
        operation: Optional[str] = None,
        usage: _Cost = None,
    ) -> Any: ...
    def commit(
        self,
        reservation: str,
        actual: _Cost = None,
        asynchronous: bool = False,
        usage: _Cost = None,
        resource: Optional[str] = None,
    ) -> Any: ...
    def listen(self, callback: Callable[[str], Any], events: Optional[List[str]] = None) -> NativeListener: ...
    def flush_outlets(self, timeout: float = 5.0) -> bool: ...
    def outlet_stats(self) -> Dict[str, Any]: ...
    def on_audit(self, callback: Callable[[str], Any]) -> NativeListener: ...
    def audit_stats(self) -> Dict[str, Any]: ...
    def reload(
        self, json: Optional[str] = None, path: Optional[Union[str, os.PathLike[str]]] = None
    ) -> Dict[str, List[str]]: ...
    def flush_audit(self, timeout: float = 5.0) -> bool: ...
    def webhook_log(self) -> Dict[str, Any]: ...
    def cost(self, resource: str, usage: Mapping[str, Any]) -> Dict[str, Any]: ...
    def estimate(self, resource: str, usage: Mapping[str, Any]) -> Dict[str, Any]: ...
    def release(self, reservation: str, asynchronous: bool = False) -> Any: ...
    def extend(self, reservation: str, lease: float, asynchronous: bool = False) -> Any: ...
    def delegate(
        self,
        child: str,
        amounts: Mapping[str, Any],
        from_scope: Optional[str] = None,
        from_reservation: Optional[str] = None,
        lease: Optional[float] = None,
        asynchronous: bool = False,
    ) -> Any: ...
    def wait(
        self,
        scope: str,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: _Cost = None,
        priority: Optional[str] = None,
        max_wait: float = 30.0,
        reserve: bool = False,
        lease: Optional[float] = None,
        asynchronous: bool = False,
        usage: _Cost = None,
    ) -> Any: ...
    def prepare(
        self,
        scope: str,
        resource: Optional[str] = None,
        action: Optional[str] = None,
        cost: _Cost = None,
        priority: Optional[str] = None,
        lease: Optional[float] = None,
        max_wait: Optional[float] = None,
        usage: _Cost = None,
    ) -> Prepared: ...
    def hold(self, prepared: Prepared, asynchronous: bool = False) -> Any:
        """The reservation id (an int) when admitted, else the denying Decision."""
    def guarded_call(
        self,
        prepared: Prepared,
        func: Any,
        args: Tuple[Any, ...],
        kwargs: Optional[Dict[str, Any]] = None,
        actual: Optional[Any] = None,
    ) -> Any: ...
    def finish(
        self,
        id: int,
        failed: bool,
        actual: Optional[Callable[[Any], Any]] = None,
        result: Any = None,
        asynchronous: bool = False,
        prepared: Optional[Prepared] = None,
    ) -> Any: ...

@final
class NativeListener:
    """Native half of :class:`ratewarden.Listener`."""

    def close(self) -> None: ...
    @property
    def is_open(self) -> bool: ...
    @property
    def events(self) -> List[str]: ...
    def stats(self) -> Dict[str, Any]: ...

@final
class ManualClock:
    """A clock that moves only when told to (deterministic tests)."""

    def __new__(cls, start: float = ...) -> ManualClock: ...
    def advance(self, seconds: float) -> None: ...
    def now(self) -> float: ...

@final
class ClientIdentity:
    def __new__(
        cls, trust_proxy: Union[bool, int, str, List[str], Tuple[str, ...], None] = None, ipv6_subnet: int = 56
    ) -> ClientIdentity: ...
    @property
    def trusts_proxies(self) -> bool: ...
    def scope(self, peer: Optional[str], forwarded_for: Optional[str] = None) -> str: ...

@final
class Undo:
    def __call__(self, *args: Any, **kwargs: Any) -> None: ...
    def keep(self) -> None: ...
