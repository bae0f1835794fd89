"""A private multi-node RabbitMQ cluster beside the system broker, for fault-injection tests.

The fault suite has to kill broker nodes, so it cannot use the system broker (``rabbit@localhost``
on 127.0.0.1:5672), which other tests and engineers share. ``RabbitCluster`` starts N throw-away
nodes from the Debian package's own scripts, clusters them, breaks them on request and tears them
down. The parts live beside it, one concept a
module: ``rabbit_env`` (where a node lives: tools, ports, directories, config, environment),
``rabbit_procs`` (its OS process: liveness, SIGKILL, orphan reaping) and ``rabbit_ctl`` (URLs,
``rabbitmqctl`` with the cluster's cookie, vhosts, status). This module re-exports what callers
import from it.

Facts this code relies on (measured on RabbitMQ 3.10.8 / Debian):

* ``rabbitmq-server -detached`` returns before the node has even registered with epmd, so
  ``await_startup`` right after it fails at once (exit 69). ``rabbitmqctl wait PIDFILE`` would
  wait properly, but three of those CLI VMs polling side by side slow three parallel boots from
  ~12 s to ~18 s on two cores; so we watch the pid file and the AMQP listener in /proc, then
  confirm with one ``await_startup``.
* A SIGKILLed beam lingers as a zombie until this machine's PID 1 reaps it (seconds), so liveness
  checks treat zombies as dead.
* A clustered node waits at boot for the peers it last saw, so nodes restarted after a
  multi-node crash are booted side by side.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness.rabbit_ctl import ClusterControl
from tests.harness.rabbit_env import (
    RABBITMQ_USER,
    NodeSpec,
    RabbitClusterError,
    chown_tree,
    find_tool,
    free_ports,
    listening,
    make_root,
    node_env,
    read_pid,
    tail,
    unavailable_reason,
    write_layout,
)
from tests.harness.rabbit_procs import (
    kill,
    marker,
    pid_alive,
    pids_marked_for,
    reap_orphaned_nodes,
    wait_dead,
)

__all__ = [
    "DEFAULT_DISK_FREE_LIMIT",
    "RABBITMQ_USER",
    "RabbitCluster",
    "RabbitClusterError",
    "free_ports",
    "rabbit_cluster_fixture",
    "reap_orphaned_nodes",
    "unavailable_reason",
]

#: Value RabbitMQ 3.10 uses when no limit is configured; ``restore()`` goes back to it.
DEFAULT_DISK_FREE_LIMIT = "50MB"


class RabbitCluster(ClusterControl):
    """N private, clustered RabbitMQ nodes on loopback, with fault-injection controls.

    Usage::

        with RabbitCluster(3) as cluster:
            cluster.add_vhost("t1")
            conn = kombu.Connection(cluster.url_for_vhost("t1"))
            cluster.kill_node(0)
            cluster.start_node(0)

    Node indices are 0-based; node 0 is the one the others join. Every wait is bounded and
    event-driven: the pid file and the AMQP listener appearing, ``await_startup``, and polling
    ``cluster_status`` with a deadline; no fixed sleeps.
    """

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

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
        self._root = make_root(self._base_dir)
        atexit.register(self.stop)
        try:
            self._nodes = write_layout(
                self._root, size=self.size, prefix=self.prefix, host=self.host,
                extra_config=self._extra_config)
            chown_tree(self._root, RABBITMQ_USER)
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
        pids = set(pids_marked_for(self._root))
        pids.update(pid for pid in self.node_pids() if pid is not None)
        for pid in pids:
            kill(pid)
        survivors = wait_dead(pids, 20.0)
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
        pid = read_pid(node)
        if pid is None or not pid_alive(pid):
            raise RabbitClusterError(f"{node.name} is not running")
        kill(pid)
        self._down.add(i)
        self._app_down.discard(i)
        if wait_dead([pid], 15.0):
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
            pid = read_pid(self._node(i))
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

    # ------------------------------------------------------------------------ booting

    def _launch(self, node: NodeSpec) -> None:
        """``rabbitmq-server -detached``: returns at once, long before the node is up."""
        node.pid_file.unlink(missing_ok=True)  # a stale pid would make the boot wait misfire
        server = find_tool("rabbitmq-server")
        assert server is not None  # checked by unavailable_reason() in start()
        proc = subprocess.run(
            [server, "-detached"],
            env=node_env(self.root, node, cookie=self._cookie,
                         marker=marker(self.root)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RabbitClusterError(
                f"rabbitmq-server -detached for {node.name} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )

    def _await_started(self, node: NodeSpec, timeout: float) -> None:
        """Block until NODE's rabbit app runs, failing fast if its process dies.

        ``rabbitmqctl wait PIDFILE`` would do this in one call, but three such CLI VMs polling
        side by side cost so much CPU on two cores that the boots took 18 s instead of 12 s.
        So we watch the pid file and the AMQP listener (cheap /proc reads, no connection that
        would show up in the broker log), then confirm once with ``await_startup``.
        """
        began = time.monotonic()
        deadline = began + timeout
        while True:
            pid = read_pid(node)
            if pid is not None and not pid_alive(pid):
                raise self._boot_error(node, f"exited during boot (pid {pid})")
            if pid is not None and listening(node.amqp_port):
                break
            now = time.monotonic()
            if now > deadline or (pid is None and now - began > min(timeout, 60.0)):
                raise self._boot_error(node, f"not up after {now - began:.0f} s")
            time.sleep(0.1)
        remaining = max(5, int(deadline - time.monotonic()))
        self.rabbitmqctl(node.index, "await_startup", "--timeout", str(remaining))

    @staticmethod
    def _boot_error(node: NodeSpec, what: str) -> RabbitClusterError:
        return RabbitClusterError(
            f"{node.name} {what}\n--- last lines of {node.log_file}:\n{tail(node.log_file)}"
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
        takes seconds); join_cluster runs one node at a time because it changes the first node's
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
