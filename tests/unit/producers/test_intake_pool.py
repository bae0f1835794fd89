"""The intake's sender pool and broker circuit, with fake senders (pure logic, no broker)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from tasync.broker import topology
from tasync.broker.alerts import Alert
from tasync.broker.errors import (
    BrokerUnreachable,
    IntakeBusy,
    PublishError,
    TasyncError,
    TopologyMissing,
)
from tasync.producers.intake_pool import BrokerCircuit, SenderPool
from tasync.producers.sender import AlertSender, SendResult
from tests.waiting import wait_for

ALERT = Alert(id="a1", source="s", target_kind="destination", target="d", text="t",
              hosts=("a",))


class FakeSender:
    def __init__(self, inside: threading.Barrier | None = None,
                 fail: Exception | None = None) -> None:
        self.inside = inside
        self.fail = fail
        self.closed = 0

    def send_many(self, alerts: Sequence[Alert]) -> SendResult:
        if self.fail is not None:
            raise self.fail
        if self.inside is not None:
            self.inside.wait(timeout=5)  # BrokenBarrierError unless all arrive together
        return SendResult(ids=[a.id for a in alerts], hosts=("a",))

    def resolve_route(self, route: str) -> tuple[str, ...]:
        return ("a",)

    def close(self) -> None:
        self.closed += 1


class Probe:
    def __init__(self, answers: list[TasyncError | None],
                 then: TasyncError | None = None) -> None:
        self.answers = answers
        self.then = then
        self.calls = 0

    def __call__(self) -> TasyncError | None:
        self.calls += 1
        return self.answers.pop(0) if self.answers else self.then


def pool(senders: list[FakeSender], probe: Probe | None = None, *, wait_s: float = 5.0
         ) -> SenderPool:
    made = iter(senders)
    circuit = BrokerCircuit(probe or Probe([]), probe_interval_s=0.01)
    return SenderPool(lambda: cast(AlertSender, next(made)), size=len(senders),
                      circuit=circuit, wait_s=wait_s)


def test_requests_publish_side_by_side_not_one_after_another() -> None:
    inside = threading.Barrier(4)
    senders = pool([FakeSender(inside) for _ in range(4)])
    with ThreadPoolExecutor(4) as threads:
        results = list(threads.map(lambda _: senders.send_many([ALERT]), range(4)))
    assert [r.ids for r in results] == [["a1"]] * 4


def test_a_busy_pool_answers_busy_after_its_wait() -> None:
    release = threading.Event()

    class Slow(FakeSender):
        def send_many(self, alerts: Sequence[Alert]) -> SendResult:
            release.wait(5)
            return super().send_many(alerts)

    senders = pool([Slow()], wait_s=0.2)
    with ThreadPoolExecutor(2) as threads:
        first = threads.submit(senders.send_many, [ALERT])
        wait_for(lambda: senders._idle.empty(), what="the only sender in use")
        with pytest.raises(IntakeBusy):
            senders.send_many([ALERT])
        release.set()
        assert first.result().ids == ["a1"]


def test_an_unreachable_broker_opens_the_circuit_until_a_probe_succeeds() -> None:
    down = BrokerUnreachable("broker unreachable at amqp://x: refused")
    sender = FakeSender(fail=down)
    probe = Probe([down, down])
    senders = pool([sender], probe)
    with pytest.raises(BrokerUnreachable):
        senders.send_many([ALERT])
    assert sender.closed == 1 and senders.circuit.error is down
    sender.fail = None
    with pytest.raises(BrokerUnreachable):  # answered from the circuit, no connection tried
        senders.send_many([ALERT])
    wait_for(lambda: senders.circuit.error is None, what="the probe closing the circuit")
    assert probe.calls == 3 and senders.send_many([ALERT]).ids == ["a1"]
    senders.close()


def test_a_broker_without_the_topology_is_told_apart_from_an_unreachable_one() -> None:
    missing = TopologyMissing(topology.setup_advice("x", "exchange tasync.alerts"))
    sender = FakeSender(fail=BrokerUnreachable(
        "broker unreachable at amqp://x: Basic.publish: (404) NOT_FOUND - no exchange"))
    senders = pool([sender], Probe([missing, missing]))
    with pytest.raises(TopologyMissing, match="tasync broker setup"):
        senders.send_many([ALERT])
    senders.close()


def test_a_confirm_that_never_came_drops_the_connection_and_probes() -> None:
    sender = FakeSender(fail=PublishError("not confirmed within 5 s"))
    down = BrokerUnreachable("broker unreachable at amqp://x: timed out")
    senders = pool([sender], Probe([], then=down))
    with pytest.raises(PublishError):
        senders.send_many([ALERT])
    assert sender.closed == 1
    wait_for(lambda: senders.circuit.error is down, what="the probe opening the circuit")
    senders.close()


def test_waiting_requests_are_released_when_the_circuit_opens() -> None:
    gate = threading.Event()

    class Hanging(FakeSender):
        def send_many(self, alerts: Sequence[Alert]) -> Any:
            gate.wait(5)
            raise BrokerUnreachable("broker unreachable at amqp://x: refused")

    senders = pool([Hanging()], Probe([], then=BrokerUnreachable("down")))
    with ThreadPoolExecutor(2) as threads:
        first = threads.submit(senders.send_many, [ALERT])
        wait_for(lambda: senders._idle.empty(), what="the only sender in use")
        second = threads.submit(senders.send_many, [ALERT])
        senders.circuit.trip(BrokerUnreachable("down"))
        with pytest.raises(BrokerUnreachable):
            second.result(timeout=2)
        gate.set()
        with pytest.raises(BrokerUnreachable):
            first.result()
    senders.close()


def test_a_sender_that_finds_the_topology_missing_opens_the_circuit_with_its_words() -> None:
    missing = TopologyMissing(topology.setup_advice("x", "exchange tasync.alerts"))
    sender = FakeSender(fail=missing)
    senders = pool([sender], Probe([], then=missing))
    with pytest.raises(TopologyMissing) as raised:
        senders.send_many([ALERT])
    assert raised.value is missing and senders.circuit.error is missing
    assert sender.closed == 1
    senders.close()
