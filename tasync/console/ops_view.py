"""Promotion from the console: what it will do, said before; then done as ``tasync promote``.

The confirmation is written from the network's status as ``tasync status`` gathers it: which
node becomes the master with which epoch, what happens to the current master, how far the node
has to catch up. The promotion itself is ``tasync promote``'s request to the node, with the
console user named (``by``), so ``master.promoted`` in the node's trail says who asked; the
console then waits, as the command does, until every live node knows the new epoch.
"""

from __future__ import annotations

from typing import Any

from tasync.broker.settings import Settings
from tasync.cli_recover import ask_node, wait_epoch
from tasync.consumers.roles import SEAT_WAIT_S
from tasync.health import NetworkStatus
from tasync.known_nodes import check_known
from tasync.progress import ProgressBar, progress_rpc

#: How long a promotion may stay silent (``tasync promote --timeout``'s default).
PROMOTE_TIMEOUT_S = 60.0


def plan(report: NetworkStatus, node: str) -> dict[str, Any]:
    """What promoting ``node`` will do, in sentences, and whether it can be asked at all."""
    rows = {str(r["node"]): r for r in report.rows}
    row = rows.get(node)
    if row is None:
        return {"node": node, "can": False, "steps": [],
                "warnings": [f"the network knows no node {node!r}"]}
    master = report.live_master()
    epochs = [int(r["epoch"]) for r in report.rows if isinstance(r.get("epoch"), int)]
    epoch = max(epochs, default=0) + 1
    if master is not None and master["node"] == node:
        return {"node": node, "can": False, "steps": [],
                "warnings": [f"{node} already is the master (epoch {master.get('epoch')}): "
                             "nothing would change"]}
    steps = [f"{node} becomes the master of the network with a new epoch, {epoch}; from then "
             "on only its changes are accepted."]
    if master is not None:
        steps.append(f"The current master, {master['node']}, is asked to step down; it stays "
                     "a backup. Changes it committed that the broker never confirmed are "
                     f"kept aside on it (tasync recover --node {master['node']}).")
    else:
        steps.append(f"No master answers now: {node} takes the master's seat once the broker "
                     f"has let the old master's go (it waits up to {SEAT_WAIT_S:g} s). If the "
                     "old master comes back, it finds its seat taken and stays a backup.")
    seq, lag = row.get("applied_seq"), row.get("lag")
    behind = f", {lag} behind the master" if lag else ""
    steps.append(f"{node} first applies every change the broker confirmed (it is at seq "
                 f"{seq}{behind}); meanwhile, a few seconds, no master takes configuration "
                 "changes.")
    steps.append("Alerts go on being delivered: delivery does not depend on the master.")
    warnings = []
    if not row.get("alive"):
        warnings.append(f"{node} does not answer: the promotion will fail until its worker "
                        "runs.")
    elif not row.get("ready"):
        warnings.append(f"{node} is not ready yet (still catching up).")
    return {"node": node, "can": True, "steps": steps, "warnings": warnings, "epoch": epoch,
            "master": master["node"] if master is not None else None}


def promote(settings: Settings, node: str, *, by: str,
            timeout_s: float = PROMOTE_TIMEOUT_S) -> dict[str, Any]:
    """Promote ``node`` as ``tasync promote`` does, asked ``by``; its ``--json`` answer.

    Raises:
        UnknownNode, NoAnswer, RemoteError: as ``tasync promote`` reports them.
    """
    with progress_rpc(settings) as rpc, ProgressBar(False, f"promoting {node}") as bar:
        check_known(rpc, [node])
        seat_s = min(SEAT_WAIT_S, timeout_s / 2)  # leaves time to drain and answer
        result = ask_node(rpc, node, "promote", {"seat_wait_s": seat_s, "by": by},
                          timeout_s=timeout_s, bar=bar)
        knowing, behind = wait_epoch(rpc, int(result["epoch"]), timeout_s=min(timeout_s, 15.0))
    return {**result, "nodes_at_epoch": knowing, "nodes_behind": behind}


def summary(result: dict[str, Any]) -> list[str]:
    """What a promotion did, in the words of ``tasync promote``."""
    node, epoch = result["node"], result["epoch"]
    if result["already"]:
        return [f"{node} already is the master (epoch {epoch})"]
    previous = {
        "stepped_down": f"; {result['previous']} stepped down",
        "dropped": "; the old master did not answer (hung or cut off): the broker dropped its "
                   f"connection after {result.get('waited_s', 0):.1f} s, and it stays a backup "
                   "if it comes back",
    }.get(str(result.get("fenced")), "; no master was running")
    lines = [f"{node} is the master now: epoch {epoch} from seq {result['base_seq']:,} "
             f"(drained {result['drained']:,} changes){previous}"]
    if result["nodes_behind"]:
        lines.append(f"not yet at epoch {epoch}: {', '.join(result['nodes_behind'])} (each "
                     "learns it from its sync queue)")
    return lines
