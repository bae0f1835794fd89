"""``tasync status`` as a health check: a row for every known node, an exit code per state."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_replication import start_trio
from tests.network import Network

pytestmark = pytest.mark.integration


def rows(network: Network) -> dict[str, dict[str, object]]:
    return {r["node"]: r for r in network.status()}


def test_status_exit_codes_follow_the_network(network: Network) -> None:
    start_trio(network)
    code, health = network.health()
    assert (code, health["state"]) == (0, "ok"), health

    network.nodes["c"].kill()
    code, health = network.health()
    assert (code, health["state"]) == (5, "node_down"), health
    row = rows(network)["c"]
    assert row["alive"] is False and row["role"] == "backup"
    assert isinstance(row["last_seen"], float)  # from its peers' beacons

    network.nodes["a"].kill()  # the master
    code, health = network.health()
    assert (code, health["state"]) == (4, "no_master"), health
    master = rows(network)["a"]
    assert master["alive"] is False and master["role"] == "master", master
    out = network.cli("status", check=False)
    assert out.returncode == 4
    assert "a" in out.stdout and "no master" in out.stderr

    network.nodes["b"].stop()
    out = network.cli("status", "--json", check=False)
    assert out.returncode == 4 and json.loads(out.stdout)["health"]["problems"][0]["what"] \
        == "no node answers"


def test_wait_applied_names_the_backups_it_skipped(network: Network) -> None:
    start_trio(network)
    network.nodes["c"].kill()
    out = network.cli("config", "set", "destination", "x", "--url", "file:///tmp/x",
                      "--wait-applied")
    assert "committed" in out.stdout
    assert "not waited for c (does not answer" in out.stderr, out.stderr
    strict = network.cli("config", "set", "destination", "y", "--url", "file:///tmp/y",
                         "--wait-applied", "--strict", check=False)
    assert strict.returncode == 1 and "not applied everywhere: c" in strict.stderr, strict
    assert "y" in json.loads(network.export("b"))["destination"]  # committed all the same


def test_watch_prints_a_line_when_the_health_changes(network: Network) -> None:
    import signal
    import subprocess
    import sys

    start_trio(network)
    watcher = subprocess.Popen([sys.executable, "-m", "tasync", "status", "--watch", "1"],
                               env=network.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().split()[1] == "ok"
        network.nodes["c"].kill()
        line = watcher.stdout.readline()
        assert "node_down: c does not answer" in line, line
    finally:
        watcher.send_signal(signal.SIGTERM)
        _out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0 and "Traceback" not in err, err
