"""Budget events delivered as signed webhooks, and a receiver verifying them
with the standard library (run: python examples/python/webhook_receiver.py;
needs `pip install standardwebhooks`)."""

import base64
import http.server
import os
import queue
import threading

from standardwebhooks.webhooks import Webhook

import ratewarden

secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()  # share it with the receiver
received: "queue.Queue[dict]" = queue.Queue()


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        # Raises unless the signature, id and timestamp check out.
        event = Webhook(secret).verify(body, {k.lower(): v for k, v in self.headers.items()})
        received.put(event)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
threading.Thread(target=server.serve_forever, daemon=True).start()

warden = ratewarden.Warden(
    {
        "scopes": {"tenant": {"limits": [{"name": "tenant-usd", "kind": "budget", "unit": "usd", "limit": "10"}]}},
        "webhooks": [
            {"url": f"http://127.0.0.1:{server.server_address[1]}/hooks", "secret": secret, "events": ["limit."]}
        ],
    }
)
for spend in ["6", "2", "2"]:  # 60%, 80%, 100% of the budget
    warden.acquire("tenant:acme", cost={"usd": spend})
for _ in range(3):
    event = received.get(timeout=10)
    data = event["data"]
    print(
        f"verified {event['type']}: {data['owner']} {data['limit']} at {data['after_text']} of {data['capacity_text']}"
    )
server.shutdown()
