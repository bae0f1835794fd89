"""Eras and epoch marks (broker/epochs.py): the one rule that fences a stale master."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasync.broker.epochs import EpochHistory, EpochMark, Era
from tasync.broker.errors import MessageError
from tasync.broker.messages import Change, ChangeBatch, decode, encode


def change(seq: int, epoch: int = 1, origin: str = "a") -> Change:
    return Change(epoch=epoch, seq=seq, ts=1000.0 + seq, origin=origin, op="set", kind="node",
                  name=f"n{seq}", body={})


def batch(first: int, last: int, epoch: int = 1, origin: str = "a") -> ChangeBatch:
    return ChangeBatch(epoch=epoch, origin=origin,
                       changes=tuple(change(s, epoch, origin) for s in range(first, last + 1)))


PROMOTED = EpochHistory((Era(1, 0, "a"), Era(2, 100, "b")))


def test_owner_is_the_newest_era_whose_base_lies_before() -> None:
    assert PROMOTED.owner(1) == Era(1, 0, "a")
    assert PROMOTED.owner(100) == Era(1, 0, "a")
    assert PROMOTED.owner(101) == Era(2, 100, "b")
    assert EpochHistory().owner(5) is None
    later = PROMOTED.learn(Era(3, 90, "c"))  # promoted while lacking 91..100: they lose
    assert later.owner(95) == Era(3, 90, "c")


def test_stale_master_changes_after_the_base_are_rejected() -> None:
    verdict = PROMOTED.judge(batch(99, 103))
    assert [c.seq for c in verdict.legit] == [99, 100]
    assert [c.seq for c in verdict.stale] == [101, 102, 103]
    assert verdict.history == PROMOTED


def test_repeats_of_old_changes_stay_legitimate() -> None:
    verdict = PROMOTED.judge(batch(10, 20))
    assert (len(verdict.legit), verdict.stale) == (11, ())


def test_another_master_of_the_same_epoch_is_not_legitimate() -> None:
    verdict = PROMOTED.judge(batch(101, 102, epoch=2, origin="rogue"))
    assert verdict.legit == () and len(verdict.stale) == 2


def test_a_newer_epoch_without_its_mark_is_learned_from_its_first_batch() -> None:
    verdict = PROMOTED.judge(batch(151, 160, epoch=3, origin="c"))
    assert verdict.history.era(3) == Era(3, 150, "c")
    assert len(verdict.legit) == 10
    assert not verdict.history.is_legit(2, 151, "b")


def test_an_unknown_older_epoch_is_judged_by_the_owner_of_its_seqs() -> None:
    only_two = EpochHistory((Era(2, 100, "b"),))
    assert only_two.judge(batch(50, 60)).stale == ()  # predates what this node can judge
    assert len(only_two.judge(batch(101, 101)).stale) == 1


def test_learn_keeps_the_first_word_and_merge_prefers_the_caller() -> None:
    mine = EpochHistory((Era(1, 0, "a"),))
    theirs = EpochHistory((Era(1, 0, "x"), Era(2, 7, "b")))
    assert mine.learn(Era(1, 0, "x")) == mine
    assert theirs.merge(mine) == theirs
    assert mine.merge(theirs).eras == (Era(1, 0, "a"), Era(2, 7, "b"))
    assert mine.merge(theirs).max_epoch == 2


def test_json_round_trip() -> None:
    assert EpochHistory.from_json(PROMOTED.to_json()) == PROMOTED
    assert EpochHistory.from_json(None) == EpochHistory()
    assert PROMOTED.current == Era(2, 100, "b")


def test_epoch_mark_on_the_wire() -> None:
    mark = EpochMark(epoch=2, base_seq=100, origin="b", ts=1.5, eras=((1, 0, "a"), (2, 100, "b")))
    decoded = decode(encode(mark), max_bytes=1 << 20)
    assert decoded == mark
    assert decoded.history == PROMOTED
    with pytest.raises(MessageError):
        decode(encode(mark).replace(b'"epoch":2', b'"epoch":0'), max_bytes=1 << 20)
    with pytest.raises(MessageError, match="unexpected message type"):
        decode(encode(mark), max_bytes=1 << 20, expect="changes")


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 50), st.sampled_from("abc")),
                max_size=6), st.integers(1, 60))
def test_exactly_one_era_owns_each_seq(eras: list[tuple[int, int, str]], seq: int) -> None:
    history = EpochHistory.from_list(eras)
    owner = history.owner(seq)
    legit = [(e.epoch, e.origin) for e in history.eras if history.is_legit(e.epoch, seq, e.origin)]
    if owner is None:
        assert len(legit) == len(history.eras)
    else:
        assert legit == [(owner.epoch, owner.origin)]


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 40), st.sampled_from("ab")),
                max_size=5), st.integers(1, 40), st.integers(0, 10), st.integers(1, 5),
       st.sampled_from("ab"))
def test_judge_agrees_with_judging_each_change(eras: list[tuple[int, int, str]], first: int,
                                               extra: int, epoch: int, origin: str) -> None:
    history = EpochHistory.from_list(eras)
    verdict = history.judge(batch(first, first + extra, epoch, origin))
    learned = verdict.history
    expected = [c for c in batch(first, first + extra, epoch, origin).changes
                if learned.is_legit(c.epoch, c.seq, c.origin)]
    assert list(verdict.legit) == expected
    assert len(verdict.legit) + len(verdict.stale) == extra + 1
