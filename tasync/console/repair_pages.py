"""The repair pages: recover a node, replay the change log into nodes. Admins only.

Each opens on a confirmation page that says what will happen (``tasync.console.repair_view``)
and acts only on its POST; both are guarded for admins on the server, so a viewer's or an
operator's request is refused whatever the page showed. A replay's confirmation also lists
the changes it will replay, as ``tasync replay --dry-run`` lists them.
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
from tasync.cli_replay import read_log
from tasync.console import repair_view
from tasync.console.common import Auth, Pages, actor, base
from tasync.console.network_view import StatusSource
from tasync.console.repair_view import ALL_BACKUPS, ReplayWanted

log = logging.getLogger("tasync.console")
#: What makes a recovery or a replay fail with a message for the page.
_TROUBLE: tuple[type[BaseException], ...] = (TasyncError, *RECOVERABLE)


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, TasyncError) else describe(exc)


class RepairPages:
    """The ``/operations/recover`` and ``/operations/replay`` routes of one console."""

    def __init__(self, console: Pages, status: StatusSource) -> None:
        self.console = console
        self.status = status

    def routes(self) -> list[BaseRoute]:
        """Each confirmation and each action, all for admins."""
        guard = self.console.guard
        return [
            Route("/operations/recover", guard("admin", self._recover_page), methods=["GET"]),
            Route("/operations/recover", guard("admin", self._recover), methods=["POST"]),
            Route("/operations/replay", guard("admin", self._replay_page), methods=["GET"]),
            Route("/operations/replay", guard("admin", self._replay), methods=["POST"]),
        ]

    # -- recover

    async def _recover_plan(self, node: str) -> tuple[dict[str, Any], str | None]:
        snap = await run_in_threadpool(self.status.get)
        if snap.report is None:
            return {"node": node, "can": False, "steps": [], "warnings": []}, \
                f"cannot ask the network: {snap.error}"
        return repair_view.recover_plan(snap.report, node), None

    async def _recover_page(self, request: Request, auth: Auth) -> Response:
        node = request.query_params.get("node", "")
        plan, error = await self._recover_plan(node)
        return self.console.page(request, "recover.html", auth=auth, plan=plan, error=error)

    async def _recover(self, request: Request, auth: Auth) -> Response:
        node = str(request.state.form.get("node", ""))
        try:
            result = await run_in_threadpool(repair_view.recover, self.console.settings, node,
                                             by=actor(auth))
        except _TROUBLE as exc:
            log.warning("console: %r could not recover %r: %s", auth.user.name, node, _why(exc))
            plan, _error = await self._recover_plan(node)
            return self.console.page(request, "recover.html", 422, auth=auth, plan=plan,
                                     error=f"not recovered: {_why(exc)}")
        log.warning("console: %r recovered %r (identical: %s)", auth.user.name, node,
                    result["identical"])
        auth.session.flash.extend(result["lines"])
        return RedirectResponse(f"{base(request)}/network", status_code=303)

    # -- replay

    async def _replay_page(self, request: Request, auth: Auth) -> Response:
        query = dict(request.query_params)
        if "since" not in query:  # the form alone, the node preselected from the network page
            return await self._replay_form(request, auth, {"since": "", "target": query.get(
                "node", ALL_BACKUPS)}, {})
        wanted, errors = repair_view.parse_replay(query)
        if wanted is None:
            return await self._replay_form(request, auth, query, errors, 422)
        return await self._replay_confirm(request, auth, wanted, None)

    async def _replay_form(self, request: Request, auth: Auth, form: dict[str, str],
                           errors: dict[str, str], status: int = 200) -> Response:
        snap = await run_in_threadpool(self.status.get)
        backups = [] if snap.report is None else [
            str(r["node"]) for r in snap.report.rows if r.get("role") != "master"]
        return self.console.page(request, "replay.html", status, auth=auth, form=form,
                                 errors=errors, backups=backups, all_backups=ALL_BACKUPS,
                                 plan=None, wanted=None,
                                 error=None if snap.report else
                                 f"cannot ask the network: {snap.error}")

    async def _replay_confirm(self, request: Request, auth: Auth, wanted: ReplayWanted,
                              error: str | None, status: int = 200) -> Response:
        snap = await run_in_threadpool(self.status.get)
        if snap.report is None:
            return await self._replay_form(request, auth, {"since": wanted.since_text,
                                                           "target": wanted.target}, {}, 503)
        try:
            found = await run_in_threadpool(read_log, self.console.settings, wanted.since)
        except _TROUBLE as exc:
            return await self._replay_form(
                request, auth, {"since": wanted.since_text, "target": wanted.target},
                {"since": f"cannot read the change log: {_why(exc)}"}, 503)
        plan = repair_view.replay_plan(snap.report, wanted, found)
        return self.console.page(request, "replay.html", status, auth=auth, plan=plan,
                                 wanted=wanted, all_backups=ALL_BACKUPS, error=error,
                                 form={}, errors={}, backups=[])

    async def _replay(self, request: Request, auth: Auth) -> Response:
        wanted, errors = repair_view.parse_replay(request.state.form)
        if wanted is None:
            return await self._replay_form(request, auth, request.state.form, errors, 422)
        try:
            result = await run_in_threadpool(repair_view.replay, self.console.settings, wanted,
                                             by=actor(auth))
        except _TROUBLE as exc:
            log.warning("console: %r could not replay since %s into %r: %s", auth.user.name,
                        wanted.since.describe(), wanted.target, _why(exc))
            return await self._replay_confirm(request, auth, wanted,
                                              f"not replayed: {_why(exc)}", 422)
        log.warning("console: %r replayed since %s into %r", auth.user.name,
                    wanted.since.describe(), wanted.target)
        auth.session.flash.extend(result["lines"])
        if result["differing"]:
            auth.session.flash.append(f"still different from the master: "
                                      f"{', '.join(result['differing'])}; recover them")
        return RedirectResponse(f"{base(request)}/network", status_code=303)
