"""The console's routes: login, the network page, the configuration pages, and their guards.

Every page is rendered on the server from a Jinja2 template with autoescaping on for every
template, so a name or a text from the network is always printed as text. The network page
replaces its table every few seconds with htmx (``/network/live``); nothing else on the pages
needs JavaScript, and the forms work without it.

Each route declares the role it needs (``Console.guard``); every POST is first checked for its
origin and CSRF token (``tasync.console.sessions``), then for the role, so a viewer's request
to change something is refused by the server whatever the page showed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from tasync.broker import kinds
from tasync.broker.connection import RECOVERABLE
from tasync.broker.errors import RemoteError, TasyncError
from tasync.broker.settings import Settings
from tasync.console.alert_pages import AlertPages
from tasync.console.common import (
    MAX_UPLOAD_BYTES,
    Auth,
    Endpoint,
    Handler,
    NetworkTrouble,
    base,
    read_form,
    visible,
    when,
)
from tasync.console.config_pages import ConfigPages
from tasync.console.history_pages import HistoryPages
from tasync.console.import_pages import ImportPages
from tasync.console.network_view import StatusSource, view_rows
from tasync.console.ops_pages import OpsPages
from tasync.console.proxy_auth import ProxyAuth, UnknownProxyUser
from tasync.console.security import SecurityHeaders
from tasync.console.sessions import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    Sessions,
    csrf_ok,
    same_origin,
)
from tasync.console.traffic_pages import TrafficPages
from tasync.console.users import UsersFile
from tasync.web import WebPart

log = logging.getLogger("tasync.console")
#: The htmx vendored in ``static/`` (its version in the URL, so a new one is fetched anew).
HTMX_VERSION = "2.0.11"


class Console:
    """One console: its users, sessions, templates and view of the network.

    Args:
        settings: how to reach the broker.
        users: the users file.
        secure_cookie: mark the session cookie Secure even over plain HTTP (behind a proxy that
            terminates TLS); it is always Secure when the request came over HTTPS.
        timeout_s: how long to wait for nodes (status) and the master (configuration).
        poll_s: how often the network page refreshes itself.
        proxy_auth: believe a trusted reverse proxy's header naming the user
            (``tasync.console.proxy_auth``); None: password logins only.
    """

    def __init__(self, settings: Settings, users: UsersFile, *, secure_cookie: bool = False,
                 timeout_s: float = 2.0, poll_s: float = 2.0,
                 proxy_auth: ProxyAuth | None = None) -> None:
        self.settings = settings
        self.proxy_auth = proxy_auth
        self.users = users
        self.sessions = Sessions()
        self.secure_cookie = secure_cookie
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.status = StatusSource(settings, timeout_s=timeout_s)
        self.templates = Environment(loader=PackageLoader("tasync.console", "templates"),
                                     autoescape=True, undefined=StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["visible"] = visible
        self.templates.filters["when"] = when

    def routes(self) -> list[BaseRoute]:
        """The console's routes, relative to where it is mounted, with its headers on all."""
        config = ConfigPages(self)
        alerts = AlertPages(self)
        ops = OpsPages(self, self.status)
        routes: list[BaseRoute] = [
            Route("/", self._home, methods=["GET"]),
            Route("/login", self._login_page, methods=["GET"]),
            Route("/login", self._login, methods=["POST"]),
            Route("/logout", self.guard("viewer", self._logout), methods=["POST"]),
            Route("/network", self.guard("viewer", self._network), methods=["GET"]),
            Route("/network/live", self.guard("viewer", self._network_live), methods=["GET"]),
            *ImportPages(self).routes(),  # before /config/{kind}
            *config.routes(),
            *alerts.routes(),
            *ops.routes(),
            *TrafficPages(self).routes(),
            *HistoryPages(self, self.status).routes(),
            Mount("/static", app=StaticFiles(packages=[("tasync.console", "static")])),
        ]
        return [Mount("", routes=routes, middleware=[Middleware(SecurityHeaders)])]

    # -- rendering and guards

    def page(self, request: Request, template: str, status: int = 200, *,
             auth: Auth | None = None, **context: Any) -> HTMLResponse:
        """``template`` rendered for ``auth``'s user, with the session's messages shown once."""
        flash: list[str] = []
        if auth is not None:
            flash, auth.session.flash = auth.session.flash, []
        html = self.templates.get_template(template).render(
            base=base(request), auth=auth, flash=flash, htmx_version=HTMX_VERSION,
            poll_s=self.poll_s, kinds=kinds.KINDS, **context)
        return HTMLResponse(html, status_code=status)

    def auth(self, request: Request) -> Auth | None:
        """The request's session and user, or None (no session, ended, or user removed).

        Raises:
            UnknownProxyUser: a trusted proxy named a user the users file does not know.
        """
        if self.proxy_auth is not None:
            name = self.proxy_auth.user_name(request)
            if name is not None:
                return self._proxied(request, name)
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            return None
        user = self.users.get(session.user)
        if user is None:
            self.sessions.drop(session.token)
            return None
        return Auth(session, user)

    def _proxied(self, request: Request, name: str) -> Auth:
        """The user a trusted proxy names, in their session (made now when the cookie has none).

        A new session is sent back in the cookie (``_keep_session``), so the next request
        carries its CSRF token's session; the header's user always wins over the cookie's.
        """
        user = self.users.get(name)
        if user is None:
            log.warning("console: refused %r named by the proxy: not in the users file", name)
            raise UnknownProxyUser(f"the proxy names the user {name!r}, whom the console's "
                                   "users file does not know")
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None or session.user != user.name:
            session = self.sessions.create(user.name)
            request.state.new_session = session
            log.info("console: %r signed in by the proxy (%s)", user.name, user.role)
        return Auth(session, user)

    def _keep_session(self, request: Request, response: Response) -> Response:
        session = getattr(request.state, "new_session", None)
        if session is not None:
            self._set_cookie(request, response, session.token)
        return response

    def _set_cookie(self, request: Request, response: Response, token: str) -> None:
        response.set_cookie(COOKIE, token, path=base(request) or "/", httponly=True,
                            samesite="strict",
                            secure=self.secure_cookie or request.url.scheme == "https")

    def guard(self, role: str, handler: Handler, *, upload: bool = False) -> Endpoint:
        """``handler`` for users with ``role``; a POST also passes the origin and CSRF checks.

        With ``upload``, a POST may be a multipart form with a file (up to
        ``MAX_UPLOAD_BYTES``), read only once the user is known.
        """
        async def endpoint(request: Request) -> Response:
            return self._keep_session(request, await checked(request))

        async def checked(request: Request) -> Response:
            try:
                auth = self.auth(request)
            except UnknownProxyUser as exc:
                return self.page(request, "error.html", 403, title="Refused", message=str(exc))
            if auth is None:
                return self._to_login(request)
            if request.method == "POST":
                form = await read_form(request, max_upload_bytes=MAX_UPLOAD_BYTES
                                       if upload else 0)
                if not same_origin(dict(request.headers)):
                    return self._refused(request, auth, "a request from another site is "
                                                        "refused")
                if not csrf_ok(auth.session, form.get(CSRF_FIELD)
                               or request.headers.get(CSRF_HEADER)):
                    return self._refused(request, auth, "the form has expired or did not come "
                                                        "from this console: reload the page")
                request.state.form = form
            if not auth.user.may(role):
                return self._refused(request, auth, f"your role ({auth.user.role}) may not do "
                                                    f"this; it needs {role}")
            return await handler(request, auth)
        return endpoint

    def _refused(self, request: Request, auth: Auth, why: str) -> Response:
        log.warning("console: refused %s %s for %r: %s", request.method, request.url.path,
                    auth.user.name, why)
        return self.page(request, "error.html", 403, auth=auth, title="Refused", message=why)

    def _to_login(self, request: Request) -> Response:
        if request.headers.get("hx-request"):  # a page polling after its session ended
            return Response(status_code=200, headers={"HX-Redirect": base(request) + "/login"})
        if request.method == "POST":
            return self.page(request, "error.html", 403, title="Refused",
                             message="you are not logged in (or your session ended)")
        return RedirectResponse(base(request) + "/login", status_code=303)

    # -- login

    async def _home(self, request: Request) -> Response:
        return RedirectResponse(base(request) + "/network", status_code=303)

    async def _login_page(self, request: Request) -> Response:
        try:
            auth = self.auth(request)
        except UnknownProxyUser as exc:
            return self.page(request, "error.html", 403, title="Refused", message=str(exc))
        if auth is not None:
            return self._keep_session(
                request, RedirectResponse(base(request) + "/network", status_code=303))
        return self.page(request, "login.html", error=None, name="")

    async def _login(self, request: Request) -> Response:
        form = await read_form(request)
        if not same_origin(dict(request.headers)):
            return self.page(request, "error.html", 403, title="Refused",
                             message="a request from another site is refused")
        name = form.get("user", "")
        user = await run_in_threadpool(self.users.verify, name, form.get("password", ""))
        if user is None:
            log.warning("console: login refused for %r", name)
            return self.page(request, "login.html", 401, error="wrong name or password",
                             name=name)
        session = self.sessions.create(user.name)
        log.info("console: %r logged in (%s)", user.name, user.role)
        answer = RedirectResponse(base(request) + "/network", status_code=303)
        self._set_cookie(request, answer, session.token)
        return answer

    async def _logout(self, request: Request, auth: Auth) -> Response:
        self.sessions.drop(auth.session.token)
        log.info("console: %r logged out", auth.user.name)
        answer = RedirectResponse(base(request) + "/login", status_code=303)
        answer.delete_cookie(COOKIE, path=base(request) or "/", httponly=True,
                             samesite="strict")
        return answer

    # -- the network

    async def _network(self, request: Request, auth: Auth) -> Response:
        return self.page(request, "network.html", auth=auth, **await self._network_view())

    async def _network_live(self, request: Request, auth: Auth) -> Response:
        return self.page(request, "_network_live.html", auth=auth,
                         **await self._network_view())

    async def _network_view(self) -> dict[str, Any]:
        snap = await run_in_threadpool(self.status.get)
        if snap.report is None:
            return {"error": snap.error, "rows": [], "problems": [], "stranded": [],
                    "state": "unreachable", "code": 3}
        report = snap.report
        return {"error": None, "rows": view_rows(report), "stranded": report.stranded,
                "problems": [{"state": c.name.lower(), "what": w} for c, w in report.problems],
                "state": report.code.name.lower(), "code": int(report.code)}

    async def blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on a worker thread; a broker or network failure becomes ``NetworkTrouble``."""
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except RemoteError:
            raise
        except TasyncError as exc:
            raise NetworkTrouble(str(exc)) from None
        except RECOVERABLE as exc:
            raise NetworkTrouble.lost(exc) from None


def console_part(settings: Settings, users_file: Path, *, prefix: str = "",
                 secure_cookie: bool = False, timeout_s: float = 2.0,
                 poll_s: float = 2.0, proxy_auth: ProxyAuth | None = None) -> WebPart:
    """The console as a part of the web stack (``tasync.web.build_app``), mounted at ``prefix``.

    Beside the intake it is mounted at a prefix such as ``/console``; alone, at the root.
    """
    console = Console(settings, UsersFile(users_file), secure_cookie=secure_cookie,
                      timeout_s=timeout_s, poll_s=poll_s, proxy_auth=proxy_auth)
    return WebPart("console", console.routes(), prefix=prefix)
