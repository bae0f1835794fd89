"""Connections to the broker: kombu for URL failover and retries, py-amqp channels underneath.

kombu picks the next URL of a ``;``-separated list when one fails and retries with backoff; the
code above it talks to the raw py-amqp channel (``conn.channel()``) so that publisher confirms,
consumer priorities, stream offsets and direct reply-to are used exactly as RabbitMQ defines
them, with no framework in between.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

import amqp.exceptions
from kombu import Connection

from broker.errors import BrokerUnreachable
from broker.settings import Settings

log = logging.getLogger("tasync.broker")
T = TypeVar("T")

#: Errors after which a fresh connection (maybe to the next URL) may succeed.
RECOVERABLE: tuple[type[BaseException], ...] = (
    OSError,
    amqp.exceptions.ConnectionError,
    amqp.exceptions.RecoverableConnectionError,
    amqp.exceptions.RecoverableChannelError,
    amqp.exceptions.ConsumerCancelled,
    # A queue whose home node is still starting answers 404 for a moment after a restart.
    amqp.exceptions.ChannelError,
    ConnectionError,
)


def _ssl_options(settings: Settings) -> dict[str, Any] | bool:
    """TLS parameters when a URL is ``amqps://``: CA file and client certificate from settings."""
    if not any(u.startswith("amqps://") for u in settings.broker_urls):
        return False
    opts: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED}
    extra = settings.extra
    if extra.get("ssl_ca_file"):
        opts["ca_certs"] = extra["ssl_ca_file"]
    if extra.get("ssl_cert_file"):
        opts["certfile"] = extra["ssl_cert_file"]
        opts["keyfile"] = extra.get("ssl_key_file")
    return opts


def make_connection(settings: Settings, *, name: str = "tasync",
                    heartbeat_s: float | None = None) -> Connection:
    """A kombu connection over all URLs, not yet connected."""
    return Connection(
        ";".join(settings.broker_urls),
        heartbeat=settings.heartbeat_s if heartbeat_s is None else heartbeat_s,
        connect_timeout=settings.connect_timeout_s,
        failover_strategy="round-robin",
        ssl=_ssl_options(settings),
        transport_options={"client_properties": {"connection_name": name}},
    )


def connect(settings: Settings, *, name: str = "tasync", retry_s: float | None = None,
            heartbeat_s: float | None = None) -> Connection:
    """Connect to the first broker URL that answers, retrying for ``retry_s`` seconds.

    Raises:
        BrokerUnreachable: no URL answered in time; the message shows URLs without passwords.
    """
    budget = settings.connect_retry_s if retry_s is None else retry_s
    deadline = time.monotonic() + budget
    delay = 0.1
    last: BaseException | None = None
    while True:
        conn = make_connection(settings, name=name, heartbeat_s=heartbeat_s)
        try:
            conn.connect()
            return conn
        except (*RECOVERABLE, amqp.exceptions.AccessRefused) as exc:
            last = exc
            conn.release()
            if isinstance(exc, amqp.exceptions.AccessRefused):
                break
        if time.monotonic() + delay > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    raise BrokerUnreachable(
        f"broker unreachable at {settings.display_urls}: {describe(last)}"
    )


def describe(exc: BaseException | None) -> str:
    """A short, secret-free description of a connection error for people."""
    if exc is None:
        return "no attempt made"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, amqp.exceptions.AccessRefused):
        return "login refused (check user and password)"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def ensure(settings: Settings, fn: Callable[[Connection], T], *, name: str = "tasync",
           retry_s: float | None = None, conn: Connection | None = None) -> tuple[T, Connection]:
    """Run ``fn(conn)``, reconnecting and running it again after a connection loss.

    ``fn`` must be safe to repeat (tasync's publishes are idempotent by seq or alert id).
    Returns the result and the connection that produced it, which the caller keeps using.
    """
    budget = settings.connect_retry_s if retry_s is None else retry_s
    deadline = time.monotonic() + budget
    while True:
        if conn is None:
            conn = connect(settings, name=name, retry_s=max(0.0, deadline - time.monotonic()))
        try:
            return fn(conn), conn
        except RECOVERABLE as exc:
            log.warning("connection lost (%s); reconnecting", describe(exc))
            close_quietly(conn)
            conn = None
            if time.monotonic() > deadline:
                raise BrokerUnreachable(
                    f"broker unreachable at {settings.display_urls}: {describe(exc)}"
                ) from None


def close_quietly(conn: Connection | None) -> None:
    """Release a connection that may already be broken."""
    if conn is None:
        return
    try:
        conn.release()
    except Exception:
        log.debug("ignored error while closing a connection", exc_info=True)
