"""What an operator can type or load: one clear line, bounded memory, nothing half-applied."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasync.broker import topology
from tasync.broker.errors import RemoteError
from tasync.broker.settings import Settings
from tasync.client import rpc_client
from tests.integration.test_replication import start_trio
from tests.network import Network

pytestmark = pytest.mark.integration
#: A billion-laughs file that expanded would need far more than this.
MEMORY_LIMIT_BYTES = 1 << 30


def limited_cli(network: Network, *args: str) -> subprocess.CompletedProcess[str]:
    """``tasync ARGS`` with its address space capped, as a hostile file's victim would be."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))

    return subprocess.run([sys.executable, "-m", "tasync", *args], env=network.env,
                          capture_output=True, text=True, timeout=120, preexec_fn=cap)


def one_line(out: subprocess.CompletedProcess[str], *, contains: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert out.stderr.startswith("tasync: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr and contains in out.stderr, out.stderr
    assert len(out.stderr) < 400, out.stderr


def test_hostile_operator_input_changes_nothing(network: Network, tmp_path: Path) -> None:
    start_trio(network)
    network.cli("config", "set", "destination", "ok", "--url", "file:///tmp/ok",
                "--wait-applied")
    before = network.export("a")

    laughs = "destination:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  {chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n"
        for i in range(9))
    (tmp_path / "laughs.yaml").write_text(laughs)
    one_line(limited_cli(network, "config", "import", str(tmp_path / "laughs.yaml")),
             contains="YAML aliases")

    for depth in (500, 5000):  # below and above Python's recursion limit
        deep = '{"url": "file:///d", "subject": ' + "[" * depth + "]" * depth + "}"
        one_line(limited_cli(network, "config", "set", "destination", "d", "--json", deep),
                 contains="nested")
    one_line(network.cli("config", "set", "destination", "d", "--url", "file:///d\x01",
                         check=False), contains="control character")
    one_line(network.cli("config", "set", "destination", "d", "--url", "file:///d",
                         "--subject", "Alert\r\nBcc: all@example.com", check=False),
             contains="control character")
    one_line(network.cli("config", "set", "destination", "n" * 10_000, "--url", "file:///d",
                         check=False), contains="10000 characters")
    (tmp_path / "ctl.json").write_text(json.dumps(
        {"destination": {f"d{i}": {"url": f"file:///d{i}"} for i in range(50)}
         | {"bad": {"url": "file:///bad\x00"}}}))
    one_line(network.cli("config", "import", str(tmp_path / "ctl.json"), check=False),
             contains="control character")

    # The master checks too, whatever a client sends it.
    ops: list[dict[str, Any]] = [
        {"op": "set", "kind": "destination", "name": "fine", "body": {"url": "file:///f"}},
        {"op": "set", "kind": "destination", "name": "nul", "body": {"url": "file:///\x00"}}]
    with rpc_client(Settings.from_url(network.broker_url)) as rpc, \
            pytest.raises(RemoteError, match="control character"):
        rpc.call_one(topology.MASTER, "commit", {"ops": ops}, timeout_s=30)

    network.settle()
    for name in ("a", "b", "c"):
        assert network.export(name) == before, f"{name} changed"
