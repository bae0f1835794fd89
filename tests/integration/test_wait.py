"""``tasync wait``: exit 0 once the condition holds, else 1 with one line saying what it saw."""

from __future__ import annotations

import pytest

from tests.network import Network

pytestmark = pytest.mark.integration


def test_wait_times_out_in_one_line_then_succeeds(network: Network) -> None:
    cases = {
        ("wait", "ready", "--node", "a"): "tasync: waited 1 s for a to report ready: a does "
                                          "not answer (is its worker running?)",
        ("wait", "master"): "tasync: waited 1 s for a ready master: no master answers (is a "
                            "node running with --role master?)",
        ("wait", "delivered"): "tasync: waited 1 s for 1 alert(s) to be delivered: no node "
                               "answers",
    }
    network.cli("broker", "setup")
    for args, line in cases.items():
        out = network.cli(*args, "--timeout", "1", check=False)
        assert (out.returncode, out.stderr.strip(), out.stdout) == (1, line, ""), args

    network.start("a", role="master")
    network.start("b")
    out = network.cli("wait", "ready", "--node", "a", "--node", "b")
    assert [line.split(" (")[0] for line in out.stdout.splitlines()] == \
        ["a: ready", "b: ready"]
    assert "b" in network.cli("config", "show", "node").stdout  # registered: routes may name it
    network.cli("config", "set", "route", "r", "--host", "b", "--host", "a")
    assert network.cli("wait", "master").stdout.startswith("a is the master (epoch 1, ")
    out = network.cli("wait", "delivered", "--source", "nobody", "--timeout", "1", check=False)
    assert out.returncode == 1 and out.stderr.strip().endswith("0 delivered so far")
