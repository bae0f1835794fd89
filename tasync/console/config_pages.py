"""The configuration pages: objects of each kind listed and filtered; admins change them.

Reads need a viewer, changes an admin. A change goes to the master through
``tasync.console.config_view`` (the path of ``tasync config set`` and ``delete``); when it is
refused, the form comes back with each message beside its field and what was typed kept.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tasync.broker import kinds
from tasync.broker.errors import RemoteError
from tasync.console import config_view
from tasync.console.common import Auth, NetworkTrouble, Pages, actor, base
from tasync.console.config_view import FIELDS, GENERAL, PAGE_OBJECTS

log = logging.getLogger("tasync.console")


class ConfigPages:
    """The ``/config`` routes of one console."""

    def __init__(self, console: Pages) -> None:
        self.console = console

    def routes(self) -> list[BaseRoute]:
        """List, create, edit and delete, each behind the role it needs."""
        guard = self.console.guard
        return [
            Route("/config", guard("viewer", self._index), methods=["GET"]),
            Route("/config/{kind}", guard("viewer", self._list), methods=["GET"]),
            Route("/config/{kind}/new", guard("admin", self._form), methods=["GET"]),
            Route("/config/{kind}/new", guard("admin", self._save), methods=["POST"]),
            Route("/config/{kind}/{name}/edit", guard("admin", self._form), methods=["GET"]),
            Route("/config/{kind}/{name}/edit", guard("admin", self._save), methods=["POST"]),
            Route("/config/{kind}/{name}/delete", guard("admin", self._confirm_delete),
                  methods=["GET"]),
            Route("/config/{kind}/{name}/delete", guard("admin", self._delete),
                  methods=["POST"]),
        ]

    def _kind(self, request: Request, auth: Auth) -> str | Response:
        kind = request.path_params["kind"]
        if kind not in FIELDS:
            return self.console.page(request, "error.html", 404, auth=auth, title="Not found",
                                     message=f"no kind {kinds.quote(kind)}; kinds are "
                                             f"{', '.join(kinds.KINDS)}")
        return str(kind)

    def _trouble(self, request: Request, auth: Auth, exc: Exception) -> Response:
        return self.console.page(request, "error.html", 503, auth=auth,
                                 title="The network does not answer", message=str(exc))

    async def _index(self, request: Request, auth: Auth) -> Response:
        return RedirectResponse(f"{base(request)}/config/{kinds.KINDS[0]}", status_code=303)

    async def _list(self, request: Request, auth: Auth) -> Response:
        kind = self._kind(request, auth)
        if isinstance(kind, Response):
            return kind
        query = request.query_params.get("q", "")
        try:
            objects = await self.console.blocking(config_view.list_objects, self.console.settings,
                                                  kind, timeout_s=self.console.timeout_s)
        except (NetworkTrouble, RemoteError) as exc:
            return self._trouble(request, auth, exc)
        shown = [o for o in objects if config_view.matches(o, query)]
        rows = [{"name": o["name"], "values": config_view.form_values(kind, o["body"])}
                for o in shown[:PAGE_OBJECTS]]
        return self.console.page(request, "config_list.html", auth=auth, kind=kind, q=query,
                                 rows=rows, fields=FIELDS[kind], total=len(objects),
                                 matched=len(shown), can_change=auth.user.may("admin"))

    async def _form(self, request: Request, auth: Auth) -> Response:
        kind = self._kind(request, auth)
        if isinstance(kind, Response):
            return kind
        name = request.path_params.get("name")
        values: dict[str, str] = {}
        if name is not None:
            try:
                body = await self.console.blocking(config_view.get_object,
                                                   self.console.settings, kind, name,
                                                   timeout_s=self.console.timeout_s)
            except (NetworkTrouble, RemoteError) as exc:
                return self._trouble(request, auth, exc)
            if body is None:
                return self.console.page(request, "error.html", 404, auth=auth,
                                         title="Not found",
                                         message=f"{kind} {kinds.quote(name)} does not exist")
            values = config_view.form_values(kind, body)
        return self._render_form(request, auth, kind, name, name or "", values, {})

    def _render_form(self, request: Request, auth: Auth, kind: str, editing: str | None,
                     name: str, values: dict[str, str], errors: dict[str, str]) -> Response:
        return self.console.page(request, "config_form.html", 422 if errors else 200,
                                 auth=auth, kind=kind, editing=editing, name=name,
                                 fields=FIELDS[kind], values=values, errors=errors,
                                 general=errors.get(GENERAL))

    async def _save(self, request: Request, auth: Auth) -> Response:
        kind = self._kind(request, auth)
        if isinstance(kind, Response):
            return kind
        form: dict[str, str] = request.state.form
        editing = request.path_params.get("name")
        name = editing if editing is not None else form.get("name", "").strip()
        values = {f.name: form.get(f.name, "") for f in FIELDS[kind]}
        body, errors = config_view.check(kind, name, form)
        if not errors and editing is None:
            errors = await self._exists(kind, name)
        if not errors:
            errors = await self._commit(auth, kind, name, body,
                                        {"op": "set", "kind": kind, "name": name, "body": body})
        if errors:
            return self._render_form(request, auth, kind, editing, name, values, errors)
        return RedirectResponse(f"{base(request)}/config/{kind}", status_code=303)

    async def _exists(self, kind: str, name: str) -> dict[str, str]:
        try:
            body = await self.console.blocking(config_view.get_object, self.console.settings,
                                               kind, name, timeout_s=self.console.timeout_s)
        except (NetworkTrouble, RemoteError) as exc:
            return {GENERAL: str(exc)}
        return {"name": f"{kind} {name} exists already: edit it instead"} if body else {}

    async def _commit(self, auth: Auth, kind: str, name: str, body: dict[str, Any],
                      op: dict[str, Any]) -> dict[str, str]:
        """Commit ``op`` on the master; the errors by field, or none and a message for the user."""
        try:
            result = await self.console.blocking(config_view.commit, self.console.settings, op,
                                                 by=actor(auth),
                                                 timeout_s=max(self.console.timeout_s, 30.0))
        except RemoteError as exc:
            return config_view.refusal(kind, body, exc)
        except NetworkTrouble as exc:
            return {GENERAL: str(exc)}
        what = f"{kind} {name}" + (" deleted" if op["op"] == "delete" else "")
        if result["count"]:
            note = (f"{what}: committed seq {result['first_seq']}..{result['last_seq']} "
                    f"(epoch {result['epoch']})")
        else:
            note = f"{what}: nothing to change"
        auth.session.flash.append(note)
        log.info("console: %r %s %s %r: %s", auth.user.name, op["op"], kind, name,
                 "committed" if result["count"] else "unchanged")
        return {}

    async def _confirm_delete(self, request: Request, auth: Auth) -> Response:
        kind = self._kind(request, auth)
        if isinstance(kind, Response):
            return kind
        return self.console.page(request, "config_delete.html", auth=auth, kind=kind,
                                 name=request.path_params["name"], error=None)

    async def _delete(self, request: Request, auth: Auth) -> Response:
        kind = self._kind(request, auth)
        if isinstance(kind, Response):
            return kind
        name = request.path_params["name"]
        errors = await self._commit(auth, kind, name, {},
                                    {"op": "delete", "kind": kind, "name": name})
        if errors:
            return self.console.page(request, "config_delete.html", 422, auth=auth, kind=kind,
                                     name=name, error="; ".join(errors.values()))
        return RedirectResponse(f"{base(request)}/config/{kind}", status_code=303)
