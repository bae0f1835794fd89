"""A consumer base with a reconnect loop, and the waiting helpers built on the same draining.

Each long-lived consumer of a node owns one connection and one thread: a stream error closes
the whole connection, and a consumer blocked in a slow handler must not delay
another's heartbeats. ``run`` connects, lets the subclass declare and subscribe, and drains
events until asked to stop; after a connection loss it reconnects with backoff, forever, so a
worker never needs a manual restart after a broker outage.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from typing import Any

import amqp.exceptions
from kombu import Connection

from tasync.broker.connection import RECOVERABLE, close_quietly, connect, describe, refusal
from tasync.broker.errors import BrokerUnreachable, MessageError, TopologyMissing
from tasync.broker.settings import Settings

log = logging.getLogger("tasync.broker")


def message_body(message: Any) -> bytes:
    """A received message's body as the bytes that were published.

    py-amqp hands a body over as ``str`` when the publisher set ``content_encoding`` (it
    decodes it), and as ``''`` when the body is empty; both are up to whoever publishes, so
    every consumer reads bodies through here instead of trusting their type. Encoding the
    text again with the publisher's encoding gives back the signed bytes.

    Raises:
        MessageError: the body cannot be turned back into bytes (quarantine it).
    """
    body = message.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        encoding = (getattr(message, "properties", None) or {}).get("content_encoding")
        try:
            return body.encode(encoding or "utf-8", "surrogateescape")
        except (LookupError, UnicodeError):
            raise MessageError(f"undecodable body (content_encoding {encoding!r})") from None
    try:
        return bytes(body)
    except TypeError:
        raise MessageError(f"unreadable body of type {type(body).__name__}") from None


class ConsumerLoop:
    """Subclasses implement ``setup`` (declare, ``basic_consume``) and may override the hooks.

    Attributes:
        name: the thread and connection name, shown in logs and the broker's connection list.
        connected: set while a connection is up and subscribed.
    """

    name = "consumer"
    poll_s = 0.5

    def __init__(self, settings: Settings, *, prefetch: int | None = None,
                 heartbeat_s: float | None = None) -> None:
        self.settings = settings
        self.prefetch = settings.prefetch if prefetch is None else prefetch
        #: This loop's connection heartbeat (default: the settings'); a loop whose silence
        #: must be noticed sooner than others' (alert delivery) has a shorter one.
        self.heartbeat_s = settings.heartbeat_s if heartbeat_s is None else heartbeat_s
        self.conn: Connection | None = None
        self.channel: Any = None
        self.connected = threading.Event()
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    # -- hooks --------------------------------------------------------------------------------

    def setup(self, channel: Any) -> None:
        """Declare what this consumer needs and subscribe; called after every (re)connect."""
        raise NotImplementedError

    def on_connected(self) -> None:
        """Called once subscribed, in the consumer's thread."""

    def on_idle(self) -> None:
        """Called about every ``poll_s`` seconds in the consumer's thread."""

    def on_disconnected(self, reason: str) -> None:
        """Called after a connection loss, before the reconnect."""

    # -- loop ---------------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Run the loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the loop to stop and wait for its thread."""
        self.stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def run(self) -> None:
        """Connect, subscribe and drain until stopped; reconnect after every loss."""
        delay = 0.1
        troubled = False  # a problem was logged since the last good connection
        while not self.stop_event.is_set():
            try:
                self.conn = connect(self.settings, name=self.name, retry_s=5.0,
                                    heartbeat_s=self.heartbeat_s)
            except BrokerUnreachable as exc:
                log.warning("%s: %s; retrying", self.name, exc, extra={"problem": str(exc)})
                troubled = True
                self.stop_event.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            try:
                self.channel = self.conn.channel()
                self.channel.basic_qos(0, self.prefetch, False)
                self.setup(self.channel)
                self.connected.set()
                delay = 0.1
                if troubled:
                    log.info("%s: connected to the broker again", self.name,
                             extra={"resolved": True})
                    troubled = False
                self.on_connected()
                self._drain_until_stopped()
            except TopologyMissing as exc:  # waits for `tasync broker setup`, said plainly
                log.warning("%s: %s; retrying", self.name, exc, extra={"problem": str(exc)})
                troubled = True
                self.on_disconnected(str(exc))
            except RECOVERABLE as exc:
                reason = (refusal(exc) if isinstance(exc, amqp.exceptions.AccessRefused)
                          else describe(exc))
                log.warning("%s: connection lost (%s); reconnecting", self.name, reason,
                            extra={"problem": reason})
                troubled = True
                self.on_disconnected(reason)
            except Exception as exc:
                log.exception("%s: unexpected error; reconnecting", self.name)
                troubled = True
                self.on_disconnected(describe(exc))
                delay = 2.0
            finally:
                self.connected.clear()
                close_quietly(self.conn)
                self.conn = self.channel = None
            # A lost connection's py-amqp objects (connection, channels, transport, their
            # callbacks) refer to each other: only the cycle collector frees them, and an idle
            # worker may not run it for a long time (40 reconnects of an idle backup kept about
            # 4 MB). A reconnect is rare and a collection costs milliseconds.
            gc.collect()
            self.stop_event.wait(delay)

    def _drain_until_stopped(self) -> None:
        assert self.conn is not None
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=self.poll_s)
            self.conn.heartbeat_check()
            self.on_idle()

    def cancelled(self, consumer_tag: str) -> None:
        """The broker cancelled our subscription (queue deleted): reconnect and declare again."""
        raise ConnectionError(f"subscription {consumer_tag} cancelled by the broker")
