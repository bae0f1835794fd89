"""The traffic page: every node's totals by source, and charts of them over time. Viewers up.

The page holds the table and the charts in a fragment that htmx replaces every ``--poll``
seconds (``/traffic/live``), as the network page does; the range (``?range=1h``, ``6h``,
``24h``) is a plain link, so the page works without JavaScript too, just not live.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tasync.console import traffic_view
from tasync.console.common import Auth, Pages
from tasync.console.traffic_view import DEFAULT_RANGE, RANGES, TrafficSource


class TrafficPages:
    """The ``/traffic`` routes of one console."""

    def __init__(self, console: Pages) -> None:
        self.console = console
        self.source = TrafficSource(console.settings, timeout_s=console.timeout_s)

    def routes(self) -> list[BaseRoute]:
        """The page and its live fragment, for viewers and up."""
        guard = self.console.guard
        return [
            Route("/traffic", guard("viewer", self._page), methods=["GET"]),
            Route("/traffic/live", guard("viewer", self._live), methods=["GET"]),
        ]

    async def _context(self, request: Request) -> dict[str, Any]:
        span = RANGES.get(request.query_params.get("range", ""), RANGES[DEFAULT_RANGE])
        gathering = await run_in_threadpool(self.source.get, span)
        return {"range": span, "ranges": list(RANGES.values()), **traffic_view.view(gathering)}

    async def _page(self, request: Request, auth: Auth) -> Response:
        return self.console.page(request, "traffic.html", auth=auth,
                                 **await self._context(request))

    async def _live(self, request: Request, auth: Auth) -> Response:
        return self.console.page(request, "_traffic_live.html", auth=auth,
                                 **await self._context(request))
