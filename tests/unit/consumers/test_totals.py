from pathlib import Path

import pytest

from tasync.broker.audit import Trail
from tasync.broker.errors import ConfigError
from tasync.broker.settings import Settings
from tasync.broker.store import NodeStore
from tasync.consumers.context import NodeContext
from tasync.consumers.totals import Totals


def context(path: Path) -> NodeContext:
    return NodeContext(settings=Settings(), node="a", data_dir=path, store=NodeStore(path),
                       trail=Trail(path, "a"))


def test_counts_by_source_survive_a_restart(tmp_path: Path) -> None:
    totals = Totals(context(tmp_path))
    totals.count("remedy", received=2, delivered=2)
    totals.count("nms", received=1, failed=1)
    totals.count("nms", received=1, delivered=1, taken_over=1)
    totals.close()
    report = Totals(context(tmp_path)).report()
    assert report["node"] == "a"
    assert report["sources"]["remedy"]["delivered"] == 2
    assert report["sources"]["nms"] == {"received": 2, "delivered": 1, "failed": 1,
                                        "skipped": 0, "taken_over": 1, "redelivered": 0,
                                        "duplicates": 0, "refused": 0, "dead_lettered": 0}
    assert report["total"]["received"] == 4


def test_since_cuts_by_minute(tmp_path: Path) -> None:
    totals = Totals(context(tmp_path))
    totals.count("old", now=1_000_000.0, delivered=5)
    totals.count("new", now=2_000_000.0, delivered=1)
    assert set(totals.report(since=1_500_000)["sources"]) == {"new"}
    assert set(totals.report(since="999990")["sources"]) == {"old", "new"}
    assert totals.report(since=1_500_030)["since"] == 1_500_000.0


def test_seen_window_includes_pending_and_persists(tmp_path: Path) -> None:
    totals = Totals(context(tmp_path), dedup_window_s=3600)
    totals.mark_seen("x", "delivered")
    assert totals.seen(["x", "y"]) == {"x"}
    totals.flush()
    totals.close()
    again = Totals(context(tmp_path), dedup_window_s=3600)
    assert again.is_seen("x") and not again.is_seen("y")


def test_ids_older_than_the_window_are_forgotten(tmp_path: Path) -> None:
    totals = Totals(context(tmp_path), dedup_window_s=60)
    totals.mark_seen("old", "delivered", now=1.0)
    totals.flush()
    assert not totals.is_seen("old")
    assert totals.seen(f"id{i}" for i in range(1200)) == set()


def test_window_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASYNC_DEDUP_WINDOW_S", "120")
    assert Totals(context(tmp_path)).dedup_window_s == 120
    monkeypatch.setenv("TASYNC_DEDUP_WINDOW_S", "soon")
    with pytest.raises(ConfigError, match="TASYNC_DEDUP_WINDOW_S"):
        Totals(context(tmp_path))
