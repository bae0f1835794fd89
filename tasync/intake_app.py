"""Wiring of the HTTP intake: its senders, its broker circuit and its part of the web stack.

``tasync intake``, the tests and the benchmark build the intake the same way here, so what is
measured and tested is what runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tasync.broker.audit import Trail
from tasync.broker.settings import Settings
from tasync.broker.signing import KeyRing
from tasync.producers import intake_http
from tasync.producers.intake import Intake, IntakeConfig
from tasync.producers.intake_pool import BrokerCircuit, SenderPool, probe_broker
from tasync.producers.sender import AlertSender
from tasync.web import WebPart


@contextmanager
def open_intake(config: IntakeConfig, settings: Settings, *, keyring: KeyRing | None = None,
                trail: Trail | None = None) -> Iterator[WebPart]:
    """The intake as a web part, its broker connections closed on exit.

    The broker is probed in the background at once, so an intake started while the broker is
    away (or its virtual host lacks the topology) answers 503 from its first request on.
    """
    broker = config.limits.broker(settings)
    circuit = BrokerCircuit(lambda: probe_broker(broker),
                            probe_interval_s=config.limits.probe_interval_s)
    pool = SenderPool(lambda: AlertSender(broker, keyring=keyring, name="intake"),
                      size=config.limits.senders, circuit=circuit,
                      wait_s=config.limits.sender_wait_s)
    service = Intake(config, pool, trail=trail)
    circuit.start()
    try:
        yield WebPart("intake", intake_http.routes(service), intake_http.openapi_paths(),
                      health=intake_http.health(lambda: circuit.error))
    finally:
        pool.close()
        if trail is not None:
            trail.close()
