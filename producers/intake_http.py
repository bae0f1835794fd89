"""The intake's HTTP routes (Starlette), mountable in any tasync web application.

``routes(intake)`` gives ``POST /alerts``, ``POST /alertmanager`` and ``openapi_paths()`` their
OpenAPI description; ``tasync.web`` assembles them with the other parts of the web stack and
serves them with uvicorn. The work itself (parsing, checking, publishing) runs on a worker
thread, so the event loop keeps serving other requests while one waits for the broker's
confirms, and no request waits for another's.

Answers are JSON: 202 ``{"ids": [...], "hosts": [...], "warnings": [...]}``, else
``{"error": "reason"}`` with 400 (bad input), 401 (token), 403 (allow-list), 413 (too large:
split the request), 503 with ``Retry-After`` (the broker cannot take the alerts now), 500 (a
bug; see the intake's log).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive

from tasync.broker.errors import BadRequest, ConfigError, PostRefused, TasyncError, TooLarge
from tasync.producers.intake import Accepted, Intake

log = logging.getLogger("tasync.intake")

#: A refused body is read on for at most this much and this long (a "lingering close"), so a
#: client still sending sees the answer instead of a connection reset.
LINGER_MAX_BYTES = 16 << 20
LINGER_TIMEOUT_S = 2.0


class JsonAnswer(Response):
    """A JSON answer a person can read with curl: spaced, one line, a newline at the end."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """``content`` as JSON text."""
        return (json.dumps(content, ensure_ascii=False) + "\n").encode()


def error_answer(status: int, reason: str, *, headers: Mapping[str, str] | None = None
                 ) -> JsonAnswer:
    """``{"error": reason}`` with ``status``."""
    return JsonAnswer({"error": reason}, status_code=status, headers=dict(headers or {}))


async def _read_body(receive: Receive, *, declared: int | None, limit: int) -> bytes:
    """The whole body, or ``TooLarge`` once it passes ``limit`` (after draining the rest)."""
    if declared is not None and declared > limit:
        await _drain(receive, 0)
        raise TooLarge(f"request of {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            raise BadRequest("the client went away before the body was complete")
        chunk = message.get("body", b"")
        more = bool(message.get("more_body", False))
        size += len(chunk)
        if size > limit:
            if more:
                await _drain(receive, size)
            raise TooLarge(f"request of more than {limit} bytes; the limit is {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(receive: Receive, already: int) -> None:
    """Read and drop what the client still sends, within ``LINGER_*``."""
    with anyio.move_on_after(LINGER_TIMEOUT_S):
        while already < LINGER_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            already += len(message.get("body", b""))


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("invalid Content-Length")
    return int(value)


def routes(intake: Intake) -> list[BaseRoute]:
    """The intake's routes, bound to ``intake``."""

    async def serve(request: Request, accept: Callable[[bytes, Mapping[str, str]], Accepted]
                    ) -> Response:
        limits = intake.config.limits
        try:
            declared = _declared_length(request)
            try:
                intake.authorise(request.headers, request.client.host if request.client else "")
            except PostRefused as exc:
                await _drain(request.receive, 0)
                return error_answer(exc.status, str(exc))
            body = await _read_body(request.receive, declared=declared,
                                    limit=limits.max_body_bytes)
            query = dict(request.query_params)
            accepted = await anyio.to_thread.run_sync(accept, body, query)
        except TooLarge as exc:
            return error_answer(413, str(exc), headers={"Connection": "close"})
        except (BadRequest, ConfigError) as exc:
            return error_answer(400, str(exc))
        except TasyncError as exc:
            log.warning("could not queue alerts: %s", exc)
            return error_answer(503, f"alerts not queued, retry later: {exc}",
                                headers={"Retry-After": str(limits.retry_after_s)})
        except Exception:
            log.exception("unexpected error handling %s %s", request.method, request.url.path)
            return error_answer(500, "internal error; see the intake's log")
        return JsonAnswer(accepted.body(), status_code=202)

    async def alerts(request: Request) -> Response:
        return await serve(request, intake.accept_generic)

    async def alertmanager(request: Request) -> Response:
        return await serve(request, intake.accept_alertmanager)

    return [Route("/alerts", alerts, methods=["POST"]),
            Route("/alert", alerts, methods=["POST"], include_in_schema=False),
            Route("/alertmanager", alertmanager, methods=["POST"])]


def health(intake_error: Callable[[], TasyncError | None]) -> Callable[[], dict[str, Any]]:
    """The intake's part of ``GET /healthz``: whether the broker takes alerts now."""
    def report() -> dict[str, Any]:
        error = intake_error()
        return {"broker": "ok" if error is None else str(error)}
    return report


