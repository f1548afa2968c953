"""Webhook signatures from Python, verified by an independent implementation:
the ``standardwebhooks`` package (the specification's reference library)."""

from __future__ import annotations

import base64
import json
import os
import time

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
