"""Raw baselines: the same messages through the same broker shape with py-amqp alone.

A baseline answers "how fast could this go with no tasync code at all": one fanout exchange
bound to N durable quorum queues (and optionally a stream, like ``tasync.changelog``), a
publisher that keeps a window of persistent messages in flight under publisher confirms, and
one consumer *process* per queue (as each tasync node is a process) with manual acks.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp

EXCHANGE = "raw.fanout"
STREAM = "raw.stream"


def connect(url: str) -> amqp.Connection:
    """A plain py-amqp connection to the vhost of an ``amqp://`` URL."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    conn = amqp.Connection(host=f"{parts.hostname}:{parts.port or 5672}",
                           userid=unquote(parts.username or "guest"),
                           password=unquote(parts.password or "guest"), virtual_host=vhost,
                           heartbeat=0)
    conn.connect()
    return conn


def queue_names(count: int) -> list[str]:
    return [f"raw.q{i}" for i in range(1, count + 1)]


def declare(url: str, *, queues: int, stream_args: dict[str, Any] | None) -> None:
    """The fanout, ``queues`` quorum queues and, when ``stream_args`` is given, a stream."""
    conn = connect(url)
    try:
        channel = conn.channel()
        channel.exchange_declare(EXCHANGE, "fanout", durable=True, auto_delete=False)
        for name in queue_names(queues):
            channel.queue_declare(name, durable=True, auto_delete=False,
                                  arguments={"x-queue-type": "quorum"})
            channel.queue_bind(name, EXCHANGE, "")
        if stream_args is not None:
            channel.queue_declare(STREAM, durable=True, auto_delete=False,
                                  arguments={**stream_args, "x-queue-type": "stream"})
            channel.queue_bind(STREAM, EXCHANGE, "")
    finally:
        conn.close()


class ConfirmWindow:
    """Counts unconfirmed publishes on a confirm-mode channel (acks may cover many tags)."""

    def __init__(self, channel: Any) -> None:
        self._open: deque[int] = deque()
        self._single: set[int] = set()
        self.nacked = 0
        self._next = 1
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)

    def __len__(self) -> int:
        return len(self._open) - len(self._single)

    def sent(self) -> None:
        self._open.append(self._next)
        self._next += 1

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            while self._open and self._open[0] <= tag:
                self._single.discard(self._open.popleft())
        else:
            self._single.add(tag)
        while self._open and self._open[0] in self._single:
            self._single.discard(self._open.popleft())

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self.nacked += 1
        self._on_ack(tag, multiple)


def publish(url: str, bodies: Sequence[bytes], *, headers: Sequence[dict[str, Any]],
            window: int = 1000) -> float:
    """Publish persistent messages with confirms, ``window`` in flight; returns when confirmed."""
    conn = connect(url)
    try:
        channel = conn.channel()
        pending = ConfirmWindow(channel)
        for body, head in zip(bodies, headers, strict=True):
            while len(pending) >= window:
                conn.drain_events(timeout=30)
            message = amqp.Message(body, content_type="application/json", delivery_mode=2,
                                   application_headers=head)
            channel.basic_publish(message, exchange=EXCHANGE, routing_key="")
            pending.sent()
        while len(pending):
            conn.drain_events(timeout=30)
        if pending.nacked:
            raise RuntimeError(f"the broker nacked {pending.nacked} messages")
        return time.time()
    finally:
        conn.close()


def _consume(url: str, queue: str, expected: int, prefetch: int, ready: Any, out: Any,
             record: bool = False, ack_every: int = 1) -> None:
    """Consumer process: manual acks until ``expected`` arrived.

    With ``ack_every`` 1 each message is acknowledged on its own; above 1 one ``multiple``
    ack covers every ``ack_every`` messages, and whatever is left once the socket has nothing
    more to read (the fastest py-amqp consumes). With ``record``, also report when each
    message (by ``message_id``) arrived.
    """
    conn = connect(url)
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    state: dict[str, Any] = {"count": 0, "first": 0.0, "last": 0.0}
    arrived: dict[str, float] = {}

    unacked = [0, 0]  # messages not yet acknowledged, the last delivery tag

    def on_message(message: amqp.Message) -> None:
        now = time.time()
        if ack_every <= 1:
            channel.basic_ack(message.delivery_tag)
        else:
            unacked[0] += 1
            unacked[1] = message.delivery_tag
            if unacked[0] >= ack_every:
                channel.basic_ack(unacked[1], multiple=True)
                unacked[0] = 0
        if record:
            arrived[message.properties.get("message_id", "")] = now
        state["first"] = state["first"] or now
        state["last"] = now
        state["count"] += 1

    channel.basic_consume(queue, callback=on_message)
    ready.set()
    deadline = time.monotonic() + 900
    while state["count"] < expected and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0 if unacked[0] else 1.0)
        except TimeoutError:
            if unacked[0]:
                channel.basic_ack(unacked[1], multiple=True)
                unacked[0] = 0
    if unacked[0]:
        channel.basic_ack(unacked[1], multiple=True)
    conn.close()
    out.put({"queue": queue, **state, "arrived": arrived})


