"""Python benchmarks: ratewarden beside `limits` and slowapi, same run, same machine.

Run through bench/python/run.sh (release build, its own venv, own Redis, autocannon).
Prints one Markdown table per section and writes bench/out/python.json.

Workload (as in ../shared/PEERS.md §3): keys rotate over 10,000 ids, 1000/min each,
so every call is admitted (the write path).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from limits import RateLimitItemPerMinute, storage, strategies

import ratewarden
from ratewarden import Warden

ROOT = Path(__file__).resolve().parents[2]
KEYS = 10_000
PASSES = int(os.environ.get("PASSES", "3"))
RESULTS: Dict[str, Any] = {}

POLICY = {
    "scopes": {"ip": {"limits": [{"name": "per-ip", "kind": "rate", "unit": "requests", "limit": 1000, "per": "1m"}]}}
}
NEVER = {
    "scopes": {"ip": {"limits": [{"name": "per-ip", "kind": "rate", "unit": "requests", "limit": 10**9, "per": "1s"}]}}
}


def median_rate(run: Callable[[], float]) -> float:
    """Median of PASSES passes of ``run`` (each returns operations per second)."""
    return statistics.median(run() for _ in range(PASSES))


def per_second(op: Callable[[int], Any], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        op(i)
    return n / (time.perf_counter() - start)


def threaded(op: Callable[[int], Any], n: int, threads: int) -> float:
    """``threads`` threads each doing ``n // threads`` operations; total ops/s."""
    each = n // threads
    barrier = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(t * each, (t + 1) * each):
            op(i)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return each * threads / (time.perf_counter() - start)


