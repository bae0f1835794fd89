"""What the CLI commands share: a request client, node discovery and table output.

Commands reach nodes only through the control exchange, so they run on any host that can
reach the broker; ``--data-dir`` variants read a local store directly and need no broker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import amqp.exceptions
import click

from tasync.broker import topology
from tasync.broker.connection import RECOVERABLE, close_quietly, connect, describe
from tasync.broker.errors import BrokerUnreachable, ConnectionLost
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings

Client = TypeVar("Client", bound=RpcClient)
T = TypeVar("T")
#: What ends a session's connection: it connects again and resumes.
_LOST: tuple[type[BaseException], ...] = (BrokerUnreachable, ConnectionLost, *RECOVERABLE)
#: How often an idempotent request to the master is sent again while no answer comes: a
#: master that was stopped, or whose control queue went with a dropped connection, gets it
#: again once it serves (it answers a repeat from its record of the first).
RESEND_S = 5.0


@contextlib.contextmanager
def connected_client(settings: Settings,
                     factory: Callable[..., Client]) -> Iterator[Client]:
    """A connected client made by ``factory`` for one command; the connection closes afterwards.

    A command fails fast (5 s at most) when no broker answers: a person is waiting.
    """
    conn = connect(settings, name="tasync-cli", retry_s=settings.connect_retry_s)
    try:
        yield factory(conn, sender=f"cli@{socket.gethostname()}:{os.getpid()}")
    finally:
        close_quietly(conn)


def rpc_client(settings: Settings) -> contextlib.AbstractContextManager[RpcClient]:
    """A connected request client for one command; the connection closes afterwards."""
    return connected_client(settings, RpcClient)


class MasterSession:
    """Idempotent requests to the master that survive a lost connection and a master's restart.

    A configuration request carries a request id, so sending it again is safe: the master
    answers a repeat from its record of the first. ``run`` calls a step with a connected
    client; when the connection breaks (the broker restarted, the command was paused and the
    broker dropped it) it connects again and calls the step again with ``resumed=True``, until
    the deadline. Once a master has answered, or after a loss, "no master is bound" is waited
    out rather than reported, because a master that restarts or a promotion in progress comes
    back within seconds; only a command whose very first request finds no master fails at
    once.

    Args:
        settings: broker settings.
        timeout_s: the whole command's budget.
    """

    def __init__(self, settings: Settings, *, timeout_s: float) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.resumed = False
        self.answered = False

    def remaining(self) -> float:
        """Seconds left of the budget (at least a tenth, so a last attempt can be made)."""
        return max(0.1, self.deadline - time.monotonic())

    def run(self, step: Callable[[RpcClient, bool], T]) -> T:
        """Run ``step(client, resumed)`` until it returns, reconnecting after a lost connection.

        Raises:
            ConnectionLost: the connection broke and could not be made again in time.
        """
        while True:
            try:
                with rpc_client(self.settings) as rpc:
                    return step(rpc, self.resumed)
            except amqp.exceptions.NotFound:
                raise  # the topology is missing: reconnecting cannot help (handle_errors says so)
            except _LOST as exc:
                if isinstance(exc, BrokerUnreachable) and not self.resumed:
                    raise  # no broker at all: say so at once (exit 3)
                if time.monotonic() >= self.deadline:
                    raise ConnectionLost(
                        f"lost the connection to the broker ({describe(exc)}) and could not "
                        f"make it again within {self.timeout_s:g} s") from None
                click.echo(f"tasync: connection to the broker lost ({describe(exc)}); "
                           "connecting again", err=True)
                self.resumed = True
                time.sleep(min(1.0, self.remaining()))

    def call(self, rpc: RpcClient, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Ask the master; re-sent while unanswered, and after a loss wait for a master."""
        waits = self.resumed or self.answered
        data = rpc.call_one(topology.MASTER, op, args, timeout_s=self.remaining(),
                            resend_s=RESEND_S,
                            unrouted_grace_s=self.remaining() if waits else None)
        self.answered = True
        return data

    def call_window(self, rpc: RpcClient, op: str, args: Sequence[dict[str, Any]], *,
                    window: int, on_answer: Callable[[int, dict[str, Any]], None]) -> None:
        """Ask the master ``op`` once per ``args``, ``window`` at a time (``call``'s waits).

        ``on_answer(i, data)`` is called as the answer to ``args[i]`` arrives, in any order.
        """
        def answered(index: int, data: dict[str, Any]) -> None:
            self.answered = True
            on_answer(index, data)

        waits = self.resumed or self.answered
        rpc.call_window(topology.MASTER, [(op, a) for a in args], window=window,
                        timeout_s=self.remaining(), on_answer=answered, resend_s=RESEND_S,
                        unrouted_grace_s=self.remaining() if waits else None)


def target_key(node: str | None) -> str:
    """The routing key for ``--node N``, or the master when no node is named."""
    return topology.node_key(node) if node else topology.MASTER


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
