"""The intake's way to the broker: a few senders side by side, and a circuit for outages.

``AlertSender`` keeps one connection and is not thread-safe, and one sender behind a lock made
concurrent requests queue: while the broker was away, each waited for the one before it to
time out. ``SenderPool`` lends each request one of ``senders`` senders, each on its own
connection, so requests publish side by side and the broker's confirms of one do not wait for
another's.

``BrokerCircuit`` remembers that the broker is away. Once a send finds it unreachable, or the
virtual host without tasync's topology, the circuit opens: every request is answered 503 at
once, without a connection attempt, while one background thread tries the broker every
``probe_interval_s``. When the probe succeeds the circuit closes and requests publish again.
So a caller always hears "not queued, retry after N s" within a connect timeout, and the
broker is not hammered by each caller's retries.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from tasync.broker import topology
from tasync.broker.alerts import Alert
from tasync.broker.connection import RECOVERABLE, close_quietly, connect, describe
from tasync.broker.errors import (
    BrokerUnreachable,
    IntakeBusy,
    PublishError,
    TasyncError,
    TopologyMissing,
)
from tasync.broker.settings import Settings
from tasync.producers.sender import AlertSender, SendResult

log = logging.getLogger("tasync.intake")
T = TypeVar("T")


def probe_broker(settings: Settings) -> TasyncError | None:
    """Connect once and check the alert path: None when alerts can be sent, else why not."""
    try:
        conn = connect(settings, name="tasync-intake-probe", retry_s=0.0)
    except BrokerUnreachable as exc:
        return exc
    try:
        missing = topology.missing_for_alerts(conn)
    except Exception as exc:  # the connection dropped while checking: still unreachable
        return BrokerUnreachable(f"broker unreachable at {settings.display_urls}: {exc}")
    finally:
        close_quietly(conn)
    if missing:
        return TopologyMissing(topology.setup_advice(settings.vhost, missing))
    return None


class BrokerCircuit:
    """Open while the broker is away; a background probe closes it again.

    Args:
        probe: None when the broker can take alerts, else the error to answer with.
        probe_interval_s: pause between two probes while open.
    """

    def __init__(self, probe: Callable[[], TasyncError | None], *,
                 probe_interval_s: float) -> None:
        self.probe = probe
        self.probe_interval_s = probe_interval_s
        self._error: TasyncError | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def error(self) -> TasyncError | None:
        """Why the circuit is open, or None while it is closed."""
        return self._error

    def check(self) -> None:
        """Raise the reason the circuit is open; return at once when it is closed."""
        error = self._error
        if error is not None:
            raise error

    def trip(self, error: TasyncError) -> None:
        """Open the circuit (or keep it open with a newer reason) and start probing."""
        with self._lock:
            if self._error is None:
                log.warning("broker not available, answering 503 until it is: %s", error)
            self._error = error
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._probe_loop, daemon=True,
                                                name="intake-broker-probe")
                self._thread.start()

    def start(self) -> None:
        """Probe once in the background, so a broker away at start is known at once."""
        self.suspect()

    def suspect(self) -> None:
        """Probe once in the background and open the circuit if the broker is away.

        For failures that may or may not be the broker's absence (a confirm that never came:
        a silent partition, or a broker slow under load): the request that saw it is answered
        at once, and the probe decides for the requests after it.
        """
        if self._error is None:
            threading.Thread(target=self._probe_once, daemon=True, name="intake-probe").start()

    def _probe_once(self) -> None:
        error = self.probe()
        if error is not None:
            self.trip(error)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_interval_s):
            error = self.probe()
            with self._lock:
                if error is None:
                    log.warning("broker available again; accepting alerts")
                    self._error, self._thread = None, None
                    return
                self._error = error

    def close(self) -> None:
        """Stop probing."""
        self._stop.set()


class SenderPool:
    """Lends one of several ``AlertSender`` (each its own connection) to each request.

    Args:
        make_sender: builds one sender (called lazily, up to ``size`` times).
        size: how many senders publish side by side.
        circuit: consulted before each use, tripped when the broker is found away.
        wait_s: how long a request waits for a free sender before ``IntakeBusy``.
    """

    def __init__(self, make_sender: Callable[[], AlertSender], *, size: int,
                 circuit: BrokerCircuit, wait_s: float) -> None:
        self.circuit = circuit
        self.wait_s = wait_s
        self._idle: queue.LifoQueue[AlertSender | None] = queue.LifoQueue()
        self._make = make_sender
        self._all: list[AlertSender] = []
        self._lock = threading.Lock()
        for _ in range(size):
            self._idle.put(None)  # a slot whose sender is made on first use

    def send_many(self, alerts: Sequence[Alert]) -> SendResult:
        """Publish with confirms on a free sender (``AlertSender.send_many``)."""
        return self._with_sender(lambda sender: sender.send_many(alerts))

    def resolve_route(self, route: str) -> tuple[str, ...]:
        """A route's hosts (``AlertSender.resolve_route``)."""
        return self._with_sender(lambda sender: sender.resolve_route(route))

    def _take(self) -> AlertSender:
        """A free sender; gives up when the circuit opens meanwhile or the wait runs out."""
        waited = 0.0
        step = 0.05
        while True:
            self.circuit.check()
            try:
                slot = self._idle.get(timeout=step)
            except queue.Empty:
                waited += step
                if waited >= self.wait_s:
                    raise IntakeBusy(f"every broker connection stayed busy for {self.wait_s:g} s"
                               ) from None
                continue
            if slot is not None:
                return slot
            sender = self._make()
            with self._lock:
                self._all.append(sender)
            return sender

    def _with_sender(self, use: Callable[[AlertSender], T]) -> T:
        sender = self._take()
        try:
            self.circuit.check()
            return use(sender)
        except BrokerUnreachable as exc:
            sender.close()
            error = self._explain(exc)
            self.circuit.trip(error)
            raise error from None
        except TopologyMissing as exc:  # the same words as the probe's and the CLI's
            sender.close()
            self.circuit.trip(exc)
            raise
        except PublishError:
            sender.close()  # its connection may be the silent one: the next use opens another
            self.circuit.suspect()
            raise
        except RECOVERABLE as exc:
            # The broker closed the channel or the connection under the sender (a 404 of an
            # exchange a vhost without the topology lacks, a broker going away): say why, as
            # a reason the route answers 503 with, never as an unexpected error.
            sender.close()
            why = self.circuit.probe()
            if why is None:
                self.circuit.suspect()
                raise PublishError(f"the broker dropped the sender's channel "
                                   f"({describe(exc)})") from None
            self.circuit.trip(why)
            raise why from None
        finally:
            self._idle.put(sender)

    def _explain(self, exc: BrokerUnreachable) -> TasyncError:
        """A broker that answers "no such exchange" is reachable: it lacks the topology."""
        if "NOT_FOUND" not in str(exc):
            return exc
        return self.circuit.probe() or exc

    def close(self) -> None:
        """Stop probing and close every sender's connection."""
        self.circuit.close()
        with self._lock:
            senders, self._all = self._all, []
        for sender in senders:
            sender.close()
