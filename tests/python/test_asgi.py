"""RateLimitMiddleware over real HTTP: uvicorn on a free loopback port, httpx as the client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator, List

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from ratewarden import InvalidInput, ManualClock, Warden
from ratewarden.asgi import RateLimitMiddleware

T0 = 1_700_000_000.0


def policy(limit: int = 3) -> dict[str, Any]:
    return {
        "scopes": {
            "ip": {"limits": [{"name": "per-ip", "kind": "rate", "unit": "requests", "limit": limit, "per": "minute"}]},
            "tenant": {
                "limits": [{"name": "tenant-rpm", "kind": "rate", "unit": "requests", "limit": limit, "per": "minute"}]
            },
        },
        "resources": {
            "search": {
                "limits": [{"name": "search-day", "kind": "quota", "unit": "requests", "limit": 1000, "per": "day"}]
            }
        },
    }


def make_app(served: List[str], **options: Any) -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        served.append(request.url.path)
        return PlainTextResponse("hello", headers={"x-app": "1"})

    app = Starlette(routes=[Route("/{path:path}", hello)])
    app.add_middleware(RateLimitMiddleware, **options)
    return app


@contextmanager
def serve(app: Starlette) -> Iterator[str]:
    """Runs uvicorn in a thread on a socket bound before it starts: connections
    queue in the kernel backlog until it accepts, so no readiness polling."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so; without
    # it a keep-alive response written in two parts waits 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", backlog=2048, proxy_headers=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def test_headers_on_200_and_429_and_the_json_body() -> None:
    served: List[str] = []
    clock = ManualClock(T0)
    warden = Warden(policy(2), clock=clock)
    with serve(make_app(served, warden=warden)) as url, httpx.Client(base_url=url) as http:
        first = http.get("/a")
        assert first.status_code == 200
        assert first.text == "hello" and first.headers["x-app"] == "1"
        assert first.headers["ratelimit-policy"] == '"per-ip";q=2;w=60'
        assert first.headers["ratelimit"] == '"per-ip";r=1;t=30'
        assert "retry-after" not in first.headers
        assert http.get("/b").headers["ratelimit"] == '"per-ip";r=0;t=60'
        denied = http.get("/c")
        assert denied.status_code == 429
        assert denied.headers["retry-after"] == "30"
        assert denied.headers["ratelimit"] == '"per-ip";r=0;t=60'
        assert denied.headers["content-type"] == "application/json"
        body = denied.json()
        assert body["error"] == "rate_limited" and body["limit"] == "per-ip" and body["kind"] == "rate"
        assert body["retry_after"] == 30.0 and "per-ip" in body["reason"]
        assert served == ["/a", "/b"], "a denied request must not reach the app"
        clock.advance(30)
        assert http.get("/d").status_code == 200


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("draft-7", {"ratelimit-policy": "2;w=60", "ratelimit": "limit=2, remaining=1, reset=30"}),
        (
            "draft-6",
            {
                "ratelimit-policy": "2;w=60",
                "ratelimit-limit": "2",
                "ratelimit-remaining": "1",
                "ratelimit-reset": "30",
            },
        ),
    ],
)
def test_older_header_drafts_by_option(style: str, expected: dict[str, str]) -> None:
    warden = Warden(policy(2), clock=ManualClock(T0))
    with serve(make_app([], warden=warden, headers=style)) as url:
        r = httpx.get(url + "/")
        assert r.status_code == 200
        for name, value in expected.items():
            assert r.headers[name] == value
        if style == "draft-6":
            assert "ratelimit" not in r.headers


def test_no_rate_limit_headers_but_retry_after_with_headers_none() -> None:
    warden = Warden(policy(1), clock=ManualClock(T0))
    with serve(make_app([], warden=warden, headers=None)) as url, httpx.Client(base_url=url) as http:
        ok = http.get("/")
        assert ok.status_code == 200 and "ratelimit" not in ok.headers and "ratelimit-policy" not in ok.headers
        denied = http.get("/")
        assert denied.status_code == 429 and denied.headers["retry-after"] == "60"
        assert "ratelimit" not in denied.headers


