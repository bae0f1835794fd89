"""The network page's data: ``tasync status`` gathered as the command gathers it, and shown.

The console asks the nodes exactly as ``tasync status --json`` does (``tasync.health``), so the
page and the command cannot disagree. One gathering serves every open page: a page that polls
while another gathering is under way waits for it, and a result younger than ``max_age_s`` is
served again, so ten open browsers cost the network what one does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import amqp.exceptions

from tasync.broker.settings import Settings
from tasync.client import rpc_client
from tasync.console.common import TROUBLE, why
from tasync.health import NetworkStatus, ago, gather_status

K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    """One gathering: the report (None when the broker could not be asked), and why not."""

    report: NetworkStatus | None
    error: str | None


class Recent(Generic[K, T]):
    """One gathering per key for every page, made again once it is ``max_age_s`` old.

    A page that asks while a gathering is under way waits for it (one lock), so ten open
    browsers cost the network what one does. Call ``get`` from a worker thread: it blocks.
    """

    def __init__(self, gather: Callable[[K], T], *, max_age_s: float) -> None:
        self._gather = gather
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last: dict[K, tuple[float, T]] = {}

    def get(self, key: K) -> T:
        """The recent gathering for ``key``, made now if there is none young enough."""
        with self._lock:
            last = self._last.get(key)
            if last is None or time.monotonic() - last[0] >= self.max_age_s:
                last = self._last[key] = (time.monotonic(), self._gather(key))
            return last[1]


class StatusSource:
    """The network's status, gathered at most once per ``max_age_s`` for all pages.

    Args:
        settings: how to reach the broker.
        timeout_s: how long to wait for nodes to answer (as ``tasync status --timeout``).
        max_age_s: how long a gathering is served again.
    """

    def __init__(self, settings: Settings, *, timeout_s: float, max_age_s: float = 1.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._recent: Recent[None, Snapshot] = Recent(lambda _key: self._gather(),
                                                      max_age_s=max_age_s)

    def get(self) -> Snapshot:
        """A recent snapshot; blocks while one is gathered (call it from a worker thread)."""
        return self._recent.get(None)

    def _gather(self) -> Snapshot:
        try:
            with rpc_client(self.settings) as rpc:
                report = gather_status(rpc, timeout_s=self.timeout_s)
        except amqp.exceptions.NotFound:
            return Snapshot(None, "the virtual host has no tasync topology (run tasync broker "
                                  "setup)")
        except TROUBLE as exc:  # one gathering fails, not the page: it says why instead
            return Snapshot(None, why(exc))
        return Snapshot(report, None)


def view_rows(report: NetworkStatus) -> list[dict[str, Any]]:
    """Each node's row as the page shows it (the same columns as ``tasync status``).

    ``compare_with`` names the master when the row's checksum differs from the master's, so
    the page can link to the comparison of the two nodes' exports.
    """
    master = report.live_master()
    rows = []
    for r in report.rows:
        alive = bool(r.get("alive"))
        checksum = str(r.get("checksum") or "")
        rows.append({
            "node": str(r["node"]), "role": str(r.get("role") or "?"),
            "master": r.get("role") == "master", "alive": alive, "ready": bool(r.get("ready")),
            "in_sync": bool(r.get("in_sync")) if alive else None,
            "epoch": _text(r.get("epoch")), "seq": _text(r.get("applied_seq")),
            "lag": _text(r.get("lag")), "checksum": checksum[:12], "checksum_full": checksum,
            "last_seen": "now" if alive else ago(r.get("last_seen")) or "never",
            "compare_with": str(master["node"]) if master is not None and alive
            and r is not master and checksum != str(master.get("checksum") or "") else None,
            "degraded": not alive or not r.get("ready") or not r.get("in_sync")
                        or bool(r.get("diverged")),
        })
    return rows


def _text(value: Any) -> str:
    return "" if value is None else str(value)
