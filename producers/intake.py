"""The HTTP intake: integrations post alerts over HTTP, the intake publishes them with confirms.

For systems that cannot run ``tasync send`` (a ticketing system's web hook, Prometheus
Alertmanager), ``tasync intake`` listens on a local port. A request is answered only after the
broker confirmed every alert in it (202 with their ids), so a 2xx means "will be delivered";
anything else means "not queued, try again": the caller's retry is safe because ids repeat.

Endpoints: ``POST /alerts`` (generic JSON), ``POST /alertmanager`` (Alertmanager webhook),
``GET /healthz``. Answers are JSON: ``{"ids": [...], "hosts": [...], "warnings": [...]}`` or
``{"error": "reason"}`` with 400 (bad input), 401 (token), 403 (allow-list), 404, 405, 411, 413
(too large), 503 (broker unreachable). Each source maps to a route (``--route-for
remedy=remedy``), so integrations need not know the servers' names.

The standard library server is enough here: each request is short and mostly waits on the
broker, and the process must stay small; threads serve requests, one lock guards the sender.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from broker.alerts import MAX_ALERT_BYTES, Alert, new_alert_id
from broker.allowlist import AllowList
from broker.errors import BrokerUnreachable, ConfigError, NoAnswer, PublishError
from producers.intake_formats import (
    AlertRequest,
    BadRequest,
    load_json,
    parse_alertmanager,
    parse_generic,
)
from producers.sender import AlertSender

log = logging.getLogger("tasync.intake")
DEFAULT_MAX_BODY = 1 << 20
#: A refused body is read on for at most this much and this long, so its sender sees the 413.
LINGER_MAX_BYTES = 16 << 20
LINGER_TIMEOUT_S = 2.0
ROUTE_CACHE_S = 10.0


@dataclass(frozen=True, kw_only=True)
class IntakeConfig:
    """How the intake maps sources to precedence lists and whom it accepts.

    Attributes:
        routes: source -> route name.
        default_route: route for sources without a mapping.
        default_hosts: precedence list for sources without a mapping or default route.
        max_body_bytes: larger requests get 413 without being parsed.
        token: when set, requests need ``Authorization: Bearer <token>`` (never logged).
        allow: when set, the client's address must be allowed (``telalert.hosts``).
    """

    routes: Mapping[str, str] = field(default_factory=dict)
    default_route: str | None = None
    default_hosts: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY
    token: str | None = field(default=None, repr=False)
    allow: AllowList | None = None


class HttpError(Exception):
    """An answer other than 202, with its status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Intake:
    """Turns HTTP requests into published alerts; independent of the HTTP server for tests.

    Args:
        config: the mapping and limits.
        sender: publishes the alerts; used under a lock because it is not thread-safe.
    """

    def __init__(self, config: IntakeConfig, sender: AlertSender) -> None:
        self.config = config
        self.sender = sender
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[float, tuple[str, ...]]] = {}

    def handle(self, method: str, target: str, body: bytes, *,
               headers: Mapping[str, str], client: str) -> tuple[int, dict[str, Any]]:
        """Answer one request: ``(status, JSON body)``; never raises."""
        try:
            return self._handle(method, target, body, headers=headers, client=client)
        except HttpError as exc:
            return exc.status, {"error": str(exc)}
        except (BadRequest, ConfigError) as exc:
            return 400, {"error": str(exc)}
        except (BrokerUnreachable, PublishError, NoAnswer) as exc:
            log.warning("could not queue alerts: %s", exc)
            return 503, {"error": f"alerts not queued, retry later: {exc}"}
        except Exception:
            log.exception("unexpected error handling %s %s", method, urlsplit(target).path)
            return 500, {"error": "internal error; see the intake's log"}

    def _handle(self, method: str, target: str, body: bytes, *, headers: Mapping[str, str],
                client: str) -> tuple[int, dict[str, Any]]:
        path = urlsplit(target).path.rstrip("/") or "/"
        query = dict(parse_qsl(urlsplit(target).query))
        if path == "/healthz":
            return 200, {"ok": True}
        if path not in ("/alerts", "/alert", "/alertmanager"):
            raise HttpError(404, f"no such endpoint {path}; use /alerts or /alertmanager")
        if method != "POST":
            raise HttpError(405, f"{path} takes POST")
        self._authorise(headers, client)
        data = load_json(body)
        if path == "/alertmanager":
            requests = parse_alertmanager(data, query=query)
        else:
            requests = parse_generic(data, query=query)
        alerts = [self._alert(r) for r in requests]
        with self._lock:
            result = self.sender.send_many(alerts)
        for warning in result.warnings:
            log.warning("%s", warning)
        return 202, {"ids": result.ids, "hosts": list(result.hosts),
                     "warnings": result.warnings}

    def _authorise(self, headers: Mapping[str, str], client: str) -> None:
        if self.config.allow is not None:
            decision = self.config.allow.check(client)
            if not decision:
                raise HttpError(403, f"client {client} not allowed: {decision.reason}")
        if self.config.token is not None:
            given = headers.get("authorization", "")
            expected = f"Bearer {self.config.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise HttpError(401, "missing or wrong bearer token")

    def _alert(self, request: AlertRequest) -> Alert:
        return Alert(id=request.id or new_alert_id(), source=request.source,
                     target_kind=request.target_kind, target=request.target, text=request.text,
                     subject=request.subject, priority=request.priority,
                     created_at=time.time(), hosts=self.hosts_for(request))

    def hosts_for(self, request: AlertRequest) -> tuple[str, ...]:
        """The precedence list: explicit hosts, the asked route, the source's route, defaults."""
        if request.hosts:
            return request.hosts
        route = request.route or self.config.routes.get(request.source) \
            or self.config.default_route
        if route:
            return self._route(route)
        if self.config.default_hosts:
            return self.config.default_hosts
        raise BadRequest(f"no route for source {request.source!r}: send 'route' or 'hosts', "
                         "or map the source with --route-for")

    def _route(self, name: str) -> tuple[str, ...]:
        cached = self._routes.get(name)
        if cached and time.monotonic() - cached[0] < ROUTE_CACHE_S:
            return cached[1]
        with self._lock:
            hosts = self.sender.resolve_route(name)
        self._routes[name] = (time.monotonic(), hosts)
        return hosts


