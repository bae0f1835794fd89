"""tasync on a private three-node RabbitMQ cluster keeps its guarantees under faults.

Every test runs the same shape: workers ``a`` (master), ``b`` and ``c`` given all three broker
URLs, continuous load (changes through ``tasync config set``, alerts from two sources with
opposite precedence lists), one fault, its heal, then ``FaultRun.finish`` checks that nothing
committed or confirmed was lost, counts duplicates and records a row for docs/reliability.md.

``pytest -m faults`` runs the whole suite; the default run includes only the short broker-node
kill (``test_ci_broker_node_kill``, marked ``integration``, about a minute with the cluster's
boot). Results and how to read them: docs/reliability.md.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.faults.checks import FaultRun
from tests.faults.cluster_net import BlockedSeen, ClusterNetwork
from tests.faults.load import Load
from tests.harness.rabbit_cluster import DEFAULT_DISK_FREE_LIMIT, RabbitCluster
from tests.waiting import wait_for

#: Changes go through the real CLI (one process each, about half a CPU second): 1/s.
CHANGE_RATE = 1.0
#: Alerts per second and source, through AlertSender (the code behind ``tasync send``) ...
ALERT_RATE = 5.0
#: ... except every CLI_EVERY-th, which runs the real ``tasync send`` command.
CLI_EVERY = 20


def start(net: ClusterNetwork, request: pytest.FixtureRequest, fault: str, *,
          change_rate: float = CHANGE_RATE, alert_rate: float = ALERT_RATE) -> FaultRun:
    """Start the trio and the load; returns the run, load flowing."""
    net.start_trio()
    sizes = net.queue_members()
    assert sizes and set(sizes.values()) == {3}, f"not replicated on all nodes: {sizes}"
    load = Load(net, change_rate=change_rate, alert_rate=alert_rate, cli_every=CLI_EVERY)
    run = FaultRun(net, load, fault=fault, test=request.node.name)
    run.begin()
    return run


def ok_ended_before_heal(run: FaultRun) -> list[Any]:
    """Successes that started after the fault and ended before its heal."""
    attempts = [*run.load.changes.attempts(), *run.load.alert_attempts()]
    return [a.key for a in attempts
            if a.ok and run.injected_at <= a.started and a.ended < run.healed_at]


def delivered_since(run: FaultRun, source: str, since: float) -> bool:
    """True once an alert of SOURCE sent after SINCE was delivered (trivially true: no alerts)."""
    if not run.load.alerts:
        return True
    sent = {a.key for a in run.load.confirmed(started_after=since) if a.value == source}
    return bool(sent & set(run.load.delivered()))


def ended_since(run: FaultRun, since: float) -> bool:
    """True once a change and an alert of every source, started after SINCE, have returned."""
    changes = [a for a in run.load.changes.attempts() if a.started > since]
    per_source = [[a for a in load.attempts() if a.started > since] for load in run.load.alerts]
    return bool(changes) and all(per_source)


def broker_node_kill(net: ClusterNetwork, request: pytest.FixtureRequest, *,
                     alert_rate: float, label: str = "") -> None:
    """SIGKILL the broker node every client tries first; load must go on; bring it back."""
    run = start(net, request, f"SIGKILL one broker node{label}", alert_rate=alert_rate)
    run.injected()
    net.cluster.kill_node(0)
    run.wait_progress(run.injected_at, changes=3, alerts=20, what="load on two broker nodes")
    run.healing()
    net.cluster.start_node(0)
    row = run.finish()
    assert row["changes_committed_during_fault"] > 0


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_ci_broker_node_kill(cluster_net: ClusterNetwork, request: pytest.FixtureRequest) -> None:
    """The short version CI runs: one broker-node kill under modest load."""
    broker_node_kill(cluster_net, request, alert_rate=2.0, label=" (short, default run)")


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_broker_node_sigkill(cluster_net: ClusterNetwork, request: pytest.FixtureRequest) -> None:
    broker_node_kill(cluster_net, request, alert_rate=ALERT_RATE)


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_two_broker_nodes_down_writes_wait(cluster_net: ClusterNetwork,
                                           request: pytest.FixtureRequest) -> None:
    """Two of three nodes die: no quorum, so no write may be confirmed, and none is lost."""
    net, cluster = cluster_net, cluster_net.cluster
    run = start(net, request, "two of three broker nodes down (no quorum)")
    cluster.kill_node(0, wait_seen=False)
    cluster.kill_node(1)
    run.injected()
    wait_for(lambda: ended_since(run, run.injected_at), timeout_s=300, interval_s=0.5,
             what="a change and alerts of each source returning while without quorum")
    run.healing()
    cluster.start_nodes([0, 1])
    run.finish()
    assert not ok_ended_before_heal(run), "a write was confirmed without a quorum"


@pytest.mark.faults
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["blackhole", "reset"])
def test_worker_cut_off_from_broker(cluster_net: ClusterNetwork, request: pytest.FixtureRequest,
                                    mode: str) -> None:
    """Backup ``c`` (first for the nms source) loses its link; others take over; it catches up."""
    net = cluster_net
    proxy = net.behind_proxy("c", broker_node=1)
    run = start(net, request, f"one worker cut off the broker ({mode})")
    run.injected()
    proxy.cut(mode=mode)  # type: ignore[arg-type]
    wait_for(lambda: delivered_since(run, "nms", run.injected_at + 2 * net.heartbeat_s),
             timeout_s=300, interval_s=0.5, what="nms alerts taken over from c")
    run.wait_progress(run.injected_at, changes=3, alerts=10, what="load while c is cut off")
    run.healing()
    proxy.heal()
    run.finish()


@pytest.mark.faults
@pytest.mark.timeout(900)
@pytest.mark.parametrize("node", ["c", "a"])
def test_worker_sigstop(cluster_net: ClusterNetwork, request: pytest.FixtureRequest,
                        node: str) -> None:
    """A hung worker (SIGSTOP): a backup first in a list, or the master; then SIGCONT."""
    net = cluster_net
    role = "master" if node == "a" else "backup"
    run = start(net, request, f"SIGSTOP of a worker ({role})")
    source = "remedy" if node == "a" else "nms"
    run.injected()
    net.sigstop(node)
    wait_for(lambda: delivered_since(run, source, run.injected_at + 2 * net.heartbeat_s),
             timeout_s=300, interval_s=0.5, what=f"{source} alerts taken over from {node}")
    wait_for(lambda: ended_since(run, run.injected_at), timeout_s=300, interval_s=0.5,
             what="a change and alerts of each source returning while it hangs")
    run.healing()
    net.sigcont(node)
    run.finish()


def alarm_raised(cluster: RabbitCluster) -> bool:
    """True while some node reports a resource alarm."""
    out = cluster.cli("rabbitmq-diagnostics", 2, "check_alarms", check=False, timeout=120)
    return out.returncode != 0


def wait_publishers_blocked(net: ClusterNetwork, senders: int) -> None:
    """Wait until the broker was seen blocking the change path and SENDERS alert sources."""
    seen = BlockedSeen(net, senders)
    try:
        wait_for(seen, timeout_s=300, interval_s=1.0, what="the broker blocking publishers")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {seen!r}") from None


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_disk_alarm_blocks_publishers(cluster_net: ClusterNetwork,
                                      request: pytest.FixtureRequest) -> None:
    """A disk alarm blocks every publisher; they wait (or give up), and nothing is lost.

    RabbitMQ blocks a connection at its first publish after the alarm. A client blocked for
    longer than its confirm timeout (30 s) fails that attempt and reconnects; its outcome is
    then unknown, which the checks allow for.
    """
    net, cluster = cluster_net, cluster_net.cluster
    run = start(net, request, "disk alarm blocks publishers")
    cluster.set_disk_free_limit(0, "1000000GB")
    wait_for(lambda: alarm_raised(cluster), timeout_s=120, interval_s=1.0,
             what="the disk alarm, cluster-wide")
    run.injected()
    wait_publishers_blocked(net, len(run.load.alerts))
    run.healing()
    cluster.set_disk_free_limit(0, DEFAULT_DISK_FREE_LIMIT)
    run.finish()


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_change_committed_without_quorum_reaches_backups_by_itself(
        cluster_net: ClusterNetwork) -> None:
    """A change the master committed but could not get confirmed reaches the backups unaided.

    Nodes 1 and 2 die, so node 0, where every worker connected first, is alive but without
    quorum: the master receives the change, commits it to its outbox, and the confirm never
    comes (the CLI reports failure). Once quorum is back, the backups must get it without a
    further change or a restart. (The master's outbox row stays marked unconfirmed, so the
    next change republishes it; backups skip it by seq.)
    """
    net, cluster = cluster_net, cluster_net.cluster
    net.start_trio()
    before = net.master_seq()
    cluster.kill_node(1, wait_seen=False)
    cluster.kill_node(2)
    out = net.cli("config", "set", "destination", "stranded", "--url",
                  (net.root / "stranded.jsonl").as_uri(), check=False, timeout=300)
    assert out.returncode != 0, "committed without a quorum"
    wait_for(lambda: net.unpublished() > 0, timeout_s=60,
             what="the master holding the change unconfirmed in its outbox")
    cluster.start_nodes([1, 2])
    net.wait_converged(at_least=before + 1)
    exports = net.exports()
    assert len(set(exports.values())) == 1
    assert '"stranded"' in exports["b"]
    assert not net.restarted()


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_send_during_disk_alarm_ends_with_an_error(cluster_net: ClusterNetwork) -> None:
    """``tasync send`` while the broker blocks publishers must end (exit 1), not hang.

    ``tasync config set`` in the same state gives up after its confirm timeout (30 s) with
    exit 1. The bound here is four times that; the alarm stays raised for all of it.
    """
    net, cluster = cluster_net, cluster_net.cluster
    net.start_trio()
    cluster.set_disk_free_limit(0, "1000000GB")
    wait_for(lambda: alarm_raised(cluster), timeout_s=120, interval_s=1.0, what="disk alarm")
    cmd = [sys.executable, "-m", "tasync", "send", "-i", "remedy-out", "-m", "during alarm",
           "--host", "a", "b", "c", "--source", "remedy", "--id", "alarm-1"]
    proc = subprocess.Popen(cmd, env=net.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail("tasync send still runs after 120 s of disk alarm, silent: it waits for "
                    "the blocked connection without a deadline")
    finally:
        cluster.set_disk_free_limit(0, DEFAULT_DISK_FREE_LIMIT)
    assert proc.returncode == 1, err
    assert err.strip() and "Traceback" not in err
