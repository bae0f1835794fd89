"""Every precedence list of the network and its state, for ``tasync status`` and tools.

Each node watches every list's queue (``tasync.consumers.delivery.lists``) and answers ``lists``
control requests with what it saw; ``gather_lists`` asks every live node and keeps, per list,
the newest observation. A list is *stranded* when its queue holds alerts and nobody consumes
it (``stranded``). When no node answers, ``broker_lists`` looks at the broker alone: it reads
the host-list stream and checks each list's queue itself.

The interface ``status`` uses::

    with rpc_client(settings) as rpc:
        report = lists_report(rpc, timeout_s=2.0)      # or gather_lists(rpc, ...) for rows
    for row in stranded(report["lists"]):
        print(row["list"], row["messages"])          # e.g. "a.b 3"

Each row: ``list`` (routing key), ``hosts``, ``messages``, ``consumers``, ``exists``,
``stranded``, ``consumed_by`` (nodes that said they consume it), ``checked_at`` and
``checked_by`` (the node whose observation it is).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import amqp
import amqp.exceptions

from tasync.broker import messages, topology
from tasync.broker.alerts import HostList
from tasync.broker.connection import close_quietly, connect
from tasync.broker.consumer import message_body
from tasync.broker.errors import MessageError, NoAnswer
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings
from tasync.consumers.delivery.lists import ListState

#: How long ``broker_lists`` waits for more host-list records before it takes the stream as read.
STREAM_IDLE_S = 0.5


def known_nodes(rpc: RpcClient, timeout_s: float) -> list[str]:
    """The nodes the master knows (none when no master answers)."""
    with contextlib.suppress(NoAnswer):
        status = rpc.call_one(topology.MASTER, "status", timeout_s=min(timeout_s, 2.0))
        return [str(n) for n in status.get("nodes", [])]
    return []


def ask_all(rpc: RpcClient, op: str, args: dict[str, Any] | None = None, *,
            timeout_s: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Every live node's answer to ``op``, and the nodes the master knows that did not answer.

    Waits at most ``timeout_s``, less once every node the master knows has answered. Failed
    answers are left out; each answer carries ``node``.
    """
    known = known_nodes(rpc, timeout_s)
    try:
        replies = rpc.call(topology.ALL, op, args or {}, timeout_s=timeout_s,
                           expect=len(known) or None)
    except NoAnswer:
        replies = []
    answers = [dict(reply.data, node=reply.node) for reply in replies if reply.ok]
    answered = {a["node"] for a in answers}
    return answers, sorted(set(known) - answered)


def lists_report(rpc: RpcClient, *, timeout_s: float) -> dict[str, Any]:
    """Every list, with the dead-letter and quarantine depths, from every live node.

    Returns:
        ``{"lists": [row, ...], "dead_letters": n | None, "quarantined": n | None,
        "answered": [node, ...]}``; the depths are the newest any node saw.
    """
    answers = sorted(ask_all(rpc, "lists", timeout_s=timeout_s)[0],
                     key=lambda a: float(a.get("checked_at") or 0))
    rows: dict[str, dict[str, Any]] = {}
    consumed_by: dict[str, set[str]] = {}
    depths: dict[str, Any] = {"dead_letters": None, "quarantined": None}
    for answer in answers:  # oldest first: a newer observation replaces an older one
        for key in depths:
            if answer.get(key) is not None:
                depths[key] = answer[key]
        for row in answer.get("lists", []):
            key = str(row["list"])
            if row.get("consumed_here"):
                consumed_by.setdefault(key, set()).add(answer["node"])
            rows[key] = {k: v for k, v in row.items() if k != "consumed_here"} | {
                "checked_at": answer.get("checked_at"), "checked_by": answer["node"]}
    for key, row in rows.items():
        row["consumed_by"] = sorted(consumed_by.get(key, ()))
    return {"lists": [rows[k] for k in sorted(rows)], **depths,
            "answered": sorted(a["node"] for a in answers)}


def gather_lists(rpc: RpcClient, *, timeout_s: float) -> list[dict[str, Any]]:
    """Every list's newest row from the live nodes (see ``lists_report``)."""
    rows: list[dict[str, Any]] = lists_report(rpc, timeout_s=timeout_s)["lists"]
    return rows


def stranded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of lists whose queue holds alerts that nobody consumes."""
    return [row for row in rows if row.get("stranded")]


def broker_lists(settings: Settings) -> list[dict[str, Any]]:
    """Every recorded list and its queue, from the broker alone (no node needed).

    Reads the ``tasync.hostlists`` stream from its start on a connection of its own (a stream
    error closes the whole connection) and passively declares each list's queue.
    """
    conn = connect(settings, name="tasync-lists")
    lists: dict[str, tuple[str, ...]] = {}
    try:
        channel = conn.channel()
        channel.basic_qos(0, 1000, False)

        def take(message: amqp.Message) -> None:
            channel.basic_ack(message.delivery_tag)
            with contextlib.suppress(MessageError):
                record: HostList = messages.decode(message_body(message), max_bytes=64 << 10,
                                                   expect="hostlist")
                lists[topology.precedence_key(record.hosts)] = record.hosts

        try:
            channel.basic_consume(topology.HOSTLISTS_QUEUE, no_ack=False, callback=take,
                                  arguments={"x-stream-offset": "first"})
        except amqp.exceptions.NotFound:
            return []
        quiet_since, count = time.monotonic(), 0
        while time.monotonic() - quiet_since < STREAM_IDLE_S:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.1)
            if len(lists) != count:
                count, quiet_since = len(lists), time.monotonic()
    finally:
        close_quietly(conn)
    conn = connect(settings, name="tasync-lists")
    rows = []
    try:
        checker = conn.channel()
        for key, hosts in sorted(lists.items()):
            try:
                ok = checker.queue_declare(topology.alert_queue(hosts), passive=True)
            except amqp.exceptions.NotFound:
                checker = conn.channel()  # the refusal closed the channel
                rows.append(ListState(key=key, hosts=hosts, exists=False).to_dict())
                continue
            rows.append(ListState(key=key, hosts=hosts, messages=int(ok.message_count),
                                  consumers=int(ok.consumer_count)).to_dict())
    finally:
        close_quietly(conn)
    return rows
