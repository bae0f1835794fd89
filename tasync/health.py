"""The network's state as ``tasync status`` shows it, and its health as an exit code.

A row for every node the network knows (the replicated ``node`` objects, as any answering node
holds them), alive or not: a node that does not answer is listed with when it was last seen
(from its peers' beacons, ``tasync.consumers.peers``) and, for the owner of the newest era, as the
master, so a dead master never just disappears from the table. The health is the first of
these that applies, most severe first (``tasync.broker.errors.ExitCode``):

=================== =============================================================
``NO_MASTER`` (4)    no node answers as master (or no node answers at all)
``NODE_DOWN`` (5)    a known node does not answer
``NOT_IN_SYNC`` (6)  a live node is not ready, behind the master, diverged, or its
                     checksum differs from the master's
``STRANDED_LISTS``   a precedence list's queue holds alerts that no live node of the
(7)                  list consumes
``OK`` (0)           every known node alive, ready and in sync
=================== =============================================================
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import click

from tasync.alert_lists import gather_lists, stranded
from tasync.broker import topology
from tasync.broker.connection import RECOVERABLE, describe
from tasync.broker.errors import BrokerUnreachable, ExitCode, NoAnswer
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings
from tasync.client import rpc_client

#: What ends one check of ``watch`` without ending the watch.
_UNREACHABLE: tuple[type[BaseException], ...] = (BrokerUnreachable, *RECOVERABLE)
#: The order in which degraded states decide the exit code.
SEVERITY = (ExitCode.NO_MASTER, ExitCode.NODE_DOWN, ExitCode.NOT_IN_SYNC,
            ExitCode.STRANDED_LISTS)


@dataclass
class NetworkStatus:
    """Every known node's row, the problems found, and the stranded lists reported."""

    rows: list[dict[str, Any]]
    problems: list[tuple[ExitCode, str]] = field(default_factory=list)
    stranded: list[dict[str, Any]] = field(default_factory=list)

    @property
    def code(self) -> ExitCode:
        """The health as an exit code: ``OK``, or the most severe problem's."""
        found = {code for code, _ in self.problems}
        return next((code for code in SEVERITY if code in found), ExitCode.OK)

    def to_json(self) -> dict[str, Any]:
        """What ``status --json`` prints: the rows, the health and the stranded lists."""
        return {"nodes": self.rows, "stranded": self.stranded,
                "health": {"code": int(self.code), "state": self.code.name.lower(),
                           "problems": [{"code": int(c), "state": c.name.lower(), "what": w}
                                        for c, w in self.problems]}}

    def live(self) -> list[dict[str, Any]]:
        """The rows of nodes that answered."""
        return [r for r in self.rows if r.get("alive")]

    def live_master(self) -> dict[str, Any] | None:
        """The row of the master, if it answered."""
        return next((r for r in self.rows if r.get("role") == "master" and r.get("alive")),
                    None)


def gather_status(rpc: RpcClient, *, timeout_s: float, max_lag: int = 0) -> NetworkStatus:
    """Every node's status, answering or not, with lag and sync state against the master.

    Waits until every node known has answered, or ``timeout_s``.

    Args:
        rpc: a connected request client.
        timeout_s: how long to wait for answers.
        max_lag: how many changes a live node may be behind before it counts as not in sync
            (a change in flight while the command runs).
    """
    master: dict[str, Any] | None = None
    with contextlib.suppress(NoAnswer):
        master = rpc.call_one(topology.MASTER, "status", timeout_s=min(timeout_s, 2.0))
    known = set(str(n) for n in (master or {}).get("nodes", []))
    try:
        replies = [r for r in rpc.call(topology.ALL, "status", timeout_s=timeout_s,
                                       expect=len(known) or None) if r.ok]
    except NoAnswer:
        replies = []
    answers = {r.node: {**r.data, "alive": True} for r in replies}
    for data in answers.values():
        known.update(str(n) for n in data.get("nodes", []))
    rows = {name: answers.get(name) or _silent_row(name, list(answers.values()))
            for name in known | set(answers)}
    status = NetworkStatus(rows=[rows[n] for n in sorted(rows)])
    if answers:  # every node watches every list's queue (tasync.consumers.delivery.lists)
        status.stranded = stranded(gather_lists(rpc, timeout_s=min(timeout_s, 2.0)))
    _judge(status, master, max_lag=max_lag)
    return status


