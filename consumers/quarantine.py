"""Moving a refused message aside: to ``tasync.quarantine`` with the reason in its headers.

A consumer that cannot accept a message (malformed, oversized, unsigned, wrong schema version,
stale epoch) must neither crash nor loop on it, and must not lose it either: the bytes go to
the quarantine queue, where an operator can inspect them, and the original is acknowledged.
"""

from __future__ import annotations

import logging
from typing import Any

import amqp

from broker import audit, topology
from broker.consumer import message_body
from broker.errors import MessageError

log = logging.getLogger("tasync.quarantine")


def quarantine(channel: Any, message: amqp.Message, *, reason: str, node: str,
               source: str) -> None:
    """Publish a copy of ``message`` to the quarantine queue, annotated with why and where."""
    headers = dict(message.properties.get("application_headers") or {})
    headers.update({
        "x-tasync-reason": reason[:1000],
        "x-tasync-node": node,
        "x-tasync-source-queue": source,
        "x-tasync-quarantined-at": audit.utc_now(),
    })
    try:
        body = message_body(message)
    except MessageError:
        body = str(message.body).encode("utf-8", "replace")  # keep what can be kept
    channel.basic_publish(
        amqp.Message(body, delivery_mode=2, application_headers=headers,
                     content_type=message.properties.get("content_type", "application/json")),
        exchange="", routing_key=topology.QUARANTINE_QUEUE,
    )
    log.warning("quarantined a message from %s: %s", source, reason)
