"""A tasync network on the private three-node RabbitMQ cluster, with the fault switches tests use.

``ClusterNetwork`` is ``tests.network.Network`` with three differences:

* every worker and every CLI call gets all three node URLs (``cluster.url_for_vhost``), except a
  worker put ``behind_proxy``: it gets only the URL of a ``TcpProxy`` in front of one cluster
  node, so the test can cut exactly that worker off the broker;
* workers run with a short ``--heartbeat`` so that a hung or cut worker is given up quickly;
* it remembers each worker's first PID, so the checks can prove that no worker needed a manual
  restart, and it resumes SIGSTOPped workers before stopping them.

The fixed shape of every fault test is ``start_trio``: ``a`` (master), ``b`` and ``c``, two file
destinations (one per alert source) and the topology checked to be replicated on all three
broker nodes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from tasync.broker.store import DB_NAME
from tests.harness.rabbit_cluster import RabbitCluster
from tests.harness.tcp_proxy import TcpProxy
from tests.network import Network, NodeProcess
from tests.waiting import wait_for

NODES = ("a", "b", "c")
MASTER = "a"
#: Alert sources and their precedence lists: different orders share the load.
SOURCES: dict[str, tuple[str, ...]] = {"remedy": ("a", "b", "c"), "nms": ("c", "b", "a")}
#: Sources that address their list by a named route (``--route``; the route has the source's
#: name); the others name the servers (``--host``). Both paths are under load in every test.
ROUTED = frozenset({"remedy"})
HEARTBEAT_S = 3.0
#: Connection names of the clients that submit changes: ``tasync config set``, and the load's
#: library client (``tests.faults.load.ChangeLoad``, the same commit request).
CHANGE_CLIENTS = frozenset({"tasync-cli", "fault-change-load"})


class ClusterNetwork(Network):
    """Workers ``a``, ``b``, ``c`` in one vhost of a private cluster, with fault switches."""

    def __init__(self, *, cluster: RabbitCluster, vhost: str, root: Path,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        super().__init__(broker_url=cluster.url_for_vhost(vhost), root=root)
        self.cluster = cluster
        self.vhost = vhost
        self.heartbeat_s = heartbeat_s
        self.node_urls: dict[str, str] = {}
        self.proxies: dict[str, TcpProxy] = {}
        self.first_pids: dict[str, int] = {}
        #: Options added to one worker's command line (the soak's ``--metrics-port``).
        self.extra_args: dict[str, tuple[str, ...]] = {}
        self.stopped: set[str] = set()
        self.outbox = root / "deliveries"
        self.outbox.mkdir(parents=True, exist_ok=True)

    # -- workers ------------------------------------------------------------------------------

    def worker_args(self, name: str, *, role: str | None, args: tuple[str, ...] = ()) -> list[str]:
        """The base command, with this worker's own broker URL and the short heartbeat."""
        cmd = super().worker_args(name, role=role,
                                  args=("--heartbeat", f"{self.heartbeat_s:g}",
                                        *self.extra_args.get(name, ()), *args))
        cmd[cmd.index("--broker") + 1] = self.node_urls.get(name, self.broker_url)
        return cmd

    def behind_proxy(self, name: str, broker_node: int) -> TcpProxy:
        """Route worker NAME (before it starts) through a proxy to one broker node only."""
        proxy = TcpProxy("127.0.0.1", self.cluster.amqp_ports[broker_node])
        self.proxies[name] = proxy
        self.node_urls[name] = proxy.url_for(self.vhost)
        return proxy

    def start(self, name: str, *, role: str | None = None, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> NodeProcess:
        node = super().start(name, role=role, args=args, env=env)
        if node.proc is not None:
            self.first_pids.setdefault(name, node.proc.pid)
        return node

    def start_trio(self) -> None:
        """Start the master and two backups, the destinations, and check the replication."""
        self.start(MASTER, role="master").wait_ready(timeout_s=120)
        for name in NODES[1:]:
            self.start(name).wait_ready(timeout_s=120)
        for source in SOURCES:
            self.cli("config", "set", "destination", destination(source),
                     "--url", self.delivery_file(source).as_uri(), "--wait-applied")
        for source in ROUTED:
            self.cli("config", "set", "route", source, *host_args(source), "--wait-applied")
        self.settle()

    def delivery_file(self, source: str) -> Path:
        """The file the destination of SOURCE appends one JSON line per delivered alert to."""
        return self.outbox / f"{source}.jsonl"

    def sigstop(self, name: str) -> None:
        """Freeze worker NAME: its sockets stay open, but it answers nothing (a hung host)."""
        self.nodes[name].signal(signal.SIGSTOP)
        self.stopped.add(name)

    def sigcont(self, name: str) -> None:
        """Let a frozen worker run on."""
        self.nodes[name].signal(signal.SIGCONT)
        self.stopped.discard(name)

    def close(self) -> None:
        """Resume frozen workers, heal proxies, stop workers (SIGTERM, then SIGKILL)."""
        for name in list(self.stopped):
            with contextlib.suppress(ProcessLookupError, AssertionError):
                self.sigcont(name)
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.heal()
        for node in self.nodes.values():
            try:
                node.stop(timeout_s=20)
            except subprocess.TimeoutExpired:
                node.kill()
        for proxy in self.proxies.values():
            proxy.close()

    # -- state --------------------------------------------------------------------------------

    def restarted(self) -> list[str]:
        """Workers that are not the process they started as, or that are not running."""
        bad = []
        for name, pid in self.first_pids.items():
            node = self.nodes[name]
            if not node.alive or node.proc_pid != pid:
                bad.append(name)
        return bad

    def applied(self) -> dict[str, int]:
        """Each worker's applied seq, read from its store (status files lag a moment behind)."""
        return {name: store_meta(node.data_dir)[0] for name, node in self.nodes.items()}

    def unpublished(self) -> int:
        """Changes the master committed that the broker has not confirmed yet."""
        return store_meta(self.nodes[MASTER].data_dir)[1]

    def master_seq(self) -> int:
        """The master's applied seq: the head of the change sequence."""
        return self.applied()[MASTER]

    def wait_converged(self, at_least: int = 0, timeout_s: float = 180.0) -> int:
        """Wait until every worker is ready and at the same seq, at least AT_LEAST; return it.

        AT_LEAST is the newest seq a client saw committed, so that a snapshot taken before the
        last change reached the master cannot pass for convergence.
        """
        def converged() -> int | None:
            seqs = self.applied()
            ready = all((n.status() or {}).get("ready") for n in self.nodes.values())
            same = len(set(seqs.values())) == 1 and seqs[MASTER] >= at_least
            return seqs[MASTER] if ready and same else None

        seq = wait_for(converged, timeout_s=timeout_s, interval_s=0.2,
                       what=f"every worker at the master's seq ({self.applied()})")
        assert seq is not None  # wait_for returns only a truthy value
        return seq

    def exports(self) -> dict[str, str]:
        """Each worker's canonical export, read from its own store."""
        return {name: self.export(name) for name in self.nodes}

    def queue_members(self) -> dict[str, int]:
        """Replica count of every quorum queue and stream of this vhost, from rabbitmqctl."""
        out = self.cluster.rabbitmqctl(0, "list_queues", "-p", self.vhost, "name", "type",
                                       "members", "--formatter", "json").stdout
        rows: list[dict[str, Any]] = json.loads(out[out.find("["):])
        return {row["name"]: len(row.get("members") or []) for row in rows
                if row.get("type") in ("quorum", "stream")}


    def connection_states(self) -> list[tuple[str, str]]:
        """``(connection name, state)`` of every connection of this vhost, e.g. ``blocked``."""
        out = self.cluster.rabbitmqctl(self._live_node(), "list_connections", "vhost", "state",
                                       "client_properties", "--formatter", "json").stdout
        rows: list[dict[str, Any]] = json.loads(out[out.find("["):] or "[]")
        states = []
        for row in rows:
            if row.get("vhost") == self.vhost:
                props = {p[0]: p[2] for p in row.get("client_properties", []) if len(p) == 3}
                states.append((str(props.get("connection_name", "?")), str(row.get("state"))))
        return states

    def _live_node(self) -> int:
        return min(set(range(self.cluster.size)) - self.cluster.down)


class BlockedSeen:
    """Whom the broker has been seen blocking during an alarm, gathered over several polls.

    A client the broker blocks for longer than its confirm timeout gives up and reconnects
    (``tasync send`` must end), so its connection is not blocked at every instant; what the
    test needs to see is that the change path was blocked, and that every alert source was
    blocked at once, at some point.
    """

    def __init__(self, net: ClusterNetwork, senders: int) -> None:
        self.net, self.senders = net, senders
        self.change_path = False
        self.most_senders = 0
        self.last: list[tuple[str, str]] = []

    def __call__(self) -> bool:
        self.last = self.net.connection_states()
        blocked = [name for name, state in self.last if state == "blocked"]
        self.change_path |= any(n in CHANGE_CLIENTS or n.startswith("tasync-relay")
                                for n in blocked)
        self.most_senders = max(self.most_senders, blocked.count("tasync-sender"))
        return self.change_path and self.most_senders >= self.senders

    def __repr__(self) -> str:
        return (f"change path blocked: {self.change_path}, most alert senders blocked at once: "
                f"{self.most_senders} of {self.senders}, last states: {sorted(self.last)}")


def store_meta(data_dir: Path) -> tuple[int, int]:
    """``(last applied seq, unpublished outbox rows)`` of a node's store, opened read-only."""
    try:
        db = sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return 0, 0  # not created yet
    try:
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN "
                               "('last_seq', 'published_seq')").fetchall())
        last = int(meta.get("last_seq", 0))
        return last, last - int(meta.get("published_seq", last))
    except sqlite3.OperationalError:
        return 0, 0  # schema not created yet
    finally:
        db.close()


def destination(source: str) -> str:
    """The destination name alerts of SOURCE are sent to."""
    return f"{source}-out"


def host_args(source: str) -> list[str]:
    """How SOURCE names its precedence list: ``--host A B C``, each node its own option."""
    return [arg for host in SOURCES[source] for arg in ("--host", host)]


def list_args(source: str) -> list[str]:
    """The ``tasync send`` arguments that address SOURCE's list: its route, or its hosts."""
    return ["--route", source] if source in ROUTED else host_args(source)
