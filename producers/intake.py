"""The HTTP intake's work, apart from HTTP: who may post, what a body means, publishing it.

For systems that cannot run ``tasync send`` (a ticketing system's web hook, Prometheus
Alertmanager), ``tasync intake`` accepts alerts over HTTP. A request is answered only after the
broker confirmed every alert in it (202 with their ids), so a 2xx means "will be delivered";
anything else means "not queued, try again": the caller's retry is safe because ids repeat.
A request is never answered 2xx with some of its alerts left out: it is accepted whole or
refused whole.

This module knows nothing of the web framework: ``tasync.producers.intake_http`` maps its results
and errors onto HTTP (``BadRequest`` 400, ``TooLarge`` 413, ``PostRefused`` 401/403, broker trouble
503). Each source maps to a route (``--route-for remedy=remedy``), so integrations need not
know the servers' names.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tasync.broker.alerts import Alert, new_alert_id
from tasync.broker.allowlist import AllowList
from tasync.broker.audit import Trail
from tasync.broker.errors import BadRequest, ConfigError, NoAnswer, PostRefused
from tasync.broker.events import Event
from tasync.broker.settings import IntakeSettings
from tasync.producers.alertmanager import NotificationMemory, parse_alertmanager
from tasync.producers.intake_formats import AlertRequest, load_json, parse_generic
from tasync.producers.sender import SendResult

log = logging.getLogger("tasync.intake")


class Publisher(Protocol):
    """What the intake needs from the broker side (``SenderPool``; tests give a fake)."""

    def send_many(self, alerts: Sequence[Alert]) -> SendResult:
        """Publish with confirms; returns once the broker confirmed every alert."""

    def resolve_route(self, route: str) -> tuple[str, ...]:
        """The hosts of a named route."""


@dataclass(frozen=True, kw_only=True)
class IntakeConfig:
    """How the intake maps sources to precedence lists and whom it accepts.

    Attributes:
        routes: source -> route name.
        default_route: route for sources without a mapping.
        default_hosts: precedence list for sources without a mapping or default route.
        token: when set, requests need ``Authorization: Bearer <token>`` (never logged).
        allow: when set, the client's address must be allowed (``telalert.hosts``).
        limits: body and alert-count limits, timeouts (``IntakeSettings``).
    """

    routes: Mapping[str, str] = field(default_factory=dict)
    default_route: str | None = None
    default_hosts: tuple[str, ...] = ()
    token: str | None = field(default=None, repr=False)
    allow: AllowList | None = None
    limits: IntakeSettings = field(default_factory=IntakeSettings)


@dataclass(frozen=True)
class Accepted:
    """The answer to a request whose alerts the broker confirmed (202)."""

    ids: list[str]
    hosts: tuple[str, ...]
    warnings: list[str]

    def body(self) -> dict[str, Any]:
        """The JSON answer."""
        return {"ids": self.ids, "hosts": list(self.hosts), "warnings": self.warnings}


class Intake:
    """Turns request bodies into published alerts; safe to use from several threads.

    Args:
        config: the mapping and limits.
        publisher: publishes with confirms (a ``SenderPool``).
        trail: where notable events go (Alertmanager's left-out alerts), when given.
    """

    def __init__(self, config: IntakeConfig, publisher: Publisher, *,
                 trail: Trail | None = None) -> None:
        self.config = config
        self.publisher = publisher
        self.trail = trail
        self.memory = NotificationMemory(config.limits.retry_window_s)
        self._routes: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._routes_lock = threading.Lock()

    def authorise(self, headers: Mapping[str, str], client: str) -> None:
        """Check the allow-list and the bearer token.

        Raises:
            PostRefused: 403 for a client the allow-list refuses, 401 for a missing or wrong token.
        """
        if self.config.allow is not None:
            decision = self.config.allow.check(client)
            if not decision:
                raise PostRefused(403, f"client {client} not allowed: {decision.reason}")
        if self.config.token is not None:
            given = headers.get("authorization", "")
            expected = f"Bearer {self.config.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise PostRefused(401, "missing or wrong bearer token")

    def accept_generic(self, body: bytes, query: Mapping[str, str]) -> Accepted:
        """Publish the alerts of a ``POST /alerts`` body.

        Raises:
            BadRequest: invalid input (400). TooLarge: too many alerts (413).
            TasyncError: the broker did not take them (503, except ``ConfigError``: 400).
        """
        requests = parse_generic(load_json(body), query=query,
                                 max_alerts=self.config.limits.max_alerts)
        return self._publish([self._alert(r) for r in requests])

    def accept_alertmanager(self, body: bytes, query: Mapping[str, str]) -> Accepted:
        """Publish the alerts of an Alertmanager notification (``POST /alertmanager``)."""
        notification = parse_alertmanager(load_json(body), query=query, memory=self.memory)
        if notification.truncated:
            log.warning("Alertmanager left out %d alert(s) of group %s (receiver %s's "
                        "max_alerts)", notification.truncated, notification.group_key,
                        notification.receiver)
        accepted = self._publish([self._alert(r) for r in notification.requests])
        if notification.truncated and self.trail is not None:
            self.trail.event(Event.ALERTMANAGER_TRUNCATED, receiver=notification.receiver,
                             group=notification.group_key, sent=len(accepted.ids),
                             left_out=notification.truncated, retry=notification.retry)
        return accepted

    def _publish(self, alerts: list[Alert]) -> Accepted:
        # The sender checks every alert against the wire schema before it publishes the first
        # (a bad one is a InvalidObject: 400, nothing queued); checking here as well cost a
        # fifth of the intake's time.
        result = self.publisher.send_many(alerts)
        for warning in result.warnings:
            log.warning("%s", warning)
        return Accepted(ids=result.ids, hosts=result.hosts, warnings=result.warnings)

    def _alert(self, request: AlertRequest) -> Alert:
        return Alert(id=request.id or new_alert_id(), source=request.source,
                     target_kind=request.target_kind, target=request.target, text=request.text,
                     subject=request.subject, priority=request.priority,
                     created_at=time.time(), hosts=self.hosts_for(request),
                     labels=request.labels, annotations=request.annotations)

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
        """A route's hosts, asked again after ``route_cache_s``.

        When no node answers, the hosts last seen are used however old they are, and a route
        never seen is a 503 (retry), not a 400: Alertmanager drops a notification answered
        with a 4xx, and the route may well exist once a node is back.
        """
        with self._routes_lock:
            cached = self._routes.get(name)
        if cached and time.monotonic() - cached[0] < self.config.limits.route_cache_s:
            return cached[1]
        try:
            hosts = self.publisher.resolve_route(name)
        except ConfigError as exc:
            if "no node answered" not in str(exc):
                raise
            if cached:
                log.warning("no node answered for route %s; using its hosts seen before", name)
                return cached[1]
            raise NoAnswer(str(exc)) from None
        with self._routes_lock:
            self._routes[name] = (time.monotonic(), hosts)
        return hosts

