"""The client's per-message AMQP costs: py-amqp's own paths against tasync's, on the real broker.

    python -m benchmarks.amqp_paths                 # 20,000 messages, best of 5
    python -m benchmarks.amqp_paths --messages 5000 --repeat 3

A profile of the alert path showed the sender spending most of its time in py-amqp's framing
(one ``sendall``, two ``settimeout`` calls and a generic argument serialiser per message) and
the consumers in reading frames (nine ``recv`` calls per delivered message). Each side is timed
here both ways in one process, alternately, in CPU µs per message:

- **publish**: a window of 1,000 persistent messages with the properties and headers an alert
  carries, confirmed, through ``ConfirmedPublisher`` (frames encoded in bulk, one write per
  128 KB) and through py-amqp's ``basic_publish`` per message (what the publisher did before,
  and what the raw baseline of ``benchmarks.alerts`` does);
- **consume**: the same messages, already queued, consumed with prefetch 1,000 and no acks,
  over py-amqp's TCP transport and over the read-ahead one (``tasync.broker.readahead``).

Each run uses its own auto-deleted queue in a fresh virtual host. Results in
``benchmarks/results/amqp_paths.json``.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

from kombu import Connection

from benchmarks.common import Broker, log
from benchmarks.measure import RESULTS_DIR, code_version, write_json
from tasync.broker.publisher import ConfirmedPublisher, Outgoing, send
from tasync.broker.readahead import ReadAheadTransport

WINDOW = 1000
BODY = b'{"id":"a-0000001","source":"bench","target_kind":"destination","target":"out",' \
    b'"text":"disk /var on host01 is 91% full","priority":5,"hosts":["master","b1"]}'


def messages(queue: str, count: int) -> list[Outgoing]:
    """``count`` alert-shaped messages for the default exchange's route to ``queue``."""
    return [Outgoing(exchange="", routing_key=queue, body=BODY,
                     headers={"tasync-client": "bench", "tasync-sender": "bench"})
            for _ in range(count)]


def publish_bulk(conn: Connection, queue: str, count: int) -> float:
    """CPU seconds to publish ``count`` messages through ``ConfirmedPublisher``."""
    batch = messages(queue, count)
    publisher = ConfirmedPublisher(conn, window=WINDOW)
    started = time.process_time()
    publisher.publish_many(batch)
    return time.process_time() - started


def publish_per_message(conn: Connection, queue: str, count: int) -> float:
    """CPU seconds to publish ``count`` messages by py-amqp's ``basic_publish``, confirmed."""
    batch = messages(queue, count)
    acked = [0]
    channel = conn.channel()
    channel.confirm_select()
    channel.events["basic_ack"].add(
        lambda tag, multiple: acked.__setitem__(0, tag if multiple else acked[0] + 1))
    started = time.process_time()
    for sent, message in enumerate(batch, 1):
        send(channel, message, user_id=None)
        while sent - acked[0] >= WINDOW:
            conn.drain_events(timeout=10)
    while acked[0] < count:
        conn.drain_events(timeout=10)
    return time.process_time() - started


def consume(conn: Connection, queue: str, count: int) -> float:
    """CPU seconds to consume ``count`` queued messages on ``conn``."""
    channel = conn.channel()
    channel.basic_qos(0, WINDOW, False)
    got = [0]
    channel.basic_consume(queue, callback=lambda _m: got.__setitem__(0, got[0] + 1),
                          no_ack=True)
    started = time.process_time()
    while got[0] < count:
        conn.drain_events(timeout=10)
    return time.process_time() - started


def one_run(url: str, count: int) -> dict[str, float]:
    """Each way once, in CPU µs per message: publish one way, then consume what it queued."""
    ways: list[tuple[str, Callable[[Connection, str, int], float], Any, str]] = [
        ("publish, py-amqp per message", publish_per_message, None,
         "consume, py-amqp transport"),
        ("publish, bulk frames", publish_bulk, ReadAheadTransport,
         "consume, read-ahead transport"),
    ]
    out: dict[str, float] = {}
    for publish_label, publish, transport, consume_label in ways:
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        with Connection(url) as conn:
            conn.connect()
            conn.channel().queue_declare(queue, durable=True)
            out[publish_label] = publish(conn, queue, count)
        with Connection(url, transport=transport) as reader:
            reader.connect()
            out[consume_label] = consume(reader, queue, count)
        with Connection(url) as conn:
            conn.channel().queue_delete(queue)
    return {name: round(1e6 * seconds / count, 1) for name, seconds in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.amqp_paths",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    broker = Broker()
    runs = []
    with broker.fresh_vhost("amqp-paths") as url:
        for number in range(1, args.repeat + 1):
            runs.append(one_run(url, args.messages))
            log(f"run {number}/{args.repeat}: " + ", ".join(f"{k} {v} µs"
                                                           for k, v in runs[-1].items()))
    best = {name: min(run[name] for run in runs) for name in runs[0]}
    print(f"| way | CPU µs per message (best of {args.repeat}) |\n| --- | --- |")
    for name, value in best.items():
        print(f"| {name} | {value} |")
    write_json(RESULTS_DIR / "amqp_paths.json",
               {"benchmark": "amqp_paths", "code": code_version(), "messages": args.messages,
                "repeat": args.repeat, "best_us_per_message": best, "runs": runs})


if __name__ == "__main__":
    main()
