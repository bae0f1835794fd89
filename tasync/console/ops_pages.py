"""The operations pages: promote a backup, recover a node, replay the change log. Admins only.

Each opens on a confirmation page that says what will happen (``tasync.console.ops_view`` for
a promotion, ``tasync.console.repair_view`` for the repairs), written from the network's status
at that moment, and acts only on its POST. The network page offers them on each backup's row
to admins alone; the pages and the POSTs are guarded for admins on the server too, so a
viewer's or an operator's request is refused whatever the page showed. A replay's confirmation
also lists the changes it will replay, as ``tasync replay --dry-run`` lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tasync.cli_replay import read_log
from tasync.console import ops_view, repair_view
from tasync.console.common import TROUBLE, Auth, Pages, actor, base, why
from tasync.console.network_view import StatusSource
from tasync.console.repair_view import ALL_BACKUPS, ReplayWanted
from tasync.health import NetworkStatus

log = logging.getLogger("tasync.console")


class OpsPages:
    """The ``/operations/...`` routes of one console."""

    def __init__(self, console: Pages, status: StatusSource) -> None:
        self.console = console
        self.status = status

    def routes(self) -> list[BaseRoute]:
        """Each confirmation and each action, all for admins."""
        guard = self.console.guard
        return [
            Route("/operations/promote", guard("admin", self._promote_page), methods=["GET"]),
            Route("/operations/promote", guard("admin", self._promote), methods=["POST"]),
            Route("/operations/recover", guard("admin", self._recover_page), methods=["GET"]),
            Route("/operations/recover", guard("admin", self._recover), methods=["POST"]),
            Route("/operations/replay", guard("admin", self._replay_page), methods=["GET"]),
            Route("/operations/replay", guard("admin", self._replay), methods=["POST"]),
        ]

    async def _plan(self, node: str, planner: Callable[[NetworkStatus, str], dict[str, Any]]
                    ) -> tuple[dict[str, Any], str | None]:
        """What an operation on ``node`` will do, from the network's status; or why not known."""
        snap = await run_in_threadpool(self.status.get)
        if snap.report is None:
            return {"node": node, "can": False, "steps": [], "warnings": []}, \
                f"cannot ask the network: {snap.error}"
        return planner(snap.report, node), None

    # -- promote

    async def _promote_page(self, request: Request, auth: Auth) -> Response:
        node = request.query_params.get("node", "")
        plan, error = await self._plan(node, ops_view.plan)
        return self.console.page(request, "promote.html", auth=auth, plan=plan, error=error)

    async def _promote(self, request: Request, auth: Auth) -> Response:
        node = str(request.state.form.get("node", ""))
        try:
            result = await run_in_threadpool(ops_view.promote, self.console.settings, node,
                                             by=actor(auth))
        except TROUBLE as exc:
            log.warning("console: %r could not promote %r: %s", auth.user.name, node, why(exc))
            plan, _error = await self._plan(node, ops_view.plan)
            return self.console.page(request, "promote.html", 422, auth=auth, plan=plan,
                                     error=f"not promoted: {why(exc)}")
        log.warning("console: %r promoted %r (epoch %s)", auth.user.name, node,
                    result["epoch"])
        auth.session.flash.extend(ops_view.summary(result))
        return RedirectResponse(f"{base(request)}/network", status_code=303)

    # -- recover

    async def _recover_page(self, request: Request, auth: Auth) -> Response:
        node = request.query_params.get("node", "")
        plan, error = await self._plan(node, repair_view.recover_plan)
        return self.console.page(request, "recover.html", auth=auth, plan=plan, error=error)

    async def _recover(self, request: Request, auth: Auth) -> Response:
        node = str(request.state.form.get("node", ""))
        try:
            result = await run_in_threadpool(repair_view.recover, self.console.settings, node,
                                             by=actor(auth))
        except TROUBLE as exc:
            log.warning("console: %r could not recover %r: %s", auth.user.name, node, why(exc))
            plan, _error = await self._plan(node, repair_view.recover_plan)
            return self.console.page(request, "recover.html", 422, auth=auth, plan=plan,
                                     error=f"not recovered: {why(exc)}")
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
        except TROUBLE as exc:
            return await self._replay_form(
                request, auth, {"since": wanted.since_text, "target": wanted.target},
                {"since": f"cannot read the change log: {why(exc)}"}, 503)
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
        except TROUBLE as exc:
            log.warning("console: %r could not replay since %s into %r: %s", auth.user.name,
                        wanted.since.describe(), wanted.target, why(exc))
            return await self._replay_confirm(request, auth, wanted,
                                              f"not replayed: {why(exc)}", 422)
        log.warning("console: %r replayed since %s into %r", auth.user.name,
                    wanted.since.describe(), wanted.target)
        auth.session.flash.extend(result["lines"])
        if result["differing"]:
            auth.session.flash.append(f"still different from the master: "
                                      f"{', '.join(result['differing'])}; recover them")
        return RedirectResponse(f"{base(request)}/network", status_code=303)
