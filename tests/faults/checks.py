"""One fault run from load to verdict: inject, heal, then compare the state against the promises.

``FaultRun`` marks when the fault was injected and healed, waits on events (load progressing,
seqs applied, alerts delivered; never fixed sleeps), and after healing checks
the guarantees of docs/reliability.md:

1. every change the CLI reported committed is on every node, with its last committed value;
   no seq applied twice; every export byte-identical;
2. every alert the broker confirmed was delivered; duplicates are counted, not forbidden;
3. every worker is still the process it started as (no manual restart) and caught up.

It appends one row per run to the results file (``tests.faults.results``) before asserting, so a
failing run is reported as faithfully as a passing one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import time
from typing import Any

from tests.faults import results
from tests.faults.cluster_net import ClusterNetwork
from tests.faults.load import Attempt, Load
from tests.network import applied_seqs
from tests.waiting import wait_for

#: Generous safety nets for waits (never performance assertions): two cores, shared.
PROGRESS_TIMEOUT_S = 180.0
RECOVER_TIMEOUT_S = 300.0


def max_stall(attempts: list[Attempt], start: float, end: float) -> float:
    """Longest time within [START, END] in which no attempt of the list succeeded."""
    times = sorted(a.ended for a in attempts if a.ok and start <= a.ended <= end)
    edges = [start, *times, end]
    return max((b - a for a, b in itertools.pairwise(edges)), default=0.0)


class FaultRun:
    """Load, fault window and verdict of one fault test."""

    def __init__(self, net: ClusterNetwork, load: Load, *, fault: str, test: str) -> None:
        self.net, self.load, self.fault, self.test = net, load, fault, test
        self.injected_at = self.healed_at = 0.0
        self.windows: list[tuple[float, float]] = []  # (injected, healed) of every fault
        self.recover_s: float | None = None
        self.row: dict[str, Any] = {}
        self.notes: list[str] = []
        self.wall_start = time.time()

    # -- phases -------------------------------------------------------------------------------

    def begin(self, *, changes: int = 3, alerts: int = 10) -> None:
        """Start the load and wait until it demonstrably flows."""
        self.load.start()
        self.wait_progress(self.load.started_at, changes=changes, alerts=alerts,
                           what="load flowing before the fault")

    def injected(self) -> None:
        """Mark the moment the fault was injected."""
        self.injected_at = time.monotonic()

    def healing(self) -> None:
        """Mark the moment the heal begins (before a node restart, which takes a while)."""
        self.healed_at = time.monotonic()
        self.windows.append((self.injected_at, self.healed_at))

    def wait_progress(self, since: float, *, changes: int = 1, alerts: int = 1,
                      what: str = "load progressing") -> None:
        wait_for(lambda: self.load.progressed(since, changes=changes, alerts=alerts),
                 timeout_s=PROGRESS_TIMEOUT_S, interval_s=0.2, what=what)

    def _recovered(self) -> bool:
        """A change committed after the heal is on every node; an alert sent after it arrived."""
        changes = self.load.changes.ok(started_after=self.healed_at)
        if not changes or self.net.restarted():
            return False
        if min(self.net.applied().values()) < (changes[0].seq or 0):
            return False
        if not self.load.alerts:
            return True
        alerts = self.load.confirmed(started_after=self.healed_at)
        return bool(alerts) and alerts[0].key in self.load.delivered()

    def wait_recovered(self) -> float:
        """Wait for end-to-end recovery after the last ``healing()``; return its seconds."""
        assert self.healed_at, "call healing() first"
        wait_for(self._recovered, timeout_s=RECOVER_TIMEOUT_S, interval_s=0.25,
                 what="end-to-end recovery after the heal")
        return time.monotonic() - self.healed_at

    def finish(self, *, recover_s: float | None = None) -> dict[str, Any]:
        """Wait for recovery, stop the load, check every guarantee, record the row, assert.

        RECOVER_S, when given, is the recovery time already measured (the soak's slowest).
        """
        assert self.healed_at, "call healing() before finish()"
        try:
            self.recover_s = self.wait_recovered() if recover_s is None else recover_s
        finally:
            self.load.stop()
        verdict = self._verify()
        results.append_row(self.row)
        assert not verdict, "; ".join(verdict)
        return self.row

    # -- the checks ---------------------------------------------------------------------------

    def _verify(self) -> list[str]:
        """Fill ``self.row`` and return what broke (empty: every guarantee held)."""
        net, problems = self.net, []
        restarted = net.restarted()
        if restarted:
            problems.append(f"workers needed a restart or died: {restarted}")
        top = max((a.seq or 0 for a in self.load.changes.ok()), default=0)
        try:
            head = net.wait_converged(at_least=top)
        except AssertionError as exc:
            problems.append(f"not converged: {exc}")
            head = net.master_seq()
        exports = net.exports()
        identical = len(set(exports.values())) == 1
        if not identical:
            problems.append("exports differ between nodes")
        changes_lost = self._changes_lost(exports, head, top)
        if changes_lost:
            problems.append(f"{len(changes_lost)} committed changes missing: {changes_lost[:5]}")
        twice = {n: len(s) - len(set(s)) for n in net.nodes
                 if (s := applied_seqs(net.root / n)) and len(s) != len(set(s))}
        if twice:
            problems.append(f"seqs applied twice: {twice}")
        lost, duplicates = self._alerts_lost()
        if lost:
            problems.append(f"{len(lost)} confirmed alerts never delivered: {sorted(lost)[:5]}")
        self._fill_row(head=head, identical=identical, changes_lost=len(changes_lost),
                       alerts_lost=len(lost), duplicates=duplicates, restarted=restarted,
                       twice=sum(twice.values()), problems=problems)
        return problems

    def _changes_lost(self, exports: dict[str, str], head: int, top: int) -> list[str]:
        """Committed changes some node lacks: a name missing, or not at a value it may have."""
        lost: set[str] = set()
        expected = self.load.changes.expected_subjects()
        for text in exports.values():
            held = json.loads(text).get("destination", {})
            for name, allowed in expected.items():
                if held.get(name, {}).get("subject") not in allowed:
                    lost.add(name)
        if top > head:
            lost.add(f"seq {top} > head {head}")
        return sorted(lost)

    def _alerts_lost(self) -> tuple[set[str], int]:
        """Confirmed alerts not delivered (after waiting for them), and duplicate deliveries."""
        if not self.load.alerts:
            return set(), 0
        confirmed = {a.key for a in self.load.confirmed()}

        def missing() -> set[str]:
            return confirmed - set(self.load.delivered())

        with contextlib.suppress(AssertionError):  # what is missing then is the finding
            wait_for(lambda: not missing(), timeout_s=RECOVER_TIMEOUT_S, interval_s=0.5,
                     what="every confirmed alert delivered")
        delivered = self.load.delivered()
        return missing(), sum(count - 1 for count in delivered.values())

    def _fill_row(self, *, head: int, identical: bool, changes_lost: int, alerts_lost: int,
                  duplicates: int, restarted: list[str], twice: int,
                  problems: list[str]) -> None:
        load, start, end = self.load, self.load.started_at, self.load.stopped_at
        changes, alerts = load.changes.attempts(), load.alert_attempts()

        def during(attempts: list[Attempt]) -> int:
            return sum(a.ok and any(lo <= a.started < hi for lo, hi in self.windows)
                       for a in attempts)

        self.row = {
            "fault": self.fault, "test": self.test,
            "when": dt.datetime.fromtimestamp(self.wall_start, dt.UTC).isoformat(
                timespec="seconds"),
            "load_s": round(end - start, 1),
            "fault_s": round(sum(hi - lo for lo, hi in self.windows), 1),
            "fault_windows": len(self.windows),
            "changes_tried": len(changes), "changes_committed": sum(a.ok for a in changes),
            "changes_committed_during_fault": during(changes), "changes_lost": changes_lost,
            "alerts_tried": len(alerts), "alerts_confirmed": sum(a.ok for a in alerts),
            "alerts_confirmed_during_fault": during(alerts), "alerts_lost": alerts_lost,
            "alert_duplicates": duplicates, "alert_load": bool(load.alerts),
            "alerts_confirmed_via_cli": sum(a.ok and a.via == "cli" for a in alerts),
            "head_seq": head, "exports_identical": identical, "seqs_applied_twice": twice,
            "workers_restarted": restarted,
            "recover_s": None if self.recover_s is None else round(self.recover_s, 1),
            "max_change_stall_s": round(max_stall(changes, start, end), 1),
            "max_alert_stall_s": round(max_stall(alerts, start, end), 1) if alerts else None,
            "passed": not problems, "problems": problems, "notes": self.notes,
        }
