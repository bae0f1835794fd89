"""Moving a refused message aside: to ``tasync.quarantine`` with the reason in its headers.

A consumer that cannot accept a message (malformed, oversized, unsigned, wrong schema version,
stale epoch) must neither crash nor loop on it, and must not lose it either: the bytes go to
the quarantine queue, where an operator can inspect them (``tasync quarantine list``), and the
original is acknowledged. Failed alerts go to the dead-letter queue annotated with the same
headers (``dead_copy``), so ``tasync dead list`` shows why and where they failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import amqp

from tasync.broker import audit, topology
from tasync.broker.alerts import ID_RE, SOURCE_RE
from tasync.broker.consumer import message_body
from tasync.broker.errors import MessageError
from tasync.broker.publisher import Outgoing

log = logging.getLogger("tasync.quarantine")

#: Why a message was quarantined or dead-lettered.
REASON_HEADER = "x-tasync-reason"
#: The node that refused it or whose delivery failed.
NODE_HEADER = "x-tasync-node"
#: The queue it came from (a sync queue, or a precedence list's routing key).
SOURCE_QUEUE_HEADER = "x-tasync-source-queue"
#: When it was quarantined (ISO-8601 UTC, as in the trail).
QUARANTINED_AT_HEADER = "x-tasync-quarantined-at"
#: When its delivery was given up (ISO-8601 UTC).
DEAD_AT_HEADER = "x-tasync-dead-at"
#: Delivery rounds tried before it was given up.
ATTEMPTS_HEADER = "x-tasync-attempts"
#: The source under which a refusal is counted when the body names no valid one.
UNKNOWN_SOURCE = "unknown"


def _copy(message: amqp.Message, *, exchange: str, routing_key: str,
          headers: dict[str, Any]) -> Outgoing:
    """A persistent copy of ``message`` (its bytes, headers and id) with ``headers`` added."""
    merged = dict(message.properties.get("application_headers") or {})
    merged.update(headers)
    try:
        body = message_body(message)
    except MessageError:
        body = str(message.body).encode("utf-8", "replace")  # keep what can be kept
    copy = Outgoing(exchange=exchange, routing_key=routing_key, body=body, headers=merged,
                    mandatory=True)
    message_id = message.properties.get("message_id")
    if isinstance(message_id, str) and message_id:
        copy = dataclasses.replace(copy, message_id=message_id)
    return copy


def quarantine_copy(message: amqp.Message, *, reason: str, node: str, source: str) -> Outgoing:
    """The quarantine queue's copy of ``message``, annotated with why and where."""
    return _copy(message, exchange="", routing_key=topology.QUARANTINE_QUEUE, headers={
        REASON_HEADER: reason[:1000],
        NODE_HEADER: node,
        SOURCE_QUEUE_HEADER: source,
        QUARANTINED_AT_HEADER: audit.utc_now(),
    })


def dead_copy(message: amqp.Message, *, reason: str, node: str, attempts: int) -> Outgoing:
    """The dead-letter queue's copy of a failed alert, annotated with why, where and how often."""
    return _copy(message, exchange=topology.DEAD_LETTER_EXCHANGE, routing_key="", headers={
        REASON_HEADER: reason[:1000],
        NODE_HEADER: node,
        SOURCE_QUEUE_HEADER: str(message.delivery_info.get("routing_key", "")),
        DEAD_AT_HEADER: audit.utc_now(),
        ATTEMPTS_HEADER: attempts,
    })


def quarantine(channel: Any, message: amqp.Message, *, reason: str, node: str,
               source: str) -> None:
    """Publish a copy of ``message`` to the quarantine queue, annotated with why and where."""
    copy = quarantine_copy(message, reason=reason, node=node, source=source)
    channel.basic_publish(
        amqp.Message(copy.body, delivery_mode=2, application_headers=copy.headers,
                     content_type=message.properties.get("content_type", "application/json")),
        exchange=copy.exchange, routing_key=copy.routing_key,
    )
    log.warning("quarantined a message from %s: %s", source, reason)


def alert_identity(message: amqp.Message) -> tuple[str | None, str]:
    """Best effort ``(alert id, source)`` of a message that was refused as an alert.

    A refused body is untrusted: the id comes from the message id or the body only when it is
    a valid id, the source only when it is a valid source, else ``UNKNOWN_SOURCE``; nothing
    here may raise.
    """
    data: Any = None
    try:
        data = json.loads(message_body(message))
    except Exception:  # anything unreadable simply has no id or source
        data = None
    fields = data if isinstance(data, dict) else {}
    candidates = [message.properties.get("message_id"), fields.get("id")]
    alert_id = next((c for c in candidates if isinstance(c, str) and ID_RE.match(c)), None)
    source = fields.get("source")
    return alert_id, source if isinstance(source, str) and SOURCE_RE.match(source) else (
        UNKNOWN_SOURCE)