async def _burst(url: str, n: int, connections: int = 16) -> List[int]:
    """``n`` concurrent GETs over ``connections`` keep-alive connections (the gate
    keeps httpx's pool queue short: it scans it per event)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    gate = asyncio.Semaphore(connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

        async def get(i: int) -> int:
            async with gate:
                return (await http.get(f"/{i}")).status_code

        return list(await asyncio.gather(*(get(i) for i in range(n))))


def test_exact_count_of_1000_requests_over_16_connections() -> None:
    served: List[str] = []
    warden = Warden(policy(250), clock=ManualClock(T0))
    with serve(make_app(served, warden=warden)) as url:
        codes = asyncio.run(_burst(url, 1000))
    assert codes.count(200) == 250 and codes.count(429) == 750
    assert len(served) == 250


def admitted(xffs: List[str], **options: Any) -> int:
    """How many of `xffs` (one request each, X-Forwarded-For as given) a 3 per
    minute per-client limit admits; the socket peer, 127.0.0.1, is the proxy."""
    warden = Warden(policy(3), clock=ManualClock(T0))
    with serve(make_app([], warden=warden, **options)) as url, httpx.Client(base_url=url) as http:
        return sum(http.get("/", headers={"x-forwarded-for": x}).status_code == 200 for x in xffs)


def test_trust_proxy_takes_the_right_most_untrusted_address() -> None:
    # Behind one proxy that appends (nginx $proxy_add_x_forwarded_for), a
    # client rotating a forged first entry gains nothing.
    forged = [f"10.9.9.{i}, 203.0.113.7" for i in range(10)]
    for trust in (True, 1, "loopback", ["127.0.0.1/32"], ("loopback", "10.0.0.0/8")):
        assert admitted(forged, trust_proxy=trust) == 3, trust
    assert admitted(forged, trust_proxy=2) == 10, "two hops trusted: the forged entry is the client, as configured"
    others = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"]
    assert admitted(others, trust_proxy=False) == 3, "not trusted: all the socket's"
    assert admitted(others, trust_proxy=True) == 4, "different clients kept apart"
    assert admitted(["garbage", "1.2.3.4:5555", "x,", "unknown"], trust_proxy=True) == 3, "never keys"


def test_client_addresses_are_normalised_and_ipv6_keyed_by_subnet() -> None:
    spellings = ["203.0.113.7", "::ffff:203.0.113.7", "::FFFF:203.0.113.7", "[::ffff:203.0.113.7]"]
    assert admitted(spellings, trust_proxy=True) == 3
    one_56 = ["2001:db8:0:100::1", "2001:DB8:0:1ff::2", "2001:db8:0:1aa:0:0:0:3", "[2001:db8:0:100::4]"]
    assert admitted(one_56, trust_proxy=True) == 3
    hosts = ["2001:db8:0:100::1", "2001:db8:0:100::2", "2001:db8:0:100::3", "2001:db8:0:100::4"]
    assert admitted(hosts, trust_proxy=True, ipv6_subnet=128) == 4


def test_scope_from_the_request_resource_skip_and_unlimited() -> None:
    served: List[str] = []
    warden = Warden(policy(1), clock=ManualClock(T0))

    def tenant(request: Request) -> str | None:
        t = request.headers.get("x-tenant")
        return None if t is None else f"tenant:{t}"

    app = make_app(
        served,
        warden=warden,
        scope=tenant,
        resource=lambda request: "search" if request.url.path.startswith("/search") else None,
        skip=lambda request: request.url.path == "/health",
    )
    with serve(app) as url, httpx.Client(base_url=url) as http:
        first = http.get("/search/x", headers={"x-tenant": "acme"})
        assert first.status_code == 200
        assert first.headers["ratelimit-policy"] == '"tenant-rpm";q=1;w=60, "search-day";q=1000;w=86400'
        assert http.get("/other", headers={"x-tenant": "acme"}).status_code == 429
        assert http.get("/other", headers={"x-tenant": "globex"}).status_code == 200
        for _ in range(3):
            health = http.get("/health", headers={"x-tenant": "acme"})
            assert health.status_code == 200 and "ratelimit" not in health.headers
            anonymous = http.get("/anon")
            assert anonymous.status_code == 200 and "ratelimit" not in anonymous.headers
    assert served.count("/health") == 3 and served.count("/anon") == 3


def test_on_limited_hook_sees_the_decision_and_may_answer() -> None:
    seen: List[Any] = []

    async def on_limited(request: Request, decision: Any) -> JSONResponse:
        seen.append((request.url.path, decision.denied_by, decision.retry_after))
        return JSONResponse({"slow": "down"}, status_code=429)

    warden = Warden(policy(1), clock=ManualClock(T0))
    with serve(make_app([], warden=warden, on_limited=on_limited)) as url, httpx.Client(base_url=url) as http:
        http.get("/x")
        r = http.get("/y")
    assert r.status_code == 429 and r.json() == {"slow": "down"}
    assert r.headers["retry-after"] == "60" and r.headers["ratelimit"] == '"per-ip";r=0;t=60'
    assert seen == [("/y", "per-ip", 60.0)]


def test_bad_options_are_refused_at_construction() -> None:
    warden = Warden(policy())
    app = Starlette()
    cases = [
        ({"warden": "nope"}, "warden must be a ratewarden.Warden"),
        ({"warden": warden, "headers": "draft-9"}, "headers='draft-9'"),
        ({"warden": warden, "scope": 42}, "scope must be a string or a callable"),
        ({"warden": warden, "skip": True}, "skip must be callable"),
        ({"warden": warden, "cost": ["requests"]}, "invalid cost"),
        ({"warden": warden, "trust_proxy": "yes"}, "invalid trust_proxy: `yes`"),
        ({"warden": warden, "trust_proxy": -1}, "is not a hop count"),
        ({"warden": warden, "trust_proxy": [1]}, "expected networks as strings, got int"),
        ({"warden": warden, "trust_proxy": 1.5}, "invalid trust_proxy"),
        ({"warden": warden, "ipv6_subnet": 0}, "invalid ipv6_subnet: 0 is not"),
        ({"warden": warden, "ipv6_subnet": 129}, "invalid ipv6_subnet: 129 is not"),
        ({"warden": warden, "ipv6_subnet": 300}, "invalid ipv6_subnet: 300 is not"),
        ({"warden": warden, "ipv6_subnet": -1}, "invalid ipv6_subnet: -1 is not"),
        ({"warden": warden, "ipv6_subnet": "56"}, "invalid ipv6_subnet"),
    ]
    for options, message in cases:
        with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
            RateLimitMiddleware(app, **options)


def test_a_bad_scope_from_a_callable_is_a_500_not_a_crash() -> None:
    warden = Warden(policy())
    with serve(make_app([], warden=warden, scope=lambda request: "not a scope")) as url:
        assert httpx.get(url + "/").status_code == 500
        # The server keeps serving.
        assert httpx.get(url + "/").status_code == 500


def test_two_servers_share_one_redis_budget_exactly(redis_servers: Any, namespace: str) -> None:
    served: List[str] = []
    clock = ManualClock(T0)  # the rate does not refill while the burst runs
    wardens = [
        Warden(policy(150), backend=redis_servers.url, namespace=namespace, timeout=10, clock=clock) for _ in range(2)
    ]
    with serve(make_app(served, warden=wardens[0])) as a, serve(make_app(served, warden=wardens[1])) as b:

        async def both() -> List[int]:
            codes = await asyncio.gather(_burst(a, 300), _burst(b, 300))
            return codes[0] + codes[1]

        codes = asyncio.run(both())
    assert codes.count(200) == 150 and codes.count(429) == 450
    assert len(served) == 150


def test_redis_down_follows_on_backend_error() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    for mode, status in (("deny", 429), ("allow", 200)):
        warden = Warden(policy(), backend=f"redis://127.0.0.1:{port}", on_backend_error=mode, lazy=True)
        with serve(make_app([], warden=warden)) as url:
            r = httpx.get(url + "/")
            assert r.status_code == status, (mode, r.text)
            if status == 429:
                assert "on_backend_error = deny" in json.loads(r.text)["reason"]


def test_a_concurrency_limit_holds_its_slot_for_the_whole_request() -> None:
    """A slow request keeps its concurrency slot until it is answered (or fails):
    the others are refused meanwhile, and the slot is free again after."""
    warden = Warden(
        {
            "scopes": {
                "ip": {
                    "limits": [
                        {"name": "one-at-a-time", "kind": "concurrency", "limit": 1},
                        {"name": "per-ip", "kind": "rate", "limit": 100, "per": "minute"},
                    ]
                }
            }
        }
    )
    entered, release = threading.Event(), threading.Event()

    async def slow(request: Request) -> PlainTextResponse:
        entered.set()
        await asyncio.to_thread(release.wait)
        return PlainTextResponse("slow")

    async def fails(request: Request) -> PlainTextResponse:
        raise RuntimeError("the handler broke")

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("fast")

    app = Starlette(routes=[Route("/slow", slow), Route("/fails", fails), Route("/fast", fast)])
    app.add_middleware(RateLimitMiddleware, warden=warden)
    with serve(app) as url, httpx.Client(base_url=url) as http:
        with ThreadPoolExecutor(1) as pool:
            slow_response = pool.submit(http.get, "/slow")
            assert entered.wait(30)
            refused = [http.get("/fast") for _ in range(4)]
            assert [r.status_code for r in refused] == [429] * 4
            assert all('"one-at-a-time";r=0' in r.headers["ratelimit"] for r in refused)
            release.set()
            done = slow_response.result(30)
        assert done.status_code == 200 and done.text == "slow"
        assert '"one-at-a-time";r=0' in done.headers["ratelimit"], "held while it ran"
        assert http.get("/fast").status_code == 200, "freed once answered"
        assert http.get("/fails").status_code == 500
        # (uvicorn closes a connection whose app raised: a new one.)
        assert httpx.get(f"{url}/fast").status_code == 200, "freed when the handler raised"
    assert warden.check("ip:127.0.0.1", cost={"requests": 0}).allowed


def test_a_429_reports_the_true_state_of_the_limits_that_did_not_deny() -> None:
    warden = Warden(
        {
            "scopes": {"ip": {"limits": [{"name": "per-ip", "kind": "rate", "limit": 2, "per": "minute"}]}},
            "resources": {
                "llm": {"limits": [{"name": "llm-usd", "kind": "budget", "unit": "usd", "limit": "1", "per": "day"}]}
            },
        },
        clock=ManualClock(T0),
    )
    app = make_app([], warden=warden, resource="llm", cost={"requests": 1, "usd": "0.25"})
    with serve(app) as url, httpx.Client(base_url=url) as http:
        seen = [http.get("/") for _ in range(3)]
    assert [r.status_code for r in seen] == [200, 200, 429]
    assert '"llm-usd";r=500000;' in seen[1].headers["ratelimit"]
    # Denied by the rate: the budget was not charged and says so (not r=250000).
    assert '"llm-usd";r=500000;' in seen[2].headers["ratelimit"], seen[2].headers["ratelimit"]
