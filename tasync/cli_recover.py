"""``tasync recover`` and ``tasync promote``: the one recovery command, and failing over.

``recover`` asks the node itself to recover (``tasync.consumers.recovery``): it replays the change
log when the log still reaches back, else installs a snapshot from the master or a peer and replays
the tail; it reports what it applied and the conflicts it keeps. The command then compares the
node with the master at the same seq and succeeds only when their checksums are equal.
``promote`` makes a backup the master with a new epoch (``tasync.consumers.roles``).
"""

from __future__ import annotations

import time
from typing import Any

import click

from tasync.broker import topology
from tasync.broker.errors import NoAnswer, NotIdentical, RemoteError
from tasync.consumers.conflicts import as_op
from tasync.consumers.roles import SEAT_WAIT_S
from tasync.health import gather_status
from tasync.known_nodes import check_known
from tasync.options import (
    json_option,
    make_settings,
    print_json,
    timeout_option,
)
from tasync.progress import ProgressBar, ProgressRpc, progress_rpc


def ask_node(rpc: ProgressRpc, node: str, op: str, args: dict[str, Any], *, timeout_s: float,
         bar: ProgressBar) -> dict[str, Any]:
    """Ask ``node`` to run ``op`` with progress on ``bar``; say plainly when it does not answer."""
    try:
        return rpc.call_with_progress(topology.node_key(node), op, args,
                                      idle_timeout_s=timeout_s, on_progress=bar.update)
    except NoAnswer as exc:
        raise NoAnswer(f"{node} does not answer ({exc}); is its worker running?") from None


def compare_with_master(rpc: ProgressRpc, node: str, *, timeout_s: float) -> dict[str, Any]:
    """Wait until ``node`` holds the master's seq, then compare checksums.

    Returns ``{"master", "seq", "checksum", "node_seq", "node_checksum", "identical"}``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            master = rpc.call_one(topology.MASTER, "status", timeout_s=5.0)
        except NoAnswer:
            raise NoAnswer("no master answers, so there is nothing to compare with: promote a "
                           "node first (tasync promote NODE)") from None
        mine = rpc.call_one(topology.node_key(node), "status", timeout_s=5.0)
        result = {"master": master["node"], "seq": master["applied_seq"],
                  "checksum": master["checksum"], "node_seq": mine["applied_seq"],
                  "node_checksum": mine["checksum"]}
        if mine["applied_seq"] == master["applied_seq"] or time.monotonic() > deadline:
            return {**result, "identical": mine["checksum"] == master["checksum"]
                    and mine["applied_seq"] == master["applied_seq"]}
        time.sleep(0.1)


def _resubmit(rpc: ProgressRpc, node: str, conflicts: list[dict[str, Any]],
              *, timeout_s: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Send each kept change through the master, in seq order; returns (done, failed)."""
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for entry in sorted(conflicts, key=lambda e: (e["seq"], e["epoch"])):
        try:
            result = rpc.call_one(topology.MASTER, "commit", {"ops": [as_op(entry)]},
                                  timeout_s=timeout_s)
        except (RemoteError, NoAnswer) as exc:
            failed.append({**entry, "error": str(exc)})
            continue
        done.append({"epoch": entry["epoch"], "seq": entry["seq"], "origin": entry["origin"],
                     "op": entry["op"], "kind": entry["kind"], "name": entry["name"],
                     "new_seq": result["last_seq"]})
    if done:
        rpc.call_one(topology.node_key(node), "conflicts_resolved", {"done": done},
                     timeout_s=timeout_s)
    return done, failed