# -- OpenAPI -------------------------------------------------------------------------------------

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME = {"type": "string", "minLength": 1, "maxLength": 128}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, **extra,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_ANSWERS = {
    "202": {"description": "every alert confirmed by the broker: it will be delivered",
            "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Accepted"}}}},
    "400": _error("invalid input, named in the message; nothing was queued"),
    "401": _error("missing or wrong bearer token"),
    "403": _error("the client's address is not on the allow-list"),
    "413": _error("the request is larger than the intake takes at once: split it"),
    "503": _error("the broker cannot take alerts now; nothing was queued, retry after the "
                  "given seconds (retries are safe: ids repeat)",
                  headers={"Retry-After": {"schema": {"type": "integer"},
                                           "description": "seconds to wait"}}),
    "500": _error("a bug; see the intake's log"),
}


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string"}}


_QUERY = [_query("destination", "deliver to this destination (if the body names none)"),
          _query("group", "deliver to this group (instead of a destination)"),
          _query("source", "who sends the alerts; maps to a route with --route-for"),
          _query("route", "a named route (precedence list of servers)")]

_ALERT_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["source"],
    "properties": {
        "source": {"type": "string", "description": "who sends it; totals are per source"},
        "destination": {**_NAME, "description": "a destination's name (or give group)"},
        "group": {**_NAME, "description": "a group's name (or give destination)"},
        "message": {"type": "string", "description": "the alert text (or text)"},
        "text": {"type": "string", "description": "the alert text (or message)"},
        "subject": {"type": "string", "maxLength": 512,
                    "description": "a one-line title; no control characters"},
        "id": {"type": "string", "description": "idempotency key, 1-128 printable characters"},
        "priority": {"type": "integer", "minimum": 0, "maximum": 9},
        "route": {"type": "string", "description": "a named route"},
        "hosts": {"type": "array", "items": {"type": "string"},
                  "description": "an explicit precedence list of node names"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
}

_AM_ALERT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["firing", "resolved"]},
        "labels": _STRINGS, "annotations": _STRINGS,
        "startsAt": {"type": "string"}, "endsAt": {"type": "string"},
        "generatorURL": {"type": "string"}, "fingerprint": {"type": "string"},
    },
}

_AM_NOTIFICATION: dict[str, Any] = {
    "type": "object", "required": ["alerts"],
    "properties": {
        "version": {"type": "string"}, "groupKey": {"type": "string"},
        "truncatedAlerts": {"type": "integer", "minimum": 0},
        "status": {"type": "string", "enum": ["firing", "resolved"]},
        "receiver": {"type": "string"}, "groupLabels": _STRINGS, "commonLabels": _STRINGS,
        "commonAnnotations": _STRINGS, "externalURL": {"type": "string"},
        "alerts": {"type": "array", "minItems": 1,
                   "items": {"$ref": "#/components/schemas/AlertmanagerAlert"}},
    },
}


def _post(summary: str, schema_ref: str, description: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "description": description, "parameters": _QUERY,
        "security": [{}, {"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": schema_ref}}}},
        "responses": _ANSWERS}}


def openapi_paths() -> dict[str, Any]:
    """The intake's part of the OpenAPI document: ``paths`` and ``components``."""
    return {
        "paths": {
            "/alerts": _post(
                "Queue one alert or a list of alerts", "#/components/schemas/AlertsRequest",
                "Answers once the broker confirmed every alert (202), or refuses the whole "
                "request; a retry is safe when the alerts carry ids."),
            "/alertmanager": _post(
                "Queue an Alertmanager webhook notification",
                "#/components/schemas/AlertmanagerNotification",
                "Each alert of the notification becomes one tasync alert. A retry of the same "
                "notification keeps its ids; a reminder after repeat_interval gets new ones."),
        },
        "components": {
            "schemas": {
                "Alert": _ALERT_SCHEMA,
                "AlertsRequest": {"oneOf": [
                    {"$ref": "#/components/schemas/Alert"},
                    {"type": "array", "minItems": 1,
                     "items": {"$ref": "#/components/schemas/Alert"}}]},
                "AlertmanagerAlert": _AM_ALERT,
                "AlertmanagerNotification": _AM_NOTIFICATION,
                "Accepted": {"type": "object", "required": ["ids", "hosts", "warnings"],
                             "properties": {
                                 "ids": {"type": "array", "items": {"type": "string"}},
                                 "hosts": {"type": "array", "items": {"type": "string"}},
                                 "warnings": {"type": "array", "items": {"type": "string"}}}},
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
