"""Reading the change-log stream ``tasync.changelog`` from a chosen point.

Stream facts that shape this module: a stream consumer needs ``basic.qos``
and manual acks; ``x-stream-offset`` takes ``first``, ``last``, ``next``, an integer offset or a
timestamp; offsets have gaps; a stream error closes the whole connection, so each read uses a
connection of its own and ends by closing it rather than cancelling a consumer with a backlog.
A stream has no end marker over AMQP 0-9-1: a read ends when the caller says so (it reached its
target seq), or after the stream has been quiet for ``idle_s``. A master that writes more often
than that keeps a stream from ever being quiet, so a read that only wants the log as it stood
(``log_head``) also ends at an offset or a while after its first message. Besides change
batches the log holds the epoch marks of promotions (``tasync.broker.epochs``), in order with the
changes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import amqp
import amqp.exceptions

from tasync.broker import topology
from tasync.broker.connection import close_quietly, connect
from tasync.broker.consumer import message_body
from tasync.broker.epochs import EpochHistory, EpochMark
from tasync.broker.errors import MessageError
from tasync.broker.fastdecode import decode_entry
from tasync.broker.messages import ChangeBatch
from tasync.broker.settings import Settings

log = logging.getLogger("tasync.sync")

Offset = str | int | dt.datetime
#: How long the head query's read of the log's newest chunk goes on after its first entry.
HEAD_READ_S = 2.0


@dataclass
class StreamRead:
    """What a read saw: batches handed on, the highest seq and epoch, messages refused."""

    batches: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    max_epoch: int = 0
    refused: int = 0
    marks: list[EpochMark] = field(default_factory=list)
    #: The stream offset of the last entry seen (RabbitMQ's ``x-stream-offset`` header).
    last_offset: int | None = None

    def record(self, item: ChangeBatch | EpochMark) -> None:
        """Count one entry of the log."""
        if isinstance(item, EpochMark):
            self.marks.append(item)
        else:
            self.batches += 1
            if self.first_seq is None:
                self.first_seq = item.first_seq
            self.last_seq = max(self.last_seq, item.last_seq)
        self.max_epoch = max(self.max_epoch, item.epoch)


def _decode_entry(body: bytes, settings: Settings) -> ChangeBatch | EpochMark:
    item = decode_entry(body, max_bytes=settings.max_message_bytes)
    if not isinstance(item, ChangeBatch | EpochMark):
        raise MessageError(f"unexpected {type(item).__name__} in the change log")
    return item


def read_changelog(settings: Settings, *, offset: Offset,
                   on_batch: Callable[[ChangeBatch], bool], idle_s: float = 1.0,
                   prefetch: int = 200,
                   on_mark: Callable[[EpochMark], bool] | None = None,
                   until_offset: int | None = None, max_s: float | None = None) -> StreamRead:
    """Hand every valid batch from ``offset`` on to ``on_batch`` until done.

    Args:
        settings: broker settings.
        offset: where to start (``"first"``, ``"last"``, an integer, or a datetime).
        on_batch: called for each batch; returning False ends the read.
        idle_s: end after this long without a message (the end of the stream).
        prefetch: messages in flight; the stream protocol requires a limit.
        on_mark: called for each epoch mark; returning False ends the read.
        until_offset: end after the entry at this stream offset (or a later one).
        max_s: end this long after the first entry arrived, even if more keep coming.

    Returns:
        The summary of the read. Invalid messages are counted and skipped: the stream is the
        master's own output, already validated, so such a message is logged, not quarantined.
    """
    result = StreamRead()
    first_at: float | None = None
    conn = connect(settings, name="tasync-changelog-reader")
    try:
        channel = conn.channel()
        channel.basic_qos(0, prefetch, False)
        done = False

        def on_message(message: amqp.Message) -> None:
            nonlocal done, first_at
            channel.basic_ack(message.delivery_tag)
            if done:
                return
            first_at = first_at or time.monotonic()
            position = (message.headers or {}).get("x-stream-offset")
            if isinstance(position, int):
                result.last_offset = position
                done = until_offset is not None and position >= until_offset
            try:
                item = _decode_entry(message_body(message), settings)
            except MessageError as exc:
                result.refused += 1
                log.warning("skipped an invalid change-log entry: %s", exc)
                return
            result.record(item)
            if isinstance(item, EpochMark):
                done = (on_mark is not None and not on_mark(item)) or done
            else:
                done = not on_batch(item) or done

        channel.basic_consume(topology.CHANGELOG_STREAM, no_ack=False, callback=on_message,
                              arguments={"x-stream-offset": _offset_arg(offset)})
        quiet_since = time.monotonic()
        seen = 0
        while not done:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.1)
            count = result.batches + result.refused + len(result.marks)
            now = time.monotonic()
            if max_s is not None and first_at is not None and now - first_at > max_s:
                break
            if count != seen:
                seen, quiet_since = count, now
            elif now - quiet_since > idle_s:
                break
    finally:
        close_quietly(conn)
    return result


def _offset_arg(offset: Offset) -> Any:
    """The ``x-stream-offset`` value; py-amqp encodes a datetime as an AMQP timestamp."""
    if isinstance(offset, dt.datetime):
        return offset.replace(microsecond=0)
    return offset


class _HeadScan:
    """Judges what a read of the log sees, in log order, to find its newest legitimate seq."""

    def __init__(self, history: EpochHistory) -> None:
        self.history = history
        self.seq = 0
        self.found = self.seen = self.unsure = False

    def mark(self, mark: EpochMark) -> bool:
        self.history = mark.history.merge(self.history)
        self.seq, self.found = max(self.seq, mark.base_seq), True
        return True

    def batch(self, batch: ChangeBatch) -> bool:
        self.seen = True
        self.unsure |= batch.epoch > self.history.max_epoch  # an epoch whose mark we lack
        verdict = self.history.judge(batch)
        self.history = verdict.history
        if verdict.legit:
            self.seq, self.found = max(self.seq, verdict.legit[-1].seq), True
        return True


def log_head(settings: Settings, history: EpochHistory) -> tuple[int, EpochHistory]:
    """The change log's newest legitimate seq, and the eras known after reading it.

    Legitimate seqs only grow along the log, so its newest chunk usually answers, by its last
    legitimate batch or a promotion's mark (whose base is the head until the new master
    changes something). When that chunk holds nothing legitimate (a stale master published
    last) or an epoch whose mark it lacks, the whole log is read, up to where the first read
    ended. Neither read waits for a busy log to fall quiet: the first ends ``HEAD_READ_S``
    after its first entry (what comes later is newer still), the second at the first's last
    offset. ``(0, history)`` when the log does not exist yet.
    """
    until: int | None = None
    for offset, idle_s in (("last", 0.5), ("first", 1.0)):
        scan = _HeadScan(history)
        try:
            read = read_changelog(settings, offset=offset, on_batch=scan.batch,
                                  on_mark=scan.mark, idle_s=idle_s, until_offset=until,
                                  max_s=HEAD_READ_S if until is None else None)
        except amqp.exceptions.NotFound:
            return 0, history
        if not scan.unsure and (scan.found or not scan.seen):
            break
        until = read.last_offset
    return scan.seq, scan.history