def describe_recovery(report: dict[str, Any]) -> str:
    """What a node's recovery did, in one line (the node's ``recover`` answer)."""
    node, method = report["node"], report["method"]
    if report.get("note") and method == "none":
        return f"{node}: {report['note']}"
    if method == "log":
        return (f"{node}: replayed {report['applied']:,} changes from the change log "
                f"(seq {report['before_seq']:,} -> {report['after_seq']:,})")
    if method == "snapshot":
        snap = report["snapshot"]
        why = f" ({report['note']})" if report.get("note") else ""
        return (f"{node}: installed a snapshot of {snap['objects']:,} objects at seq "
                f"{snap['seq']:,} from {snap['source']}{why}, then replayed "
                f"{report['applied']:,} changes (now at seq {report['after_seq']:,})")
    return f"{node}: already up to date at seq {report['after_seq']:,}"


def _change_line(entry: dict[str, Any]) -> str:
    return (f"  seq {entry['seq']} epoch {entry['epoch']} from {entry['origin']}: "
            f"{entry['op']} {entry['kind']} {entry['name']}")


def _print_recovery(report: dict[str, Any], done: list[dict[str, Any]],
                    failed: list[dict[str, Any]], verdict: dict[str, Any]) -> None:
    click.echo(describe_recovery(report))
    still_open = [c for c in report["conflicts"]
                  if (c["epoch"], c["seq"]) not in {(d["epoch"], d["seq"]) for d in done}]
    if still_open:
        click.echo(f"conflicts: {len(still_open)} change(s) {report['node']} made that the "
                   f"network never accepted, kept in {report['conflicts_file']} (not applied):")
        for entry in still_open:
            click.echo(_change_line(entry) + (f"  [{entry['error']}]" if "error" in entry else ""))
        if not done and not failed:
            click.echo(f"  send them through the master with: tasync recover --node "
                       f"{report['node']} --resubmit")
    for entry in done:
        click.echo(f"resubmitted: seq {entry['seq']} epoch {entry['epoch']}: {entry['op']} "
                   f"{entry['kind']} {entry['name']} -> committed as seq {entry['new_seq']}")
    for entry in failed:
        click.echo(f"not resubmitted: seq {entry['seq']}: {entry['error']}")
    if verdict["identical"]:
        click.echo(f"{report['node']} is identical to the master {verdict['master']}: seq "
                   f"{verdict['seq']:,}, checksum {verdict['checksum'][:12]}")


@click.command()
@click.option("--node", required=True, metavar="NAME", help="The node to bring up to date.")
@click.option("--from", "source", metavar="NAME",
              help="Take a snapshot from this node when one is needed "
                   "(default: the master, else the most advanced peer).")
@click.option("--snapshot", "force_snapshot", is_flag=True,
              help="Install a snapshot even when the change log could fill the gap.")
@click.option("--resubmit", is_flag=True,
              help="Also send the node's kept conflicts through the current master.")
@timeout_option(120.0)
@json_option
def recover(*, node: str, source: str | None, force_snapshot: bool, resubmit: bool,
            timeout_s: float, as_json: bool) -> None:
    """Bring NODE to the master's state, and report what it applied and any conflicts.

    The node replays the change log when the log still reaches back to its last change;
    otherwise (or when it holds changes the network never accepted) it installs a snapshot
    from the master or an up-to-date peer and replays the log's tail. Changes it made that
    the network never accepted are kept in <data-dir>/conflicts.json and listed here, never
    applied silently; --resubmit sends them through the current master.

    \b
    Examples:
      tasync recover --node b               a backup that was down
      tasync recover --node a               the old master, after `tasync promote b`
      tasync recover --node a --resubmit    ...and send its kept changes through b
      tasync recover --node d --from c      take the snapshot from c
    Exit status: 0 only when NODE's checksum equals the master's afterwards.
    --timeout bounds the silence between two answers, not the whole recovery.
    """
    settings = make_settings()
    args = {"source": source, "snapshot": force_snapshot}
    with progress_rpc(settings) as rpc:
        check_known(rpc, [node, source])
        with ProgressBar(not as_json, f"recovering {node}") as bar:
            report = ask_node(rpc, node, "recover", args, timeout_s=timeout_s, bar=bar)
        done: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        if resubmit and report["conflicts"]:
            done, failed = _resubmit(rpc, node, report["conflicts"], timeout_s=timeout_s)
        verdict = compare_with_master(rpc, node, timeout_s=timeout_s)
    if as_json:
        print_json({"recovery": report, "resubmitted": done, "failed": failed, **verdict})
    else:
        _print_recovery(report, done, failed, verdict)
    if not verdict["identical"]:
        raise NotIdentical(
            f"{node} differs from the master {verdict['master']}: seq {verdict['node_seq']} "
            f"checksum {verdict['node_checksum'][:12]} vs seq {verdict['seq']} checksum "
            f"{verdict['checksum'][:12]}; try tasync recover --node {node} --snapshot")
    if failed:
        raise NotIdentical(f"{len(failed)} kept change(s) could not be resubmitted (see above)")


