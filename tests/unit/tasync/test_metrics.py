"""The metrics endpoint: real HTTP, real store and totals, a fake node around them."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tasync import memory
from tasync.broker.audit import Trail
from tasync.broker.errors import ConfigError
from tasync.broker.settings import Settings
from tasync.broker.store import NodeStore
from tasync.consumers.context import NodeContext
from tasync.consumers.totals import Totals
from tasync.metrics import DEFAULT_HOST, start_metrics_server


class FakeConsumer:
    def __init__(self, name: str, connected: bool) -> None:
        self.name = name
        self.connected = threading.Event()
        if connected:
            self.connected.set()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SimpleNamespace]:
    store = NodeStore(tmp_path, durable=False)
    ctx = NodeContext(settings=Settings(metrics_sources=("cli", "nms", "remedy")), node="b",
                      data_dir=tmp_path, store=store,
                      trail=Trail(tmp_path, "b"), started_at=1700000000.0)
    totals = Totals(ctx)
    fake = SimpleNamespace(ctx=ctx, changes_applied=0, totals=totals,
                           consumers=[FakeConsumer("tasync-sync-b", True),
                                      FakeConsumer("tasync-delivery-b", False)])
    yield fake
    totals.close()
    store.close()


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` from a real HTTP scrape, parsed strictly."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


@pytest.fixture
def server(node: SimpleNamespace) -> Iterator[Any]:
    running = start_metrics_server(0, node)
    yield running
    running.close()


def test_node_state_is_read_at_each_scrape(node: SimpleNamespace, server: Any) -> None:
    first = scrape(server.port)
    assert first["tasync_node_ready"] == {(("node", "b"),): 0.0}
    assert first["tasync_is_master"] == {(("node", "b"),): 0.0}
    assert first["tasync_applied_seq"] == {(("node", "b"),): 0.0}
    assert first["tasync_changes_applied_total"] == {(("node", "b"),): 0.0}
    assert first["tasync_start_time_seconds"] == {(("node", "b"),): 1700000000.0}
    assert "tasync_outbox_pending_changes" not in first  # a backup has no outbox
    assert "tasync_lag_changes" not in first  # unknown, so absent rather than a wrong zero
    assert first["tasync_consumer_connected"] == {
        (("consumer", "sync"), ("node", "b")): 1.0,
        (("consumer", "delivery"), ("node", "b")): 0.0,
    }

    node.ctx.ready.set()
    node.ctx.store.set_meta(epoch=3, last_seq=42, published_seq=42, role="master")
    node.changes_applied = 42
    node.lag_changes = lambda: 5
    second = scrape(server.port)
    assert second["tasync_node_ready"] == {(("node", "b"),): 1.0}
    assert second["tasync_is_master"] == {(("node", "b"),): 1.0}
    assert second["tasync_epoch"] == {(("node", "b"),): 3.0}
    assert second["tasync_applied_seq"] == {(("node", "b"),): 42.0}
    assert second["tasync_changes_applied_total"] == {(("node", "b"),): 42.0}
    assert second["tasync_lag_changes"] == {(("node", "b"),): 5.0}
    assert second["tasync_outbox_pending_changes"] == {(("node", "b"),): 0.0}


def test_alert_counters_follow_the_totals_by_source(node: SimpleNamespace,
                                                    server: Any) -> None:
    before = scrape(server.port)
    assert before.get("tasync_alerts_received_total", {}) == {}
    totals: Totals = node.totals
    totals.count("remedy", received=3, delivered=2, failed=1)
    totals.count("nms", received=1, delivered=1, taken_over=1)
    after = scrape(server.port)
    assert after["tasync_alerts_received_total"] == {
        (("node", "b"), ("source", "nms")): 1.0, (("node", "b"), ("source", "remedy")): 3.0}
    assert after["tasync_alerts_delivered_total"][(("node", "b"), ("source", "remedy"))] == 2.0
    assert after["tasync_alerts_failed_total"][(("node", "b"), ("source", "remedy"))] == 1.0
    assert after["tasync_alerts_taken_over_total"] == {
        (("node", "b"), ("source", "nms")): 1.0, (("node", "b"), ("source", "remedy")): 0.0}
    totals.count("remedy", received=2)
    assert scrape(server.port)["tasync_alerts_received_total"][
        (("node", "b"), ("source", "remedy"))] == 5.0


def test_unreadable_parts_are_left_out_not_fatal(node: SimpleNamespace, server: Any) -> None:
    class Broken:
        def report(self) -> dict[str, Any]:
            raise RuntimeError("totals.db is locked")

    node.totals = Broken()
    del node.changes_applied
    samples = scrape(server.port)
    assert "tasync_alerts_received_total" not in samples
    assert "tasync_changes_applied_total" not in samples
    assert samples["tasync_applied_seq"] == {(("node", "b"),): 0.0}


def test_own_registry_and_loopback_by_default(node: SimpleNamespace, server: Any) -> None:
    assert server.host == DEFAULT_HOST == "127.0.0.1"
    assert REGISTRY.get_sample_value("tasync_applied_seq", {"node": "b"}) is None
    samples = scrape(server.port)
    assert not [name for name in samples if name.startswith(("process_", "python_"))]


def test_port_in_use_is_a_clear_error(node: SimpleNamespace, server: Any) -> None:
    with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{server.port}"):
        start_metrics_server(server.port, node)


def test_memory_gauges_read_this_process(node: SimpleNamespace, server: Any) -> None:
    samples = scrape(server.port)
    label = (("node", "b"),)
    # The node's store and totals connections are open, so SQLite holds their schemas and pages.
    assert samples["tasync_sqlite_memory_bytes"][label] > 10_000
    assert samples["tasync_python_allocated_blocks"][label] > 10_000
    if memory.malloc_stats() is not None:
        assert samples["tasync_malloc_in_use_bytes"][label] > samples[
            "tasync_sqlite_memory_bytes"][label]  # SQLite allocates from that heap
        assert samples["tasync_malloc_free_held_bytes"][label] >= 0


def test_memory_gauges_without_their_library_are_absent(node: SimpleNamespace, server: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_sqlite_memory_used", lambda: None)
    monkeypatch.setattr(memory, "_libc", lambda: None)
    samples = scrape(server.port)
    assert "tasync_sqlite_memory_bytes" not in samples
    assert "tasync_malloc_in_use_bytes" not in samples
    assert "tasync_malloc_free_held_bytes" not in samples
    assert samples["tasync_python_allocated_blocks"][(("node", "b"),)] > 0
    assert samples["tasync_applied_seq"] == {(("node", "b"),): 0.0}


def test_sources_not_named_are_counted_as_other(node: SimpleNamespace, server: Any) -> None:
    totals: Totals = node.totals
    for number in range(20):
        totals.count(f"script-{number}", received=1, delivered=1)
    totals.count("nms", received=2)
    samples = scrape(server.port)["tasync_alerts_received_total"]
    assert samples == {(("node", "b"), ("source", "nms")): 2.0,
                       (("node", "b"), ("source", "other")): 20.0}


def test_a_scrape_reads_running_sums_not_the_minute_buckets(node: SimpleNamespace,
                                                            server: Any) -> None:
    totals: Totals = node.totals
    for minute in range(500):
        totals.count("nms", now=1_000_000.0 + 60 * minute, delivered=1)
    totals.flush()
    node.totals.report = None  # a scrape must not sum the buckets
    assert scrape(server.port)["tasync_alerts_delivered_total"][
        (("node", "b"), ("source", "nms"))] == 500.0


def test_lists_and_queue_depths_are_gauges(node: SimpleNamespace, server: Any) -> None:
    from tasync.consumers.delivery.lists import ListsReport, ListState

    report = ListsReport(checked_at=1.0, lists=(
        ListState(key="a.b", hosts=("a", "b"), messages=3, consumers=0),
        ListState(key="b.a", hosts=("b", "a"), messages=0, consumers=2)),
        dead_letters=4, quarantined=0)
    watcher = SimpleNamespace(caught_up=threading.Event(), ids_learned=7)
    node.delivery = SimpleNamespace(lists=SimpleNamespace(report=report), handled=watcher)
    samples = scrape(server.port)
    assert samples["tasync_list_stranded"] == {
        (("list", "a.b"), ("node", "b")): 1.0, (("list", "b.a"), ("node", "b")): 0.0}
    assert samples["tasync_list_messages"][(("list", "a.b"), ("node", "b"))] == 3.0
    assert samples["tasync_dead_letter_messages"] == {(("node", "b"),): 4.0}
    assert samples["tasync_quarantine_messages"] == {(("node", "b"),): 0.0}
    assert samples["tasync_dedup_caught_up"] == {(("node", "b"),): 0.0}
    assert samples["tasync_dedup_ids_learned_total"] == {(("node", "b"),): 7.0}
