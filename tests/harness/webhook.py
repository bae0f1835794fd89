"""A local webhook for delivery tests: records every POST and answers from a script.

The delivery channels' unit tests and the workers' integration tests both need an HTTP
endpoint whose answers they choose (a 503 to be retried, a 404 not to be, a redirect, a slow
or held answer) and whose requests they read back, so both use this one.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Posted:
    """One request as the webhook received it: the JSON body, the headers, the path."""

    body: Any
    headers: dict[str, str]
    path: str


class Webhook:
    """An HTTP server on the loopback; ``url`` ends in ``/hook``.

    Each POST is answered, in this order of precedence, by the next of ``statuses`` (a
    script consumed one request at a time), else by ``always``, else by 500 for the first
    ``fail_first`` attempts of each alert id (the ``id`` of the JSON body) and 200 after.
    ``delay_s`` slows every answer; ``hold`` cleared keeps requests waiting until it is set
    again. Every attribute is read at each request, so a test may change them while workers
    post. A redirect (301, 302) points at a closed port.

    Attributes:
        requests: every request, in the order received (before its answer was decided).
        attempts: answered requests per alert id.
        accepted: the alert ids answered 200, in order.
    """

    def __init__(self, *, statuses: list[int] | None = None, always: int | None = None,
                 fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.always = always
        self.fail_first = fail_first
        self.delay_s = delay_s
        self.requests: list[Posted] = []
        self.attempts: Counter[str] = Counter()
        self.accepted: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True,
                         name="test-webhook").start()

    @property
    def by_node(self) -> list[tuple[str, str]]:
        """``(alert id, node)`` of every request, in order: which node posted which alert."""
        with self.lock:
            return [(str(p.body.get("id")), str(p.body.get("node"))) for p in self.requests
                    if isinstance(p.body, dict)]

    def answer(self, body: Any) -> int:
        """The status for one request (see the class); counts the attempt."""
        alert_id = str(body.get("id")) if isinstance(body, dict) else ""
        with self.lock:
            self.attempts[alert_id] += 1
            if self.statuses:
                status = self.statuses.pop(0)
            else:
                status = self.always or (
                    500 if self.attempts[alert_id] <= self.fail_first else 200)
            if status == 200:
                self.accepted.append(alert_id)
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with hook.lock:
                    hook.requests.append(Posted(body, dict(self.headers), self.path))
                if hook.delay_s:
                    time.sleep(hook.delay_s)  # the slow endpoint being simulated
                hook.hold.wait(60)
                status = hook.answer(body)
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "http://127.0.0.1:1/")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def close(self) -> None:
        """Let held requests go, stop serving and free the port."""
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Webhook:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
