"""A node name the network does not know is called unknown at once, with the names it knows.

A known node that does not answer is still reported as not answering, and a node that runs but
has not registered yet (no master ran when it started) is not called unknown.
"""

from __future__ import annotations

import pytest

from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ZZ_COMMANDS = [
    ["recover", "--node", "zz"],
    ["recover", "--node", "b", "--from", "zz"],
    ["promote", "zz"],
    ["config", "show", "--node", "zz"],
    ["config", "export", "--node", "zz"],
    ["replay", "--since", "seq:0", "--node", "zz"],
]


def one_line(out: str) -> str:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return lines[0]


def test_unknown_node_names_are_refused_with_the_known_ones(network: Network) -> None:
    network.start("b").wait_ready()
    # No master yet: b is running but not a node object anywhere; it is not unknown.
    assert network.cli("config", "show", "--node", "b").returncode == 0
    out = network.cli("config", "show", "--node", "zz", check=False)
    assert out.returncode == 1
    assert one_line(out.stderr) == "tasync: unknown node 'zz' (known nodes: none yet)"

    network.start("a", role="master").wait_ready()
    network.start("c").wait_ready()
    wait_for(lambda: {r["node"] for r in network.status() if r.get("alive")} == {"a", "b", "c"}
             and all(n in network.cli("config", "show", "node").stdout for n in "abc"),
             timeout_s=60, what="a, b and c registered")
    for args in ZZ_COMMANDS:
        out = network.cli(*args, check=False)
        assert out.returncode == 1, (args, out.stderr)
        assert one_line(out.stderr) == "tasync: unknown node 'zz' (known nodes: a, b, c)", args
        assert out.stdout == "", args

    network.nodes["c"].stop()
    out = network.cli("recover", "--node", "c", "--timeout", "5", check=False)
    assert out.returncode == 1
    assert "c does not answer" in one_line(out.stderr)
    out = network.cli("config", "show", "--node", "c", check=False)
    assert out.returncode == 1
    assert "unknown" not in out.stderr and "no running node answers" in out.stderr
