"""A Starlette (or FastAPI) app behind RateLimitMiddleware: 5 requests a minute
per client address, 60 a minute per API key for /search. Run it, then
`curl -i localhost:8000/search?q=x -H 'x-api-key: k1'` a few times."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ratewarden import Warden, scope
from ratewarden.asgi import RateLimitMiddleware

warden = Warden(
    {
        "scopes": {
            "ip": {"limits": [{"name": "per-ip", "kind": "rate", "unit": "requests", "limit": 5, "per": "1m"}]},
            "key": {"limits": [{"name": "per-key", "kind": "rate", "unit": "requests", "limit": 60, "per": "1m"}]},
        },
    }
)


def who(request: Request) -> str:
    key = request.headers.get("x-api-key")
    client = request.client.host if request.client else "unknown"
    return scope(key=key) if key else scope(ip=client)


async def search(request: Request) -> JSONResponse:
    return JSONResponse({"results": [], "q": request.query_params.get("q")})


app = Starlette(routes=[Route("/search", search)])
app.add_middleware(RateLimitMiddleware, warden=warden, scope=who)  # headers="draft-7" for older clients

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, port=8000)
