"""What every tasync benchmark needs: a fresh vhost, real worker processes, their trails.

The pieces are small and independent so the replication, alert and recovery benchmarks can
share them:

* ``Broker`` reaches RabbitMQ and its ``rabbitmqctl``; ``Broker.fresh_vhost`` makes a vhost for
  one scenario and deletes it afterwards, whatever happens.
* ``Worker`` is one ``tasync-worker`` process; ``Network`` is a master and its backups under
  one temporary directory, stopped (SIGTERM, then SIGKILL) on exit.
* ``TrailFollower`` tails a node's ``telalert.trail`` and records when each seq was applied, by
  the node's own clock (millisecond resolution), so latencies need no polling precision.

Statistics, load and results files are in ``benchmarks.measure``.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from tasync.broker.audit import TRAIL_NAME, parse_trail_line
from tasync.broker.store import DB_NAME


def log(message: str) -> None:
    """Progress on stderr, with the time, so a long benchmark shows where it is."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def wait_for(predicate: Callable[[], Any], *, timeout_s: float, what: str,
             interval_s: float = 0.01) -> Any:
    """Return the first truthy value of ``predicate()``, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


# -- broker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """A RabbitMQ on which the benchmark may create and delete vhosts (needs ``rabbitmqctl``)."""

    host: str = "127.0.0.1"
    port: int = 5672
    user: str = "guest"
    password: str = "guest"
    ctl: tuple[str, ...] = ("rabbitmqctl",)

    def url(self, vhost: str) -> str:
        """The AMQP URL of ``vhost`` (percent-encoded, as kombu and tasync expect)."""
        return (f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{quote(vhost, safe='')}")

    def rabbitmqctl(self, *args: str, check: bool = True) -> str:
        """Run ``rabbitmqctl ARGS`` and return its output."""
        out = subprocess.run([*self.ctl, *args], check=check, capture_output=True, text=True,
                             timeout=120)
        return out.stdout

    def version(self) -> str:
        """The broker's version, e.g. ``3.10.8``."""
        try:
            return self.rabbitmqctl("version").strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    @contextlib.contextmanager
    def fresh_vhost(self, prefix: str) -> Iterator[str]:
        """A new vhost named ``bench-<prefix>-<random>``, deleted on exit; yields its URL."""
        name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
        self.rabbitmqctl("add_vhost", name)
        try:
            self.rabbitmqctl("set_permissions", "-p", name, self.user, ".*", ".*", ".*")
            yield self.url(name)
        finally:
            self.rabbitmqctl("delete_vhost", name, check=False)


# -- worker processes -------------------------------------------------------------------------