def wait_epoch(rpc: ProgressRpc, epoch: int, *, timeout_s: float) -> tuple[list[str], list[str]]:
    """Wait until every live node reports ``epoch``; returns (nodes that do, nodes that don't).

    A node that does not answer within a second (a replaced master that hangs) is not waited
    for: it is not live, and it learns the epoch from its sync queue when it resumes.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in gather_status(rpc, timeout_s=1.0).rows if r.get("alive")]
        behind = sorted(r["node"] for r in rows if int(r.get("epoch", 0)) < epoch)
        if not behind or time.monotonic() > deadline:
            return sorted(r["node"] for r in rows if r["node"] not in behind), behind
        time.sleep(0.1)


@click.command()
@click.argument("node")
@timeout_option(60.0)
@json_option
def promote(*, node: str, timeout_s: float, as_json: bool) -> None:
    """Make NODE the master (epoch + 1) once it has drained every confirmed change.

    NODE takes the broker's master seat, which only one node holds at a time: the current
    master, if it answers, steps down and gives it up; if it does not answer (hung, cut off),
    NODE waits for the broker to drop its connection (a few seconds). NODE then applies every
    change the broker confirmed, opens a new epoch and announces it to every node through the
    change stream. A replaced master that comes back finds its seat gone and stays a backup;
    its unconfirmed changes are kept in its conflicts.json (see tasync recover). Of two
    promotions at once, one wins; the other says so and changes nothing.

    \b
    Examples:
      tasync promote b      the master died: b takes over
      tasync promote a      hand back to a once `tasync recover --node a` made it identical
    """
    settings = make_settings()
    with progress_rpc(settings) as rpc, ProgressBar(not as_json, f"promoting {node}") as bar:
        check_known(rpc, [node])
        seat_s = min(SEAT_WAIT_S, timeout_s / 2)  # leaves time to drain and answer
        result = ask_node(rpc, node, "promote", {"seat_wait_s": seat_s}, timeout_s=timeout_s,
                          bar=bar)
        knowing, behind = wait_epoch(rpc, int(result["epoch"]), timeout_s=min(timeout_s, 15.0))
    result = {**result, "nodes_at_epoch": knowing, "nodes_behind": behind}
    if as_json:
        print_json(result)
        return
    if result["already"]:
        click.echo(f"{node} already is the master (epoch {result['epoch']})")
        return
    previous = {
        "stepped_down": f"; {result['previous']} stepped down",
        "dropped": f"; the old master did not answer (hung or cut off): the broker dropped its "
                   f"connection after {result.get('waited_s', 0):.1f} s, and it stays a backup "
                   "if it comes back",
    }.get(str(result.get("fenced")), "; no master was running")
    click.echo(f"{node} is the master now: epoch {result['epoch']} from seq "
               f"{result['base_seq']:,} (drained {result['drained']:,} changes){previous}")
    click.echo(f"nodes at epoch {result['epoch']}: {', '.join(knowing) or 'none'}")
    if behind:
        click.echo(f"not yet at epoch {result['epoch']}: {', '.join(behind)} (each learns it "
                   "from its sync queue)")
