"""The operations pages: promote a backup, after a page that says what will happen. Admins only.

The network page offers the promotion on each backup's row to admins alone; the confirmation
page and the POST that promotes are guarded for admins too, so a viewer's or an operator's
request is refused by the server whatever the page showed.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tasync.broker.connection import RECOVERABLE, describe
from tasync.broker.errors import TasyncError
from tasync.console import ops_view
from tasync.console.common import Auth, Pages, actor, base
from tasync.console.network_view import StatusSource

log = logging.getLogger("tasync.console")
#: What makes a promotion fail with a message for the page.
_TROUBLE: tuple[type[BaseException], ...] = (TasyncError, *RECOVERABLE)


class OpsPages:
    """The ``/operations`` routes of one console."""

    def __init__(self, console: Pages, status: StatusSource) -> None:
        self.console = console
        self.status = status

    def routes(self) -> list[BaseRoute]:
        """The confirmation and the promotion, both for admins."""
        guard = self.console.guard
        return [
            Route("/operations/promote", guard("admin", self._confirm), methods=["GET"]),
            Route("/operations/promote", guard("admin", self._promote), methods=["POST"]),
        ]

    async def _plan(self, node: str) -> tuple[dict[str, Any], str | None]:
        snap = await run_in_threadpool(self.status.get)
        if snap.report is None:
            return {"node": node, "can": False, "steps": [], "warnings": []}, \
                f"cannot ask the network: {snap.error}"
        return ops_view.plan(snap.report, node), None

    async def _confirm(self, request: Request, auth: Auth) -> Response:
        node = request.query_params.get("node", "")
        plan, error = await self._plan(node)
        return self.console.page(request, "promote.html", auth=auth, plan=plan, error=error)

    async def _promote(self, request: Request, auth: Auth) -> Response:
        node = str(request.state.form.get("node", ""))
        try:
            result = await run_in_threadpool(ops_view.promote, self.console.settings, node,
                                             by=actor(auth))
        except _TROUBLE as exc:
            why = str(exc) if isinstance(exc, TasyncError) else describe(exc)
            log.warning("console: %r could not promote %r: %s", auth.user.name, node, why)
            plan, _error = await self._plan(node)
            return self.console.page(request, "promote.html", 422, auth=auth, plan=plan,
                                     error=f"not promoted: {why}")
        log.warning("console: %r promoted %r (epoch %s)", auth.user.name, node,
                    result["epoch"])
        auth.session.flash.extend(ops_view.summary(result))
        return RedirectResponse(f"{base(request)}/network", status_code=303)
