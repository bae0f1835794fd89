"""Recovery and replay from the console: what each will do, said before; then done as the commands.

The plans are written from the network's status as ``tasync status`` gathers it (and, for a
replay, from the change log as ``tasync replay --dry-run`` reads it), so the confirmation page
says in sentences what will happen to which node. The work itself is the commands': the same
``recover`` and ``replay`` requests to the node, with the console user named (``by``) so that
``recovery.done`` and ``recovery.replayed`` in the node's trail say who asked, and the same
comparison with the master afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasync.broker.errors import ConfigError, NoAnswer
from tasync.broker.settings import Settings
from tasync.broker.since import Since
from tasync.cli_recover import ask_node, compare_with_master, describe_recovery
from tasync.cli_replay import LogRead, describe_replay
from tasync.health import NetworkStatus, gather_status
from tasync.known_nodes import check_known
from tasync.progress import ProgressBar, progress_rpc

#: How long a recovery or a replay may stay silent (the commands' ``--timeout`` default).
REPAIR_TIMEOUT_S = 120.0
#: The replay form's choice that means every live backup (``tasync replay --all``).
ALL_BACKUPS = "*all"
#: Changes listed, at most, on a replay's confirmation page (the newest are cut).
LISTED = 500


def _rows(report: NetworkStatus) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    rows = {str(r["node"]): r for r in report.rows}
    master = report.live_master()
    return rows, master


def recover_plan(report: NetworkStatus, node: str) -> dict[str, Any]:
    """What recovering ``node`` will do, in sentences, and whether it can be asked at all."""
    rows, master = _rows(report)
    row = rows.get(node)
    if row is None:
        return {"node": node, "can": False, "steps": [],
                "warnings": [f"the network knows no node {node!r}"]}
    if master is None:
        return {"node": node, "can": False, "steps": [],
                "warnings": ["no master answers, so there is nothing to recover from and "
                             "compare with: promote a node first"]}
    if master["node"] == node:
        return {"node": node, "can": False, "steps": [],
                "warnings": [f"{node} is the master: its state is the reference, nothing "
                             "would change"]}
    seq, head = row.get("applied_seq"), master.get("applied_seq")
    mine, theirs = str(row.get("checksum") or ""), str(master.get("checksum") or "")
    steps = [f"{node} is at seq {seq}; the master, {master['node']}, is at seq {head}."]
    if row.get("diverged"):
        steps.append(f"{node} holds changes the network never accepted: they are kept aside "
                     "in its conflicts.json, never applied, and it installs a snapshot of "
                     f"the master's configuration (all of it replaces what {node} holds), "
                     "then replays the change log's tail.")
    elif isinstance(seq, int) and isinstance(head, int) and seq < head:
        steps.append(f"{node} replays the {head - seq} changes it misses from the change log "
                     "when the log still reaches back that far; otherwise it installs a "
                     "snapshot of the master's configuration and replays the log's tail.")
    elif mine != theirs:
        steps.append(f"{node} holds the master's seq but other objects (checksum {mine[:12]} "
                     f"where the master has {theirs[:12]}): it installs a snapshot of the "
                     f"master's configuration, which replaces every object {node} holds.")
    else:
        steps.append(f"{node} already holds the master's state (checksum {mine[:12]}): "
                     "nothing needs doing, and the request is recorded in its trail all the "
                     "same.")
    steps.append(f"{node}'s checksum is then compared with the master's at the same seq; the "
                 "recovery succeeds only when they are equal.")
    steps.append("Alerts go on being delivered meanwhile: delivery does not depend on the "
                 "configuration being replicated.")
    warnings = []
    if not row.get("alive"):
        warnings.append(f"{node} does not answer: the recovery will fail until its worker "
                        "runs (a node catches up by itself when it starts).")
    return {"node": node, "can": True, "steps": steps, "warnings": warnings,
            "master": master["node"]}


def recover(settings: Settings, node: str, *, by: str,
            timeout_s: float = REPAIR_TIMEOUT_S) -> dict[str, Any]:
    """Recover ``node`` as ``tasync recover --node`` does, asked ``by``; what it did, in lines.

    Returns ``{"lines", "identical"}``: the command's report and whether the node's checksum
    equals the master's afterwards.

    Raises:
        UnknownNode, NoAnswer, RemoteError: as ``tasync recover`` reports them.
    """
    with progress_rpc(settings) as rpc, ProgressBar(False, f"recovering {node}") as bar:
        check_known(rpc, [node])
        report = ask_node(rpc, node, "recover", {"source": None, "snapshot": False, "by": by},
                          timeout_s=timeout_s, bar=bar)
        verdict = compare_with_master(rpc, node, timeout_s=timeout_s)
    lines = [describe_recovery(report)]
    if report["conflicts"]:
        lines.append(f"{len(report['conflicts'])} change(s) {node} made that the network never "
                     f"accepted are kept in {report['conflicts_file']}, not applied (tasync "
                     f"recover --node {node} --resubmit sends them through the master)")
    if verdict["identical"]:
        lines.append(f"{node} is identical to the master {verdict['master']}: seq "
                     f"{verdict['seq']:,}, checksum {verdict['checksum'][:12]}")
    else:
        lines.append(f"{node} still differs from the master {verdict['master']}: seq "
                     f"{verdict['node_seq']} checksum {verdict['node_checksum'][:12]} vs seq "
                     f"{verdict['seq']} checksum {verdict['checksum'][:12]}")
    return {"lines": lines, "identical": verdict["identical"]}


@dataclass(frozen=True)
class ReplayWanted:
    """A replay as the form asks for it: from where, into which nodes (or ``ALL_BACKUPS``)."""

    since: Since
    target: str

    @property
    def since_text(self) -> str:
        """``since`` as the form carries it onwards: ``seq:K`` or seconds since the epoch.

        A duration (``30m``) is pinned to the time it meant when the plan was made, so the
        replay done is the one the confirmation page stated.
        """
        return f"seq:{self.since.seq}" if self.since.seq is not None else f"{self.since.ts:.3f}"


def parse_replay(form: dict[str, str]) -> tuple[ReplayWanted | None, dict[str, str]]:
    """The replay form read: what is wanted, or errors by field."""
    errors: dict[str, str] = {}
    text, target = form.get("since", "").strip(), form.get("target", "").strip()
    since = None
    if not text:
        errors["since"] = "give a time, a duration (30m) or seq:K"
    else:
        try:
            since = Since.parse(text, allow_seq=True)
        except ConfigError as exc:
            errors["since"] = str(exc).split(": ", 1)[-1]
    if not target:
        errors["target"] = "choose a node, or every backup"
    if since is None or errors:
        return None, errors
    return ReplayWanted(since, target), {}


def replay_targets(report: NetworkStatus, target: str) -> list[str]:
    """The nodes a replay goes into: the one named, or every live backup (as ``--all``)."""
    if target != ALL_BACKUPS:
        return [target]
    return [str(r["node"]) for r in report.rows if r.get("alive") and r.get("role") != "master"]


def replay_plan(report: NetworkStatus, wanted: ReplayWanted, log: LogRead) -> dict[str, Any]:
    """What the replay will do, in sentences, with the changes it replays (newest last)."""
    rows, master = _rows(report)
    targets = replay_targets(report, wanted.target)
    since = wanted.since.describe()
    changes = log.changes
    warnings: list[str] = []
    can = True
    if not targets:
        warnings.append("no live backup answers: there is nothing to replay into")
        can = False
    for node in targets:
        row = rows.get(node)
        if row is None:
            warnings.append(f"the network knows no node {node!r}")
            can = False
        elif row.get("role") == "master":
            warnings.append(f"{node} is the master: the change log is its own output, there "
                            "is nothing to replay into it")
            can = False
        elif not row.get("alive"):
            warnings.append(f"{node} does not answer: the replay will fail until its worker "
                            "runs.")
    if not log.complete:
        warnings.append(f"the change log may not reach back to {since}: its older entries "
                        "were trimmed by retention, so the replay may miss changes")
    if changes:
        span = f"seq {changes[0].seq} to {changes[-1].seq}"
        first = (f"The change log holds {len(changes)} change(s) after {since} ({span}), "
                 "listed below" + (f" (the first {LISTED})" if len(changes) > LISTED else "")
                 + "; changes a replaced master made are never replayed.")
    else:
        first = (f"The change log holds no change after {since}: the replay re-applies "
                 "nothing, and is recorded in the trail all the same.")
    who = ", ".join(targets) or "no node"
    steps = [first,
             f"{who} {'re-applies' if len(targets) == 1 else 're-apply'} every one of them in "
             "seq order, also those already held: each object they touch is rewritten as the "
             "log has it, which repairs a copy that drifted.",
             "Objects no listed change touches are left as they are (tasync recover replaces "
             "everything).",
             f"Then {'its' if len(targets) == 1 else 'each'} checksum is compared with the "
             f"master's{'' if master is None else ' (' + str(master['node']) + ')'}."]
    return {"can": can, "steps": steps, "warnings": warnings, "targets": targets,
            "changes": changes[:LISTED], "count": len(changes)}


def replay(settings: Settings, wanted: ReplayWanted, *, by: str,
           timeout_s: float = REPAIR_TIMEOUT_S) -> dict[str, Any]:
    """Replay as ``tasync replay --since`` does into the wanted nodes, asked ``by``.

    Returns ``{"lines", "differing"}``: each node's report, and the nodes that still differ
    from the master afterwards.

    Raises:
        UnknownNode, NoAnswer, RemoteError: as ``tasync replay`` reports them.
    """
    with progress_rpc(settings) as rpc:
        if wanted.target == ALL_BACKUPS:
            targets = replay_targets(gather_status(rpc, timeout_s=2.0), wanted.target)
        else:
            check_known(rpc, [wanted.target])
            targets = [wanted.target]
        if not targets:
            raise NoAnswer("no live backup answers")
        results = []
        for node in targets:
            with ProgressBar(False, f"replaying into {node}") as bar:
                result = ask_node(rpc, node, "replay", {**wanted.since.to_args(), "by": by},
                                  timeout_s=timeout_s, bar=bar)
            results.append({**result, **compare_with_master(rpc, node, timeout_s=timeout_s)})
    return {"lines": [line for r in results for line in describe_replay(r)],
            "differing": [r["node"] for r in results if not r["identical"]]}
