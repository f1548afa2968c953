"""The three apps the ASGI benchmark serves (chosen by RW_BENCH_APP): bare Starlette,
with ratewarden's RateLimitMiddleware, with slowapi — same route, same limit (per
client address, never reached), both limiters emitting their rate-limit headers."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

VARIANT = os.environ.get("RW_BENCH_APP", "bare")
LIMIT = 10**9  # per minute: every request is admitted (the write path)


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


app = Starlette(routes=[Route("/", hello)])

if VARIANT == "ratewarden":
    from ratewarden import Warden
    from ratewarden.asgi import RateLimitMiddleware

    warden = Warden(
        {
            "scopes": {
                "ip": {"limits": [{"name": "per-ip", "kind": "rate", "unit": "requests", "limit": LIMIT, "per": "1m"}]}
            }
        }
    )
    app.add_middleware(RateLimitMiddleware, warden=warden)
elif VARIANT == "slowapi":
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIMiddleware
    from slowapi.util import get_remote_address

    limiter = Limiter(key_func=get_remote_address, default_limits=[f"{LIMIT}/minute"], headers_enabled=True)
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIMiddleware)
elif VARIANT != "bare":
    raise SystemExit(f"RW_BENCH_APP={VARIANT!r} is not bare, ratewarden or slowapi")
