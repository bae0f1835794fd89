"""A private multi-node RabbitMQ cluster beside the system broker, for fault-injection tests.

The fault suite has to kill broker nodes, so it cannot use the system broker (``rabbit@localhost``
on 127.0.0.1:5672), which other tests and engineers share. This module starts N throw-away nodes
from the Debian package's own scripts, clusters them and tears them down, following the recipe
measured in design section 9.

Facts this code relies on (measured on RabbitMQ 3.10.8 / Debian):

* ``/usr/sbin/rabbitmq-server`` and ``/usr/sbin/rabbitmqctl`` are one wrapper that, run as root,
  re-executes the real script through ``su rabbitmq``. ``su`` keeps the environment (so the
  ``RABBITMQ_*`` variables below reach the node) but sets ``HOME=/var/lib/rabbitmq``, so every
  node directory must be owned by the ``rabbitmq`` user, and ``$HOME/.erlang.cookie`` is always the
  system broker's cookie, whatever ``HOME`` the caller has.
* Cookie: each cluster gets its own random cookie, handed to the nodes as
  ``-setcookie`` through ``RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS`` and to the CLI as
  ``--erlang-cookie``. That needs no cookie file at all, never touches the system broker's
  cookie, and makes it impossible for a private node or CLI call to reach ``rabbit@localhost``
  by mistake. (``RABBITMQ_ERLANG_COOKIE`` works too but is deprecated and makes every CLI call
  print a warning.)
* ``/etc/rabbitmq/rabbitmq-env.conf`` sets ``NODENAME=rabbit@localhost`` and
  ``/etc/rabbitmq/rabbitmq.conf`` a listener on 5672; both are replaced per cluster
  (``RABBITMQ_CONF_ENV_FILE``, ``RABBITMQ_CONFIG_FILE``) so nothing of the system broker leaks in.
* ``rabbitmq-server -detached`` returns before the node has even registered with epmd, so
  ``await_startup`` right after it fails at once (exit 69). ``rabbitmqctl wait PIDFILE`` would
  wait properly, but three of those CLI VMs polling side by side slow three parallel boots from
  ~12 s to ~18 s on two cores; so we watch the pid file and the AMQP listener in /proc, then
  confirm with one ``await_startup``.
* A SIGKILLed beam lingers as a zombie until this machine's PID 1 reaps it (seconds), so liveness
  checks treat zombies as dead.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

RABBITMQ_USER = "rabbitmq"
#: Value RabbitMQ 3.10 uses when no limit is configured; ``restore()`` goes back to it.
DEFAULT_DISK_FREE_LIMIT = "50MB"
#: Name prefix of every cluster's temporary directory (used to recognise orphans safely).
ROOT_PREFIX = "tasync-rmq-"
#: Environment marker put on every node process: ``<root dir>|<owner pid>:<owner start time>``.
#: It lets ``stop()`` find a node even without its pid file and lets a later run reap the nodes of
#: a test process that was killed before it could clean up.
MARKER_ENV = "TASYNC_RABBIT_HARNESS"
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_CLI_DIST_PORTS = range(35672, 35683)  # rabbitmqctl's own distribution ports
_POLL = 0.2


class RabbitClusterError(RuntimeError):
    """A private node failed to start, join, stop or answer; the message carries log tails."""


# --------------------------------------------------------------------------------------------
# Environment probes
# --------------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """Locate a RabbitMQ script, looking in the sbin directories a non-login PATH may lack."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which(name, path=search)


def unavailable_reason() -> str | None:
    """Say why private nodes cannot run here, or return None when they can.

    Returns:
        A human-readable reason suitable for ``pytest.skip``, or None.
    """
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if find_tool(tool) is None:
            return f"{tool} is not installed (apt-get install rabbitmq-server)"
    try:
        rabbit_uid = pwd.getpwnam(RABBITMQ_USER).pw_uid
    except KeyError:
        return f"no '{RABBITMQ_USER}' user: the Debian rabbitmq-server package is not installed"
    if os.geteuid() not in (0, rabbit_uid):
        return "the Debian rabbitmq-server wrapper only runs as root or as the rabbitmq user"
    return None


