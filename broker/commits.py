"""What a configuration commit is asked for and what it became: the commit's contract.

The control server (a consumer) receives the operations of ``config set``, ``delete`` and
imports, checks each body's schema (``parse_ops``) and hands them to the master's change relay
(a producer), which checks references, commits and publishes, and answers with ``Committed``.
Both ends name these types, so they live here, below both: the control server declares what it
needs of the relay as a ``Protocol`` beside itself (``consumers.control.Committer``) and never
imports the relay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from broker import kinds
from broker.errors import InvalidObject
from broker.store import CommittedRequest


@dataclass(frozen=True, kw_only=True)
class Op:
    """One validated operation, ready to become a change."""

    op: str
    kind: str
    name: str
    body: dict[str, Any] | None


def parse_ops(raw_ops: Iterable[Mapping[str, Any]]) -> list[Op]:
    """Validate the shape and schema of each operation (no references yet)."""
    ops: list[Op] = []
    for index, raw in enumerate(raw_ops):
        if not isinstance(raw, Mapping):
            raise InvalidObject(f"operation {index + 1}: not an object")
        op, kind, name = raw.get("op", "set"), raw.get("kind"), raw.get("name")
        if op not in ("set", "delete"):
            raise InvalidObject(f"operation {index + 1}: op must be 'set' or 'delete'")
        kinds.check_kind(str(kind))
        kinds.check_name(str(kind), name)  # type: ignore[arg-type]
        body = kinds.load_body(str(kind), str(name), raw.get("body") or {}) if op == "set" else None
        ops.append(Op(op=op, kind=str(kind), name=str(name), body=body))
    return ops


@dataclass(frozen=True)
class Committed:
    """What a commit committed and the broker confirmed.

    ``repeated`` is set when the request id had been committed before: nothing new was.
    """

    first_seq: int
    last_seq: int
    count: int
    epoch: int
    repeated: bool = False

    @classmethod
    def from_request(cls, done: CommittedRequest) -> Committed:
        """The answer a request id got the first time it was committed."""
        return cls(done.first_seq, done.last_seq, done.count, done.epoch, repeated=True)