def table(title: str, header: List[str], rows: List[List[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


def us(rate: float) -> str:
    return f"{1e6 / rate:.2f} µs"


def kops(rate: float) -> str:
    return f"{rate / 1000:.1f}k/s"


# -- guarded-call overhead and acquire ------------------------------------------


def bench_guard() -> None:
    w = Warden(NEVER)
    n = 200_000

    def bare() -> None:
        return None

    guarded = w.guard("ip:1")(bare)

    async def bare_async() -> None:
        return None

    guarded_async = w.guard("ip:1")(bare_async)

    def drive(coro_fn: Callable[[], Any]) -> Callable[[int], Any]:
        # Step the coroutine by hand: what an event loop adds is the same for both.
        def op(_: int) -> None:
            c = coro_fn()
            try:
                c.send(None)
            except StopIteration:
                pass

        return op

    sync_bare = median_rate(lambda: per_second(lambda _: bare(), n))
    sync_guarded = median_rate(lambda: per_second(lambda _: guarded(), n))
    async_bare = median_rate(lambda: per_second(drive(bare_async), n))
    async_guarded = median_rate(lambda: per_second(drive(guarded_async), n))
    ids = [f"ip:{i}" for i in range(KEYS)]
    w2 = Warden(POLICY)
    acquire = median_rate(lambda: per_second(lambda i: w2.acquire(ids[i % KEYS]), n))
    acquire_async = median_rate(lambda: per_second(drive(lambda: _await(w2.acquire_async("ip:7"))), n))
    acquire_4 = median_rate(lambda: threaded(lambda i: w2.acquire(ids[i % KEYS]), n, 4))
    sync_overhead = 1e6 / sync_guarded - 1e6 / sync_bare
    async_overhead = 1e6 / async_guarded - 1e6 / async_bare
    RESULTS["guard"] = {
        "sync_overhead_us": sync_overhead,
        "async_overhead_us": async_overhead,
        "acquire_us": 1e6 / acquire,
        "acquire_async_us": 1e6 / acquire_async,
        "acquire_4_threads_per_s": acquire_4,
    }
    table(
        "Embedded engine: guard overhead and acquire (release build)",
        ["what", "figure", "target"],
        [
            [
                "guarded no-op vs bare, sync",
                f"{us(sync_guarded)} vs {us(sync_bare)} → overhead {sync_overhead:.2f} µs",
                "≤ 2 µs",
            ],
            [
                "guarded no-op vs bare, async",
                f"{us(async_guarded)} vs {us(async_bare)} → overhead {async_overhead:.2f} µs",
                "≤ 2 µs",
            ],
            ["`acquire`, 1 thread, 10k keys", f"{us(acquire)} ({kops(acquire)})", ""],
            ["`await acquire_async`", us(acquire_async), "≤ 5 µs"],
            ["`acquire`, 4 threads, 10k keys (total)", kops(acquire_4), ""],
        ],
    )


async def _await(aw: Any) -> Any:
    return await aw


# -- against limits, in memory -----------------------------------------------------


def bench_limits_memory() -> None:
    n = 100_000
    ids = [f"ip:{i}" for i in range(KEYS)]
    keys = [str(i) for i in range(KEYS)]
    item = RateLimitItemPerMinute(1000)
    rows = []
    w = Warden(POLICY)
    ours = median_rate(lambda: per_second(lambda i: w.acquire(ids[i % KEYS]), n))
    ours_4 = median_rate(lambda: threaded(lambda i: w.acquire(ids[i % KEYS]), n, 4))
    RESULTS["limits_memory"] = {"ratewarden": ours, "ratewarden_4": ours_4}
    for name, strategy in (
        ("MovingWindowRateLimiter", strategies.MovingWindowRateLimiter),
        ("FixedWindowRateLimiter", strategies.FixedWindowRateLimiter),
    ):
        limiter = strategy(storage.MemoryStorage())
        theirs = median_rate(lambda: per_second(lambda i: limiter.hit(item, keys[i % KEYS]), n))
        theirs_4 = median_rate(lambda: threaded(lambda i: limiter.hit(item, keys[i % KEYS]), n, 4))
        RESULTS["limits_memory"][name] = theirs
        RESULTS["limits_memory"][name + "_4"] = theirs_4
        rows.append([f"limits {name}, 1 thread", f"{us(ours)} vs {us(theirs)}", f"**{ours / theirs:.1f}×**"])
        rows.append(
            [f"limits {name}, 4 threads", f"{kops(ours_4)} vs {kops(theirs_4)}", f"**{ours_4 / theirs_4:.1f}×**"]
        )
    table(
        "In memory: ratewarden `acquire` vs limits 5.8 `hit` (target ≥ 5×)",
        ["peer", "ratewarden vs peer", "ratio"],
        rows,
    )


# -- against limits, on Redis ---------------------------------------------------------


def bench_redis(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    ids = [f"ip:{i}" for i in range(KEYS)]
    keys = [str(i) for i in range(KEYS)]
    item = RateLimitItemPerMinute(1000)
    rows = []
    RESULTS["redis"] = {}
    for threads, n in ((1, 5_000), (8, 20_000)):
        w = Warden(POLICY, backend=url, namespace=f"bench{threads}", timeout=5)
        ours = median_rate(lambda: threaded(lambda i: w.acquire(ids[i % KEYS]), n, threads))
        RESULTS["redis"][f"ratewarden_{threads}"] = ours
        for name, strategy in (
            ("MovingWindow", strategies.MovingWindowRateLimiter),
            ("FixedWindow", strategies.FixedWindowRateLimiter),
        ):
            limiter = strategy(storage.RedisStorage(f"redis://127.0.0.1:{port}", max_connections=64))
            # Each strategy keeps its own key type: separate keys.
            named = [f"{name}-{k}" for k in keys]
            theirs = median_rate(lambda: threaded(lambda i: limiter.hit(item, named[i % KEYS]), n, threads))
            RESULTS["redis"][f"{name}_{threads}"] = theirs
            rows.append(
                [
                    f"{threads} thread{'s' if threads > 1 else ''}, limits {name}",
                    f"{kops(ours)} vs {kops(theirs)}",
                    f"**{ours / theirs:.2f}×**",
                ]
            )
    table(
        "On the same Redis: ratewarden `acquire` vs limits 5.8 `hit`, sync (target ≥ 2×)",
        ["callers", "ratewarden vs peer", "ratio"],
        rows,
    )


# -- ASGI ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def autocannon(url: str, seconds: int) -> Dict[str, Any]:
    tool = ROOT / "bench" / "node_modules" / ".bin" / "autocannon"
    out = subprocess.run(
        [str(tool), "-c", "50", "-d", str(seconds), "-j", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    return json.loads(out.stdout)


def bench_asgi() -> None:
    seconds = int(os.environ.get("ASGI_SECONDS", "5"))
    results: Dict[str, List[float]] = {"bare": [], "ratewarden": [], "slowapi": []}
    codes: Dict[str, Any] = {}
    for _ in range(PASSES):
        for variant in results:
            port = free_port()
            env = dict(os.environ, RW_BENCH_APP=variant)
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "asgi_apps:app",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ],
                cwd=Path(__file__).parent,
                env=env,
            )
            try:
                deadline = time.monotonic() + 30
                while True:  # readiness of another process: poll its port
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline or server.poll() is not None:
                            raise RuntimeError(f"uvicorn ({variant}) did not start") from None
                        time.sleep(0.05)
                autocannon(f"http://127.0.0.1:{port}/", 1)  # warm-up
                r = autocannon(f"http://127.0.0.1:{port}/", seconds)
                results[variant].append(r["requests"]["average"])
                codes[variant] = {"2xx": r["2xx"], "non2xx": r["non2xx"], "errors": r["errors"]}
            finally:
                server.terminate()
                server.wait(timeout=30)
    med = {k: statistics.median(v) for k, v in results.items()}
    RESULTS["asgi"] = {"req_per_s": med, "passes": results, "codes": codes}
    bare = med["bare"]
    rows = [["bare Starlette", f"{bare:.0f}", "–", str(codes["bare"])]]
    for v in ("ratewarden", "slowapi"):
        rows.append([v, f"{med[v]:.0f}", f"**{(1 - med[v] / bare) * 100:.1f} %**", str(codes[v])])
    table(
        f"ASGI: uvicorn (h11, 1 worker), autocannon -c 50 -d {seconds}, median of {PASSES} (target ≤ 10 % cost)",
        ["app", "req/s", "cost vs bare", "responses (last pass)"],
        rows,
    )


def main() -> None:
    print(f"ratewarden {ratewarden.__version__}, Python {sys.version.split()[0]}, {PASSES} passes")
    sections = sys.argv[1:] or ["guard", "memory", "redis", "asgi"]
    if "guard" in sections:
        bench_guard()
    if "memory" in sections:
        bench_limits_memory()
    if "redis" in sections:
        sys.path.insert(0, str(ROOT / "scripts"))
        from redis_harness import RedisServers

        with RedisServers() as servers:
            bench_redis(servers.url)
    if "asgi" in sections:
        bench_asgi()
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "python.json").write_text(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
