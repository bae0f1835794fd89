"""What a configuration commit is asked for and what it became: the commit's contract.

The control server (a consumer) receives the operations of ``config set``, ``delete`` and
imports, checks each body's schema (``parse_ops``) and hands them to the master's change relay
(a producer), which checks references, commits and publishes, and answers with ``Committed``.
Both ends name these types, so they live here, below both: the control server declares what it
needs of the relay as a ``Protocol`` beside itself (``tasync.consumers.control.Committer``) and
never imports the relay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from tasync.broker import kinds
from tasync.broker.errors import InvalidObject
from tasync.broker.store import CommittedRequest


class Op(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """One validated operation, ready to become a change.

    A msgspec ``Struct`` rather than a frozen dataclass: a bulk import makes one per object
    twice on the master (checked on arrival, read back from the staged parts when it commits),
    and a frozen dataclass costs twenty times as much to build. It behaves like one: keyword
    construction, immutable, equal by value. ``array_like`` is the staged form
    (``encode_staged``): ``[op, kind, name, body]``. Untracked by the cycle collector
    (``gc=False``) for the reason ``Change`` is: it holds only strings and a JSON body.
    """

    op: str
    kind: str
    name: str
    body: dict[str, Any] | None


_STAGED = msgspec.json.Decoder(list[Op])
_ENCODER = msgspec.json.Encoder()


def encode_staged(ops: list[Op]) -> str:
    """Checked operations as one staged part keeps them: ``[[op, kind, name, body], ...]``.

    The bodies were normalised by ``parse_ops`` (strings, lists of strings and None only), so
    this is the JSON ``json.dumps`` would write, without spaces.
    """
    return _ENCODER.encode(ops).decode()


def decode_staged(text: str | bytes) -> list[Op]:
    """A staged part's operations back (``encode_staged``, or ``json.dumps`` of the same lists).

    They were checked before they were staged, so only their shape is checked again.
    """
    return _STAGED.decode(text)


def parse_ops(raw_ops: Iterable[Mapping[str, Any]]) -> list[Op]:
    """Validate the shape and schema of each operation (no references yet)."""
    ops: list[Op] = []
    append = ops.append
    for index, raw in enumerate(raw_ops):
        # ``type() is dict`` first: an import checks 100,000 and ``isinstance`` against the
        # ``Mapping`` ABC costs several times as much
        if type(raw) is not dict and not isinstance(raw, Mapping):
            raise InvalidObject(f"operation {index + 1}: not an object")
        op, kind = raw.get("op", "set"), str(raw.get("kind"))
        name: str = raw.get("name")  # type: ignore[assignment]  # check_name refuses a non-str
        if op == "set":  # load_body checks the kind and the name first, as below
            body = kinds.load_body(kind, name, raw.get("body") or {})
            append(Op(op=op, kind=kind, name=name, body=body))
        elif op == "delete":
            kinds.check_kind(kind)
            kinds.check_name(kind, name)
            append(Op(op=op, kind=kind, name=name, body=None))
        else:
            raise InvalidObject(f"operation {index + 1}: op must be 'set' or 'delete'")
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
