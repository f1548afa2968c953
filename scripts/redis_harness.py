#!/usr/bin/env python3
"""Throwaway Redis servers for the test suites (Rust, Python and Node alike).

    python3 scripts/redis_harness.py start [--cluster] [--tls]   # prints JSON when ready
    python3 scripts/redis_harness.py stop DIR            # stops them, removes DIR

`start` launches one standalone `redis-server` and, with `--cluster`, three
more as a 3-master Redis Cluster (`redis-cli --cluster create`), each on a free
loopback port (never 6379, whose server may belong to someone else), with no
persistence, in a fresh temporary directory. It prints one JSON line:

    {"dir": "/tmp/rw-redis-…", "url": "redis://127.0.0.1:PORT",
     "cluster": ["127.0.0.1:P1", "127.0.0.1:P2", "127.0.0.1:P3"],
     "cluster_url": "redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3",
     "tls_url": "rediss://127.0.0.1:PT", "tls_ca": "/tmp/rw-redis-…/ca.crt",
     "pids": [...]}

(`tls_url`/`tls_ca` with `--tls`: one more server speaking only TLS, with a
certificate for 127.0.0.1 signed by a throwaway CA made with `openssl`.)

and exits 0 only once every server answers PING and the cluster reports
`cluster_state:ok` with all 16384 slots assigned. The servers run on after
`start` returns; `stop DIR` ends them (SIGTERM, then SIGKILL) and deletes the
directory. Python tests can use `RedisServers` as a context manager instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

READY_TIMEOUT_S = 20.0


def _free_port(avoid: set[int]) -> int:
    """A loopback port that is free now, whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in avoid or port == 6379 or port + 10000 > 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        avoid.add(port)
        return port
    raise RuntimeError("no free loopback port found")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH; install Redis (Debian: apt-get install redis-server)")
    return path


def _cli(port: int, *args: str, timeout: float = 5.0, tls_ca: str | None = None) -> str:
    tls = ["--tls", "--cacert", tls_ca] if tls_ca else []
    out = subprocess.run(
        [_tool("redis-cli"), *tls, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out.stdout.strip()


def _wait(what: str, ready: Any) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)  # readiness polling of an external process, not test logic
    raise RuntimeError(f"timed out after {READY_TIMEOUT_S}s waiting for {what}")


def _tls_files(directory: str) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""
    f = {n: os.path.join(directory, n) for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt", "ext")}
    openssl = _tool("openssl")
    run = lambda *a: subprocess.run([openssl, *a], capture_output=True, timeout=60, check=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f["ca.key"],
        "-out",
        f["ca.crt"],
        "-days",
        "2",
        "-subj",
        "/CN=ratewarden-test-ca",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f["srv.key"], "-out", f["srv.csr"], "-subj", "/CN=localhost")
    with open(f["ext"], "w") as ext:
        ext.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        f["srv.csr"],
        "-CA",
        f["ca.crt"],
        "-CAkey",
        f["ca.key"],
        "-CAcreateserial",
        "-out",
        f["srv.crt"],
        "-days",
        "2",
        "-extfile",
        f["ext"],
    )
    return f


def _spawn(directory: str, port: int, cluster: bool = False, tls: bool = False) -> int:
    """A redis-server on `port`: plain, a cluster node, or speaking only TLS."""
    listen = ["--port", str(port)]
    ca = None
    if tls:
        f = _tls_files(directory)
        ca = f["ca.crt"]
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", f["srv.crt"],
                  "--tls-key-file", f["srv.key"], "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]  # fmt: skip
    args = [
        _tool("redis-server"),
        *listen,
        "--bind",
        "127.0.0.1",
        "--dir",
        directory,
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--logfile",
        os.path.join(directory, f"redis-{port}.log"),
    ]
    if cluster:
        args += [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            "5000",
        ]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives `start`; never tied to the caller's terminal
    )
    _wait(f"redis-server on port {port}", lambda: _cli(port, "PING", timeout=1.0, tls_ca=ca) == "PONG")
    return proc.pid


def start(cluster: bool, tls: bool = False) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="rw-redis-")
    ports: set[int] = set()
    pids: list[int] = []
    info: dict[str, Any] = {"dir": directory, "pids": pids}
    try:
        port = _free_port(ports)
        pids.append(_spawn(directory, port, cluster=False))
        info["url"] = f"redis://127.0.0.1:{port}"
        if cluster:
            nodes = [_free_port(ports) for _ in range(3)]
            for p in nodes:
                pids.append(_spawn(directory, p, cluster=True))
            addrs = [f"127.0.0.1:{p}" for p in nodes]
            subprocess.run(
                [_tool("redis-cli"), "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )

            def cluster_ok() -> bool:
                for p in nodes:
                    state = _cli(p, "CLUSTER", "INFO")
                    if "cluster_state:ok" not in state or "cluster_slots_assigned:16384" not in state:
                        return False
                return True

            _wait("cluster_state:ok on all 3 nodes", cluster_ok)
            info["cluster"] = addrs
            info["cluster_url"] = "redis+cluster://" + ",".join(addrs)
        if tls:
            port = _free_port(ports)
            pids.append(_spawn(directory, port, tls=True))
            info["tls_url"] = f"rediss://127.0.0.1:{port}"
            info["tls_ca"] = os.path.join(directory, "ca.crt")
        with open(os.path.join(directory, "pids"), "w") as f:
            f.write(" ".join(str(p) for p in pids))
        return info
    except BaseException:
        stop(directory, pids)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie we spawned (same process) still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def stop(directory: str, pids: list[int] | None = None) -> None:
    if pids is None:
        try:
            with open(os.path.join(directory, "pids")) as f:
                pids = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            pids = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(directory, ignore_errors=True)


class RedisServers:
    """Context manager for Python tests: `with RedisServers(cluster=True) as r: r.url`."""

    def __init__(self, cluster: bool = False) -> None:
        self.cluster = cluster
        self.info: dict[str, Any] = {}

    def __enter__(self) -> RedisServers:
        self.info = start(self.cluster)
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.info["dir"], self.info["pids"])

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def cluster_url(self) -> str:
        return str(self.info["cluster_url"])


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[1] == "start" and set(argv[2:]) <= {"--cluster", "--tls"}:
        print(json.dumps(start(cluster="--cluster" in argv[2:], tls="--tls" in argv[2:])), flush=True)
        return 0
    if len(argv) == 3 and argv[1] == "stop":
        stop(argv[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
