"""Continuous load for the fault suite: configuration changes on the master, alerts from sources.

Every attempt is recorded with its outcome, so the checks can hold the product to exactly what it
promised (docs/reliability.md):

* a change counts as **committed** when ``tasync config set`` exited 0 (the CLI reported the
  broker's confirm), or, in library mode, when the master answered the same ``commit`` request;
* an alert counts as **confirmed** when ``tasync send`` exited 0, or, in library mode, when
  ``AlertSender.send`` (the code behind ``tasync send``) returned: the broker confirmed it.

A failed attempt promises nothing either way; it may or may not have gone through.

Two modes, because a CLI process costs about half a second of CPU: ``cli`` runs the real
commands (the fault tests' changes), ``library`` calls the same client code in this process
(alerts, and the soak's 50 alerts/s and 5 changes/s, which two cores cannot afford as processes).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasync.broker import kinds, topology
from tasync.broker.alerts import Alert
from tasync.broker.connection import close_quietly, connect
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings
from tasync.client import RESEND_S
from tasync.producers.sender import AlertSender
from tests.faults.cluster_net import ROUTED, SOURCES, ClusterNetwork, destination, list_args

_COMMITTED_RE = re.compile(r"committed seq (\d+)\.\.(\d+)")


@dataclass(frozen=True)
class Attempt:
    """One change or alert the load tried: ``key`` is the object name or the alert id."""

    key: str
    value: str
    started: float
    ended: float
    ok: bool
    seq: int | None = None
    error: str = ""
    via: str = ""


class PacedLoad(threading.Thread):
    """Calls ``attempt(n)`` about ``rate`` times a second until ``stop``; never bursts."""

    def __init__(self, name: str, rate: float) -> None:
        super().__init__(name=name, daemon=True)
        self.rate = rate
        self.stop_event = threading.Event()
        self._attempts: list[Attempt] = []
        self._lock = threading.Lock()

    def attempt(self, n: int) -> Attempt:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; called on the load's thread when it ends."""

    def run(self) -> None:
        n, due = 0, time.monotonic()
        try:
            while not self.stop_event.is_set():
                delay = due - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    break
                due = max(due + 1.0 / self.rate, time.monotonic())
                n += 1
                result = self.attempt(n)
                with self._lock:
                    self._attempts.append(result)
        finally:
            self.close()

    def stop(self, timeout_s: float = 120.0) -> None:
        self.stop_event.set()
        self.join(timeout_s)
        assert not self.is_alive(), f"{self.name} did not stop"

    def attempts(self) -> list[Attempt]:
        with self._lock:
            return list(self._attempts)

    def ok(self, *, started_after: float = 0.0) -> list[Attempt]:
        return [a for a in self.attempts() if a.ok and a.started > started_after]


class ChangeLoad(PacedLoad):
    """Sets destinations on the master; names cycle through ``pool`` (None: all new names).

    Each change sets ``subject`` to ``v<n>``, so the final value of every name is known from the
    attempts alone (see ``expected_subjects``).
    """

    def __init__(self, net: ClusterNetwork, *, rate: float, via: str = "cli",
                 pool: int | None = None) -> None:
        super().__init__("change-load", rate)
        self.net, self.via, self.pool = net, via, pool
        self.url = (net.root / "unused.jsonl").as_uri()
        self._rpc: RpcClient | None = None

    def name_for(self, n: int) -> str:
        return f"chg-{(n % self.pool) if self.pool else n:06d}"

    def attempt(self, n: int) -> Attempt:
        name, subject = self.name_for(n), f"v{n}"
        started = time.monotonic()
        try:
            seq, error = (self._by_cli if self.via == "cli" else self._by_library)(name, subject)
        except Exception as exc:
            self._drop_rpc()
            seq, error = None, f"{type(exc).__name__}: {exc}"[:300]
        return Attempt(name, subject, started, time.monotonic(), seq is not None, seq, error)

    def _by_cli(self, name: str, subject: str) -> tuple[int | None, str]:
        out = self.net.cli("config", "set", "destination", name, "--url", self.url,
                           "--subject", subject, "--timeout", "30", check=False, timeout=120)
        match = _COMMITTED_RE.search(out.stdout)
        if out.returncode == 0 and match:
            return int(match.group(2)), ""
        return None, f"exit {out.returncode}: {out.stderr.strip()[-300:]}"

    def _by_library(self, name: str, subject: str) -> tuple[int | None, str]:
        if self._rpc is None:
            settings = Settings.from_url(self.net.broker_url)
            conn = connect(settings, name="fault-change-load", retry_s=5.0)
            self._rpc = RpcClient(conn, sender=f"change-load@{uuid.uuid4().hex[:6]}")
        body = kinds.load_body("destination", name, {"url": self.url, "subject": subject})
        op = {"op": "set", "kind": "destination", "name": name, "body": body}
        # As ``tasync config set`` asks: with a request id, re-sent while unanswered (a master
        # paused past its heartbeats loses the requests queued for it with its connection).
        result = self._rpc.call_one(topology.MASTER, "commit",
                                    {"ops": [op], "request_id": uuid.uuid4().hex},
                                    timeout_s=30, resend_s=RESEND_S)
        return int(result["last_seq"]), ""

    def _drop_rpc(self) -> None:
        if self._rpc is not None:
            close_quietly(self._rpc.conn)
            self._rpc = None

    def close(self) -> None:
        self._drop_rpc()

    def expected_subjects(self) -> dict[str, set[str]]:
        """For each name with a committed change: the subjects its final value may have.

        That is the last committed subject, or the subject of any later attempt whose outcome
        is unknown (it failed on our side, but the master may have committed it).
        """
        by_name: dict[str, list[Attempt]] = {}
        for attempt in self.attempts():  # in the order they were made
            by_name.setdefault(attempt.key, []).append(attempt)
        expected: dict[str, set[str]] = {}
        for name, attempts in by_name.items():
            allowed: set[str] = set()
            for attempt in reversed(attempts):
                allowed.add(attempt.value)
                if attempt.ok:
                    expected[name] = allowed
                    break
        return expected


