"""What the CLI commands share: a request client, node discovery and table output.

Commands reach nodes only through the control exchange, so they run on any host that can
reach the broker; ``--data-dir`` variants read a local store directly and need no broker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import click

from broker import topology
from broker.connection import close_quietly, connect
from broker.errors import NoAnswer
from broker.rpc import RpcClient
from broker.settings import Settings

Client = TypeVar("Client", bound=RpcClient)


@contextlib.contextmanager
def connected_client(settings: Settings,
                     factory: Callable[..., Client]) -> Iterator[Client]:
    """A connected client made by ``factory`` for one command; the connection closes afterwards.

    A command fails fast (5 s at most) when no broker answers: a person is waiting.
    """
    conn = connect(settings, name="tasync-cli", retry_s=min(settings.connect_retry_s, 5.0))
    try:
        yield factory(conn, sender=f"cli@{socket.gethostname()}:{os.getpid()}")
    finally:
        close_quietly(conn)


def rpc_client(settings: Settings) -> contextlib.AbstractContextManager[RpcClient]:
    """A connected request client for one command; the connection closes afterwards."""
    return connected_client(settings, RpcClient)


def target_key(node: str | None) -> str:
    """The routing key for ``--node N``, or the master when no node is named."""
    return topology.node_key(node) if node else topology.MASTER


def gather_status(rpc: RpcClient, *, timeout_s: float) -> list[dict[str, Any]]:
    """Every node's status, answering or not, with lag and sync state against the master.

    Waits until every node the master knows has answered, or ``timeout_s``.
    """
    master: dict[str, Any] | None = None
    known: list[str] = []
    with contextlib.suppress(NoAnswer):
        master = rpc.call_one(topology.MASTER, "status", timeout_s=min(timeout_s, 2.0))
        known = [str(n) for n in master.get("nodes", [])]
    expect = len(known) if known else None
    try:
        replies = rpc.call(topology.ALL, "status", timeout_s=timeout_s, expect=expect)
    except NoAnswer:
        replies = []
    rows: dict[str, dict[str, Any]] = {}
    for reply in replies:
        if reply.ok:
            rows[reply.node] = {**reply.data, "alive": True}
    for name in known:
        rows.setdefault(name, {"node": name, "alive": False, "ready": False})
    head = int(master["applied_seq"]) if master is not None else max(
        (r.get("applied_seq", 0) for r in rows.values()), default=0)
    for row in rows.values():
        if row["alive"]:
            row["lag"] = head - int(row.get("applied_seq", 0))
            row["in_sync"] = master is not None and row.get("checksum") == master["checksum"]
    return [rows[n] for n in sorted(rows)]


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                title: str | None = None) -> None:
    """A rich table on a terminal; aligned plain text when piped, so scripts can ``awk`` it."""
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
