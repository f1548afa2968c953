"""Budget events to a callback, and every decision in an audit log
(run: python examples/python/audit_and_events.py)."""

import json
import os
import queue
import tempfile

import ratewarden

audit_file = os.path.join(tempfile.mkdtemp(), "audit.jsonl")
warden = ratewarden.Warden(
    {
        "scopes": {
            "tenant": {
                "limits": [{"name": "tenant-usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"}]
            }
        },
        "audit": {"file": audit_file},  # or {"stream": {"key": "audit"}} on Redis
    }
)

events: "queue.Queue[dict]" = queue.Queue()
with warden.on_event(events.put, events=["limit.", "reservation."]):  # on a thread of its own
    with warden.reserve("tenant:acme", cost={"usd": "4"}) as r:
        r.commit({"usd": "5"})  # more than reserved (charged: the default rule), 50 % crossed
    warden.acquire("tenant:acme", cost={"usd": "3"})  # 8 of 10: past 80 %
    warden.acquire("tenant:acme", cost={"usd": "3"})  # denied: 2 left
    for _ in range(3):
        e = events.get(timeout=10)
        if e["type"] == "reservation.overage":
            x = e["data"]["limits"][0]
            print(f"{e['type']}: {x['owner']} {x['limit']} reserved {x['reserved_text']}, charged {x['charged_text']}")
        else:
            d = e["data"]
            print(f"{e['type']}: {d['owner']} {d['limit']} at {d['after_text']} of {d['capacity_text']}")

warden.flush_audit()  # the file is written on a thread of its own
with open(audit_file) as f:
    for record in map(json.loads, f):
        print("audit:", record["action"], record["outcome"], record["amounts"])
