"""Recovery with one command: returning, lost and new nodes, promotion, fencing, replay.

Real worker processes against RabbitMQ; every check compares state (canonical exports, the
conflicts file, trails as audit state), never log wording or timing.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tasync.broker import topology
from tasync.broker.audit import read_trail
from tasync.broker.connection import connect
from tasync.broker.settings import Settings
from tests.integration.test_replication import assert_identical, start_trio, write_import
from tests.integration.test_replication_faults import ImportLoop, assert_no_seq_applied_twice
from tests.network import BrokerAdmin, Network, applied_seqs
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def events(network: Network, name: str, event: str) -> list[dict[str, str]]:
    return [e for e in read_trail(network.root / name) if e["event"] == event]


def import_objects(network: Network, tmp: Path, count: int, prefix: str) -> dict[str, Any]:
    path = write_import(tmp / f"{prefix}.json", count, prefix=prefix)
    result: dict[str, Any] = json.loads(network.cli("config", "import", str(path), "--json",
                                                    "--wait-applied").stdout)
    return result


def master_seq(network: Network) -> int:
    rows = [r for r in network.status() if r.get("role") == "master" and r.get("alive")]
    assert len(rows) == 1, rows
    return int(rows[0]["applied_seq"])


def broker_channel(broker_url: str) -> tuple[Any, Any]:
    conn = connect(Settings.from_url(broker_url))
    return conn, conn.channel()


def lose_queue_and_log(broker_url: str, node: str) -> None:
    """Delete ``node``'s sync queue and start the change log afresh, as if both were lost.

    With the log recreated empty it no longer reaches back to anything the node missed,
    which is what retention does to a node that stayed away too long.
    """
    conn, channel = broker_channel(broker_url)
    try:
        channel.queue_delete(topology.sync_queue(node))
        channel.queue_delete(topology.CHANGELOG_STREAM)
        topology.declare_config(channel, Settings.from_url(broker_url))
    finally:
        conn.release()


def recover(network: Network, node: str, *extra: str) -> dict[str, Any]:
    out = network.cli("recover", "--node", node, "--json", *extra)
    result: dict[str, Any] = json.loads(out.stdout)
    assert result["identical"], result
    return result


# -- 1: a backup that was down catches up by itself ----------------------------------------------


def test_backup_stopped_during_5000_changes_catches_up_by_itself(network: Network,
                                                                  tmp_path: Path) -> None:
    start_trio(network)
    loop = ImportLoop(network, tmp_path, parts=10, size=500)
    loop.start()
    b = network.nodes["b"]
    wait_for(lambda: (b.status() or {}).get("applied_seq", 0) > 600, timeout_s=120,
             what="b applying")
    assert b.stop() == 0
    loop.join(600)
    assert not loop.failed and len(loop.committed) == 10
    head = master_seq(network)
    status = network.start("b").wait_ready()
    assert status["applied_seq"] == head  # ready only once it holds everything
    assert_identical(network)
    assert_no_seq_applied_twice(network, ("b",))
    assert events(network, "b", "recovery.caught_up")
    assert recover(network, "b")["recovery"]["method"] == "none"


# -- 2: a lost queue, a log that no longer reaches back, a drifted store ------------------------


def test_lost_queue_and_log_recover_through_a_snapshot(network: Network, tmp_path: Path,
                                                       broker_url: str) -> None:
    start_trio(network)
    import_objects(network, tmp_path, 1000, "before-")
    assert network.nodes["b"].stop() == 0
    import_objects(network, tmp_path, 300, "missed-")  # b misses these, and then the log...
    lose_queue_and_log(broker_url, "b")
    import_objects(network, tmp_path, 300, "during-")
    head = master_seq(network)
    status = network.start("b").wait_ready()
    assert status["applied_seq"] == head
    installed = events(network, "b", "recovery.snapshot_installed")
    assert installed and installed[-1]["source"] == "a"
    assert_identical(network)
    result = recover(network, "b")
    assert result["recovery"]["method"] == "none"
    import_objects(network, tmp_path, 10, "after-")  # the redeclared queue delivers again
    assert_identical(network)


def damage(data_dir: Path, pattern: str) -> None:
    """Delete objects straight from a node's database, behind its store's back."""
    with sqlite3.connect(data_dir / "node.db") as db:
        assert db.execute("DELETE FROM objects WHERE name LIKE ?", (pattern,)).rowcount > 0


def test_a_drifted_store_is_repaired_with_a_snapshot(network: Network, tmp_path: Path) -> None:
    start_trio(network)
    import_objects(network, tmp_path, 200, "d-")
    c = network.nodes["c"]
    assert c.stop() == 0
    damage(c.data_dir, "d-0001%")
    network.start("c").wait_ready()  # same seq as the master, other objects: repaired at start
    assert events(network, "c", "recovery.snapshot_installed")
    assert_identical(network)

    damage(c.data_dir, "d-0002%")  # while it runs: only a fresh checksum notices
    assert network.export("c") != network.export("a")
    result = recover(network, "c", "--from", "b")
    assert result["recovery"]["method"] == "snapshot"
    assert result["recovery"]["snapshot"]["source"] == "b"
    assert_identical(network)


# -- 3: a new node joins -----------------------------------------------------------------------


def test_new_node_joins_after_10000_changes(network: Network, tmp_path: Path) -> None:
    network.start("a", role="master").wait_ready()
    network.start("b").wait_ready()
    import_objects(network, tmp_path, 9_999, "n-")
    head = master_seq(network)
    assert head >= 10_000
    status = network.start("d").wait_ready()
    assert status["applied_seq"] >= head
    assert_identical(network, ("a", "b", "d"))
    trail = [e["event"] for e in read_trail(network.root / "d")]
    assert trail.index("recovery.caught_up") < trail.index("node.ready")
    assert sorted(set(applied_seqs(network.root / "d"))) == applied_seqs(network.root / "d")


# -- 4: promotion, the old master's return, and the hand-back ---------------------------------


def test_promote_change_on_the_new_master_and_hand_back(network: Network,
                                                        tmp_path: Path) -> None:
    start_trio(network)
    import_objects(network, tmp_path, 50, "pre-")
    network.nodes["a"].kill()
    promoted = json.loads(network.cli("promote", "b", "--json").stdout)
    assert (promoted["epoch"], promoted["previous"]) == (2, None)
    import_objects(network, tmp_path, 100, "on-b-")  # --wait-applied: c follows

    a = network.start("a", role="master")
    assert a.wait_ready()["role"] == "backup"  # b holds the seat and owns the newest era
    refused = events(network, "a", "master.refused")
    assert refused and refused[-1]["owner"] == "b", refused
    result = recover(network, "a")
    assert result["recovery"]["conflicts"] == []
    assert_identical(network)

    handed = json.loads(network.cli("promote", "a", "--json").stdout)
    assert (handed["epoch"], handed["previous"]) == (3, "b")
    assert sorted(handed["nodes_at_epoch"]) == ["a", "b", "c"]
    import_objects(network, tmp_path, 20, "on-a-")
    assert_identical(network)
    roles = {r["node"]: (r["role"], r["epoch"]) for r in network.status()}
    assert roles == {"a": ("master", 3), "b": ("backup", 3), "c": ("backup", 3)}
    learned = [(e["epoch"], e["origin"]) for e in events(network, "c", "era.learned")]
    assert ("2", "b") in learned and ("3", "a") in learned
    assert_no_seq_applied_twice(network, ("c",))


# -- 5: a change the broker never confirmed ---------------------------------------------------


def test_unconfirmed_change_of_a_dead_master_is_kept_and_resubmitted(network: Network,
                                                                      tmp_path: Path) -> None:
    start_trio(network)
    network.cli("config", "set", "destination", "early", "--url", "file:///tmp/e",
                "--wait-applied")
    assert network.nodes["a"].stop() == 0
    a = network.start("a", env={"TASYNC_FAILPOINT": "before-publish"})
    a.wait_ready()
    cli = subprocess.Popen([sys.executable, "-m", "tasync", "config", "set", "destination",
                            "late", "--url", "file:///l"], env=network.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert a.proc is not None and a.proc.wait(60) == 70  # died between commit and publish
    finally:
        cli.kill()
        cli.wait()

    network.cli("promote", "b")
    import_objects(network, tmp_path, 100, "on-b-")
    assert network.start("a", role="master").wait_ready()["role"] == "backup"
    kept = json.loads((a.data_dir / "conflicts.json").read_text())["conflicts"]
    assert [(c["name"], c["status"], c["epoch"]) for c in kept] == [("late", "open", 1)]
    assert [e["name"] for e in events(network, "a", "recovery.conflict_kept")] == ["late"]
    for name in ("a", "b", "c"):
        assert "late" not in json.loads(network.export(name))["destination"]
    assert_identical(network)

    reported = recover(network, "a")
    assert [c["name"] for c in reported["recovery"]["conflicts"]] == ["late"]
    resubmitted = recover(network, "a", "--resubmit")
    assert [r["name"] for r in resubmitted["resubmitted"]] == ["late"]
    network.settle()
    for name in ("a", "b", "c"):
        assert json.loads(network.export(name))["destination"]["late"]["url"] == "file:///l"
    assert_identical(network)
    kept = json.loads((a.data_dir / "conflicts.json").read_text())["conflicts"]
    assert [(c["name"], c["status"]) for c in kept] == [("late", "resubmitted")]
    assert recover(network, "a")["recovery"]["conflicts"] == []


# -- 6: fencing --------------------------------------------------------------------------------


def test_a_stale_master_is_rejected_everywhere(network: Network, tmp_path: Path,
                                               broker_url: str) -> None:
    from tasync.broker.commits import parse_ops
    from tasync.broker.errors import SeatLost
    from tasync.broker.messages import Change, ChangeBatch
    from tasync.broker.publisher import ConfirmedPublisher
    from tasync.broker.seat import MasterSeat
    from tasync.broker.store import NodeStore
    from tasync.producers.relay import ChangeRelay, batch_messages

    start_trio(network)
    import_objects(network, tmp_path, 20, "pre-")
    a = network.nodes["a"]
    assert a.stop() == 0
    stale_dir = tmp_path / "a-stale"
    shutil.copytree(a.data_dir, stale_dir)
    network.cli("promote", "b")
    network.start("a").wait_ready()  # its stored role is master: it starts as a backup

    # A copy that still believes it is the master of epoch 1 cannot take the seat b holds,
    # so it commits nothing at all.
    settings = Settings.from_url(broker_url)
    store = NodeStore(stale_dir)
    seat = MasterSeat(settings, node="a")
    try:
        assert not seat.take()
        with pytest.raises(SeatLost):
            ChangeRelay(store, node="a", seat=seat).submit(parse_ops([
                {"op": "set", "kind": "destination", "name": "stale",
                 "body": {"url": "file:///tmp/stale"}}]))
        seq = store.last_seq + 1
    finally:
        seat.close()
        store.close()
    # What such a master published anyway (an old version, a forged writer) is fenced by
    # every receiver: epoch 1 no longer owns seqs after b's era began.
    stale = ChangeBatch(epoch=1, origin="a", changes=(Change(
        epoch=1, seq=seq, ts=time.time(), origin="a", op="set", kind="destination",
        name="stale", body={"url": "file:///tmp/stale", "schedule": None, "subject": None}),))
    conn = connect(settings)
    try:
        ConfirmedPublisher(conn).publish_many(batch_messages([stale], None))
    finally:
        conn.release()
    for name in ("a", "b", "c"):
        wait_for(lambda name=name: any(e.get("reason") == "stale-epoch" for e in
                                       events(network, name, "change.rejected")),
                 timeout_s=30, what=f"{name} rejecting the stale change")
    network.cli("config", "set", "destination", "fresh", "--url", "file:///tmp/f",
                "--wait-applied")
    network.start("d").wait_ready()  # reads the whole log, stale change included
    export = json.loads(assert_identical(network, ("a", "b", "c", "d")))
    assert "fresh" in export["destination"] and "stale" not in export["destination"]
    assert any(e.get("reason") == "stale-epoch" for e in events(network, "d", "change.rejected"))
    listing = json.loads(network.cli("replay", "--since", "seq:0", "--dry-run", "--json").stdout)
    assert "stale" not in [c["name"] for c in listing["changes"]]
    assert listing["rejected"] >= 1


# -- 7: replay and listing ------------------------------------------------------------------------


def listing(network: Network, since: str) -> dict[str, Any]:
    out = network.cli("replay", "--since", since, "--dry-run", "--json")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_replay_lists_exactly_the_changes_after_a_time_and_repairs(network: Network) -> None:
    network.start("a", role="master").wait_ready()
    b = network.start("b")
    b.wait_ready()
    cli = network.cli
    cli("config", "set", "destination", "d1", "--url", "file:///1")
    cli("config", "set", "destination", "d2", "--url", "file:///2")
    cli("config", "set", "group", "g", "--member", "d1")
    before = listing(network, "seq:0")["changes"]
    last_seq, last_ts = before[-1]["seq"], max(c["ts"] for c in before)
    since = dt.datetime.fromtimestamp(last_ts + 0.001, dt.UTC).isoformat()

    cli("config", "set", "destination", "d3", "--url", "file:///3")
    cli("config", "set", "destination", "d1", "--url", "file:///one")
    cli("config", "delete", "destination", "d2")
    cli("config", "set", "group", "g", "--member", "d1", "--member", "d3", "--wait-applied")
    expected = [(last_seq + 1, "set", "d3"), (last_seq + 2, "set", "d1"),
                (last_seq + 3, "delete", "d2"), (last_seq + 4, "set", "g")]
    by_time = listing(network, since)
    assert [(c["seq"], c["op"], c["name"]) for c in by_time["changes"]] == expected
    assert by_time["complete"] and by_time["rejected"] == 0
    by_seq = listing(network, f"seq:{last_seq}")
    assert by_seq["changes"] == by_time["changes"]
    text = cli("replay", "--since", since, "--dry-run").stdout
    assert "4 changes since" in text and "d3" in text

    damage(b.data_dir, "d1")  # b's copy drifts; the changes since T touched d1
    assert network.export("b") != network.export("a")
    result = json.loads(cli("replay", "--since", since, "--node", "b", "--json").stdout)
    assert (result[0]["changes"], result[0]["reapplied"], result[0]["identical"]) == (4, 4, True)
    assert_identical(network, ("a", "b"))
    bad = cli("replay", "--since", "yesterday", "--dry-run", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert cli("replay", "--since", since, check=False).returncode == 2


# -- split brain: a hung master wakes up after a promotion ----------------------------------------


def close_connections_of(broker_admin: BrokerAdmin, vhost: str, node: str) -> int:
    """Close every broker connection of ``node``, as the broker does after missed heartbeats."""
    listed = broker_admin.rabbitmqctl("list_connections", "-p", vhost, "pid",
                                      "client_properties", "-q").splitlines()[1:]
    closed = 0
    for line in listed:
        pid, props = line.split("\t", 1)
        if re.search(r'\{"connection_name","tasync-[a-z]+-' + node + r'"\}', props):
            broker_admin.rabbitmqctl("close_connection", pid, "lost heartbeats (test)")
            closed += 1
    return closed


@pytest.mark.faults  # long: in the fault suite (-m faults)
def test_a_hung_master_is_fenced_and_steps_down_when_it_wakes(
        network: Network, tmp_path: Path, broker_admin: BrokerAdmin, vhost: str) -> None:
    start_trio(network)
    import_objects(network, tmp_path, 20, "pre-")
    a = network.nodes["a"]
    a.signal(signal.SIGSTOP)
    try:
        # Too short a wait for the broker to drop the hung master's seat: nothing changes...
        refused = network.cli("promote", "b", "--timeout", "4", check=False)
        if refused.returncode != 0:  # (unless the broker was quicker than the wait)
            assert refused.returncode == 1 and "did not answer" in refused.stderr, refused
            assert network.status()[1]["role"] == "backup"  # b: nothing changed
            # ...until its connections are closed, as the broker or an operator does.
            assert close_connections_of(broker_admin, vhost, "a") >= 2
            refused = network.cli("promote", "b")
        promoted = json.loads(network.cli("promote", "b", "--json").stdout)
        assert promoted["epoch"] == 2
        import_objects(network, tmp_path, 20, "on-b-")
    finally:
        a.signal(signal.SIGCONT)
    wait_for(lambda: events(network, "a", "master.stepped_down"), timeout_s=60,
             what="a stepping down after it wakes")
    recover(network, "a")
    assert_identical(network)
    roles = {r["node"]: (r["role"], r["epoch"]) for r in network.status()}
    assert roles == {"a": ("backup", 2), "b": ("master", 2), "c": ("backup", 2)}