def linger(handler: BaseHTTPRequestHandler, length: int) -> None:
    """Read and drop some of a refused body before closing (a "lingering close").

    A client still sending when the socket closes gets a reset instead of the 413 and its
    reason; reading on for a moment, within a bound, lets it read the answer.
    """
    remaining = min(length, LINGER_MAX_BYTES)
    handler.connection.settimeout(LINGER_TIMEOUT_S)
    with contextlib.suppress(OSError):
        while remaining > 0:
            chunk = handler.rfile.read1(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)


def make_handler(intake: Intake) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``intake``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "tasync-intake"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._serve(b"")

        def do_POST(self) -> None:
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                self._reply(411, {"error": "Content-Length required"})
                return
            try:
                length = int(length_header)
            except ValueError:
                self._reply(400, {"error": "invalid Content-Length"})
                return
            limit = min(intake.config.max_body_bytes, MAX_ALERT_BYTES * 1000)
            if length > limit or length < 0:
                self._reply(413, {"error": f"request of {length} bytes; the limit is {limit}"},
                            close=True)
                linger(self, length)
                return
            self._serve(self.rfile.read(length))

        def _serve(self, body: bytes) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, data = intake.handle(self.command, self.path, body, headers=headers,
                                         client=self.client_address[0])
            self._reply(status, data)

        def _reply(self, status: int, data: dict[str, Any], *, close: bool = False) -> None:
            payload = (json.dumps(data) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.client_address[0], format % args)

    return Handler


def make_server(intake: Intake, *, host: str, port: int) -> ThreadingHTTPServer:
    """A threaded HTTP server for ``intake``, bound but not yet serving."""
    server = ThreadingHTTPServer((host, port), make_handler(intake))
    server.daemon_threads = True
    return server
