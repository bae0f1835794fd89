"""The stage of ``tasync demo``: a broker to use, and real node processes to start and kill.

The demo runs the same programs an operator runs (``tasync-worker`` processes and ``tasync``
commands), so what it shows is the product, not a simulation. It never disturbs an existing
network: on a broker it can administer it works in a fresh virtual host, and it removes what it
created when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from tasync import private_broker
from tasync.broker import topology
from tasync.broker.connection import close_quietly, connect
from tasync.broker.errors import BrokerUnreachable, ConfigError
from tasync.broker.settings import Settings


def _with_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def _reachable(url: str, wait_s: float) -> bool:
    try:
        close_quietly(connect(Settings.from_url(url), name="tasync-demo-probe", retry_s=wait_s))
        return True
    except BrokerUnreachable:
        return False


def _vhost_in_use(url: str) -> bool:
    """Whether a tasync network already lives in the URL's vhost (its config exchange exists)."""
    conn = connect(Settings.from_url(url), name="tasync-demo-probe", retry_s=1.0)
    try:
        conn.channel().exchange_declare(topology.CONFIG_EXCHANGE, "fanout", passive=True)
        return True
    except Exception:  # a 404 closes the channel: the exchange is not there
        return False
    finally:
        close_quietly(conn)


@contextlib.contextmanager
def demo_broker(url: str, say: Callable[[str], None], *, wait_s: float = 1.0) -> Iterator[str]:
    """Yield the URL the demo runs on, and clean up afterwards.

    Uses the broker at ``url`` when it answers (in a fresh vhost when ``rabbitmqctl`` can make
    one), else starts a private RabbitMQ node, else a container where a Docker engine runs.
    ``wait_s`` is how long the broker at ``url`` may take to answer.
    """
    host = urlsplit(url).hostname or "localhost"
    if _reachable(url, wait_s):
        vhost = f"tasync-demo-{secrets.token_hex(3)}"
        local = host in ("localhost", "127.0.0.1", "::1")
        if local and shutil.which("rabbitmqctl") and _ctl("add_vhost", vhost):
            _ctl("set_permissions", "-p", vhost, urlsplit(url).username or "guest",
                 ".*", ".*", ".*")
            say(f"using the broker at {host}, in a fresh virtual host '{vhost}'")
            try:
                yield _with_vhost(url, vhost)
            finally:
                _ctl("delete_vhost", vhost)
            return
        if _vhost_in_use(url):
            raise ConfigError("a tasync network already lives in the broker's vhost; point "
                              "TASYNC_BROKER_URL at an empty vhost for the demo")
        say(f"using the broker at {Settings.from_url(url).display_urls}")
        yield url
        return
    reason = private_broker.unavailable_reason()
    if reason is None:
        say("no broker answers: starting a private RabbitMQ node for the demo")
        with private_broker.PrivateBroker() as node:
            yield node.url
        return
    with _container(say) as container_url:
        if container_url:
            yield container_url
            return
    raise BrokerUnreachable(f"no broker answers at {Settings.from_url(url).display_urls}, "
                            f"and none can be started here: {reason}")


@contextlib.contextmanager
def _container(say: Callable[[str], None]) -> Iterator[str | None]:
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.12").start()
    except Exception:  # no testcontainers, or no Docker engine
        yield None
        return
    say("no broker answers: started a RabbitMQ container for the demo")
    try:
        port = container.get_exposed_port(5672)
        yield f"amqp://guest:guest@{container.get_container_host_ip()}:{port}/%2F"
    finally:
        container.stop()


def _ctl(*args: str) -> bool:
    try:
        out = subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


@dataclass
class Stage:
    """The demo's node processes and a way to run ``tasync`` commands against them."""

    broker_url: str
    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment for child processes: the demo's broker URL."""
        return {**os.environ, "TASYNC_BROKER_URL": self.broker_url, "PYTHONUNBUFFERED": "1"}

    def start(self, node: str, *, role: str | None = None) -> None:
        """Start ``tasync-worker`` for ``node`` and wait until it says it is ready."""
        args = [sys.executable, "-m", "tasync.worker_cli", "--node", node,
                "--data-dir", str(self.root / node), "--heartbeat", "2"]
        if role:
            args += ["--role", role]
        log = open(self.root / f"{node}.stderr", "ab")  # noqa: SIM115 - lives with the process
        self.procs[node] = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                            stderr=log)
        self.wait(lambda: self.status_file(node).get("ready") and
                  self.status_file(node).get("pid") == self.procs[node].pid,
                  what=f"{node} to be ready", node=node)

    def status_file(self, node: str) -> dict[str, Any]:
        """A node's own status.json, or {} before it wrote one."""
        try:
            data: dict[str, Any] = json.loads((self.root / node / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data

    def wait(self, check: Callable[[], Any], *, what: str, timeout_s: float = 120.0,
             node: str | None = None) -> None:
        """Poll ``check`` until true; fail with ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            if node and self.procs[node].poll() is not None:
                tail = (self.root / f"{node}.stderr").read_text(errors="replace")[-500:]
                raise ConfigError(f"node {node} exited: {tail.strip()}")
            time.sleep(0.1)
        raise ConfigError(f"timed out waiting for {what}")

    def kill(self, node: str) -> None:
        """SIGKILL, as a crash or a pulled plug would do it."""
        proc = self.procs[node]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def tasync(self, *args: str, ok: tuple[int, ...] = (0,)) -> str:
        """Run a ``tasync`` command as an operator would; its stdout, or an error.

        ``ok`` lists the exit statuses that are answers rather than failures (``status``
        exits 4-7 for a network the demo broke on purpose).
        """
        out = subprocess.run([sys.executable, "-m", "tasync", *args], env=self.env,
                             capture_output=True, text=True, timeout=300, check=False)
        if out.returncode not in ok:
            raise ConfigError(f"'tasync {' '.join(args)}' failed: {out.stderr.strip()}")
        return out.stdout

    def tasync_json(self, *args: str, ok: tuple[int, ...] = (0,)) -> Any:
        """Run a command with ``--json`` and parse its output."""
        return json.loads(self.tasync(*args, "--json", ok=ok))

    def stop_all(self) -> None:
        """SIGTERM every node, and SIGKILL what does not stop."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
