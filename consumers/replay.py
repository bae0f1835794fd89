"""Every change since a point in time, from the change log: listed for an auditor, or replayed.

``tasync replay --since T`` names the point (``tasync.broker.since``: a time, a duration or
``seq:K``). The change log is read from a little before that point (timestamp offsets find a
chunk, not a message), every entry is judged by the eras (``tasync.broker.epochs``) so a stale
master's rejected changes are never listed nor replayed, repeats of a change (an outbox published
twice) count once, and only what lies after the point is kept. The read also tells whether the log
provably reaches back to the point.

Replaying into a node rewrites every object the replayed changes touch, in seq order, even
those it already holds: replaying a suffix of the history restores exactly what that suffix
changed, which repairs a node whose copy of those objects drifted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasync.broker.epochs import EpochHistory, EpochMark
from tasync.broker.errors import ConfigError, GapError
from tasync.broker.events import Event
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.settings import Settings
from tasync.broker.since import Since
from tasync.broker.stream import read_changelog
from tasync.consumers.recovery import REWIND_S, Progress, Recovery, Ticker

__all__ = ["Since", "SinceRead", "read_since", "replay_into", "stream_offset"]


def stream_offset(since: Since, ts_hint: float | None = None) -> Any:
    """Where to start reading the stream: a little before the point, or the beginning."""
    start = since.ts if since.ts is not None else ts_hint
    if start is None:
        return "first"
    return dt.datetime.fromtimestamp(max(0.0, start - REWIND_S), dt.UTC)


@dataclass
class SinceRead:
    """What ``read_since`` saw."""

    changes: int = 0
    rejected: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    complete: bool = True


def read_since(settings: Settings, since: Since, history: EpochHistory, *,
               on_changes: Callable[[ChangeBatch], None], until_seq: int | None = None,
               ts_hint: float | None = None,
               on_mark: Callable[[EpochMark], object] | None = None) -> SinceRead:
    """Hand every legitimate change after ``since`` to ``on_changes``, in seq order, once.

    Args:
        settings: broker settings.
        since: the point.
        history: the eras known beforehand (the master's); marks read on the way are added.
        on_changes: receives consecutive changes of one batch.
        until_seq: stop once a legitimate change reaches it (the network's head).
        ts_hint: when ``since`` is a seq, the time of a change near it, to start reading there.
        on_mark: also told about each epoch mark.
    """
    out = SinceRead()
    first_legit: Change | None = None

    def on_batch(batch: ChangeBatch) -> bool:
        nonlocal history, first_legit
        verdict = history.judge(batch)
        history = verdict.history
        out.rejected += len(verdict.stale)
        if not verdict.legit:
            return True
        first_legit = first_legit or verdict.legit[0]
        keep = tuple(c for c in verdict.legit if since.wants(c) and c.seq > out.last_seq)
        if keep:
            out.first_seq = out.first_seq or keep[0].seq
            out.last_seq, out.changes = keep[-1].seq, out.changes + len(keep)
            on_changes(ChangeBatch(epoch=batch.epoch, origin=batch.origin, changes=keep))
        return until_seq is None or verdict.legit[-1].seq < until_seq

    def on_mark_read(mark: EpochMark) -> bool:
        nonlocal history
        history = mark.history.merge(history)
        if on_mark is not None:
            on_mark(mark)
        return True

    read_changelog(settings, offset=stream_offset(since, ts_hint), on_batch=on_batch,
                   on_mark=on_mark_read, idle_s=1.5)
    if first_legit is not None and since.wants(first_legit) and first_legit.seq > 1:
        # The first change read is already after the point: unless it directly follows the
        # point (seq mode), changes between the point and it may have been trimmed away.
        out.complete = since.seq is not None and first_legit.seq <= since.seq + 1
    return out


def replay_into(recovery: Recovery, since: Since, *, progress: Progress | None = None,
                by: str | None = None) -> dict[str, Any]:
    """Replay every change after ``since`` into this node (forced: rewrite what it holds).

    ``by`` names who asked when the client names them (the console's user), for the trail.

    Returns:
        Counts for ``tasync replay``: changes read, re-applied, newly applied, rejected.
    """
    ctx, sync = recovery.ctx, recovery.sync
    store = ctx.store
    with sync.locked():
        view = recovery.network_view()
        recovery.learn(view.history, reason="disowned by a newer epoch")
        if store.diverged:
            raise ConfigError(f"{ctx.node} holds changes the network never accepted; run "
                              f"tasync recover --node {ctx.node} first")
        ticker = Ticker(progress, max(0, view.seq - (since.seq or 0)), "replay")
        counts = {"reapplied": 0, "applied": 0}

        def on_changes(batch: ChangeBatch) -> None:
            try:
                result = sync.apply_batch(batch, replayed=True, force=True)
            except GapError:
                recovery.catch_up(batch.first_seq - 1)
                result = sync.apply_batch(batch, replayed=True, force=True)
            counts["reapplied"] += result.reapplied
            counts["applied"] += result.applied
            ticker.add(result.reapplied + result.applied)

        hint = None
        if since.seq is not None:
            near = store.changes_between(since.seq, since.seq + 1)
            hint = near[0].ts if near else None
        read = read_since(ctx.settings, since, store.history, on_changes=on_changes,
                          until_seq=view.seq or None, ts_hint=hint, on_mark=sync.accept_mark)
        ctx.trail.event(Event.RECOVERY_REPLAYED, by=by, since=since.describe(),
                        changes=read.changes,
                        reapplied=counts["reapplied"], applied=counts["applied"],
                        rejected=read.rejected or None, complete=read.complete)
        return {"node": ctx.node, "since": since.describe(), "changes": read.changes,
                "first_seq": read.first_seq, "last_seq": read.last_seq,
                "rejected": read.rejected, "complete": read.complete, **counts,
                "seq": store.last_seq, "checksum": store.checksum()}
