"""The configuration import page: an admin uploads a file, then follows its import.

The file is what ``tasync config import`` reads (JSON or YAML, an export or a list of
operations). It is read and every object checked on the server before anything is sent, as the
command does; a file that fails is shown again with the message, and nothing reaches the
master. A good file's import runs on a thread (``tasync.console.import_jobs``) and the page
follows it: htmx asks for its progress every ``--poll`` seconds until it ends, committed or
refused, all or nothing. Only admins see the page, and the server refuses anyone else.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tasync.broker.errors import ConfigError, InvalidObject
from tasync.config_files import load_import_bytes, objects_to_ops
from tasync.console.common import MAX_UPLOAD_BYTES, Auth, Form, Pages, actor, base
from tasync.console.config_view import flatten
from tasync.console.import_jobs import Busy, ImportJobs

#: The upload's field in the form.
FILE_FIELD = "file"
#: How long an import may wait for the master's answer (``tasync config import``'s default).
IMPORT_TIMEOUT_S = 300.0


class ImportPages:
    """The ``/config/import`` routes of one console (registered before ``/config/{kind}``)."""

    def __init__(self, console: Pages) -> None:
        self.console = console
        self.jobs = ImportJobs(console.settings,
                               timeout_s=max(console.timeout_s, IMPORT_TIMEOUT_S))

    def routes(self) -> list[BaseRoute]:
        """The upload form, the upload, and an import's page and progress; admins only."""
        guard = self.console.guard
        return [
            Route("/config/import", guard("admin", self._form), methods=["GET"]),
            Route("/config/import", guard("admin", self._upload, upload=True),
                  methods=["POST"]),
            Route("/config/import/{job}", guard("admin", self._job), methods=["GET"]),
            Route("/config/import/{job}/live", guard("admin", self._live), methods=["GET"]),
        ]

    def _render_form(self, request: Request, auth: Auth, status: int = 200, *,
                     error: str | None = None, errors: list[str] | None = None) -> Response:
        return self.console.page(request, "config_import.html", status, auth=auth,
                                 error=error, errors=errors or [],
                                 running=self.jobs.running(),
                                 max_mib=MAX_UPLOAD_BYTES >> 20)

    async def _form(self, request: Request, auth: Auth) -> Response:
        return self._render_form(request, auth)

    async def _upload(self, request: Request, auth: Auth) -> Response:
        form: Form = request.state.form
        upload = form.files.get(FILE_FIELD)
        if upload is None or not upload.data:
            return self._render_form(request, auth, 422, error="choose a file to import")
        name = upload.filename.replace("\\", "/").rsplit("/", 1)[-1] or "upload"
        try:
            ops = await run_in_threadpool(_read, upload.data, name)
        except InvalidObject as exc:
            return self._render_form(request, auth, 422, error=str(exc),
                                     errors=flatten(exc.errors))
        except ConfigError as exc:
            return self._render_form(request, auth, 422, error=str(exc))
        try:
            job = self.jobs.start(ops, user=auth.user.name, by=actor(auth), filename=name)
        except Busy as exc:
            return self._render_form(request, auth, 409, error=str(exc))
        return RedirectResponse(f"{base(request)}/config/import/{job.id}", status_code=303)

    def _job_context(self, request: Request) -> dict[str, Any] | None:
        job = self.jobs.get(request.path_params["job"])
        return None if job is None else {"job": job}

    async def _job(self, request: Request, auth: Auth) -> Response:
        context = self._job_context(request)
        if context is None:
            return self.console.page(request, "error.html", 404, auth=auth, title="Not found",
                                     message="no such import (the console keeps the last few, "
                                             "until it restarts)")
        return self.console.page(request, "config_import_job.html", auth=auth, **context)

    async def _live(self, request: Request, auth: Auth) -> Response:
        context = self._job_context(request)
        if context is None:
            return self.console.page(request, "error.html", 404, auth=auth, title="Not found",
                                     message="no such import")
        return self.console.page(request, "_import_progress.html", auth=auth, **context)


def _read(data: bytes, name: str) -> list[dict[str, Any]]:
    """The file's operations, every object checked (``tasync config import``'s first step)."""
    return objects_to_ops(load_import_bytes(data, name))
