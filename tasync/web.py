"""tasync's web stack: one ASGI application (Starlette) that parts are mounted into, run by uvicorn.

The HTTP intake is the first part; the web console and the metrics can be mounted beside it.
A part brings its routes, its piece of the OpenAPI document and, optionally, a health report;
the application adds what every part shares:

* ``GET /healthz``: ``{"ok": true, ...}`` with each part's report (the intake says whether the
  broker takes alerts now);
* ``GET /openapi.json``: the OpenAPI 3.1 description of every part (``docs/openapi.json`` is
  the copy in the repository, kept equal by the tests);
* answers in JSON for unknown paths (404) and wrong methods (405).

Why Starlette on uvicorn: requests are served concurrently on one event loop, slow callers
cost no thread each, the server speaks HTTP/1.1 keep-alive properly and handles clients that
go away, and the same application can carry more routers later. The request work that blocks
(publishing with confirms) runs on worker threads from the intake's own routes.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from tasync.broker.errors import ConfigError
from tasync.producers.intake_http import JsonAnswer, error_answer

log = logging.getLogger("tasync.web")


@dataclass(frozen=True)
class WebPart:
    """Something served on the web stack.

    Attributes:
        name: its name in the health report.
        routes: its routes, below ``prefix``.
        openapi: its ``paths`` and ``components`` (paths relative to ``prefix``).
        prefix: where it is mounted (``""``: at the root).
        health: its part of ``/healthz``.
    """

    name: str
    routes: Sequence[BaseRoute]
    openapi: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = ""
    health: Callable[[], Mapping[str, Any]] | None = None


def _version() -> str:
    try:
        return version("tasync")
    except PackageNotFoundError:
        return "0"


def openapi_document(parts: Sequence[WebPart]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the application made of ``parts``."""
    paths: dict[str, Any] = {
        "/healthz": {"get": {
            "summary": "Whether the service runs, and what each part reports",
            "responses": {"200": {"description": "running", "content": {"application/json": {
                "schema": {"type": "object", "required": ["ok"],
                           "properties": {"ok": {"type": "boolean"}}}}}}}}},
    }
    components: dict[str, dict[str, Any]] = {}
    for part in parts:
        for path, item in part.openapi.get("paths", {}).items():
            paths[part.prefix + path] = item
        for section, entries in part.openapi.get("components", {}).items():
            components.setdefault(section, {}).update(entries)
    return {"openapi": "3.1.0",
            "info": {"title": "tasync", "version": _version(),
                     "description": "tasync's HTTP interface: the intake for alerts."},
            "paths": paths, "components": components}


def build_app(parts: Sequence[WebPart]) -> Starlette:
    """The ASGI application serving ``parts``, health and the OpenAPI description."""
    document = openapi_document(parts)
    known = sorted(p for p in document["paths"])

    async def healthz(_: Request) -> Response:
        report: dict[str, Any] = {"ok": True}
        for part in parts:
            if part.health is not None:
                report[part.name] = dict(part.health())
        return JsonAnswer(report)

    async def openapi(_: Request) -> Response:
        return JsonAnswer(document)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            return error_answer(404, f"no such endpoint {request.url.path}; endpoints: "
                                     f"{', '.join(known)}")
        if status == 405:
            allowed = exc.headers.get("Allow", "") if isinstance(exc, HTTPException) \
                and exc.headers else ""
            return error_answer(405, f"{request.url.path} takes {allowed or 'another method'}",
                                headers={"Allow": allowed} if allowed else None)
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return error_answer(status, str(detail))

    routes: list[BaseRoute] = [Route("/healthz", healthz, methods=["GET"]),
                               Route("/openapi.json", openapi, methods=["GET"])]
    for part in parts:
        routes += list(part.routes) if not part.prefix else [Mount(part.prefix,
                                                                   routes=list(part.routes))]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so that the port (0: any free one) is known before serving.

    Made with ``IPPROTO_TCP`` spelled out: asyncio switches Nagle's algorithm off
    (``TCP_NODELAY``) only on connections whose socket says so, and uvicorn writes an answer's
    headers and body separately, so with Nagle on every answer waited for the client's
    delayed ACK: 40 ms a request.

    Raises:
        ConfigError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def serve(app: Starlette, sock: socket.socket, *, log_level: str = "warning",
          proxy_headers: bool = False) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT, which stop it gracefully.

    By default each request's client is the TCP peer, whatever ``X-Forwarded-For`` says:
    the intake's allow-list and the console's proxy authentication judge the peer, and any
    local process could otherwise claim another address (uvicorn believes the header from
    loopback peers). ``proxy_headers=True`` takes uvicorn's behaviour back (the console
    without proxy authentication, for ``X-Forwarded-Proto`` behind a TLS proxy).
    """
    config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=False,
                            lifespan="off", server_header=False, timeout_graceful_shutdown=5,
                            proxy_headers=proxy_headers)
    uvicorn.Server(config).run(sockets=[sock])


def main() -> None:
    """Print the OpenAPI document of the intake (``docs/openapi.json`` is this output)."""
    from tasync.producers.intake_http import openapi_paths

    document = openapi_document([WebPart("intake", [], openapi_paths())])
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
