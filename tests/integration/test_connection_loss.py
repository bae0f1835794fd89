"""A broker connection lost in the middle of a command: one line and exit 3, never a traceback.

Each command runs through a TCP proxy in front of the broker; the proxy cuts its connection
(a reset, as a broker restart or a network failure does) while the command is waiting on
something slow: a node that does not answer, a hung master's seat, a big import.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.harness.tcp_proxy import TcpProxy
from tests.integration.test_replication import start_trio, write_import
from tests.network import Network
from tests.waiting import wait_for

#: What every command says of a virtual host without the topology (``topology.setup_advice``).
ADVICE = (r"tasync: virtual host '[^']+' has no tasync topology \((exchange|queue) tasync\.[\w.-]+ "
          r"does not exist\): run `tasync broker setup` against it")

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(broker_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as running:
        yield running


def cut_in_the_middle(network: Network, proxy: TcpProxy, *args: str) -> None:
    vhost = unquote(urlsplit(network.broker_url).path[1:])
    url = proxy.url_for(vhost)
    cmd = [sys.executable, "-m", "tasync", *args, "--broker", url]
    proc = subprocess.Popen(cmd, env=network.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: proxy.accepted_connections >= 1 or proc.poll() is not None,
             timeout_s=60, what=f"tasync {args[0]} to connect")
    assert proc.poll() is None, proc.communicate()
    proxy.cut("reset")
    _out, err = proc.communicate(timeout=120)
    proxy.heal()
    assert proc.returncode == 3, (args, proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.startswith("tasync: ") and len(err.strip().splitlines()) <= 2, err


def test_commands_that_lose_the_broker_midway_exit_3(network: Network, proxy: TcpProxy,
                                                     tmp_path: Path) -> None:
    start_trio(network)
    network.nodes["c"].kill()  # known, silent: status and totals wait for it
    cut_in_the_middle(network, proxy, "status", "--timeout", "60")
    cut_in_the_middle(network, proxy, "totals", "--timeout", "60")

    network.start("c").wait_ready()
    c = network.nodes["c"]
    c.signal(signal.SIGSTOP)  # recover waits for its answer
    cut_in_the_middle(network, proxy, "recover", "--node", "c", "--timeout", "60")
    c.signal(signal.SIGCONT)

    big = write_import(tmp_path / "big.json", 30_000)
    cut_in_the_middle(network, proxy, "config", "import", str(big), "--timeout", "10")

    network.nodes["a"].signal(signal.SIGSTOP)  # promote waits for the hung master's seat
    cut_in_the_middle(network, proxy, "promote", "b")
    network.nodes["a"].signal(signal.SIGCONT)


def test_a_closed_port_and_a_vhost_without_topology_are_one_line(
        network: Network, broker_admin: object, tmp_path: Path) -> None:
    closed = "amqp://guest:guest@127.0.0.1:1/%2F"
    for args in (("status",), ("totals",), ("config", "show"),
                 ("send", "-i", "x", "-m", "hi", "--host", "a")):
        out = network.cli(*args, "--broker", closed, check=False)
        assert out.returncode == 3, (args, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    # The test's vhost is empty until a node or `broker setup` declares the topology.
    for args in (("status",), ("totals",), ("trace", "x"), ("dead", "list"),
                 ("quarantine", "list"), ("wait", "ready", "--node", "a", "--timeout", "2"),
                 ("recover", "--node", "a"), ("promote", "a"),
                 ("replay", "--since", "seq:0", "--dry-run"), ("config", "show"),
                 ("config", "export"), ("config", "delete", "destination", "d"),
                 ("config", "set", "destination", "d", "--url", "file:///d"),
                 ("send", "-i", "d", "-m", "hi", "--host", "a")):
        out = network.cli(*args, check=False)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr
        assert re.fullmatch(ADVICE, out.stderr.strip()), (args, out.stderr)
