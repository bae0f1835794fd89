"""The delivery worker's fast path: deferred trail lines, kept files, cached plans, tallies.

Each piece replaced per-alert work (a trail write, an open and close of the file, resolving
the target, a locked counter update) with per-batch or once-per-configuration work; these
tests hold each to what the slow way guaranteed.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tasync.broker.alerts import Alert
from tasync.broker.audit import TRAIL_NAME, Trail, read_trail
from tasync.consumers.delivery import channels
from tasync.consumers.delivery.executor import Executor, PlanCache, RetryPolicy
from tasync.consumers.delivery.resolve import Leaf, ResolveError
from tasync.consumers.totals import Tally
from tests.unit.consumers.test_delivery_resolve import Store


def test_deferred_trail_lines_reach_the_file_at_flush_in_order(tmp_path: Path) -> None:
    trail = Trail(tmp_path, "a")
    trail.defer("alert.delivered", id="A1")
    trail.defer("alert.delivered", id="A2")
    assert read_trail(tmp_path) == []
    trail.flush()
    assert [x["id"] for x in read_trail(tmp_path)] == ["A1", "A2"]
    trail.defer("alert.delivered", id="A3")
    trail.event("node_ready", seq=1)  # an immediate line writes the waiting ones first
    assert [x["event"] for x in read_trail(tmp_path)][-2:] == ["alert.delivered", "node_ready"]
    trail.defer("alert.delivered", id="A4")
    trail.close()
    assert read_trail(tmp_path)[-1]["id"] == "A4"


def test_deferred_lines_are_written_when_too_many_wait(tmp_path: Path) -> None:
    trail = Trail(tmp_path, "a")
    for number in range(Trail.DEFER_MAX):
        trail.defer("alert.delivered", id=f"A{number}")
    assert len(read_trail(tmp_path)) == Trail.DEFER_MAX
    trail.close()


def test_deferred_lines_rotate_the_trail(tmp_path: Path) -> None:
    trail = Trail(tmp_path, "a")
    trail._max_bytes = 2000
    for number in range(100):
        trail.defer("alert.delivered", id=f"A{number:03d}", text="x" * 40)
        if number % 10 == 9:
            trail.flush()
    trail.close()
    rotated = tmp_path / f"{TRAIL_NAME}.1"
    assert rotated.exists()
    assert (tmp_path / TRAIL_NAME).stat().st_size < 2000


PAYLOAD: dict[str, Any] = {
    "id": "A1", "destination": "out", "text": "ünïcode ✓ \"quoted\" \\ back\nnew\tline \x01",
    "subject": "s/lash <b>", "source": "nms", "priority": 7, "target_kind": "destination",
    "target": "out", "hosts": ["a", "b"], "created_at": 1765072834.123456, "node": "a",
    "delivered_at": 1765072834.5, "labels": {"sev": "page", "emoji": "🔥"},
    "annotations": {"runbook_url": "https://x/y?z=1&w=2"},
}


def test_file_lines_are_what_json_dumps_wrote(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    channels.send(f"file://{target}", PAYLOAD)
    expected = json.dumps(PAYLOAD, ensure_ascii=False, separators=(",", ":")) + "\n"
    assert target.read_text(encoding="utf-8") == expected


def test_the_file_channel_follows_rotation_and_removal(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    channels.send(f"file://{path}", {"id": "one"})
    os.rename(path, f"{path}.1")  # logrotate's default: rename, the next line makes a new file
    channels.send(f"file://{path}", {"id": "two"})
    os.remove(path)  # removed: the next line makes it again rather than vanish with the inode
    channels.send(f"file://{path}", {"id": "three"})
    assert Path(f"{path}.1").read_text() == '{"id":"one"}\n'
    assert path.read_text() == '{"id":"three"}\n'


class SeqStore(Store):
    """A store whose reads are counted, with a seq the test moves."""

    def __init__(self, objects: dict[str, dict[str, dict[str, Any]]]) -> None:
        super().__init__(objects)
        self.seq = 1
        self.reads = 0

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return super().get(kind, name)


def test_plans_are_resolved_once_per_configuration_seq() -> None:
    store = SeqStore({"destination": {"out": {"url": "file:///tmp/a"}}})
    cache = PlanCache(store, lambda: store.seq)
    cache.refresh()
    first = cache.resolve("destination", "out")
    assert cache.resolve("destination", "out") is first
    assert store.reads == 1
    with pytest.raises(ResolveError):
        cache.resolve("destination", "nope")
    with pytest.raises(ResolveError):
        cache.resolve("destination", "nope")
    assert store.reads == 2
    store.objects["destination"]["out"] = {"url": "file:///tmp/b"}
    store.objects["destination"]["nope"] = {"url": "file:///tmp/c"}
    cache.refresh()  # same seq: what was resolved stands
    assert cache.resolve("destination", "out") is first
    store.seq = 2
    cache.refresh()
    assert cache.resolve("destination", "out") == Leaf(name="out", url="file:///tmp/b")
    assert cache.resolve("destination", "nope").name == "nope"  # type: ignore[union-attr]
    assert cache.is_local(first)


def test_the_worker_executor_defers_its_lines_and_caches_plans(tmp_path: Path) -> None:
    store = SeqStore({"destination": {"out": {"url": f"file://{tmp_path}/out.jsonl"}}})
    trail = Trail(tmp_path, "a")
    executor = Executor(node="a", store=store, trail=trail, policy=RetryPolicy(attempts=1),
                        wait=threading.Event().wait, defer_trail=True,
                        config_seq=lambda: store.seq)
    executor.refresh_plans()
    for number in range(3):
        alert = Alert(id=f"A{number}", source="nms", target_kind="destination", target="out",
                      text="t", hosts=("a",))
        assert executor.run(alert).status == "delivered"
    assert store.reads == 1
    assert read_trail(tmp_path) == []
    trail.flush()
    assert [x["id"] for x in read_trail(tmp_path)] == ["A0", "A1", "A2"]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


class Counted:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, int]]] = []

    def count(self, source: str, **increments: int) -> None:
        self.calls.append((source, increments))


def test_a_tally_hands_over_one_call_per_source() -> None:
    tally, totals = Tally(), Counted()
    for _ in range(3):
        tally.add("nms", "received")
    tally.add("nms", "delivered", 2)
    tally.add("remedy", "refused")
    tally.add_to(totals)  # type: ignore[arg-type]
    assert totals.calls == [("nms", {"received": 3, "delivered": 2}),
                            ("remedy", {"refused": 1})]
    tally.add_to(totals)  # type: ignore[arg-type]
    assert len(totals.calls) == 2
