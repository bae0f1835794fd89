"""A private, throw-away RabbitMQ node for ``tasync demo`` when no broker answers.

It runs the installed ``rabbitmq-server`` with its own node name, ports, data directory and
Erlang cookie, so it can sit beside a system broker without touching it: the system's
``rabbitmq-env.conf`` and ``rabbitmq.conf`` (which name the system node and port 5672) are
replaced by files of its own. The Debian start script switches to the ``rabbitmq`` user, so the
directory is handed to that user. ``stop`` kills the node and removes every file it made.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tasync.broker.errors import BrokerUnreachable

ENV_CONF = """\
# Private demo node: keeps the system broker's NODENAME and ports out.
ERL_EPMD_ADDRESS=127.0.0.1
"""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def unavailable_reason() -> str | None:
    """Why a private node cannot start here, or None when it can."""
    if shutil.which("rabbitmq-server") is None:
        return ("rabbitmq-server is not installed: install it (Debian/Ubuntu: "
                "'apt-get install rabbitmq-server') or point TASYNC_BROKER_URL at a broker")
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "the 'rabbitmq' user does not exist (install the rabbitmq-server package)"
    if os.geteuid() != 0:
        return ("starting a private RabbitMQ node needs root (the start script switches to the "
                "'rabbitmq' user); run as root or point TASYNC_BROKER_URL at a broker")
    return None


class PrivateBroker:
    """One private RabbitMQ node on a free port; a context manager."""

    def __init__(self, *, startup_timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"tasync-demo-{secrets.token_hex(3)}@{socket.gethostname().split('.')[0]}"
        self.root = Path(tempfile.mkdtemp(prefix="tasync-demo-rmq-", dir="/tmp"))
        self.startup_timeout_s = startup_timeout_s
        self._cookie = secrets.token_hex(16)

    @property
    def url(self) -> str:
        """The AMQP URL of the node's default vhost."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbit.pid"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-setcookie {self._cookie}",
        })
        return env

    def start(self) -> PrivateBroker:
        """Write the node's files, start it and wait until it accepts AMQP connections."""
        reason = unavailable_reason()
        if reason:
            raise BrokerUnreachable(reason)
        self.root.chmod(0o755)
        for sub in ("mnesia", "log"):
            (self.root / sub).mkdir()
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text(ENV_CONF)
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users.guest = true\n")
        user = pwd.getpwnam("rabbitmq")
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=False,
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if port_open("127.0.0.1", self.port):
                return self
            time.sleep(0.25)
        self.stop()
        raise BrokerUnreachable(f"the private RabbitMQ node did not start within "
                                f"{self.startup_timeout_s:g} s")

    def _pid(self) -> int | None:
        try:
            return int((self.root / "rabbit.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Kill the node and remove its directory (the demo keeps nothing of it)."""
        pid = self._pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateBroker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
