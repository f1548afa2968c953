"""The shared Redis harness works from Python: real servers, real sockets."""

import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from redis_harness import RedisServers


def ping(host_port: str) -> bytes:
    host, port = host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(64)


def test_standalone_server_lives_for_the_block_and_not_after() -> None:
    with RedisServers() as servers:
        address = servers.url.removeprefix("redis://")
        assert not address.endswith(":6379")
        assert ping(address) == b"+PONG\r\n"
    try:
        ping(address)
    except OSError:
        pass
    else:
        raise AssertionError("the server outlived its context manager")
