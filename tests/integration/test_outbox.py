"""The master's outbox is published from its mark: after a timeout, after a crash, at 1M objects.

Real worker processes and real ``tasync`` commands. The relay's fault points
(``tasync.producers.relay.RelayFaults``) cut the first publishing pass of an import in half: the
first half is confirmed and marked, then the pass fails as a confirm timeout would, or the
master exits as if killed. Every check compares state: the change log's batches (no seq
published twice, so the relay resumed at the mark and not at the first batch) and every
node's export.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasync.broker import topology
from tasync.broker.messages import ChangeBatch
from tasync.broker.settings import Settings
from tasync.broker.stream import read_changelog
from tasync.progress import progress_rpc
from tests.faults.cluster_net import store_meta
from tests.integration.test_replication import assert_identical, write_import
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
#: Objects imported: several replication batches, so a pass has more than one message.
OBJECTS = 6000


def logged_seqs(broker_url: str) -> collections.Counter[int]:
    """How many times the change log holds each seq."""
    seen: collections.Counter[int] = collections.Counter()

    def on_batch(batch: ChangeBatch) -> bool:
        seen.update(c.seq for c in batch.changes)
        return True

    read_changelog(Settings.from_url(broker_url), offset="first", on_batch=on_batch)
    return seen


def start(network: Network, env: dict[str, str]) -> None:
    network.start("a", role="master", env=env).wait_ready()
    for name in ("b", "c"):
        network.start(name).wait_ready()


def test_export_through_the_broker_streams_the_same_bytes(network: Network, tmp_path: Path,
                                                         broker_url: str) -> None:
    network.start("a", role="master").wait_ready()
    network.cli("config", "import", str(write_import(tmp_path / "i.json", 8000)))
    pieces: list[str] = []
    with progress_rpc(Settings.from_url(broker_url)) as rpc:
        last = rpc.call_with_progress(topology.MASTER, "export", {}, idle_timeout_s=30,
                                      on_progress=lambda p: pieces.append(p["piece"]))
    assert len(pieces) >= 2 and last["streamed"]  # the node sent it in pieces
    streamed = network.cli("config", "export").stdout
    assert streamed == "".join(pieces) + last["export"] == network.export("a")
    assert len(json.loads(streamed)["destination"]) == 8000


@pytest.mark.faults
def test_import_resumes_at_the_mark_after_a_publish_timeout(network: Network, tmp_path: Path,
                                                            broker_url: str) -> None:
    start(network, {"TASYNC_FAILPOINT": "publish-timeout"})
    path = write_import(tmp_path / "i.json", OBJECTS)
    done = json.loads(network.cli("config", "import", str(path), "--json").stdout)
    seq = network.settle()
    assert seq == done["last_seq"]
    export = assert_identical(network)
    assert len(json.loads(export)["destination"]) == OBJECTS
    seen = logged_seqs(broker_url)
    assert set(seen) == set(range(1, seq + 1))
    assert max(seen.values()) == 1, "a seq was published again after the timeout"


@pytest.mark.faults
def test_master_killed_mid_publish_resumes_at_the_mark(network: Network, tmp_path: Path,
                                                       broker_url: str) -> None:
    start(network, {"TASYNC_FAILPOINT": "exit-mid-publish"})
    a = network.nodes["a"]
    path = write_import(tmp_path / "i.json", OBJECTS)
    cli = subprocess.Popen([sys.executable, "-m", "tasync", "config", "import", str(path)],
                           env=network.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        assert a.proc is not None and a.proc.wait(120) == 70  # died half-way through a pass
    finally:
        cli.kill()
        cli.wait()
    half = logged_seqs(broker_url)
    committed = json.loads(network.export("a"))["destination"]
    assert len(committed) == OBJECTS  # durable on the master before it published
    assert 0 < len(half) < OBJECTS

    network.start("a", role="master").wait_ready()
    seq = network.settle()
    assert_identical(network)
    seen = logged_seqs(broker_url)
    assert set(seen) == set(range(1, seq + 1))
    assert max(seen.values()) == 1, "the restarted master published from the first batch"


#: The long run's size: one import command of this many objects.
MILLION = 1_000_000


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_million_object_import_survives_a_master_kill_mid_publish(
        network: Network, tmp_path: Path) -> None:
    """One ``config import`` of 1,000,000 objects; SIGKILL of the master while it publishes.

    The restarted master publishes the rest of its outbox from the mark in the background;
    every backup ends with every object the master committed, byte for byte.
    """
    network.start("a", role="master").wait_ready()
    for name in ("b", "c"):
        network.start(name).wait_ready()
    a = network.nodes["a"]
    path = write_import(tmp_path / "million.json", MILLION)
    started = time.monotonic()
    cli = subprocess.Popen([sys.executable, "-m", "tasync", "config", "import", str(path)],
                           env=network.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        def publishing() -> bool:
            last, pending = store_meta(a.data_dir)
            return last > MILLION and 0 < pending < last - MILLION // 10

        wait_for(publishing, timeout_s=1200, interval_s=0.05,
                 what="the master committed the import and is publishing it")
        a.kill()
    finally:
        cli.kill()
        cli.wait()
    committed, pending = store_meta(a.data_dir)
    assert pending > 0, "the kill came after the whole outbox was published"
    network.start("a", role="master").wait_ready(timeout_s=600)
    for node in network.nodes.values():
        node.wait_seq(committed, timeout_s=1800)
    elapsed = time.monotonic() - started
    export = assert_identical(network)
    assert len(json.loads(export)["destination"]) == MILLION
    print(f"\n1,000,000-object import with a master SIGKILL mid-publish: every backup "
          f"identical after {elapsed:.0f} s ({pending:,} changes were unpublished at the kill)")
