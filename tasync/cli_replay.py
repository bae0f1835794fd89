"""``tasync replay``: every change since a point in time, listed for an auditor or replayed.

The change log (``tasync.changelog``) is the record: ``--dry-run`` reads it here and lists
every change after the point (judged by the master's eras, so a stale master's rejected
changes never appear); ``--node N`` or ``--all`` asks nodes to replay those changes into their
stores (``tasync.consumers.replay``), then compares each with the master.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from typing import Any

import click

from tasync.broker import topology
from tasync.broker.epochs import EpochHistory
from tasync.broker.errors import IncompleteLog, NoAnswer, NotIdentical, RemoteError
from tasync.broker.messages import Change, ChangeBatch, change_to_dict
from tasync.broker.settings import Settings
from tasync.broker.since import Since
from tasync.cli_recover import ask_node, compare_with_master
from tasync.client import print_table
from tasync.consumers.replay import read_since
from tasync.health import gather_status
from tasync.known_nodes import check_known
from tasync.options import (
    json_option,
    make_settings,
    print_json,
    since_option,
    timeout_option,
)
from tasync.progress import ProgressBar, ProgressRpc, progress_rpc


@dataclass(frozen=True)
class LogRead:
    """The legitimate changes after a point, oldest first, and how the read went."""

    changes: list[Change]
    complete: bool
    rejected: int


def read_log(settings: Settings, since: Since) -> LogRead:
    """Every legitimate change after ``since`` up to the network's head, as ``--dry-run`` lists.

    The master's eras judge each entry (a stale master's changes are left out) and its head
    bounds the read; without a master the log is read to its end with the eras it holds.
    The console's history page reads the log here too, so the two cannot disagree.
    """
    head: dict[str, Any] | None = None
    with progress_rpc(settings) as rpc, contextlib.suppress(NoAnswer, RemoteError):
        head = rpc.call_one(topology.MASTER, "head", timeout_s=2.0)
    history = EpochHistory.from_list(head["eras"]) if head else EpochHistory()
    found: list[Change] = []

    def keep(batch: ChangeBatch) -> None:
        found.extend(batch.changes)

    read = read_since(settings, since, history, on_changes=keep,
                      until_seq=int(head["seq"]) or None if head else None)
    return LogRead(found, read.complete, read.rejected)


def _list(settings: Settings, since: Since, *, as_json: bool) -> None:
    log = read_log(settings, since)
    found = log.changes
    if as_json:
        print_json({"since": since.describe(), "complete": log.complete,
                    "rejected": log.rejected, "changes": [change_to_dict(c) for c in found]})
    else:
        print_table(["seq", "epoch", "time (UTC)", "origin", "op", "kind", "name"], [
            [c.seq, c.epoch, dt.datetime.fromtimestamp(c.ts, dt.UTC).isoformat(
                timespec="milliseconds"), c.origin, c.op, c.kind, c.name] for c in found])
        click.echo(f"{len(found):,} changes since {since.describe()}"
                   + (f"; {log.rejected} stale changes rejected" if log.rejected else ""))
    if not log.complete:
        raise IncompleteLog(f"the change log may not reach back to {since.describe()}: its "
                            "older entries were trimmed by retention; the list may miss changes")


def _replay_node(rpc: ProgressRpc, node: str, since: Since, *, timeout_s: float,
                 as_json: bool) -> dict[str, Any]:
    with ProgressBar(not as_json, f"replaying into {node}") as bar:
        result = ask_node(rpc, node, "replay", since.to_args(), timeout_s=timeout_s, bar=bar)
    verdict = compare_with_master(rpc, node, timeout_s=timeout_s)
    result = {**result, **verdict}
    if not as_json:
        for line in describe_replay(result):
            click.echo(line)
    return result


def describe_replay(result: dict[str, Any]) -> list[str]:
    """What one node's replay did (its answer and the comparison with the master), in lines."""
    node = result["node"]
    lines = [f"{node}: replayed {result['changes']:,} changes since {result['since']} "
             f"({result['reapplied']:,} re-applied, {result['applied']:,} new), now at "
             f"seq {result['seq']:,}" + ("" if result["identical"] else
                                          "; differs from the master")]
    if not result["complete"]:
        lines.append(f"{node}: the change log may not reach back to {result['since']}")
    return lines


@click.command()
@since_option(allow_seq=True, required=True, what="the changes from")
@click.option("--node", metavar="NAME", help="Replay into this node.")
@click.option("--all", "all_nodes", is_flag=True, help="Replay into every live backup.")
@click.option("--dry-run", is_flag=True, help="Only list the changes; change nothing.")
@timeout_option(120.0)
@json_option
def replay(*, since: Since, node: str | None, all_nodes: bool, dry_run: bool, timeout_s: float,
           as_json: bool) -> None:
    """Replay the change log from a point in time into nodes, or list it.

    A replay re-applies every change after the point in seq order, also those a node
    already holds, which restores every object they touch; changes a stale master made are
    never listed nor replayed.

    \b
    Examples:
      tasync replay --since 2026-01-31T14:05:00Z --dry-run     what changed since then
      tasync replay --since seq:1200 --dry-run --json          for scripts
      tasync replay --since 2026-01-31T14:05:00Z --node b      repair b's copy
      tasync replay --since seq:1200 --all                     every live backup
    Exit status: 1 when the log may not reach back that far, or a node still differs from
    the master afterwards (tasync recover repairs it).
    """
    settings = make_settings()
    if dry_run:
        if node or all_nodes:
            raise click.UsageError("--dry-run lists the log; it takes no --node or --all")
        _list(settings, since, as_json=as_json)
        return
    if bool(node) == all_nodes:
        raise click.UsageError("give exactly one of --node NAME, --all or --dry-run")
    with progress_rpc(settings) as rpc:
        check_known(rpc, [node])
        targets = [node] if node else [
            r["node"] for r in gather_status(rpc, timeout_s=2.0).rows
            if r.get("alive") and r.get("role") != "master"]
        if not targets:
            raise NoAnswer("no live backup answers")
        results = [_replay_node(rpc, n, since, timeout_s=timeout_s, as_json=as_json)
                   for n in targets]
    if as_json:
        print_json(results)
    differing = [r["node"] for r in results if not r["identical"]]
    if differing:
        raise NotIdentical(f"still different from the master: {', '.join(differing)}; "
                           "run tasync recover --node NAME")
    if not all(r["complete"] for r in results):
        raise IncompleteLog(f"the change log may not reach back to {since.describe()}")