def _short_hostname() -> str:
    """Host part of node names: ``hostname -s``, as RabbitMQ's short names expect."""
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return "localhost"  # an unresolvable host name would make distribution fail
    return host


# --------------------------------------------------------------------------------------------
# /proc helpers (stdlib only; the nodes are not our children, so waitpid is no option)
# --------------------------------------------------------------------------------------------


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; everything after the last ')' is safe.
    return stat.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """True if PID runs; zombies count as dead because PID 1 here reaps them only lazily."""
    fields = _proc_stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _start_time(pid: int) -> str | None:
    """Kernel start time of PID, to tell a live owner from a recycled PID."""
    fields = _proc_stat_fields(pid)
    return fields[19] if fields is not None else None


def _wait_dead(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until all PIDS are dead; return those still alive at the deadline."""
    pending = [pid for pid in pids if pid_alive(pid)]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        pending = [pid for pid in pending if pid_alive(pid)]
    return pending


def _kill(pid: int) -> None:
    """SIGKILL PID, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _marked_processes() -> Iterator[tuple[int, str]]:
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


def _owner_alive(owner: str) -> bool:
    """True if the ``pid:start_time`` owner recorded in a marker is still the same process."""
    pid_text, _, start = owner.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    return pid_alive(pid) and _start_time(pid) == start


def reap_orphaned_nodes() -> list[int]:
    """Kill private nodes whose owning test process died without tearing them down.

    Only processes carrying our marker whose owner is gone are touched, so clusters of other
    test runs that are still alive (other engineers, parallel CI jobs) are left alone, and the
    system broker never carries the marker.

    Returns:
        The PIDs that were killed.
    """
    victims: dict[int, Path] = {}
    for pid, value in _marked_processes():
        root, _, owner = value.rpartition("|")
        if not _owner_alive(owner):
            victims[pid] = Path(root)
    for pid in victims:
        _kill(pid)
    _wait_dead(victims, 15.0)
    for stale in set(victims.values()):
        if stale.name.startswith(ROOT_PREFIX) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return sorted(victims)


# --------------------------------------------------------------------------------------------
# Ports and directories
# --------------------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    """True if nothing listens on (or lingers in TIME_WAIT on) 127.0.0.1:PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    """True if some socket LISTENs on 127.0.0.1:PORT, read from /proc without connecting."""
    needle = f"0100007F:{port:04X}"
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        return False
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == needle and fields[3] == "0A":
            return True
    return False


def free_ports(count: int) -> list[int]:
    """Pick COUNT distinct free ports below the kernel's ephemeral range.

    Below the ephemeral range, because a port the kernel may hand to any outgoing connection
    could be taken between this probe and the node's bind. Random, so that concurrent clusters
    (other engineers, CI) are unlikely to race for the same port.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    upper = min(low, 32768) if low > 21000 else 32768
    candidates = [p for p in range(20000, upper) if p not in _CLI_DIST_PORTS]
    random.shuffle(candidates)
    chosen: list[int] = []
    for port in candidates:
        if _port_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RabbitClusterError(f"could not find {count} free ports in 20000-{upper}")


def _traversable_by_others(path: Path) -> bool:
    """True if every ancestor of PATH lets other users (the rabbitmq user) pass through."""
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _chown_tree(root: Path, user: str) -> None:
    """Give ROOT and everything below it to USER, because the nodes run as that user."""
    if os.geteuid() != 0:
        return  # running as the rabbitmq user already: the files are ours
    entry = pwd.getpwnam(user)
    os.chown(root, entry.pw_uid, entry.pw_gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)


def _tail(path: Path, lines: int = 25) -> str:
    """The part of log PATH that explains a failed start.

    The first ``[error]`` lines when there are any (a crash report's last lines are the end of
    an Erlang term and say nothing), else the last LINES lines.
    """
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    errors = [line for line in text if "[error]" in line or "[critical]" in line]
    return "\n".join(errors[:lines] if errors else text[-lines:])


_ENV_CONF = """\
# Written by tests/harness/rabbit_cluster.py. It replaces /etc/rabbitmq/rabbitmq-env.conf so
# that the system broker's NODENAME and ports never leak into a private node, while keeping its
# loopback-only distribution settings.
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
"""


@dataclass(frozen=True)
class _Node:
    """Static facts about one private node: its name, ports and directories."""

    index: int
    name: str
    amqp_port: int
    dist_port: int
    home: Path

    @property
    def pid_file(self) -> Path:
        return self.home / "rabbit.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "log" / f"{self.name}.log"

    @property
    def config_file(self) -> Path:
        return self.home / "rabbitmq.conf"


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


class RabbitCluster:
    """N private, clustered RabbitMQ nodes on loopback, with fault-injection controls.

    Usage::

        with RabbitCluster(3) as cluster:
            cluster.add_vhost("t1")
            conn = kombu.Connection(cluster.url_for_vhost("t1"))
            cluster.kill_node(0)
            cluster.start_node(0)

    Node indices are 0-based; node 0 is the seed the others join. Every wait is bounded and
    event-driven: the pid file and the AMQP listener appearing, ``await_startup``, and polling
    ``cluster_status`` with a deadline; no fixed sleeps.

    Attributes:
        size: Number of nodes.
        prefix: Node name prefix; node i is ``f"{prefix}{i + 1}@{host}"``.
        host: Host part of the node names (``hostname -s``).
        startup_seconds: Wall time ``start()`` took, for reports.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        prefix: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        extra_config: Mapping[str, str] | None = None,
        startup_timeout: float = 120.0,
        keep_dir: bool = False,
    ) -> None:
        """Describe a cluster; nothing starts before ``start()``.

        Args:
            size: Number of nodes (3 gives a quorum that survives one loss).
            prefix: Node name prefix. The default is random so that concurrent clusters of
                different test runs on this host never collide in epmd.
            base_dir: Where the temporary directory goes; it must be traversable by the
                rabbitmq user (default: the system temp dir, or /tmp if that is not).
            extra_config: Extra ``rabbitmq.conf`` settings for every node, e.g.
                ``{"cluster_partition_handling": "pause_minority"}``.
            startup_timeout: Seconds allowed for each node start and for the cluster to form.
            keep_dir: Keep node directories (logs) after ``stop()``, for debugging. The
                environment variable ``TASYNC_KEEP_RABBIT_DIR=1`` does the same.
        """
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.prefix = prefix or f"tq{secrets.token_hex(3)}n"
        self.host = _short_hostname()
        self.startup_timeout = startup_timeout
        self.keep_dir = keep_dir or os.environ.get("TASYNC_KEEP_RABBIT_DIR") == "1"
        self.startup_seconds: float | None = None
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._extra_config = dict(extra_config or {})
        self._cookie = secrets.token_hex(20)
        self._root: Path | None = None
        self._nodes: list[_Node] = []
        self._down: set[int] = set()  # OS process not running
        self._app_down: set[int] = set()  # process up, rabbit app stopped
        self._disk_limit_changed: set[int] = set()

    # ----------------------------------------------------------------- context management

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------ properties

    @property
    def root(self) -> Path:
        """Temporary directory holding every node's data and logs."""
        if self._root is None:
            raise RabbitClusterError("cluster is not started")
        return self._root

    @property
    def nodes(self) -> list[str]:
        """Erlang node names, e.g. ``tq1a2b3cn1@vm``."""
        return [node.name for node in self._started_nodes()]

    @property
    def amqp_ports(self) -> list[int]:
        """AMQP port of each node."""
        return [node.amqp_port for node in self._started_nodes()]

    @property
    def urls(self) -> list[str]:
        """One AMQP URL per node for the default vhost ``/``."""
        return [self.url(i) for i in range(self.size)]

    @property
    def down(self) -> set[int]:
        """Indices of nodes whose OS process this harness killed or stopped."""
        return set(self._down)

    def url(self, i: int, vhost: str = "/") -> str:
        """AMQP URL of node I for VHOST (guest is allowed because we connect via loopback)."""
        port = self._node(i).amqp_port
        return f"amqp://guest:guest@127.0.0.1:{port}/{quote(vhost, safe='')}"

    def url_for_vhost(self, vhost: str = "/", order: Sequence[int] | None = None) -> str:
        """All node URLs for VHOST joined by ``;``, the failover form kombu accepts.

        Args:
            vhost: Virtual host name.
            order: Node indices in the order a client should try them (default 0..N-1); lets a
                test put a node it is about to kill first.
        """
        indices = range(self.size) if order is None else order
        return ";".join(self.url(i, vhost) for i in indices)

    def log_file(self, i: int) -> Path:
        """Path of node I's main log file."""
        return self._node(i).log_file

    # ------------------------------------------------------------------------ lifecycle

    def start(self) -> RabbitCluster:
        """Start all nodes in parallel, cluster them onto node 0 and wait until all run.

        Returns:
            self, so ``cluster = RabbitCluster().start()`` works.

        Raises:
            RabbitClusterError: A node did not start or join in time; everything started so
                far is killed again before raising.
        """
        if self._nodes:
            raise RabbitClusterError("cluster already started")
        reason = unavailable_reason()
        if reason is not None:
            raise RabbitClusterError(reason)
        reap_orphaned_nodes()
        began = time.monotonic()
        self._root = self._make_root()
        atexit.register(self.stop)
        try:
            self._nodes = self._layout(self._root)
            _chown_tree(self._root, RABBITMQ_USER)
            self._launch_and_wait(range(self.size))
            self._join_all()
            self.wait_for_running()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """SIGKILL every node of this cluster and remove its directory.

        Nodes are killed rather than stopped gracefully: the data is thrown away anyway and
        a graceful stop of three nodes costs many seconds. Nodes are found both through their
        pid files and through the environment marker, so a node whose pid file is missing (a
        half-finished start) is not leaked. Safe to call more than once.
        """
        atexit.unregister(self.stop)
        if self._root is None:
            return
        pids = set(self._own_marked_pids())
        pids.update(pid for pid in self.node_pids() if pid is not None)
        for pid in pids:
            _kill(pid)
        survivors = _wait_dead(pids, 20.0)
        root = self._root
        if not self.keep_dir:
            shutil.rmtree(root, ignore_errors=True)
        self._root = None
        self._nodes = []
        self._down.clear()
        self._app_down.clear()
        self._disk_limit_changed.clear()
        if survivors:
            raise RabbitClusterError(f"processes survived SIGKILL: {survivors}")

    def restore(self, timeout: float | None = None) -> None:
        """Undo every fault injected so far: restart nodes, start apps, reset disk limits.

        Meant for a session-scoped cluster shared by several tests: call it at the start (or
        end) of a test so that an earlier test's kill does not leak into the next.
        """
        if self._down:
            self.start_nodes(sorted(self._down), timeout=timeout)
        for i in sorted(self._app_down):
            self.start_app(i)
        for i in sorted(self._disk_limit_changed):
            self.set_disk_free_limit(i, DEFAULT_DISK_FREE_LIMIT)
        self._disk_limit_changed.clear()
        self.wait_for_running(timeout=timeout)

    # ------------------------------------------------------------------- fault injection

    def kill_node(self, i: int, *, wait_seen: bool = True) -> int:
        """SIGKILL node I's beam process, as a machine crash would.

        Args:
            i: Node index.
            wait_seen: Also wait until a surviving node no longer lists node I as running, so
                the test's next step starts from a cluster that has noticed the loss.

        Returns:
            The PID that was killed.
        """
        node = self._node(i)
        pid = self._read_pid(node)
        if pid is None or not pid_alive(pid):
            raise RabbitClusterError(f"{node.name} is not running")
        _kill(pid)
        self._down.add(i)
        self._app_down.discard(i)
        if _wait_dead([pid], 15.0):
            raise RabbitClusterError(f"{node.name} (pid {pid}) survived SIGKILL")
        if wait_seen and self._live_indices():
            self._wait_until(
                lambda: node.name not in self.running_nodes(),
                f"surviving nodes to notice that {node.name} is gone",
            )
        return pid

    def stop_node(self, i: int) -> None:
        """Stop node I gracefully (``rabbitmqctl stop``), as an orderly shutdown would."""
        node = self._node(i)
        self.rabbitmqctl(i, "stop", str(node.pid_file), timeout=self.startup_timeout)
        self._down.add(i)
        self._app_down.discard(i)

    def start_node(self, i: int, *, timeout: float | None = None) -> None:
        """Restart node I after ``kill_node``/``stop_node`` and wait until it has rejoined."""
        self.start_nodes([i], timeout=timeout)

    def start_nodes(self, indices: Sequence[int], *, timeout: float | None = None) -> None:
        """Restart several nodes at once and wait until the whole cluster runs again.

        Nodes restarted together boot in parallel, which matters after a full-cluster crash:
        a clustered node waits at boot for the peers it last saw, so starting them one by one
        would stall.
        """
        for i in indices:
            pid = self._read_pid(self._node(i))
            if pid is not None and pid_alive(pid):
                raise RabbitClusterError(f"{self._node(i).name} is already running")
        self._launch_and_wait(indices, timeout=timeout)
        self._down.difference_update(indices)
        self.wait_for_running(timeout=timeout)

    def stop_app(self, i: int) -> None:
        """Stop the RabbitMQ application on node I; the Erlang VM keeps running."""
        self.rabbitmqctl(i, "stop_app", timeout=self.startup_timeout)
        self._app_down.add(i)

    def start_app(self, i: int) -> None:
        """Start the RabbitMQ application on node I again and wait until the cluster sees it."""
        self.rabbitmqctl(i, "start_app", timeout=self.startup_timeout)
        self._app_down.discard(i)
        self.wait_for_running()

    def set_disk_free_limit(self, i: int, value: str | int) -> None:
        """Set node I's disk free limit; ``"1000GB"`` raises the disk alarm and blocks publishers.

        Args:
            i: Node index.
            value: Bytes, a size such as ``"50MB"``, or ``"mem_relative 1.5"``.
        """
        self.rabbitmqctl(i, "set_disk_free_limit", *str(value).split())
        self._disk_limit_changed.add(i)

    # ------------------------------------------------------------------------ vhosts

    def add_vhost(self, name: str) -> None:
        """Create vhost NAME (idempotently) and give guest full permissions on it."""
        i = self._any_live_index()
        proc = self.rabbitmqctl(i, "add_vhost", name, check=False)
        if proc.returncode != 0 and "already exists" not in proc.stdout + proc.stderr:
            raise RabbitClusterError(f"add_vhost {name!r} failed: {proc.stderr or proc.stdout}")
        self.rabbitmqctl(i, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        """Delete vhost NAME and everything in it, ignoring a vhost that does not exist."""
        self.rabbitmqctl(self._any_live_index(), "delete_vhost", name, check=False)

    # ------------------------------------------------------------------------ inspection

    def node_pids(self) -> list[int | None]:
        """OS PID of each node's beam process, or None where it is not running."""
        pids: list[int | None] = []
        for node in self._nodes:
            pid = self._read_pid(node)
            pids.append(pid if pid is not None and pid_alive(pid) else None)
        return pids

    def cluster_status(self, i: int | None = None) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` as seen by node I (default: any live node)."""
        index = self._any_live_index() if i is None else i
        out = self.rabbitmqctl(index, "cluster_status", "--formatter", "json").stdout
        start = out.find("{")  # skip any informational line before the JSON document
        status: dict[str, Any] = json.loads(out[start:])
        return status

    def running_nodes(self, i: int | None = None) -> list[str]:
        """Names of the nodes whose rabbit app runs, as seen by node I (default: any live)."""
        return list(self.cluster_status(i).get("running_nodes", []))

    def wait_for_running(
        self, expected: Iterable[int] | None = None, timeout: float | None = None
    ) -> None:
        """Wait until every expected node runs, as seen from each of them.

        Args:
            expected: Node indices that must be running; default: all the harness has not
                killed, stopped or stop_app'ed.
            timeout: Seconds (default: ``startup_timeout``).
        """
        wanted = set(range(self.size)) - self._down - self._app_down
        if expected is not None:
            wanted = set(expected)
        names = {self._node(i).name for i in wanted}
        if not names:
            return
        observers = sorted(wanted)

        def all_see_all() -> bool:
            # Ask the observers side by side: each CLI call is a ~1 s Erlang VM start.
            with ThreadPoolExecutor(max_workers=len(observers)) as pool:
                views = list(pool.map(self.running_nodes, observers))
            return all(names <= set(view) for view in views)

        self._wait_until(all_see_all, f"nodes {sorted(names)} to be running", timeout)

    # ------------------------------------------------------------------------ CLI

    def rabbitmqctl(
        self, i: int, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl`` against node I with this cluster's cookie.

        Args:
            i: Node index (``-n`` target).
            *args: Command and arguments, e.g. ``"list_queues", "name", "leader"``.
            check: Raise RabbitClusterError on a non-zero exit.
            timeout: Seconds before the CLI process is abandoned.
        """
        return self.cli("rabbitmqctl", i, *args, check=check, timeout=timeout)

    def cli(
        self, tool: str, i: int, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run any RabbitMQ CLI (``rabbitmq-queues``, ``rabbitmq-diagnostics`` ...) on node I."""
        node = self._node(i)
        exe = find_tool(tool)
        if exe is None:
            raise RabbitClusterError(f"{tool} not found")
        cmd = [exe, "-n", node.name, "--erlang-cookie", self._cookie, *args]
        try:
            proc = subprocess.run(
                cmd, env=self._cli_env(), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise RabbitClusterError(f"{tool} {' '.join(args)} on {node.name} timed out") from exc
        if check and proc.returncode != 0:
            raise RabbitClusterError(
                f"{tool} {' '.join(args)} on {node.name} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    # ------------------------------------------------------------------------ internals

    def _started_nodes(self) -> list[_Node]:
        if not self._nodes:
            raise RabbitClusterError("cluster is not started")
        return self._nodes

    def _node(self, i: int) -> _Node:
        nodes = self._started_nodes()
        if not 0 <= i < len(nodes):
            raise IndexError(f"node index {i} out of range 0..{len(nodes) - 1}")
        return nodes[i]

    def _live_indices(self) -> list[int]:
        return [i for i in range(self.size) if i not in self._down | self._app_down]

    def _any_live_index(self) -> int:
        live = self._live_indices()
        if not live:
            raise RabbitClusterError("no node is running")
        return live[0]

    @staticmethod
    def _read_pid(node: _Node) -> int | None:
        try:
            return int(node.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _own_marked_pids(self) -> list[int]:
        root = str(self._root)
        return [pid for pid, value in _marked_processes() if value.rpartition("|")[0] == root]

    def _marker(self) -> str:
        return f"{self._root}|{os.getpid()}:{_start_time(os.getpid())}"

    def _make_root(self) -> Path:
        base = self._base_dir or Path(tempfile.gettempdir())
        if not _traversable_by_others(base):
            base = Path("/tmp")
        root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=base))
        root.chmod(0o755)  # mkdtemp makes it 0700; the rabbitmq user must get in
        return root

    def _layout(self, root: Path) -> list[_Node]:
        """Choose ports and write each node's directories and configuration files."""
        ports = free_ports(2 * self.size)
        (root / "rabbitmq-env.conf").write_text(_ENV_CONF)
        nodes = []
        for i in range(self.size):
            node = _Node(
                index=i,
                name=f"{self.prefix}{i + 1}@{self.host}",
                amqp_port=ports[2 * i],
                dist_port=ports[2 * i + 1],
                home=root / f"node{i + 1}",
            )
            for sub in ("mnesia", "log"):
                (node.home / sub).mkdir(parents=True)
            (node.home / "enabled_plugins").write_text("[].\n")
            settings = {
                "listeners.tcp.local": f"127.0.0.1:{node.amqp_port}",
                "loopback_users.guest": "true",
                **self._extra_config,
            }
            node.config_file.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
            nodes.append(node)
        return nodes

    def _cli_env(self) -> dict[str, str]:
        """Caller's environment minus any RABBITMQ_/ERL_ setting that could redirect the CLI."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env["RABBITMQ_CONF_ENV_FILE"] = str(self.root / "rabbitmq-env.conf")
        return env

    def _node_env(self, node: _Node) -> dict[str, str]:
        env = self._cli_env()
        env.update(
            {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_PORT": str(node.amqp_port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": str(node.home / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.home / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.home / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(node.pid_file),
                "RABBITMQ_CONFIG_FILE": str(node.config_file),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-setcookie {self._cookie}",
                MARKER_ENV: self._marker(),
            }
        )
        return env

    def _launch(self, node: _Node) -> None:
        """``rabbitmq-server -detached``: returns at once, long before the node is up."""
        node.pid_file.unlink(missing_ok=True)  # a stale pid would make the boot wait misfire
        server = find_tool("rabbitmq-server")
        assert server is not None  # checked by unavailable_reason() in start()
        proc = subprocess.run(
            [server, "-detached"],
            env=self._node_env(node),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RabbitClusterError(
                f"rabbitmq-server -detached for {node.name} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )

    def _await_started(self, node: _Node, timeout: float) -> None:
        """Block until NODE's rabbit app runs, failing fast if its process dies.

        ``rabbitmqctl wait PIDFILE`` would do this in one call, but three such CLI VMs polling
        side by side cost so much CPU on two cores that the boots took 18 s instead of 12 s.
        So we watch the pid file and the AMQP listener (cheap /proc reads, no connection that
        would show up in the broker log), then confirm once with ``await_startup``.
        """
        began = time.monotonic()
        deadline = began + timeout
        while True:
            pid = self._read_pid(node)
            if pid is not None and not pid_alive(pid):
                raise self._boot_error(node, f"exited during boot (pid {pid})")
            if pid is not None and _listening(node.amqp_port):
                break
            now = time.monotonic()
            if now > deadline or (pid is None and now - began > min(timeout, 60.0)):
                raise self._boot_error(node, f"not up after {now - began:.0f} s")
            time.sleep(0.1)
        remaining = max(5, int(deadline - time.monotonic()))
        self.rabbitmqctl(node.index, "await_startup", "--timeout", str(remaining))

    @staticmethod
    def _boot_error(node: _Node, what: str) -> RabbitClusterError:
        return RabbitClusterError(
            f"{node.name} {what}\n--- last lines of {node.log_file}:\n{_tail(node.log_file)}"
        )

    def _launch_and_wait(self, indices: Iterable[int], timeout: float | None = None) -> None:
        """Launch nodes, then wait for all of them concurrently (a boot takes ~5 s each)."""
        nodes = [self._node(i) for i in indices]
        for node in nodes:
            self._launch(node)
        limit = timeout or self.startup_timeout
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            futures = [pool.submit(self._await_started, node, limit) for node in nodes]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise RabbitClusterError("\n\n".join(str(e) for e in errors))

    def _join_all(self) -> None:
        """Join nodes 1..N-1 to node 0: stop_app, join_cluster, start_app.

        stop_app and start_app run in parallel across nodes (they are independent and each
        takes seconds); join_cluster runs one node at a time because it changes the seed's
        schema.
        """
        others = list(range(1, self.size))
        if not others:
            return
        seed = self._node(0).name
        self._parallel(others, "stop_app")
        for i in others:
            self.rabbitmqctl(i, "join_cluster", seed, timeout=self.startup_timeout)
        self._parallel(others, "start_app")

    def _parallel(self, indices: Sequence[int], *args: str) -> None:
        with ThreadPoolExecutor(max_workers=len(indices)) as pool:
            futures = [
                pool.submit(self.rabbitmqctl, i, *args, timeout=self.startup_timeout)
                for i in indices
            ]
            for future in futures:
                future.result()

    def _wait_until(
        self, check: Callable[[], bool], what: str, timeout: float | None = None
    ) -> None:
        """Poll CHECK (a no-argument callable) until it is true or the deadline passes."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except RabbitClusterError as exc:  # a node mid-restart may refuse the CLI
                last_error = exc
            time.sleep(_POLL)
        raise RabbitClusterError(f"timed out waiting for {what}; last error: {last_error}")


# --------------------------------------------------------------------------------------------
# pytest fixture
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", name="rabbit_cluster")
def rabbit_cluster_fixture() -> Iterator[RabbitCluster]:
    """A session-wide private 3-node cluster; skips when RabbitMQ cannot run here.

    Import it into a test module or conftest (``from tests.harness.rabbit_cluster import
    rabbit_cluster_fixture``) and request ``rabbit_cluster``. Tests that inject faults should
    call ``rabbit_cluster.restore()`` first, since the cluster is shared by the whole session,
    and use a vhost of their own (``add_vhost``) to stay independent.
    """
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"private RabbitMQ cluster unavailable: {reason}")
    with RabbitCluster() as cluster:
        yield cluster
