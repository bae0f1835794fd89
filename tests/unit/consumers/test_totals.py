import time
from pathlib import Path

import pytest

from tasync.broker.audit import Trail
from tasync.broker.errors import ConfigError, MessageError
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


def test_a_series_counts_per_bucket_over_every_source(tmp_path: Path) -> None:
    totals = Totals(context(tmp_path))
    base = 1_800_000_000.0  # a multiple of 300
    totals.count("nms", now=base + 10, received=2, delivered=1)
    totals.count("remedy", now=base + 70, received=1, refused=1)
    totals.count("nms", now=base + 400, received=4, failed=1)
    totals.count("old", now=base - 600, received=9)  # before the series starts
    series = totals.series_counts(base + 30, 60, now=base + 450)
    assert series["since"] == base and series["bucket_s"] == 60
    assert series["counts"]["received"] == [2, 1, 0, 0, 0, 0, 4, 0]
    assert series["counts"]["refused"] == [0, 1, 0, 0, 0, 0, 0, 0]
    assert series["counts"]["failed"][6] == 1
    wide = totals.series_counts(base, 300, now=base + 450)
    assert wide["counts"]["received"] == [3, 4] and wide["counts"]["delivered"] == [1, 0]


def test_a_report_carries_a_series_only_when_asked(tmp_path: Path) -> None:
    totals = Totals(context(tmp_path))
    totals.count("nms", received=3)
    plain = totals.report()
    assert "series" not in plain  # what tasync totals asks and prints, unchanged
    now = time.time()
    report = totals.report(series={"since": now - 600, "bucket_s": 120})
    assert report["sources"] == plain["sources"]
    assert report["series"]["bucket_s"] == 120
    assert sum(report["series"]["counts"]["received"]) == 3
    assert report["series"]["counts"]["received"][-1] == 3  # the bucket under way is last
    assert len(report["series"]["counts"]["received"]) in (5, 6)


@pytest.mark.parametrize("series", [
    "soon", {"bucket_s": 60}, {"since": "x"}, {"since": 0, "bucket_s": 90},
    {"since": 0, "bucket_s": -60}, {"since": float("nan")}, {"since": 0, "bucket_s": 60}])
def test_a_malformed_or_too_long_series_is_refused(tmp_path: Path, series: object) -> None:
    with pytest.raises(MessageError, match=r"series|bucket"):
        Totals(context(tmp_path)).report(series=series)  # type: ignore[arg-type]
