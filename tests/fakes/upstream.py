"""A fake LLM upstream that enforces its own quota and answers like the real
thing: OpenAI's ``POST /v1/chat/completions`` and Anthropic's ``POST
/v1/messages``, each response carrying that provider's real rate-limit header
set, and a 429 with ``Retry-After`` once the window's quota is spent.

The quota is ``limit`` requests per fixed window of ``window`` seconds, shared
by both endpoints. ``GET /stats`` answers what it served: ``ok``, ``rejected``
(429s) and a log of ``[seconds since start, x-test-priority, status]``.

Run it as a script (``python tests/fakes/upstream.py --limit 6 --window 1.5``):
it prints ``{"url": ...}`` on its first line and serves until killed. Tests in
both languages use it over real HTTP.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Tuple


class Quota:
    """``limit`` requests per fixed window of ``window`` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self.start = time.time()
        self.lock = threading.Lock()
        self.index = 0
        self.used = 0
        self.ok = 0
        self.rejected = 0
        self.log: List[Tuple[float, str, int]] = []

    def take(self, priority: str) -> Tuple[bool, int, float]:
        """(admitted, remaining after, seconds until the window ends)."""
        with self.lock:
            now = time.time()
            index = int((now - self.start) // self.window)
            if index != self.index:
                self.index, self.used = index, 0
            end = self.start + (index + 1) * self.window
            admitted = self.used < self.limit
            if admitted:
                self.used += 1
                self.ok += 1
            else:
                self.rejected += 1
            self.log.append((round(now - self.start, 4), priority, 200 if admitted else 429))
            return admitted, self.limit - self.used, end - now


def openai_headers(q: Quota, remaining: int, reset: float) -> Dict[str, str]:
    # Rounded up: a reset never reads earlier than the window's real end.
    return {
        "x-ratelimit-limit-requests": str(q.limit),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": f"{math.ceil(reset * 1000)}ms",
    }


def anthropic_headers(q: Quota, remaining: int, reset: float) -> Dict[str, str]:
    at = datetime.fromtimestamp(math.ceil(time.time() + reset), tz=timezone.utc)
    return {
        "anthropic-ratelimit-requests-limit": str(q.limit),
        "anthropic-ratelimit-requests-remaining": str(remaining),
        "anthropic-ratelimit-requests-reset": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


OPENAI_OK = {
    "id": "chatcmpl-fake",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
ANTHROPIC_OK = {
    "id": "msg_fake",
    "type": "message",
    "role": "assistant",
    "model": "claude-fake",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 1},
}


def handler(q: Quota) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def _send(self, status: int, body: Dict[str, Any], headers: Dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/stats":
                with q.lock:
                    body = {"ok": q.ok, "rejected": q.rejected, "log": list(q.log)}
                self._send(200, body, {})
            else:
                self._send(404, {"error": "not found"}, {})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path.endswith("/chat/completions"):
                ok_body, style = OPENAI_OK, openai_headers
                error = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
            elif self.path.endswith("/messages"):
                ok_body, style = ANTHROPIC_OK, anthropic_headers
                error = {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}}
            else:
                self._send(404, {"error": "not found"}, {})
                return
            admitted, remaining, reset = q.take(self.headers.get("x-test-priority", ""))
            headers = style(q, remaining, reset)
            if admitted:
                self._send(200, ok_body, headers)
            else:
                headers["retry-after"] = str(max(1, math.ceil(reset)))
                self._send(429, error, headers)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--window", type=float, default=1.5)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(Quota(args.limit, args.window)))
    print(json.dumps({"url": f"http://127.0.0.1:{server.server_address[1]}"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # pragma: no cover
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
