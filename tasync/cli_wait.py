"""``tasync wait``: block until the network is in a state a script needs, or say what it saw.

Scripts, the quick start and health checks after a deploy need "node a is ready" or "an alert
was delivered" as a command: a fixed ``sleep`` is too short on a slow machine and wasted time
on a fast one. Each subcommand polls the nodes' own answers over the control exchange and exits
0 as soon as the condition holds, or 1 after ``--timeout`` with one line saying what it waited
for and what it last saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

from tasync.broker import topology
from tasync.broker.errors import NoAnswer, RemoteError, WaitTimedOut
from tasync.broker.rpc import RpcClient
from tasync.broker.since import Since
from tasync.client import rpc_client
from tasync.options import (
    make_settings,
    since_option,
    timeout_option,
)

#: The longest one question to the nodes may take; a wait is many of them.
ASK_S = 1.0
#: Pause between two rounds of questions that all got an answer, so a wait costs the nodes
#: a few requests a second, not a busy loop.
PAUSE_S = 0.2


#: ``--timeout`` of every ``wait`` subcommand.
wait_timeout_option = timeout_option(60.0, "Give up after this long (exit 1).")


def poll(check: Callable[[float], str | None], *, timeout_s: float, what: str) -> None:
    """Call ``check(budget_s)`` until it returns None (done) or time runs out.

    ``check`` returns what it saw when the condition does not hold yet; the last of these ends
    the one-line error.

    Raises:
        WaitTimedOut: ``waited 60 s for a to report ready: a does not answer``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        seen = check(max(0.05, min(ASK_S, remaining)))
        if seen is None:
            return
        if time.monotonic() + PAUSE_S > deadline:
            raise WaitTimedOut(f"waited {timeout_s:g} s for {what}: {seen}")
        time.sleep(PAUSE_S)


def _status(rpc: RpcClient, key: str, budget_s: float) -> dict[str, Any] | None:
    try:
        return rpc.call_one(key, "status", timeout_s=budget_s)
    except (NoAnswer, RemoteError):
        return None


@click.group()
def wait() -> None:
    """Wait until nodes are ready, a master runs, or alerts were delivered.

    \b
    Examples:
      tasync wait ready --node a --node b
      tasync wait master --timeout 30
      tasync wait delivered --source remedy --count 1
    """


@wait.command("ready")
@click.option("--node", "nodes", multiple=True, required=True, metavar="NAME",
              help="A node to wait for (repeat the option for several).")
@wait_timeout_option
def wait_ready(*, nodes: tuple[str, ...], timeout_s: float) -> None:
    """Wait until every NODE is ready: caught up, answering requests, and registered.

    A node reports ready once it holds every change committed before it started and its
    control server listens; it is registered once the master made it a `node` object and
    that object reached it. From then on commands that name it (routes, recover) work.

    \b
    Examples:
      tasync wait ready --node a
      tasync wait ready --node a --node b --timeout 120
    Exit status: 0 once all are ready, 1 when --timeout passes first.
    """
    for node in nodes:
        topology.check_node_name(node)
    done: dict[str, dict[str, Any]] = {}
    with rpc_client(make_settings()) as rpc:

        def check(budget_s: float) -> str | None:
            seen: list[str] = []
            for node in nodes:
                if node in done:
                    continue
                status = _status(rpc, topology.node_key(node), budget_s)
                if status is None:
                    seen.append(f"{node} does not answer (is its worker running?)")
                elif not status.get("ready"):
                    seen.append(f"{node} answers but is not ready yet (catching up, at seq "
                                f"{status.get('applied_seq', 0)})")
                elif node not in status.get("nodes", []):
                    seen.append(f"{node} is ready but not registered yet (the master registers "
                                "it: is a master running?)")
                else:
                    done[node] = status
            return "; ".join(seen) or None

        poll(check, timeout_s=timeout_s, what=f"{_names(nodes)} to report ready")
    for node in nodes:
        status = done[node]
        click.echo(f"{node}: ready ({status.get('role', '?')}, epoch {status.get('epoch')}, "
                   f"seq {status.get('applied_seq')})")


@wait.command("master")
@wait_timeout_option
def wait_master(*, timeout_s: float) -> None:
    """Wait until a master runs and is ready to accept configuration changes.

    \b
    Examples:
      tasync wait master
      tasync wait master --timeout 300 && tasync config import config.yaml
    Exit status: 0 once a master is ready, 1 when --timeout passes first.
    """
    found: dict[str, Any] = {}
    with rpc_client(make_settings()) as rpc:

        def check(budget_s: float) -> str | None:
            status = _status(rpc, topology.MASTER, budget_s)
            if status is None:
                return "no master answers (is a node running with --role master?)"
            if not status.get("ready"):
                return f"{status.get('node')} is the master but not ready yet"
            found.update(status)
            return None

        poll(check, timeout_s=timeout_s, what="a ready master")
    click.echo(f"{found['node']} is the master (epoch {found.get('epoch')}, seq "
               f"{found.get('applied_seq')})")


@wait.command("delivered")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many delivered alerts to wait for.")
@click.option("--source", metavar="SOURCE", help="Count only alerts of this source.")
@since_option(allow_seq=False, what="count only deliveries from")
@wait_timeout_option
def wait_delivered(*, count: int, source: str | None, since: Since | None,
                   timeout_s: float) -> None:
    """Wait until the live nodes together delivered at least --count alerts.

    The count is what `tasync totals` shows as delivered, summed over the nodes that answer:
    alerts whose delivery to their destinations succeeded. Totals are kept per minute, so
    --since counts from the start of the minute it names.

    \b
    Examples:
      tasync wait delivered                                   at least one alert, ever
      tasync wait delivered --source remedy --count 10 --since 5m
    Exit status: 0 once enough were delivered, 1 when --timeout passes first.
    """
    args = {"since": since.ts if since is not None else None}
    delivered: dict[str, int] = {}
    with rpc_client(make_settings()) as rpc:

        def check(budget_s: float) -> str | None:
            try:
                replies = rpc.call(topology.ALL, "totals", args, timeout_s=budget_s,
                                   expect=None)
            except NoAnswer:
                return "no node answers"
            delivered.clear()
            for reply in replies:
                if reply.ok:
                    counts = (reply.data.get("sources", {}).get(source, {}) if source
                              else reply.data.get("total", {}))
                    delivered[reply.node] = int(counts.get("delivered", 0))
            total = sum(delivered.values())
            return None if total >= count else f"{total} delivered so far"

        what = f"{count} alert(s){f' from {source}' if source else ''} to be delivered"
        poll(check, timeout_s=timeout_s, what=what)
    by_node = ", ".join(f"{n} {c}" for n, c in sorted(delivered.items()) if c)
    click.echo(f"{sum(delivered.values())} delivered ({by_node})")


def _names(nodes: tuple[str, ...]) -> str:
    return ", ".join(nodes[:-1]) + (" and " if len(nodes) > 1 else "") + nodes[-1]