def _silent_row(name: str, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """A known node that did not answer: when its peers last heard of it, and its role."""
    beacons = [a["peers"][name] for a in answers if name in (a.get("peers") or {})]
    last = max(beacons, key=lambda b: b["seen_at"], default=None)
    owner = max(answers, key=lambda a: int(a.get("epoch", 0)), default={}).get("era_owner")
    role = "master" if owner == name else (last or {}).get("role", "?")
    return {"node": name, "alive": False, "ready": False, "role": role,
            "epoch": (last or {}).get("epoch"), "applied_seq": (last or {}).get("seq"),
            "last_seen": last["seen_at"] if last else None}


def _judge(status: NetworkStatus, master: dict[str, Any] | None, *, max_lag: int) -> None:
    """Fill in lag and sync per row, and the problems of the whole network."""
    live = status.live()
    head = int(master["applied_seq"]) if master is not None else max(
        (int(r.get("applied_seq", 0)) for r in live), default=0)
    if master is None:
        owner = next((r["node"] for r in status.rows if r.get("role") == "master"), None)
        status.problems.append((ExitCode.NO_MASTER, "no node answers" if not live else
                                "no master answers" + (f" ({owner} was the master)"
                                                       if owner else "")))
    for row in status.rows:
        if not row.get("alive"):
            seen = row.get("last_seen")
            when = f"last seen {ago(seen)}" if seen else "not seen since this node started"
            status.problems.append((ExitCode.NODE_DOWN, f"{row['node']} does not answer ({when})"))
            continue
        row["lag"] = head - int(row.get("applied_seq", 0))
        row["in_sync"] = master is not None and row.get("checksum") == master["checksum"]
        why = [w for w, bad in (("not ready", not row.get("ready")),
                                (f"{row['lag']} changes behind", row["lag"] > max_lag),
                                ("diverged", row.get("diverged")),
                                ("checksum differs", master is not None and row["lag"] <= 0
                                 and not row["in_sync"])) if bad]
        if why:
            status.problems.append((ExitCode.NOT_IN_SYNC, f"{row['node']}: {', '.join(why)}"))
    for row in status.stranded:
        status.problems.append((ExitCode.STRANDED_LISTS,
                                f"list {row.get('list')} holds {row.get('messages')} alerts and "
                                "no live node of it consumes them"))


def ago(when: float | None, *, now: float | None = None) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``: how long ago a Unix time was."""
    if when is None:
        return ""
    seconds = max(0.0, (time.time() if now is None else now) - float(when))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def watch(settings: Settings, *, every_s: float, timeout_s: float, max_lag: int) -> None:
    """Check the network every ``every_s`` and print a line whenever its health changes.

    Runs until SIGTERM or SIGINT (a service's log, or a terminal left open); a broker that
    cannot be reached is a state like the others, not the end of the watch.
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    last: tuple[Any, ...] | None = None
    while not stop.is_set():
        try:
            with rpc_client(settings) as rpc:
                report = gather_status(rpc, timeout_s=timeout_s, max_lag=max_lag)
            state: tuple[Any, ...] = tuple((code, what.split(" (")[0])
                                           for code, what in report.problems)
            line = "; ".join(f"{c.name.lower()}: {w}" for c, w in report.problems) or "ok"
        except _UNREACHABLE as exc:
            state, line = ("unreachable",), f"broker_unreachable: {describe(exc)}"
        if state != last:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            click.echo(f"{stamp} {line}")
            last = state
        stop.wait(every_s)
