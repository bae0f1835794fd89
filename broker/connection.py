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
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import amqp.exceptions
from kombu import Connection

from tasync.broker import topology
from tasync.broker.errors import AccessDenied, BrokerUnreachable, ConfigError, TopologyMissing
from tasync.broker.readahead import ReadAheadTransport
from tasync.broker.settings import Settings

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
    # server_hostname=None makes kombu put each URL's host here, and py-amqp checks the broker's
    # certificate against it; without the key py-amqp would accept any certificate the CA signed.
    opts: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    tls = settings.tls
    if tls.ca_file:
        opts["ca_certs"] = tls.ca_file
    if tls.cert_file:
        opts["certfile"] = tls.cert_file
        opts["keyfile"] = tls.key_file
    return opts


def make_connection(settings: Settings, *, name: str = "tasync",
                    heartbeat_s: float | None = None) -> Connection:
    """A kombu connection over all URLs, not yet connected.

    ``memory://`` URLs select the in-process broker of the unit tests (``tasync.broker.memory``):
    the same kombu connection, with channels that never leave the process.
    """
    return Connection(
        ";".join(settings.broker_urls),
        heartbeat=settings.heartbeat_s if heartbeat_s is None else heartbeat_s,
        connect_timeout=settings.connect_timeout_s,
        failover_strategy="round-robin",
        ssl=_ssl_options(settings),
        transport=_transport(settings),
        transport_options={"client_properties": {"connection_name": name}},
    )


def _transport(settings: Settings) -> Any:
    """The transport for the URLs: py-amqp's, reading ahead, or the in-process one.

    Raises:
        ConfigError: ``memory://`` mixed with broker URLs; one network is in one place.
    """
    memory = [url.startswith("memory://") for url in settings.broker_urls]
    if not any(memory):
        return ReadAheadTransport
    if not all(memory):
        raise ConfigError("memory:// (the in-process broker) cannot be mixed with other "
                          "broker URLs")
    from tasync.broker.memory import MemoryTransport  # only tests use it; nodes never load it

    return MemoryTransport


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
            # Each URL once, without kombu's own pause: ``Connection.connect()`` sleeps 2 s
            # before its second try, which made every command against a single down broker
            # take 2 s more per attempt than its budget says. The loop here does the waiting.
            conn.ensure_connection(max_retries=len(settings.broker_urls) - 1, interval_start=0,
                                   interval_step=0, interval_max=0,
                                   reraise_as_library_errors=False)
            return conn
        except (*RECOVERABLE, amqp.exceptions.AccessRefused) as exc:
            last = exc
            conn.release()
            if _permanent(exc):
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
    if isinstance(exc, amqp.exceptions.NotAllowed):
        return "access to the virtual host refused (check the vhost in the URL and the user's " \
               "permissions on it)"
    if isinstance(exc, ssl.SSLError):
        return _describe_tls(exc)
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


#: OpenSSL reasons that a retry cannot cure, with what the operator should do about them.
_TLS_ADVICE = {
    "CERTIFICATE_REQUIRED": "the broker requires a client certificate (give --cert-file and "
                            "--key-file, or $TASYNC_SSL_CERT_FILE and $TASYNC_SSL_KEY_FILE)",
    "UNKNOWN_CA": "the broker does not trust our client certificate (not signed by its CA)",
    "BAD_CERTIFICATE": "the broker refused our client certificate",
    "CERTIFICATE_EXPIRED": "a certificate has expired",
    "WRONG_VERSION_NUMBER": "the port does not speak TLS (plain amqp:// port?)",
}


def _describe_tls(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate was not accepted ({exc.verify_message}); check "
                "--ca-file and that the URL's host is named in the certificate")
    reason = str(exc.reason or "")
    if isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:
        return ("TLS: the broker closed the connection during the handshake (it did not accept "
                "our client certificate, or the port does not speak TLS)")
    for key, advice in _TLS_ADVICE.items():
        if key in reason:
            return f"TLS: {advice}"
    return f"TLS handshake failed ({reason or type(exc).__name__})"


def _permanent(exc: BaseException) -> bool:
    """Connection errors that retrying the same URLs cannot fix: fail at once instead."""
    if isinstance(exc, amqp.exceptions.AccessRefused | amqp.exceptions.NotAllowed):
        return True
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    return isinstance(exc, ssl.SSLError) and any(
        key in str(exc.reason or "") for key in ("CERTIFICATE_REQUIRED", "UNKNOWN_CA",
                                                 "BAD_CERTIFICATE", "WRONG_VERSION_NUMBER"))


def ensure(settings: Settings, fn: Callable[[Connection], T], *, name: str = "tasync",
           retry_s: float | None = None, conn: Connection | None = None) -> tuple[T, Connection]:
    """Run ``fn(conn)``, reconnecting and running it again after a connection loss.

    ``fn`` must be safe to repeat (tasync's publishes are idempotent by seq or alert id).
    Returns the result and the connection that produced it, which the caller keeps using.

    Raises:
        AccessDenied: the broker refused an operation for lack of permission; a retry would
            only be refused again, so it is not retried.
        TopologyMissing: an exchange does not exist (the virtual host has no topology):
            reconnecting cannot create it, so it is not retried either.
        BrokerUnreachable: no connection could be (re)established in time.
    """
    budget = settings.connect_retry_s if retry_s is None else retry_s
    deadline = time.monotonic() + budget
    delay = 0.1
    while True:
        if conn is None:
            conn = connect(settings, name=name, retry_s=max(0.0, deadline - time.monotonic()))
        try:
            return fn(conn), conn
        except amqp.exceptions.AccessRefused as exc:
            close_quietly(conn)
            raise AccessDenied(refusal(exc)) from None
        except amqp.exceptions.NotFound as exc:
            if "no exchange" not in str(exc):
                _lost(exc, conn, deadline, settings)
                conn, delay = None, _pause(delay)
                continue
            close_quietly(conn)
            raise (topology.missing_error(exc, settings.vhost)
                   or TopologyMissing(topology.setup_advice(settings.vhost, str(exc)))) from None
        except RECOVERABLE as exc:
            _lost(exc, conn, deadline, settings)
            conn, delay = None, _pause(delay)


