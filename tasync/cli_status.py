"""``tasync status``: every node's health in one table, and the exit code that sums it up."""

from __future__ import annotations

import sys
from typing import Any

import click

from tasync.client import print_table, rpc_client
from tasync.health import ago, gather_status, watch
from tasync.options import (
    json_option,
    make_settings,
    print_json,
    timeout_option,
)


@click.command()
@click.option("--max-lag", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="CHANGES", help="How far behind the master a node may be and still "
                                      "count as in sync (changes in flight).")
@click.option("--watch", "watch_s", type=click.FloatRange(min=1.0), default=None,
              metavar="SECONDS", help="Check again every SECONDS, printing one line each time "
                                      "the health changes, until stopped.")
@timeout_option(2.0)
@json_option
def status(*, max_lag: int, watch_s: float | None, timeout_s: float, as_json: bool) -> None:
    """Every node the network knows: role, epoch, seq, lag, alive, ready, in sync, last seen.

    A health check by exit code: 0 when every known node is alive, ready and in sync;
    4 no master answers; 5 a known node does not answer; 6 a node is not ready, behind,
    diverged or differs from the master; 7 a precedence list holds alerts no live node of
    it consumes; 3 the broker is unreachable. The first that applies, in that order.

    \b
    Examples:
      tasync status
      tasync status --json | jq .health
      tasync status --timeout 5 --max-lag 10 || page-the-oncall
      tasync status --watch 30        a line each time the health changes
    """
    if watch_s is not None:
        watch(make_settings(), every_s=watch_s, timeout_s=timeout_s, max_lag=max_lag)
        return
    with rpc_client(make_settings()) as rpc:
        report = gather_status(rpc, timeout_s=timeout_s, max_lag=max_lag)
    if as_json:
        print_json(report.to_json())
    else:
        print_table(
            ["node", "role", "epoch", "seq", "lag", "alive", "ready", "in sync", "checksum",
             "last seen"],
            [[r["node"], r.get("role", "?"), r.get("epoch", ""), r.get("applied_seq", ""),
              r.get("lag", ""), _yes(r.get("alive")), _yes(r.get("ready")),
              _yes(r.get("in_sync")) if r.get("alive") else "", str(r.get("checksum") or "")[:12],
              "now" if r.get("alive") else ago(r.get("last_seen")) or "never"]
             for r in report.rows],
        )
        for code, what in report.problems:
            click.echo(f"tasync: {code.name.lower().replace('_', ' ')}: {what}", err=True)
    sys.exit(int(report.code))


def _yes(value: Any) -> str:
    return "yes" if value else "no"
