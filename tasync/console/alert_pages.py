"""The alert pages: send a test alert, trace an alert by id, dead letters and the quarantine.

Reading (a trace, the dead letters, the quarantine) needs a viewer; sending a test alert and
re-sending a dead letter or a quarantined alert need an operator, and the server checks that
whatever the page showed.
The work is ``tasync.console.alerts_view``'s, which calls the commands' own functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tasync.broker.connection import RECOVERABLE
from tasync.broker.errors import RemoteError, TasyncError
from tasync.console import alerts_view, config_view
from tasync.console.alerts_view import GENERAL, QUEUES, AlertForm
from tasync.console.common import Auth, NetworkTrouble, Pages, actor, base

log = logging.getLogger("tasync.console")
#: Form fields of the send form, in the order the page shows them.
SEND_FIELDS = ("target", "route", "hosts", "text", "subject", "id", "priority")


class AlertPages:
    """The ``/alerts`` routes of one console."""

    def __init__(self, console: Pages) -> None:
        self.console = console

    def routes(self) -> list[BaseRoute]:
        """Each page behind the role it needs."""
        guard = self.console.guard
        return [
            Route("/alerts", guard("viewer", self._index), methods=["GET"]),
            Route("/alerts/send", guard("operator", self._send), methods=["POST"]),
            Route("/alerts/trace", guard("viewer", self._trace), methods=["GET"]),
            Route("/alerts/trace/live", guard("viewer", self._trace_live), methods=["GET"]),
            Route("/alerts/dead/requeue", guard("operator", self._requeue), methods=["POST"]),
            Route("/alerts/quarantine/requeue", guard("operator", self._requeue),
                  methods=["POST"]),
            Route("/alerts/{queue}", guard("viewer", self._list), methods=["GET"]),
            Route("/alerts/{queue}/show", guard("viewer", self._show), methods=["GET"]),
        ]

    async def _calling(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on a worker thread; a lost broker becomes ``NetworkTrouble``.

        Unlike ``Pages.blocking``, a refusal (``TasyncError``) is raised as it is, so that the
        form shows it beside its field.
        """
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except TasyncError:
            raise
        except RECOVERABLE as exc:
            raise NetworkTrouble.lost(exc) from None

    # -- send a test alert, trace an alert

    async def _index(self, request: Request, auth: Auth) -> Response:
        return await self._send_page(request, auth, AlertForm(target="", text=""), {})

    async def _send_page(self, request: Request, auth: Auth, wanted: AlertForm,
                         errors: dict[str, str]) -> Response:
        objects: dict[str, list[dict[str, Any]]] = {}
        trouble = None
        if auth.user.may("operator"):
            try:
                for kind in ("destination", "group", "route"):
                    objects[kind] = await self.console.blocking(
                        config_view.list_objects, self.console.settings, kind,
                        timeout_s=self.console.timeout_s)
            except (NetworkTrouble, RemoteError) as exc:
                trouble = f"the master does not answer, so names cannot be listed: {exc}"
        return self.console.page(
            request, "alerts.html", 422 if errors else 200, auth=auth, tab="send",
            can_send=auth.user.may("operator"), wanted=wanted, errors=errors,
            general=errors.get(GENERAL) or trouble, targets=alerts_view.targets(objects),
            routes=[o["name"] for o in objects.get("route", [])])

    async def _send(self, request: Request, auth: Auth) -> Response:
        wanted = AlertForm.from_form(request.state.form)
        errors = alerts_view.check_form(wanted)
        if errors:
            return await self._send_page(request, auth, wanted, errors)
        try:
            alert, result = await self._calling(alerts_view.send_test, self.console.settings,
                                                wanted, by=actor(auth))
        except TasyncError as exc:
            return await self._send_page(request, auth, wanted, alerts_view.send_errors(exc))
        except NetworkTrouble as exc:
            return await self._send_page(request, auth, wanted, {GENERAL: str(exc)})
        log.info("console: %r sent test alert %r to %s %r", auth.user.name, alert.id,
                 alert.target_kind, alert.target)
        auth.session.flash.append(f"sent alert {alert.id} to {alert.target_kind} "
                                  f"{alert.target} along {' '.join(result.hosts)}")
        auth.session.flash.extend(f"warning: {w}" for w in result.warnings)
        return RedirectResponse(f"{base(request)}/alerts/trace?id={quote(alert.id, safe='')}",
                                status_code=303)

    async def _trace(self, request: Request, auth: Auth) -> Response:
        alert_id = request.query_params.get("id", "").strip()
        return self.console.page(request, "alert_trace.html", auth=auth, tab="send",
                                 alert_id=alert_id, **await self._story(alert_id))

    async def _trace_live(self, request: Request, auth: Auth) -> Response:
        alert_id = request.query_params.get("id", "").strip()
        return self.console.page(request, "_trace_live.html", auth=auth, alert_id=alert_id,
                                 **await self._story(alert_id))

    async def _story(self, alert_id: str) -> dict[str, Any]:
        if not alert_id:
            return {"story": None, "error": None}
        try:
            found = await self.console.blocking(alerts_view.trace, self.console.settings,
                                                alert_id, timeout_s=self.console.timeout_s)
        except (NetworkTrouble, RemoteError) as exc:
            return {"story": None, "error": str(exc)}
        return {"story": found, "error": None}

    # -- dead letters and the quarantine

    def _queue(self, request: Request, auth: Auth) -> str | Response:
        name = str(request.path_params["queue"])
        if name not in QUEUES:
            return self.console.page(request, "error.html", 404, auth=auth, title="Not found",
                                     message="no such page")
        return name

    async def _look(self, request: Request, auth: Auth,
                    name: str) -> tuple[int, list[dict[str, Any]]] | Response:
        try:
            found: tuple[int, list[dict[str, Any]]] = await self.console.blocking(
                alerts_view.look, self.console.settings, QUEUES[name])
        except (NetworkTrouble, RemoteError) as exc:
            return self.console.page(request, "error.html", 503, auth=auth,
                                     title="The broker does not answer", message=str(exc))
        return found

    async def _list(self, request: Request, auth: Auth) -> Response:
        name = self._queue(request, auth)
        if isinstance(name, Response):
            return name
        found = await self._look(request, auth, name)
        if isinstance(found, Response):
            return found
        total, rows = found
        return self.console.page(request, "dead_list.html", auth=auth, tab=name, queue=name,
                                 total=total, rows=rows, limit=alerts_view.LOOK_LIMIT,
                                 can_requeue=auth.user.may("operator"))

    async def _show(self, request: Request, auth: Auth) -> Response:
        name = self._queue(request, auth)
        if isinstance(name, Response):
            return name
        key = request.query_params.get("key", "")
        found = await self._look(request, auth, name)
        if isinstance(found, Response):
            return found
        rows = [r for r in found[1] if r["key"] == key]
        if not rows:
            return self.console.page(request, "error.html", 404, auth=auth, title="Not found",
                                     message=f"nothing in the {name} queue is {key!r} (looked "
                                             f"at the first {alerts_view.LOOK_LIMIT})")
        return self.console.page(request, "dead_show.html", auth=auth, tab=name, queue=name,
                                 row=rows[0], copies=len(rows),
                                 can_requeue=auth.user.may("operator"))

    async def _requeue(self, request: Request, auth: Auth) -> Response:
        """Re-send a dead letter, or a quarantined alert (the queue is the path's)."""
        name = "quarantine" if request.url.path.endswith("/quarantine/requeue") else "dead"
        what = "dead letter" if name == "dead" else "quarantined message"
        key = str(request.state.form.get("key", ""))
        try:
            done = await self._calling(alerts_view.requeue, self.console.settings, key,
                                       by=actor(auth), queue=QUEUES[name])
        except (TasyncError, NetworkTrouble) as exc:
            auth.session.flash.append(f"{key}: not re-sent: {exc}")
            return RedirectResponse(f"{base(request)}/alerts/{name}", status_code=303)
        if done is None:
            auth.session.flash.append(f"{key}: no such {what} (re-sent meanwhile?)")
            return RedirectResponse(f"{base(request)}/alerts/{name}", status_code=303)
        log.info("console: %r re-sent %s %r", auth.user.name, what, key)
        auth.session.flash.append(f"re-sent {key} along {done['list']}")
        auth.session.flash.extend(f"warning: {w}" for w in done["warnings"])
        return RedirectResponse(f"{base(request)}/alerts/trace?id={quote(key, safe='')}",
                                status_code=303)