class AlertLoad(PacedLoad):
    """Sends alerts of one source to its precedence list; ids are ``<source>-<run>-<n>``.

    With ``cli_every`` = k, every k-th alert goes through the real ``tasync send`` command
    and the others through ``AlertSender`` (what the command runs), so the CLI is exercised
    under every fault at a CPU cost two cores can carry.
    """

    def __init__(self, net: ClusterNetwork, source: str, *, rate: float,
                 via: str = "library", cli_every: int = 0) -> None:
        super().__init__(f"alert-load-{source}", rate)
        self.net, self.source, self.via, self.cli_every = net, source, via, cli_every
        self.hosts = SOURCES[source]
        self.run_tag = uuid.uuid4().hex[:6]
        self._sender: AlertSender | None = None
        self._hosts = self.hosts

    def attempt(self, n: int) -> Attempt:
        alert_id = f"{self.source}-{self.run_tag}-{n:06d}"
        via = "cli" if self.cli_every and n % self.cli_every == 0 else self.via
        started = time.monotonic()
        try:
            error = (self._by_cli if via == "cli" else self._by_library)(alert_id, n)
        except Exception as exc:
            self.close()
            error = f"{type(exc).__name__}: {exc}"[:300]
        return Attempt(alert_id, self.source, started, time.monotonic(), not error, None, error,
                       via)

    def _by_cli(self, alert_id: str, n: int) -> str:
        out = self.net.cli("send", "-i", destination(self.source), "-m", f"alert {n}",
                           *list_args(self.source), "--source", self.source, "--id", alert_id,
                           check=False, timeout=120)
        return "" if out.returncode == 0 else f"exit {out.returncode}: {out.stderr[-300:]}"

    def _by_library(self, alert_id: str, n: int) -> str:
        if self._sender is None:
            sender = AlertSender(Settings.from_url(self.net.broker_url), name=self.source)
            try:  # a long-lived integration resolves its route once per connection
                self._hosts = (sender.resolve_route(self.source) if self.source in ROUTED
                               else self.hosts)
            except Exception:
                sender.close()
                raise
            self._sender = sender
        self._sender.send(Alert(id=alert_id, source=self.source, target_kind="destination",
                                target=destination(self.source), text=f"alert {n}",
                                hosts=self._hosts))
        return ""

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None


class Deliveries:
    """Tails the file destinations: how often each alert id was delivered, and by which node.

    Reads only what was appended since the last call, so waiting on a long soak's files stays
    cheap; a line still being written is left for the next call.
    """

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = list(paths)
        self.counts: Counter[str] = Counter()
        self.by_node: Counter[str] = Counter()
        self._offsets = dict.fromkeys(self.paths, 0)
        self._lock = threading.Lock()

    def refresh(self) -> Counter[str]:
        with self._lock:
            for path in self.paths:
                try:
                    with path.open("rb") as handle:
                        handle.seek(self._offsets[path])
                        data = handle.read()
                except FileNotFoundError:
                    continue
                complete = data[: data.rfind(b"\n") + 1]
                self._offsets[path] += len(complete)
                for raw in complete.splitlines():
                    self._count(raw)
            return self.counts

    def _count(self, raw: bytes) -> None:
        try:
            line: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError:
            return
        self.counts[str(line.get("id"))] += 1
        self.by_node[str(line.get("node"))] += 1


class Load:
    """The whole load of one test: changes on the master and alerts from every source."""

    def __init__(self, net: ClusterNetwork, *, change_rate: float, alert_rate: float,
                 change_via: str = "cli", alert_via: str = "library", cli_every: int = 0,
                 pool: int | None = None, alerts: bool = True) -> None:
        self.net = net
        self.changes = ChangeLoad(net, rate=change_rate, via=change_via, pool=pool)
        self.alerts = [AlertLoad(net, source, rate=alert_rate, via=alert_via,
                                 cli_every=cli_every)
                       for source in SOURCES] if alerts else []
        self.deliveries = Deliveries(net.delivery_file(source) for source in SOURCES)
        self.started_at = self.stopped_at = 0.0

    def start(self) -> Load:
        self.started_at = time.monotonic()
        for load in self._all():
            load.start()
        return self

    def stop(self) -> None:
        for load in self._all():
            load.stop_event.set()
        for load in self._all():
            load.stop()
        self.stopped_at = time.monotonic()

    def _all(self) -> list[PacedLoad]:
        return [self.changes, *self.alerts]

    def confirmed(self, *, started_after: float = 0.0) -> list[Attempt]:
        return [a for load in self.alerts for a in load.ok(started_after=started_after)]

    def alert_attempts(self) -> list[Attempt]:
        return [a for load in self.alerts for a in load.attempts()]

    def delivered(self) -> Counter[str]:
        """How often each alert id was delivered, over every source's file (kept up to date)."""
        return self.deliveries.refresh()

    def progressed(self, since: float, *, changes: int = 1, alerts: int = 1) -> bool:
        """True once at least CHANGES and ALERTS attempts started after SINCE succeeded."""
        alerts_ok = not self.alerts or len(self.confirmed(started_after=since)) >= alerts
        return len(self.changes.ok(started_after=since)) >= changes and alerts_ok