class _Consumers:
    """One consumer process per queue, started and ready before anything is published."""

    def __init__(self, url: str, queues: list[str], *, expected: int, prefetch: int,
                 record: bool = False, ack_every: int = 1) -> None:
        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.procs = []
        events = []
        for name in queues:
            ready = ctx.Event()
            proc = ctx.Process(target=_consume, daemon=True,
                               args=(url, name, expected, prefetch, ready, self.out, record,
                                     ack_every))
            proc.start()
            self.procs.append(proc)
            events.append(ready)
        for ready in events:
            if not ready.wait(60):
                self.close()
                raise TimeoutError("a baseline consumer did not start")

    def results(self, expected: int) -> list[dict[str, Any]]:
        """Each queue's report; raises if one got fewer than ``expected`` messages."""
        reports = [self.out.get(timeout=900) for _ in self.procs]
        short = [r["queue"] for r in reports if r["count"] < expected]
        if short:
            raise RuntimeError(f"baseline consumers of {short} got too few messages")
        return reports

    def close(self) -> None:
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


@dataclass(frozen=True)
class RawResult:
    """Timing of one baseline run, seconds since the epoch."""

    messages: int
    started: float
    published: float
    consumed: float
    per_queue: list[dict[str, Any]]

    @property
    def wall_s(self) -> float:
        return self.consumed - self.started


def fanout_run(url: str, bodies: Sequence[bytes], *, headers: Sequence[dict[str, Any]],
               queues: int = 3, prefetch: int = 64, window: int = 1000, ack_every: int = 1,
               stream_args: dict[str, Any] | None = None) -> RawResult:
    """Publish ``bodies`` to a fresh fanout and wait until every queue's consumer acked all.

    ``url`` should name an empty vhost of its own. ``window`` publishes are in flight under
    confirms; ``ack_every`` above 1 makes the consumers acknowledge with ``multiple``.
    """
    declare(url, queues=queues, stream_args=stream_args)
    consumers = _Consumers(url, queue_names(queues), expected=len(bodies), prefetch=prefetch,
                           ack_every=ack_every)
    try:
        started = time.time()
        published = publish(url, bodies, headers=headers, window=window)
        per_queue = consumers.results(len(bodies))
    finally:
        consumers.close()
    for report in per_queue:
        report.pop("arrived")
    return RawResult(messages=len(bodies), started=started, published=published,
                     consumed=max(q["last"] for q in per_queue), per_queue=per_queue)


def latency_run(url: str, body: bytes, *, count: int, queues: int, gap_s: float,
                stream_args: dict[str, Any] | None = None) -> list[float]:
    """One persistent message at a time, confirmed, then a pause; returns latencies in ms.

    A latency is the time from just before ``basic_publish`` until the last of the ``queues``
    consumers received the message: the broker's floor under "committed -> applied everywhere".
    """
    declare(url, queues=queues, stream_args=stream_args)
    consumers = _Consumers(url, queue_names(queues), expected=count, prefetch=64, record=True)
    sent: dict[str, float] = {}
    try:
        conn = connect(url)
        try:
            channel = conn.channel()
            pending = ConfirmWindow(channel)
            for index in range(count):
                message_id = str(index)
                sent[message_id] = time.time()
                channel.basic_publish(
                    amqp.Message(body, content_type="application/json", delivery_mode=2,
                                 message_id=message_id), exchange=EXCHANGE, routing_key="")
                pending.sent()
                while len(pending):
                    conn.drain_events(timeout=30)
                time.sleep(gap_s)
        finally:
            conn.close()
        reports = consumers.results(count)
    finally:
        consumers.close()
    return [1000.0 * (max(r["arrived"][m] for r in reports) - t) for m, t in sent.items()]
