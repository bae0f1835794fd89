"""Epochs and eras: which master owned which seqs, and the mark a promotion publishes.

Each promotion opens an *era* ``(epoch, base, origin)``: master ``origin`` owns every seq after
``base`` until a later era's base. A change is legitimate when the era that owns its seq is the
era of its epoch and origin. This one rule fences a stale master (whatever it numbers after a
promotion's base belongs to a newer era, so it is rejected everywhere), still accepts harmless
repeats of older changes (they belong to their own era and are skipped by seq), and does not
depend on the order in which messages sit in the change log.

A promotion publishes an ``EpochMark`` through ``tasync.config``, so every sync queue and the
change log hold it in order with the changes, and a node that was down learns the new epoch
from its own queue when it comes back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from marshmallow import Schema, fields, post_load, validate

from tasync.broker import messages
from tasync.broker.messages import Change, ChangeBatch


@dataclass(frozen=True, order=True)
class Era:
    """Master ``origin`` owns the seqs after ``base`` in ``epoch`` (until a newer era)."""

    epoch: int
    base: int
    origin: str


@dataclass(frozen=True, kw_only=True)
class EpochMark:
    """Published by a newly promoted master before its first change; carries every era."""

    epoch: int
    base_seq: int
    origin: str
    ts: float
    eras: tuple[tuple[int, int, str], ...] = field(default_factory=tuple)

    @property
    def history(self) -> EpochHistory:
        """The eras this mark announces, including its own."""
        return EpochHistory.from_list(self.eras).learn(Era(self.epoch, self.base_seq, self.origin))


class EpochMarkSchema(Schema):
    """An epoch mark on the wire."""

    class Meta:
        """Unknown fields are refused, as for every wire message."""

        unknown = "raise"

    v = fields.Integer(required=True)
    type = fields.String(required=True)
    epoch = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    base_seq = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))
    origin = fields.String(required=True, validate=validate.Length(min=1, max=64))
    ts = fields.Float(required=True)
    eras = fields.List(fields.Tuple((fields.Integer(strict=True), fields.Integer(strict=True),
                                     fields.String())),
                       load_default=list, validate=validate.Length(max=10_000))

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> EpochMark:
        data.pop("v")
        data.pop("type")
        data["eras"] = tuple(tuple(e) for e in data["eras"])
        return EpochMark(**data)


messages.register("epoch", EpochMark, EpochMarkSchema())


@dataclass(frozen=True)
class Verdict:
    """What the eras say about one batch.

    Attributes:
        history: the eras after this batch (a batch of an unknown, newer epoch teaches one).
        legit: the changes that belong to their era, in seq order.
        stale: the changes a newer era owns (or another master of the same epoch made).
    """

    history: EpochHistory
    legit: tuple[Change, ...]
    stale: tuple[Change, ...]


@dataclass(frozen=True)
class EpochHistory:
    """The eras a node knows, ordered by epoch; persisted as JSON in the store's meta table."""

    eras: tuple[Era, ...] = ()

    @classmethod
    def from_list(cls, items: Iterable[Iterable[Any]]) -> EpochHistory:
        """Build from ``[[epoch, base, origin], ...]`` (the wire and file form)."""
        history = cls()
        for epoch, base, origin in items:
            history = history.learn(Era(int(epoch), int(base), str(origin)))
        return history

    @classmethod
    def from_json(cls, text: str | None) -> EpochHistory:
        """Parse what ``to_json`` wrote; an absent value is an empty history."""
        return cls.from_list(json.loads(text)) if text else cls()

    def to_list(self) -> list[list[Any]]:
        """``[[epoch, base, origin], ...]``."""
        return [[e.epoch, e.base, e.origin] for e in self.eras]

    def to_json(self) -> str:
        """Compact JSON of ``to_list``."""
        return json.dumps(self.to_list(), separators=(",", ":"))

    @property
    def max_epoch(self) -> int:
        """The newest epoch known (0 when none)."""
        return self.eras[-1].epoch if self.eras else 0

    @property
    def current(self) -> Era | None:
        """The newest era."""
        return self.eras[-1] if self.eras else None

    def era(self, epoch: int) -> Era | None:
        """The era of ``epoch``, if known."""
        return next((e for e in self.eras if e.epoch == epoch), None)

    def learn(self, era: Era) -> EpochHistory:
        """Add ``era`` unless its epoch is known already (the first word on an epoch stays)."""
        if self.era(era.epoch) is not None:
            return self
        return EpochHistory(tuple(sorted((*self.eras, era))))

    def merge(self, other: EpochHistory) -> EpochHistory:
        """Every era of both; for an epoch both know, this history's word stays."""
        merged = self
        for era in other.eras:
            merged = merged.learn(era)
        return merged

    def owner(self, seq: int) -> Era | None:
        """The era that owns ``seq``: the newest one whose base lies before it."""
        owners = [e for e in self.eras if e.base < seq]
        return owners[-1] if owners else None

    def is_legit(self, epoch: int, seq: int, origin: str) -> bool:
        """Whether a change numbered ``seq`` by ``origin`` in ``epoch`` belongs to its era.

        A seq older than every known era is accepted: it predates what this node can judge,
        and a node only ever holds such seqs already (it skips them by seq).
        """
        owner = self.owner(seq)
        return owner is None or (owner.epoch == epoch and owner.origin == origin)

    def _owns_all(self, batch: ChangeBatch) -> bool:
        """Whether the batch's own era owns every seq of it (the common case, checked at once).

        Ownership changes inside the batch's range only where a newer era's base lies in it.
        """
        owner = self.owner(batch.first_seq)
        if owner is None or (owner.epoch, owner.origin) != (batch.epoch, batch.origin):
            return owner is None and self.owner(batch.last_seq) is None
        return not any(e.epoch > owner.epoch and batch.first_seq <= e.base < batch.last_seq
                       for e in self.eras)

    def judge(self, batch: ChangeBatch) -> Verdict:
        """Split ``batch`` into legitimate and stale changes, learning an unknown newer epoch.

        A batch of an epoch newer than any known comes from a master whose mark this node has
        not seen (a queue declared after the promotion): its era starts before its first seq.
        """
        history = self
        if history.era(batch.epoch) is None and batch.epoch > history.max_epoch:
            history = history.learn(Era(batch.epoch, batch.first_seq - 1, batch.origin))
        if history._owns_all(batch):
            return Verdict(history, batch.changes, ())
        ok = [history.is_legit(c.epoch, c.seq, c.origin) for c in batch.changes]
        if all(ok):
            return Verdict(history, batch.changes, ())
        legit = tuple(c for c, good in zip(batch.changes, ok, strict=True) if good)
        stale = tuple(c for c, good in zip(batch.changes, ok, strict=True) if not good)
        return Verdict(history, legit, stale)
