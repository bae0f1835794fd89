"""Reading the change-log stream ``tasync.changelog`` from a chosen point.

Stream facts that shape this module (design section 9): a stream consumer needs ``basic.qos``
and manual acks; ``x-stream-offset`` takes ``first``, ``last``, ``next``, an integer offset or a
timestamp; offsets have gaps; a stream error closes the whole connection, so each read uses a
connection of its own and ends by closing it rather than cancelling a consumer with a backlog.
A stream has no end marker over AMQP 0-9-1: a read ends at a target seq, or after the stream
has been quiet for ``idle_s``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import amqp

from broker import messages, topology
from broker.connection import close_quietly, connect
from broker.errors import MessageError
from broker.messages import ChangeBatch
from broker.settings import Settings

log = logging.getLogger("tasync.sync")

Offset = str | int | dt.datetime


@dataclass
class StreamRead:
    """What a read saw: batches handed on, the highest seq and epoch, messages refused."""

    batches: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    max_epoch: int = 0
    refused: int = 0


def read_changelog(settings: Settings, *, offset: Offset,
                   on_batch: Callable[[ChangeBatch], bool], until_seq: int | None = None,
                   idle_s: float = 1.0, prefetch: int = 200) -> StreamRead:
    """Hand every valid batch from ``offset`` on to ``on_batch`` until done.

    Args:
        settings: broker settings.
        offset: where to start (``"first"``, ``"last"``, an integer, or a datetime).
        on_batch: called for each batch; returning False ends the read.
        until_seq: end once a batch reaches this seq.
        idle_s: end after this long without a message (the end of the stream).
        prefetch: messages in flight; the stream protocol requires a limit.

    Returns:
        The summary of the read. Invalid messages are counted and skipped: the stream is the
        master's own output, already validated, so such a message is logged, not quarantined.
    """
    result = StreamRead()
    conn = connect(settings, name="tasync-changelog-reader")
    try:
        channel = conn.channel()
        channel.basic_qos(0, prefetch, False)
        done = False

        def on_message(message: amqp.Message) -> None:
            nonlocal done
            channel.basic_ack(message.delivery_tag)
            if done:
                return
            try:
                batch = messages.decode(message.body, max_bytes=settings.max_message_bytes,
                                        expect="changes")
            except MessageError as exc:
                result.refused += 1
                log.warning("skipped an invalid change-log entry: %s", exc)
                return
            result.batches += 1
            if result.first_seq is None:
                result.first_seq = batch.first_seq
            result.last_seq = max(result.last_seq, batch.last_seq)
            result.max_epoch = max(result.max_epoch, batch.epoch)
            if not on_batch(batch) or (until_seq is not None and batch.last_seq >= until_seq):
                done = True

        channel.basic_consume(topology.CHANGELOG_STREAM, no_ack=False, callback=on_message,
                              arguments={"x-stream-offset": _offset_arg(offset)})
        quiet_since = time.monotonic()
        seen = 0
        while not done:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.1)
            if result.batches + result.refused != seen:
                seen, quiet_since = result.batches + result.refused, time.monotonic()
            elif time.monotonic() - quiet_since > idle_s:
                break
    finally:
        close_quietly(conn)
    return result


def _offset_arg(offset: Offset) -> Any:
    """The ``x-stream-offset`` value; py-amqp encodes a datetime as an AMQP timestamp."""
    if isinstance(offset, dt.datetime):
        return offset.replace(microsecond=0)
    return offset


def stream_head(settings: Settings, *, idle_s: float = 0.5) -> StreamRead:
    """Look at the newest chunk of the change log: its highest seq and epoch (0 when empty)."""
    return read_changelog(settings, offset="last", on_batch=lambda _b: True, idle_s=idle_s)
