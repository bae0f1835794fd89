"""Where a private RabbitMQ node lives: tools, ports, directories, config files, environment.

Facts this relies on (measured on RabbitMQ 3.10.8 / Debian):

* ``/usr/sbin/rabbitmq-server`` and ``/usr/sbin/rabbitmqctl`` are one wrapper that, run as root,
  re-executes the real script through ``su rabbitmq``. ``su`` keeps the environment (so the
  ``RABBITMQ_*`` variables below reach the node) but sets ``HOME=/var/lib/rabbitmq``, so every
  node directory must be owned by the ``rabbitmq`` user.
* ``/etc/rabbitmq/rabbitmq-env.conf`` sets ``NODENAME=rabbit@localhost`` and
  ``/etc/rabbitmq/rabbitmq.conf`` a listener on 5672; both are replaced per cluster
  (``RABBITMQ_CONF_ENV_FILE``, ``RABBITMQ_CONFIG_FILE``) so nothing of the system broker leaks in.
* The cookie is handed to the nodes as ``-setcookie`` through
  ``RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS`` (and to the CLI as ``--erlang-cookie``): no cookie file,
  the system broker's cookie untouched, no private node or CLI call able to reach
  ``rabbit@localhost`` by mistake.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.harness.rabbit_procs import MARKER_ENV, ROOT_PREFIX

RABBITMQ_USER = "rabbitmq"
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_CLI_DIST_PORTS = range(35672, 35683)  # rabbitmqctl's own distribution ports


class RabbitClusterError(RuntimeError):
    """A private node failed to start, join, stop or answer; the message carries log tails."""


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


def short_hostname() -> str:
    """Host part of node names: ``hostname -s``, as RabbitMQ's short names expect."""
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return "localhost"  # an unresolvable host name would make distribution fail
    return host


def _port_free(port: int) -> bool:
    """True if nothing listens on (or lingers in TIME_WAIT on) 127.0.0.1:PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
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


def chown_tree(root: Path, user: str) -> None:
    """Give ROOT and everything below it to USER, because the nodes run as that user."""
    if os.geteuid() != 0:
        return  # running as the rabbitmq user already: the files are ours
    entry = pwd.getpwnam(user)
    os.chown(root, entry.pw_uid, entry.pw_gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)


def tail(path: Path, lines: int = 25) -> str:
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
class NodeSpec:
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


def make_root(base_dir: Path | None) -> Path:
    """A fresh cluster directory the rabbitmq user can enter (under BASE_DIR or the temp dir)."""
    base = base_dir or Path(tempfile.gettempdir())
    if not _traversable_by_others(base):
        base = Path("/tmp")
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=base))
    root.chmod(0o755)  # mkdtemp makes it 0700; the rabbitmq user must get in
    return root


def write_layout(root: Path, *, size: int, prefix: str, host: str,
                 extra_config: Mapping[str, str]) -> list[NodeSpec]:
    """Choose ports and write each node's directories and configuration files under ROOT."""
    ports = free_ports(2 * size)
    (root / "rabbitmq-env.conf").write_text(_ENV_CONF)
    nodes = []
    for i in range(size):
        node = NodeSpec(
            index=i,
            name=f"{prefix}{i + 1}@{host}",
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
            **extra_config,
        }
        node.config_file.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        nodes.append(node)
    return nodes


def cli_env(root: Path) -> dict[str, str]:
    """Caller's environment minus any RABBITMQ_/ERL_ setting that could redirect the CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env["RABBITMQ_CONF_ENV_FILE"] = str(root / "rabbitmq-env.conf")
    return env


def node_env(root: Path, node: NodeSpec, *, cookie: str, marker: str) -> dict[str, str]:
    """The environment ``rabbitmq-server`` needs to boot NODE as a private node."""
    env = cli_env(root)
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
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-setcookie {cookie}",
            MARKER_ENV: marker,
        }
    )
    return env


def read_pid(node: NodeSpec) -> int | None:
    """The PID in NODE's pid file, or None when there is none (yet)."""
    try:
        return int(node.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
