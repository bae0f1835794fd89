"""Real tasync processes for tests: workers started and killed, commands run, state read."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tasync.broker.audit import read_trail
from tasync.broker.settings import redact_url
from tests.waiting import wait_for

#: ``rabbitmqctl`` verbs that stop, restart, alarm or reconfigure a whole broker, or cut
#: other people's connections. The broker at 127.0.0.1:5672 is shared by everyone on the
#: machine, so tests do these on the private nodes of ``tests.harness.rabbit_cluster``.
BROKER_WIDE_VERBS = frozenset({
    "stop", "shutdown", "stop_app", "start_app", "reset", "force_reset", "force_boot",
    "join_cluster", "forget_cluster_node", "change_cluster_node_type", "update_cluster_nodes",
    "rename_cluster_node", "set_cluster_name", "set_vm_memory_high_watermark",
    "set_disk_free_limit", "close_all_connections", "close_all_user_connections",
    "suspend_listeners", "resume_listeners", "set_log_level", "rotate_logs", "eval",
    "enable_feature_flag", "set_global_parameter", "clear_global_parameter",
    "set_operator_policy", "clear_operator_policy", "delete_vhost_limits", "set_vhost_limits",
    "hipe_compile", "decode", "encode",
})
#: Verbs that change a user; the shared ``guest`` must stay as it is for everyone else.
USER_VERBS = frozenset({"delete_user", "change_password", "clear_password", "set_user_tags",
                        "set_user_limits", "clear_user_limits", "add_user"})


class SharedBrokerGuard(AssertionError):
    """A test asked the shared broker for something only a private node may suffer."""


def check_shared_broker_verb(args: tuple[str, ...] | list[str]) -> None:
    """Refuse broker-wide verbs, changes to ``guest``, and changes to the vhost ``/``.

    Raises:
        SharedBrokerGuard: naming the verb and where such a test belongs.
    """
    words: list[str] = []
    skip = False
    for arg in args:  # the verb is the first word that is neither an option nor its value
        if skip:
            skip = False
        elif arg in ("-n", "--node", "-p", "--vhost", "-t", "--timeout"):
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
    verb = words[0] if words else ""
    if verb in BROKER_WIDE_VERBS:
        raise SharedBrokerGuard(
            f"rabbitmqctl {verb} would act on the broker every test and engineer on this "
            "machine shares; run it on a private node (tests.harness.rabbit_cluster)")
    if verb == "delete_vhost" and words[1:2] == ["/"]:
        raise SharedBrokerGuard("rabbitmqctl delete_vhost /: the default vhost is everyone's")
    if verb in USER_VERBS and "guest" in words[1:]:
        raise SharedBrokerGuard(f"rabbitmqctl {verb} guest: the shared guest user stays as it is")
    vhost = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-p", "--vhost")), "/")
    if verb in ("set_permissions", "clear_permissions", "set_topic_permissions",
                "clear_topic_permissions") and vhost == "/":
        raise SharedBrokerGuard(f"rabbitmqctl {verb} on the default vhost '/': tests change "
                                "permissions in vhosts of their own")


@dataclass
class BrokerAdmin:
    """A RabbitMQ the tests may create vhosts on."""

    host: str
    port: int
    ctl: list[str]

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}/{quote(vhost, safe='')}"

    def rabbitmqctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` on the shared broker; verbs that act on all of it are refused."""
        check_shared_broker_verb(args)
        out = subprocess.run([*self.ctl, *args], check=True, capture_output=True, text=True,
                             timeout=120)
        return out.stdout

    def add_vhost(self, name: str) -> None:
        self.rabbitmqctl("add_vhost", name)
        self.rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        check_shared_broker_verb(("delete_vhost", name))
        subprocess.run([*self.ctl, "delete_vhost", name], check=False, capture_output=True,
                       timeout=120)

    def add_vhosts(self, names: list[str]) -> None:
        """Create test vhosts (``guest`` may use them) with one ``rabbitmqctl`` run.

        Each ``rabbitmqctl`` run starts an Erlang VM (about a second); two runs per test for
        creating and one for deleting cost the suite minutes. The one evaluated expression
        does only what ``add_vhost`` and ``set_permissions -p NAME guest`` do, and only for
        names ``TEST_VHOST`` accepts; anything else (``eval`` at large) stays refused.
        """
        self._eval_on_test_vhosts(names, _ADD_VHOST)

    def delete_vhosts(self, names: list[str]) -> None:
        """Delete test vhosts with one ``rabbitmqctl`` run (see ``add_vhosts``)."""
        self._eval_on_test_vhosts(names, _DELETE_VHOST)

    def _eval_on_test_vhosts(self, names: list[str], template: str) -> None:
        if not names:
            return
        bad = [n for n in names if not TEST_VHOST.fullmatch(n)]
        if bad:
            raise SharedBrokerGuard(f"not test vhosts: {bad}")
        listed = ", ".join(f'<<"{name}">>' for name in names)
        subprocess.run([*self.ctl, "eval", template.format(vhosts=listed)], check=True,
                       capture_output=True, text=True, timeout=120)