@dataclass
class Worker:
    """One ``tasync-worker`` process with its own data directory."""

    name: str
    data_dir: Path
    broker_url: str
    role: str | None = None
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def stderr_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.stderr"

    @property
    def trail_path(self) -> Path:
        return self.data_dir / TRAIL_NAME

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_NAME

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tasync.worker_cli", "--node", self.name,
               "--data-dir", str(self.data_dir), "--broker", self.broker_url]
        if self.role:
            cmd += ["--role", self.role]
        return cmd + list(self.extra_args)

    def start(self) -> Worker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=err,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def status(self) -> dict[str, Any]:
        """The node's own ``status.json`` (empty before it wrote one)."""
        try:
            data: dict[str, Any] = json.loads((self.data_dir / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def wait_ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if not self.alive:
                tail = self.stderr_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {self.name} exited: {tail}")
            status = self.status()
            return status if status.get("ready") and status.get("pid") == self.pid else None

        result: dict[str, Any] = wait_for(ready, timeout_s=timeout_s, what=f"{self.name} ready",
                                          interval_s=0.05)
        return result

    def rss_bytes(self) -> int:
        """Resident set size of the worker process."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the worker used so far: unlike wall time, this hardly
        depends on what else runs on the machine."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Network:
    """A master and backups of one tasync network, each a real process, under ``root``.

    Use as a context manager: every worker is stopped on exit, and ``root`` is removed unless
    ``keep`` is set.
    """

    def __init__(self, broker_url: str, *, root: Path | None = None, keep: bool = False) -> None:
        self.url = broker_url
        self.root = root or Path(tempfile.mkdtemp(prefix="tasync-bench-"))
        self.keep = keep
        self.workers: dict[str, Worker] = {}
        self.master: Worker | None = None

    @property
    def backups(self) -> list[Worker]:
        return [w for w in self.workers.values() if w is not self.master]

    def start_worker(self, name: str, *, role: str | None = None,
                     extra_args: tuple[str, ...] = ()) -> Worker:
        worker = Worker(name, self.root / name, self.url, role=role, extra_args=extra_args)
        self.workers[name] = worker
        if role == "master":
            self.master = worker
        return worker.start()

    def start(self, backups: int, *, timeout_s: float = 120.0) -> Network:
        """Start ``master`` and then ``b1``..``bN``; return once all are ready and in sync."""
        self.start_worker("master", role="master").wait_ready(timeout_s)
        started = [self.start_worker(f"b{i}") for i in range(1, backups + 1)]
        for worker in started:
            worker.wait_ready(timeout_s)
        self.wait_in_sync(timeout_s=timeout_s)
        return self

    def head_seq(self) -> int:
        """The master's last committed seq, read from its store (no broker round trip)."""
        assert self.master is not None
        return last_seq(self.master.db_path)

    def wait_in_sync(self, *, timeout_s: float = 60.0) -> int:
        """Wait until every backup applied the master's last seq (node registrations, ...)."""
        def in_sync() -> int | None:
            head = self.head_seq()
            done = all(last_seq(b.db_path) >= head for b in self.backups)
            return head if done and head == self.head_seq() else None

        seq: int = wait_for(in_sync, timeout_s=timeout_s, what="backups in sync",
                            interval_s=0.1)
        return seq

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _read_only(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)


def last_seq(db_path: Path) -> int:
    """A node's applied (backup) or committed (master) seq, read from its store file."""
    if not db_path.exists():
        return 0
    db = _read_only(db_path)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
    except sqlite3.OperationalError:  # the worker has not created its tables yet
        return 0
    finally:
        db.close()
    return int(row[0]) if row else 0


def commit_times(db_path: Path, seqs: Sequence[int] | None = None) -> dict[int, float]:
    """``seq -> ts`` from a store's change history: the master stamps ``ts`` as it commits."""
    db = _read_only(db_path)
    try:
        rows = db.execute("SELECT seq, ts FROM changes").fetchall()
    finally:
        db.close()
    wanted = None if seqs is None else set(seqs)
    return {int(s): float(t) for s, t in rows if wanted is None or s in wanted}


# -- trails -----------------------------------------------------------------------------------

APPLY_EVENTS = frozenset({"change.applied", "change.replayed"})


def trail_time(stamp: str) -> float:
    """Seconds since the epoch of a trail timestamp ``2025-01-31T12:00:00.123Z``."""
    parsed = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    return parsed.timestamp()


class TrailFollower:
    """Tails one node's trail and remembers when each seq was applied (node clock, 1 ms).

    Trail stamps are truncated to the millisecond, so a time read here is up to 1 ms early.
    Call ``poll`` to read what was appended since the last call.
    """

    def __init__(self, path: Path, *, from_end: bool = True) -> None:
        self.path = path
        self._offset = path.stat().st_size if from_end and path.exists() else 0
        self._partial = b""
        self._firsts: list[int] = []
        self._spans: list[tuple[int, int, float]] = []
        self.max_seq = 0

    def poll(self) -> int:
        """Read new lines; return the highest seq applied so far."""
        try:
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < self._offset:  # rotated
                    self._offset = 0
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return self.max_seq
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._add(raw.decode("utf-8", errors="replace"))
        return self.max_seq

    def _add(self, line: str) -> None:
        if not any(event in line for event in APPLY_EVENTS):
            return
        fields = parse_trail_line(line)
        if fields["event"] not in APPLY_EVENTS:
            return
        if "seq" in fields:
            first = last = int(fields["seq"])
        else:
            first, last = int(fields["first_seq"]), int(fields["last_seq"])
        index = bisect.bisect(self._firsts, first)
        self._firsts.insert(index, first)
        self._spans.insert(index, (first, last, trail_time(fields["ts"])))
        self.max_seq = max(self.max_seq, last)

    def applied_at(self, seq: int) -> float | None:
        """When ``seq`` was applied, or None if not seen yet (a node applies each seq once)."""
        index = bisect.bisect_right(self._firsts, seq) - 1
        if index < 0:
            return None
        first, last, ts = self._spans[index]
        return ts if first <= seq <= last else None
