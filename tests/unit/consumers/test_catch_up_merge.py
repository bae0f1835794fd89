"""A catch-up merges consecutive change-log batches, and keeps the log's order exactly.

``Recovery._read_from`` is driven here by a fake change log (``read_changelog`` replaced), so
what is applied, in which groups and in which order, is visible without a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasync.broker.epochs import EpochMark
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.store import NodeStore
from tasync.consumers import recovery
from tasync.consumers.recovery import Recovery, Ticker


def batch(first: int, count: int, *, epoch: int = 1, origin: str = "a") -> ChangeBatch:
    return ChangeBatch(epoch=epoch, origin=origin, changes=tuple(
        Change(epoch=epoch, seq=s, ts=1000.0 + s, origin=origin, op="set", kind="destination",
               name=f"d{s}", body={"url": f"file:///{s}"}) for s in range(first, first + count)))


class FakeSync:
    """Applies to a real store and records each apply's seq range and each mark."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store
        self.log: list[Any] = []

    def apply_batch(self, b: ChangeBatch, **_: Any) -> Any:
        self.log.append((b.first_seq, b.last_seq))
        return self.store.apply(b)

    def accept_mark(self, mark: EpochMark) -> bool:
        self.log.append(("mark", mark.epoch))
        return True


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    store = NodeStore(tmp_path / "n", durable=False)
    sync = FakeSync(store)
    rec = object.__new__(Recovery)
    rec.ctx, rec.sync, rec.settings = type("Ctx", (), {"store": store})(), sync, None

    def run(entries: list[Any], target: int) -> tuple[int, list[Any], list[Any]]:
        handed: list[Any] = []

        def fake_read(_settings: Any, *, on_batch: Any, on_mark: Any, **_: Any) -> None:
            for entry in entries:
                handed.append(entry)
                keep = on_mark(entry) if isinstance(entry, EpochMark) else on_batch(entry)
                if not keep:
                    return

        monkeypatch.setattr(recovery, "read_changelog", fake_read)
        applied = rec._read_from("first", target, Ticker(None, target, "replay"))
        return applied, sync.log, handed

    yield run
    store.close()


def test_consecutive_batches_are_applied_together_up_to_the_limit(
        rig: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "MERGE_CHANGES", 25)
    entries = [batch(1 + 10 * i, 10) for i in range(7)]  # seqs 1..70
    applied, log, _ = rig(entries, 70)
    assert applied == 70
    assert log == [(1, 30), (31, 60), (61, 70)]


def test_the_read_stops_at_the_target(rig: Callable[..., Any]) -> None:
    entries = [batch(1, 10), batch(11, 10), batch(21, 10)]
    applied, log, handed = rig(entries, 20)
    assert (applied, log) == (20, [(1, 20)])
    assert len(handed) == 2  # nothing read past the target


def test_marks_repeats_and_other_eras_apply_what_is_pending_first(
        rig: Callable[..., Any]) -> None:
    mark = EpochMark(epoch=2, base_seq=20, origin="b", ts=1.0, eras=((1, 0, "a"),))
    entries = [batch(1, 10), batch(11, 10), mark, batch(21, 5, epoch=2, origin="b"),
               batch(16, 10, epoch=2, origin="b"), batch(26, 5, epoch=2, origin="b")]
    applied, log, _ = rig(entries, 30)
    # The repeat (16..25) is not consecutive: 21..25 goes first; 26..30 continues the repeat.
    assert log == [(1, 20), ("mark", 2), (21, 25), (16, 30)]
    assert applied == 30


def test_what_is_pending_when_the_log_goes_quiet_is_applied(rig: Callable[..., Any]) -> None:
    applied, log, _ = rig([batch(1, 10), batch(11, 10)], 100)
    assert (applied, log) == (20, [(1, 20)])


def test_a_gap_ends_the_read_without_applying(rig: Callable[..., Any]) -> None:
    applied, log, _ = rig([batch(5, 10), batch(15, 10)], 100)
    assert applied == 0
    assert log == [(5, 24)]  # tried once, refused by the store (GapError), nothing applied