#: Names of the vhosts the pool makes; nothing else is created or deleted through ``eval``.
TEST_VHOST = re.compile(r"t-pool-[0-9a-f]{16}")
_ADD_VHOST = ("[begin ok = rabbit_vhost:add(V, <<\"tasync-tests\">>), "
              "ok = rabbit_auth_backend_internal:set_permissions(<<\"guest\">>, V, <<\".*\">>, "
              "<<\".*\">>, <<\".*\">>, <<\"tasync-tests\">>) end || V <- [{vhosts}]], ok.")
_DELETE_VHOST = "[rabbit_vhost:delete(V, <<\"tasync-tests\">>) || V <- [{vhosts}]], ok."


class VhostPool:
    """Fresh vhosts made ahead and used ones deleted, in batches, by a thread of its own.

    Every test still gets a vhost nobody used before; it just does not wait for the broker
    to make one, nor to delete it afterwards.

    Args:
        admin: the broker.
        ahead: how many vhosts are kept ready.
    """

    def __init__(self, admin: BrokerAdmin, *, ahead: int = 3) -> None:
        self.admin = admin
        self.ahead = ahead
        self._ready: queue.Queue[str] = queue.Queue()
        self._used: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vhost-pool", daemon=True)
        self._thread.start()

    def take(self) -> str:
        """A new vhost, made ahead of time."""
        self._wake.set()
        while True:
            try:
                name = self._ready.get(timeout=1.0)
            except queue.Empty:
                if self._failure is not None:
                    raise RuntimeError(f"making test vhosts failed: {self._failure}") from None
                continue
            self._wake.set()
            return name

    def give_back(self, name: str) -> None:
        """Delete ``name`` soon, in the background."""
        with self._lock:
            self._used.append(name)
        self._wake.set()

    def close(self) -> None:
        """Stop the thread; delete every vhost it made that is still there."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=180)
        left: list[str] = []
        while not self._ready.empty():
            left.append(self._ready.get_nowait())
        with self._lock:
            left += self._used
            self._used = []
        self.admin.delete_vhosts(left)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                missing = self.ahead - self._ready.qsize()
                if missing > 0:
                    names = [f"t-pool-{uuid.uuid4().hex[:16]}" for _ in range(missing)]
                    self.admin.add_vhosts(names)
                    for name in names:
                        self._ready.put(name)
                with self._lock:
                    used, self._used = self._used, []
                self.admin.delete_vhosts(used)
            except (OSError, subprocess.SubprocessError) as exc:
                self._failure = exc
                return


@dataclass
class NodeProcess:
    """One ``tasync-worker`` process."""

    name: str
    data_dir: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"{self.name}.stderr"

    def start(self) -> NodeProcess:
        with open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err,
                                         env=self.env)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:
        """The node's own ``status.json``, or None before it wrote one."""
        try:
            data: dict[str, Any] = json.loads((self.data_dir / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    def _ready_now(self) -> bool:
        status = self.status()
        return bool(status and status.get("ready") and status.get("pid") == self.proc_pid)

    @property
    def proc_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def wait_ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        def check() -> bool:
            if not self.alive:
                raise AssertionError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            return self._ready_now()

        wait_for(check, timeout_s=timeout_s, what=f"{self.name} ready")
        return self.status() or {}

    def wait_seq(self, seq: int, timeout_s: float = 60.0) -> None:
        wait_for(lambda: (self.status() or {}).get("applied_seq", 0) >= seq,
                 timeout_s=timeout_s, what=f"{self.name} at seq {seq}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no clean-up, exactly like a crash."""
        if self.alive:
            self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait: the clean stop an operator does."""
        if self.alive:
            self.signal(signal.SIGTERM)
            assert self.proc is not None
            return self.proc.wait(timeout_s)
        return self.proc.returncode if self.proc else None


class Network:
    """The processes of one test's tasync network."""

    def __init__(self, *, broker_url: str, root: Path) -> None:
        self.broker_url = broker_url
        self.root = root
        self.nodes: dict[str, NodeProcess] = {}
        self.env = {**os.environ, "TASYNC_BROKER_URL": broker_url, "PYTHONUNBUFFERED": "1"}

    def worker_args(self, name: str, *, role: str | None, args: tuple[str, ...] = ()) -> list[str]:
        cmd = [sys.executable, "-m", "tasync.worker_cli", "--node", name,
               "--data-dir", str(self.root / name), "--broker", self.broker_url]
        if role:
            cmd += ["--role", role]
        return cmd + list(args)

    def start(self, name: str, *, role: str | None = None, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> NodeProcess:
        """Start (or restart) node ``name`` with its data directory under the test's tmp dir."""
        node = NodeProcess(name=name, data_dir=self.root / name,
                           args=self.worker_args(name, role=role, args=args),
                           env={**self.env, **(env or {})})
        self.nodes[name] = node
        return node.start()

    def start_all(self, *names: str, args: tuple[str, ...] = ()) -> list[NodeProcess]:
        """Start backups ``names`` at once and wait until every one is ready.

        Their boots (an interpreter, a store, a broker connection each) overlap instead of
        queueing; each node still has to report ready on its own.
        """
        nodes = [self.start(name, args=args) for name in names]
        for node in nodes:
            node.wait_ready()
        return nodes

    def cli(self, *args: str, check: bool = True, timeout: float = 300.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``tasync --broker URL ...`` as a user would."""
        cmd = [sys.executable, "-m", "tasync", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=self.env, input=input)
        # Kept for the session's secret scan (tests/harness/secret_registry.py): every output
        # an operator could see must be free of passwords and keys.
        # The command line is the test's own input, so its URLs are shown as an operator's
        # would be; what the command printed is recorded as it was.
        shown = " ".join(";".join(redact_url(u) if "://" in u else u for u in a.split(";"))
                         for a in args)
        with open(self.root / "cli.out", "a", encoding="utf-8") as record:
            record.write(f"$ tasync {shown}\nexit {out.returncode}\n{out.stdout}"
                         f"{out.stderr}\n")
        if check and out.returncode != 0:
            raise AssertionError(f"tasync {' '.join(args)} exited {out.returncode}: "
                                 f"{out.stderr.strip()}")
        return out

    def status(self) -> list[dict[str, Any]]:
        """``tasync status --json``: a row per known node, answering or not.

        Its exit status is the network's health (0 healthy, 4-7 degraded), which the tests
        that break things expect; only a failure to run (1-3) fails here.
        """
        out = self.cli("status", "--json", check=False)
        assert out.returncode == 0 or out.returncode >= 4, out.stderr
        rows: list[dict[str, Any]] = json.loads(out.stdout)["nodes"]
        return rows

    def health(self) -> tuple[int, dict[str, Any]]:
        """``tasync status --json``'s exit status and its ``health`` object."""
        out = self.cli("status", "--json", check=False)
        return out.returncode, json.loads(out.stdout)["health"]

    def settle(self) -> int:
        """Wait until every started node's status file shows the master's seq; return it."""
        master = [r for r in self.status() if r.get("role") == "master" and r.get("alive")]
        assert master, "no master answers"
        seq = int(master[0]["applied_seq"])
        for node in self.nodes.values():
            if node.alive:
                node.wait_seq(seq)
        return seq

    def export(self, name: str) -> str:
        """A node's canonical export read from its own store (works while it is stopped)."""
        return self.cli("config", "export", "--data-dir", str(self.root / name)).stdout

    def close(self) -> None:
        """Stop every node cleanly, all at once: each is told first, then each is waited for."""
        for node in self.nodes.values():
            if node.alive:
                node.signal(signal.SIGTERM)
        for node in self.nodes.values():
            try:
                node.stop(timeout_s=15)
            except subprocess.TimeoutExpired:
                node.kill()


APPLY_EVENTS = {"change.applied", "change.replayed"}


def applied_seqs(data_dir: Path) -> list[int]:
    """Every seq a node's trail says it applied, in trail order (a seq twice = applied twice)."""
    seqs: list[int] = []
    for line in read_trail(data_dir):
        if line["event"] not in APPLY_EVENTS:
            continue
        if "seq" in line:
            seqs.append(int(line["seq"]))
        else:
            seqs.extend(range(int(line["first_seq"]), int(line["last_seq"]) + 1))
    return seqs
