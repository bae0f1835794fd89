"""Long requests that report as they go: a recovery, a replay, a promotion's drain.

The node answers such a request with interim replies ``{"progress": {...}}`` on the same
direct reply-to correlation, then with its result. ``ProgressRpc`` shows the interim replies
(on a terminal, as a progress bar) and treats each one as a sign of life, so a long recovery
needs no guessed total timeout: ``idle_timeout_s`` bounds the silence between two replies.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from tasync.broker import messages
from tasync.broker.errors import NoAnswer, RemoteError
from tasync.broker.messages import Request
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings
from tasync.client import connected_client

OnProgress = Callable[[dict[str, Any]], None]


class ProgressRpc(RpcClient):
    """An ``RpcClient`` that can also wait for a result through interim progress replies."""

    def call_with_progress(self, routing_key: str, op: str, args: dict[str, Any], *,
                           idle_timeout_s: float,
                           on_progress: OnProgress | None = None) -> dict[str, Any]:
        """Send a request asking for progress; return the final reply's data.

        Raises:
            NoAnswer: nobody is subscribed, or ``idle_timeout_s`` passed without any reply.
            RemoteError: the node answered with an error.
        """
        corr = uuid.uuid4().hex
        self._replies[corr] = []
        body = messages.encode(Request(op=op, sender=self.sender, args={**args, "progress": True}))
        self.send(corr, routing_key, body, ttl_s=idle_timeout_s)
        deadline = time.monotonic() + idle_timeout_s
        seen = 0
        try:
            while True:
                self.check_routed(corr, routing_key, body, ttl_s=idle_timeout_s)
                replies = self._replies[corr]
                while seen < len(replies):
                    reply = replies[seen]
                    seen += 1
                    deadline = time.monotonic() + idle_timeout_s
                    if not reply.ok:
                        raise RemoteError(reply.error or f"{reply.node} failed without a reason")
                    if "progress" not in reply.data:
                        return reply.data
                    if on_progress is not None:
                        on_progress(reply.data["progress"])
                if time.monotonic() > deadline:
                    raise NoAnswer(f"no answer to {op!r} from {routing_key!r} within "
                                   f"{idle_timeout_s:g} s")
                with contextlib.suppress(TimeoutError):
                    self.conn.drain_events(timeout=0.25)
                self.conn.heartbeat_check()
        finally:
            self.forget(corr)


def progress_rpc(settings: Settings) -> contextlib.AbstractContextManager[ProgressRpc]:
    """A connected ``ProgressRpc`` for one command; the connection closes afterwards."""
    return connected_client(settings, ProgressRpc)


class ProgressBar:
    """A rich progress bar on stderr when it is a terminal and shown; a no-op otherwise."""

    def __init__(self, show: bool, label: str) -> None:
        self.show = show and sys.stderr.isatty()
        self.label = label
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        return self

    def update(self, data: dict[str, Any]) -> None:
        """Take a node's ``{"stage", "done", "total"}``."""
        if not self.show:
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=data.get("total") or None)
        self._bar.update(self._task, completed=data.get("done", 0),
                         total=data.get("total") or None,
                         description=f"{self.label}: {data.get('stage', '')}")

    def __exit__(self, *_: object) -> None:
        if self._bar is not None:
            self._bar.stop()