def _lost(exc: BaseException, conn: Connection, deadline: float, settings: Settings) -> None:
    """Drop a connection ``ensure`` lost; give up when its budget is spent."""
    log.warning("connection lost (%s); reconnecting", describe(exc))
    close_quietly(conn)
    if time.monotonic() > deadline:
        raise BrokerUnreachable(
            f"broker unreachable at {settings.display_urls}: {describe(exc)}") from None


def _pause(delay: float) -> float:
    """Wait a little before reconnecting (no busy loop); returns the next, longer, wait."""
    time.sleep(delay)
    return min(delay * 2, 1.0)


def refusal(exc: amqp.exceptions.AccessRefused) -> str:
    """One line for a broker ``ACCESS_REFUSED``: what was refused to whom, and the remedy."""
    text = (str(exc).splitlines() or [""])[0]
    detail = text.split("ACCESS_REFUSED - ", 1)[-1].strip() or "access refused"
    return f"permission denied by the broker: {detail[:240]} (see `tasync broker setup --users`)"


#: SASL mechanisms that log in as the user name they carry; with any other (EXTERNAL takes the
#: name from the client certificate) the URL's user name may not be the authenticated user.
_NAMED_LOGINS = frozenset({"PLAIN", "AMQPLAIN"})


def connection_user(conn: Connection) -> str | None:
    """The broker user ``conn`` authenticated as, when that is certain; else ``None``.

    Publishers put it in the ``user_id`` property: RabbitMQ refuses a publish whose
    ``user_id`` is not the connection's user, so receivers can trust it as the sender's
    identity (docs/security.md). A wrong ``user_id`` would close the channel, so it is only
    set when every login mechanism the connection offered carries the same user name.
    """
    raw = getattr(conn, "connection", None)
    mechanisms = getattr(raw, "authentication", None)
    if not isinstance(mechanisms, tuple | list) or not mechanisms:
        return None
    names = set()
    for mechanism in mechanisms:
        kind = getattr(mechanism, "mechanism", b"")
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        user = getattr(mechanism, "username", None)
        if kind not in _NAMED_LOGINS or not user:
            return None
        names.add(user.decode() if isinstance(user, bytes) else str(user))
    return names.pop() if len(names) == 1 else None


def _socket_of(raw: Any) -> Any:
    """The socket of a py-amqp connection, or ``None`` once it is closed; never reconnects.

    py-amqp's ``transport`` property connects again when the connection has none (it warns
    that this is deprecated). After the broker closed a connection (a node shutting down, a
    forced close) py-amqp has already dropped its transport, so reading that property would
    open a new, never-used connection to the broker at every loss; ``_transport`` does not.
    """
    return getattr(getattr(raw, "_transport", None), "sock", None)


def close_quietly(conn: Connection | None, *, timeout_s: float = 2.0) -> None:
    """Close a connection that may already be broken, without ever hanging.

    The AMQP close handshake waits for the broker's ``close-ok`` with no timeout of its own; on
    a partitioned link it would wait forever. The socket gets a deadline first, and when the
    polite close fails the connection is dropped without a handshake.
    """
    if conn is None:
        return
    try:
        sock = _socket_of(getattr(conn, "_connection", None))
        if sock is not None:
            sock.settimeout(timeout_s)
        conn.release()
    except Exception:
        log.debug("closing politely failed; dropping the connection", exc_info=True)
        try:
            conn.collect()
        except Exception:
            log.debug("ignored error while dropping a connection", exc_info=True)


class BlockedGuard:
    """Gives up on a connection that the broker keeps blocked for longer than ``limit_s``.

    During a resource alarm (disk or memory) RabbitMQ stops reading from every connection that
    publishes, and says so with ``connection.blocked``. py-amqp's synchronous calls (opening a
    channel, declaring a queue) then wait for an answer without any deadline, so a client that
    has to end, such as ``tasync send``, would hang for as long as the alarm lasts. The guard
    starts a timer when the broker blocks the connection and stops it when the broker unblocks
    it; if the timer fires first, the guard shuts the socket down, the waiting read fails with
    a connection error, and ``expired`` tells the caller that the cause was the block.
    """

    def __init__(self, conn: Connection, limit_s: float) -> None:
        self.limit_s = limit_s
        self.expired = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        raw = getattr(conn, "connection", None)  # the py-amqp connection (already connected)
        self._sock = _socket_of(raw)
        if raw is not None:
            raw.on_blocked = self._on_blocked
            raw.on_unblocked = self._on_unblocked

    def _on_blocked(self, reason: str) -> None:
        log.warning("the broker blocks publishing on this connection (%s)", reason)
        with self._lock:
            if self._timer is None:
                self._timer = threading.Timer(self.limit_s, self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _on_unblocked(self) -> None:
        log.info("the broker unblocked this connection")
        self.cancel()

    def _expire(self) -> None:
        with self._lock:
            if self._timer is None:  # unblocked meanwhile
                return
            self._timer = None
            self.expired = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                log.debug("socket already closed", exc_info=True)

    def cancel(self) -> None:
        """Stop watching (unblocked, or the connection is being closed)."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
