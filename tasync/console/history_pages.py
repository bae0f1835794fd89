"""The history pages: the change log, newest first, and two nodes compared object by object.

Both only read, so a viewer may see them. The network page links to the comparison on each
row whose checksum differs from the master's.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tasync.broker.errors import ConfigError, RemoteError
from tasync.broker.since import Since
from tasync.console import history_view
from tasync.console.common import Auth, NetworkTrouble, Pages
from tasync.console.network_view import StatusSource


class HistoryPages:
    """The ``/history`` and ``/network/diff`` routes of one console."""

    def __init__(self, console: Pages, status: StatusSource) -> None:
        self.console = console
        self.status = status

    def routes(self) -> list[BaseRoute]:
        """Both pages, for viewers."""
        guard = self.console.guard
        return [
            Route("/history", guard("viewer", self._history), methods=["GET"]),
            Route("/network/diff", guard("viewer", self._diff), methods=["GET"]),
        ]

    async def _history(self, request: Request, auth: Auth) -> Response:
        text = request.query_params.get("since", "").strip() or history_view.DEFAULT_SINCE
        context: dict[str, Any] = {"since_text": text, "changes": [], "count": 0, "complete": True,
                   "rejected": 0, "error": None, "since": None, "shown": history_view.SHOWN}
        try:
            since = Since.parse(text, allow_seq=True)
        except ConfigError as exc:
            context["error"] = str(exc).split(": ", 1)[-1]
            return self.console.page(request, "history.html", 422, auth=auth, **context)
        try:
            changes, log = await self.console.blocking(history_view.history,
                                                       self.console.settings, since)
        except (NetworkTrouble, RemoteError) as exc:
            context["error"] = f"cannot read the change log: {exc}"
            return self.console.page(request, "history.html", 503, auth=auth, **context)
        context.update(changes=changes, count=len(log.changes), complete=log.complete,
                       rejected=log.rejected, since=since.describe())
        return self.console.page(request, "history.html", auth=auth, **context)

    async def _diff(self, request: Request, auth: Auth) -> Response:
        a = request.query_params.get("a", "").strip()
        b = request.query_params.get("b", "").strip()
        snap = await run_in_threadpool(self.status.get)
        rows = [] if snap.report is None else snap.report.rows
        nodes = [str(r["node"]) for r in rows]
        checksums = {str(r["node"]): str(r.get("checksum") or "") for r in rows}
        backups = [str(r["node"]) for r in rows if r.get("role") != "master"]
        context: dict[str, Any] = {"a": a, "b": b, "nodes": nodes, "checksums": checksums,
                                   "backups": backups, "error": None, "difference": None}
        if not (a and b):
            return self.console.page(request, "diff.html", auth=auth, **context)
        try:
            exports = [await self.console.blocking(history_view.export_of,
                                                   self.console.settings, node)
                       for node in (a, b)]
        except (NetworkTrouble, RemoteError) as exc:
            context["error"] = f"cannot read the exports: {exc}"
            return self.console.page(request, "diff.html", 503, auth=auth, **context)
        context["difference"] = history_view.compare(*exports)
        return self.console.page(request, "diff.html", auth=auth, **context)
