"""Addressing and asking the nodes of a private RabbitMQ cluster: URLs, the CLI, vhosts, status.

``ClusterControl`` is the state and read side of ``RabbitCluster`` (``rabbit_cluster``): which
nodes exist and which the harness took down, their URLs, ``rabbitmqctl`` with the cluster's own
cookie, vhosts, ``cluster_status`` and the event-driven wait until every node runs. Starting,
stopping and breaking nodes is ``RabbitCluster``'s part.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.harness.rabbit_env import (
    NodeSpec,
    RabbitClusterError,
    cli_env,
    find_tool,
    read_pid,
    short_hostname,
)
from tests.harness.rabbit_procs import pid_alive

_POLL = 0.2


class ClusterControl:
    """The nodes of one private cluster, and how to talk to them (see ``RabbitCluster``).

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
        self.host = short_hostname()
        self.startup_timeout = startup_timeout
        self.keep_dir = keep_dir or os.environ.get("TASYNC_KEEP_RABBIT_DIR") == "1"
        self.startup_seconds: float | None = None
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._extra_config = dict(extra_config or {})
        self._cookie = secrets.token_hex(20)
        self._root: Path | None = None
        self._nodes: list[NodeSpec] = []
        self._down: set[int] = set()  # OS process not running
        self._app_down: set[int] = set()  # process up, rabbit app stopped
        self._disk_limit_changed: set[int] = set()

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
            pid = read_pid(node)
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

    def _started_nodes(self) -> list[NodeSpec]:
        if not self._nodes:
            raise RabbitClusterError("cluster is not started")
        return self._nodes

    def _node(self, i: int) -> NodeSpec:
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

    def _cli_env(self) -> dict[str, str]:
        return cli_env(self.root)

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

