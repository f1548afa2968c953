"""Webhook signatures from Python, verified by an independent implementation:
the ``standardwebhooks`` package (the specification's reference library)."""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import ratewarden

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def test_a_signed_message_verifies_with_the_standard_library() -> None:
    body = json.dumps({"type": "limit.exhausted", "data": {"limit": "usd"}})
    now = int(time.time())
    headers = ratewarden.sign_webhook(SECRET, "msg_0123456789abcdef", now, body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-id"] == "msg_0123456789abcdef"
    assert headers["webhook-timestamp"] == str(now)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)
    # Bytes sign the same; another body, id or secret does not verify.
    assert ratewarden.sign_webhook(SECRET, "msg_0123456789abcdef", now, body.encode()) == headers
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + " ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, {**headers, "webhook-id": "msg_other"})
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


def test_the_library_signs_what_we_sign() -> None:
    body = '{"a":1}'
    now = int(time.time())
    theirs = Webhook(SECRET).sign("msg_x", _dt(now), body)
    ours = ratewarden.sign_webhook(SECRET, "msg_x", now, body)["webhook-signature"]
    assert ours == theirs


def test_a_bad_secret_is_refused_without_repeating_it() -> None:
    for bad in ["whsec_!!secret!!", "whsec_AAAA", ""]:
        with pytest.raises(ratewarden.InvalidInput, match="secret") as e:
            ratewarden.sign_webhook(bad, "msg_1", 1, b"{}")
        assert "!!secret!!" not in str(e.value)


def _dt(ts: int):  # type: ignore[no-untyped-def]
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, tz=timezone.utc)


class _Receiver:
    """A real HTTP receiver on a free loopback port that verifies every
    message with ``standardwebhooks`` and answers the statuses it is told."""

    def __init__(self, statuses: list, delay: float = 0.0) -> None:
        import http.server
        import threading

        receiver = self
        self.statuses = list(statuses)
        self.got: list = []  # (webhook-id, type, verified)
        self.cond = threading.Condition()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload = Webhook(SECRET).verify(body, headers)
                    verified = True
                except WebhookVerificationError:
                    payload, verified = json.loads(body), False
                if delay:
                    time.sleep(delay)
                with receiver.cond:
                    receiver.got.append((headers["webhook-id"], payload["type"], verified))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.cond.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def wait_for(self, n: int, timeout: float = 20.0) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout), self.got
            return list(self.got)

    def close(self) -> None:
        self.server.shutdown()


def _log_when(w: ratewarden.Warden, ready: Any) -> dict:
    """The delivery log once ``ready(log)`` holds: the delivery thread writes
    it after the receiver answered, so a test that saw the request waits for
    the record (polling; delivery runs on its own thread and clock)."""
    deadline = time.time() + 20
    while True:
        log = w.webhook_log()
        if ready(log) or time.time() > deadline:
            return log
        time.sleep(0.01)


def _warden(url: str, **hook: object) -> ratewarden.Warden:
    return ratewarden.Warden(
        {
            "scopes": {"tenant": {"limits": [{"name": "usd", "kind": "budget", "unit": "usd", "limit": "10"}]}},
            "webhooks": [{"url": url, "secret": SECRET, "backoff": "10ms", **hook}],
        }
    )


def test_threshold_events_are_delivered_signed_and_in_order() -> None:
    r = _Receiver([])
    try:
        w = _warden(r.url, events=["limit."])
        assert w.acquire("tenant:a", cost={"usd": "6"}).allowed  # 50%
        assert w.acquire("tenant:a", cost={"usd": "4"}).allowed  # 80% and 100%
        got = r.wait_for(3)
        assert [(t, ok) for _, t, ok in got] == [
            ("limit.threshold_crossed", True),
            ("limit.threshold_crossed", True),
            ("limit.exhausted", True),
        ]
        assert len({i for i, _, _ in got}) == 3
        log = _log_when(w, lambda log: len(log["deliveries"]) == 3)
        assert [d["status"] for d in log["deliveries"]] == [200, 200, 200]
        assert log["dead_letters"] == [] and log["dropped"] == 0
    finally:
        r.close()


def test_a_failing_receiver_gets_retries_with_the_same_id_then_the_message() -> None:
    r = _Receiver([500, 503])
    try:
        w = _warden(r.url, events=["limit.exhausted"])
        assert w.acquire("tenant:a", cost={"usd": "10"}).allowed
        got = r.wait_for(3)
        assert len({i for i, _, _ in got}) == 1, got
        assert all(ok for _, _, ok in got)
        log = _log_when(w, lambda log: len(log["deliveries"]) == 3)
        assert [(d["attempt"], d["status"]) for d in log["deliveries"]] == [(1, 500), (2, 503), (3, 200)]
    finally:
        r.close()


def test_after_max_attempts_a_message_is_a_dead_letter() -> None:
    r = _Receiver([500] * 10)
    try:
        w = _warden(r.url, events=["limit.exhausted"], max_attempts=3)
        assert w.acquire("tenant:a", cost={"usd": "10"}).allowed
        r.wait_for(3)
        dead = _log_when(w, lambda log: log["dead_letters"])["dead_letters"]
        assert len(dead) == 1 and dead[0]["attempts"] == 3 and dead[0]["last"] == "HTTP 500"
        assert json.loads(dead[0]["body"])["type"] == "limit.exhausted"
    finally:
        r.close()


def test_a_slow_or_dead_receiver_never_holds_decisions_up() -> None:
    r = _Receiver([], delay=2.0)
    try:
        w = _warden(r.url)
        allowed = sum(w.acquire("tenant:a", cost={"usd": "0.05"}).allowed for _ in range(200))
        # All 200 decided (crossing 50%, 80% and 100% on the way) while the
        # receiver still sat on the first message: delivery waited, they did not.
        assert allowed == 200
        assert len(r.got) <= 1
    finally:
        r.close()
    unreachable = _warden("http://127.0.0.1:9/hooks", max_attempts=2)
    assert unreachable.acquire("tenant:a", cost={"usd": "10"}).allowed


def test_webhooks_the_policy_cannot_hold_name_where() -> None:
    def bad(hook: dict, says: str) -> None:
        with pytest.raises(ratewarden.PolicyError, match=says):
            ratewarden.Warden({"webhooks": [hook]})

    bad({"url": "ftp://x/", "secret": SECRET}, r"webhooks\[0\]\.url")
    bad({"url": "http://x/"}, "exactly one of `secret`")
    bad({"url": "http://x/", "secret": "whsec_AAAA"}, r"webhooks\[0\]\.secret")
    bad({"url": "http://x/", "secret_env": "RW_NO_SUCH_VARIABLE"}, "is not set")
    bad({"url": "http://x/", "secret": SECRET, "events": ["limit.nope"]}, "no event type")
    bad({"url": "http://x/", "secret": SECRET, "max_attempts": 0}, "max_attempts")
