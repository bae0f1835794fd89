"""The OS processes of private RabbitMQ nodes: liveness, SIGKILL, and reaping orphans.

Stdlib only, reading /proc: the nodes are started through ``rabbitmq-server -detached`` (which
forks and exits), so they are not our children and ``waitpid`` is no option.

Every node process carries the environment marker ``MARKER_ENV`` =
``<root dir>|<owner pid>:<owner start time>``. It lets a cluster find its nodes even without a
pid file, and lets a later run reap the nodes of a test process that was killed before it could
clean up, without ever touching the system broker (which never carries the marker) or the
clusters of other live test runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Name prefix of every cluster's temporary directory (used to recognise orphans safely).
ROOT_PREFIX = "tasync-rmq-"
#: Environment marker put on every node process: ``<root dir>|<owner pid>:<owner start time>``.
MARKER_ENV = "TASYNC_RABBIT_HARNESS"


def proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; everything after the last ')' is safe.
    return stat.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """True if PID runs; zombies count as dead because PID 1 here reaps them only lazily."""
    fields = proc_stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def start_time(pid: int) -> str | None:
    """Kernel start time of PID, to tell a live owner from a recycled PID."""
    fields = proc_stat_fields(pid)
    return fields[19] if fields is not None else None


def wait_dead(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until all PIDS are dead; return those still alive at the deadline."""
    pending = [pid for pid in pids if pid_alive(pid)]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        pending = [pid for pid in pending if pid_alive(pid)]
    return pending


def kill(pid: int) -> None:
    """SIGKILL PID, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def marked_processes() -> Iterator[tuple[int, str]]:
    """Yield (pid, marker value) for every process carrying MARKER_ENV."""
    prefix = f"{MARKER_ENV}=".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                yield int(entry.name), item[len(prefix) :].decode(errors="replace")
                break


def owner_alive(owner: str) -> bool:
    """True if the ``pid:start_time`` owner recorded in a marker is still the same process."""
    pid_text, _, start = owner.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    return pid_alive(pid) and start_time(pid) == start


def reap_orphaned_nodes() -> list[int]:
    """Kill private nodes whose owning test process died without tearing them down.

    Only processes carrying our marker whose owner is gone are touched, so clusters of other
    test runs that are still alive (other engineers, parallel CI jobs) are left alone, and the
    system broker never carries the marker.

    Returns:
        The PIDs that were killed.
    """
    victims: dict[int, Path] = {}
    for pid, value in marked_processes():
        root, _, owner = value.rpartition("|")
        if not owner_alive(owner):
            victims[pid] = Path(root)
    for pid in victims:
        kill(pid)
    wait_dead(victims, 15.0)
    for stale in set(victims.values()):
        if stale.name.startswith(ROOT_PREFIX) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return sorted(victims)


def marker(root: Path) -> str:
    """The marker value for the nodes of the cluster in ROOT, owned by this process."""
    return f"{root}|{os.getpid()}:{start_time(os.getpid())}"


def pids_marked_for(root: Path) -> list[int]:
    """PIDs of every process carrying the marker of the cluster in ROOT."""
    return [pid for pid, value in marked_processes() if value.rpartition("|")[0] == str(root)]
