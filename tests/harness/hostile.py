"""Hostile messages for the sync and delivery consumers, generated with hypothesis.

Each strategy draws one ``Hostile`` message that a correct node must refuse: malformed or
truncated JSON, a wrong type in one field, a wrong schema version, a missing or unknown field,
a message of another type, an origin or sender the allow-lists deny, and a well-formed message
whose signature is missing, malformed or made with another key. Messages are invalid *by
construction*, never by chance: a strategy that could draw a valid message would make a test
that finds a changed node state report a false failure. So wrong-type values are chosen per
field among values marshmallow can never coerce (a list where a string belongs, ``None`` where
a value is required), wrong versions exclude everything equal to the current one, and the
well-formed messages come only with a denied origin or a bad signature.

Oversized messages are built by ``oversized`` rather than drawn: hypothesis keeps each example
small, and a few of them are enough to prove the size check.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasync.broker import messages
from tasync.broker.alerts import Alert, alert_to_dict
from tasync.broker.epochs import EpochMark
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.signing import SENDER_HEADER, SIGNATURE_HEADER, KeyRing


@dataclass(frozen=True)
class Hostile:
    """One message to throw at a consumer, and what makes it unacceptable."""

    category: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)


# -- values a field can never be coerced from -----------------------------------------------------

_JUNK_SCALARS = st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False))
_CONTAINERS = st.one_of(st.lists(_JUNK_SCALARS, max_size=3),
                        st.dictionaries(st.text(max_size=5), _JUNK_SCALARS, max_size=3))
#: For string fields: numbers, containers, null.
NOT_A_STRING = st.one_of(st.integers(), st.floats(allow_nan=False), _CONTAINERS, st.none())
#: For number fields: containers, null, and text that is not a number.
NOT_A_NUMBER = st.one_of(_CONTAINERS, st.none(), st.sampled_from(["", "x", "1,5", "--1"]))
#: For list fields: scalars, mappings, null.
NOT_A_LIST = st.one_of(_JUNK_SCALARS, st.dictionaries(st.text(max_size=5), _JUNK_SCALARS,
                                                      max_size=3), st.none())
#: For mapping fields: scalars, non-empty lists.
NOT_A_MAPPING = st.one_of(st.text(max_size=5), st.integers(), st.lists(st.integers(),
                                                                       min_size=1, max_size=3))
#: Schema versions other than the current one (1, 1.0 and True all compare equal to it).
WRONG_VERSIONS = st.one_of(
    st.integers().filter(lambda v: v != messages.SCHEMA_VERSION),
    st.floats(allow_nan=False).filter(lambda v: v != messages.SCHEMA_VERSION),
    st.sampled_from(["1", "v1", "", None, [], {}, False]),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)

# -- what is valid, as a base to break ------------------------------------------------------------

#: Fixed times: hypothesis replays draws and needs the same bases every time.
_TS = 1_700_000_000.0
#: Signs a body with the node's cluster key. Strategies take this callable, never the key ring:
#: hypothesis prints a failing example's arguments field by field, secrets included.
Signer = Callable[[bytes], str]
#: Makes each drawn message distinct (an object name, an alert id), so that no kind of message
#: runs out of new examples and hypothesis keeps drawing every kind.
_TAGS = st.integers(0, 10**9)


def batch_dict(*, origin: str, seq: int, epoch: int = 1, tag: int = 0) -> dict[str, Any]:
    """The wire form of a valid one-change batch."""
    change = Change(epoch=epoch, seq=seq, ts=_TS, origin=origin, op="set",
                    kind="destination", name=f"hostile-{tag}", body={"url": "file:///tmp/x"})
    return messages.to_dict(ChangeBatch(epoch=epoch, origin=origin, changes=(change,)))


def mark_dict(*, origin: str, epoch: int = 2, base_seq: int = 1) -> dict[str, Any]:
    """The wire form of a valid epoch mark."""
    return messages.to_dict(EpochMark(epoch=epoch, base_seq=base_seq, origin=origin, ts=_TS,
                                      eras=((1, 0, origin), (epoch, base_seq, origin))))


def alert_dict(*, hosts: tuple[str, ...], target: str, tag: int = 0) -> dict[str, Any]:
    """The wire form of a valid alert."""
    return alert_to_dict(Alert(id=f"hostile-{tag}", source="fuzz", target_kind="destination",
                               target=target, text="hostile", hosts=hosts, created_at=_TS))


#: Per message type: field -> strategy of values that field can never accept.
WRONG_TYPES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "changes": {"epoch": NOT_A_NUMBER, "origin": NOT_A_STRING, "changes": NOT_A_LIST,
                "type": NOT_A_STRING},
    "change": {"epoch": NOT_A_NUMBER, "seq": NOT_A_NUMBER, "ts": NOT_A_NUMBER,
               "origin": NOT_A_STRING, "op": NOT_A_STRING, "kind": NOT_A_STRING,
               "name": NOT_A_STRING, "body": NOT_A_MAPPING},
    "epoch": {"epoch": NOT_A_NUMBER, "base_seq": NOT_A_NUMBER, "origin": NOT_A_STRING,
              "ts": NOT_A_NUMBER, "eras": NOT_A_LIST},
    "alert": {"id": NOT_A_STRING, "source": NOT_A_STRING, "target_kind": NOT_A_STRING,
              "target": NOT_A_STRING, "text": NOT_A_STRING,
              "subject": st.one_of(st.integers(), _CONTAINERS),
              "priority": NOT_A_NUMBER, "created_at": NOT_A_NUMBER, "hosts": NOT_A_LIST},
}


#: Top-level fields a message may leave out (they have defaults): leaving them out is valid.
OPTIONAL = frozenset({"subject", "priority", "eras"})


def _encode(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


@st.composite
def _broken(draw: st.DrawFn, base: dict[str, Any]) -> tuple[str, bytes]:
    """One way of breaking a valid message ``base``: ``(category, body)``."""
    kind = draw(st.sampled_from(["garbage", "json", "truncated", "wrong-type", "wrong-version",
                                 "missing-field", "unknown-field", "wrong-message-type"]))
    data = copy.deepcopy(base)
    if kind == "garbage":
        return kind, draw(st.binary(max_size=300))
    if kind == "json":
        value = draw(JSON_VALUES.filter(lambda v: not (isinstance(v, dict) and "v" in v)))
        return kind, _encode(value)
    if kind == "truncated":
        body = _encode(data)
        return kind, body[:draw(st.integers(0, len(body) - 1))]
    if kind == "wrong-version":
        version = draw(WRONG_VERSIONS)
        if draw(st.booleans()):
            data["v"] = version
        else:
            del data["v"]
        return kind, _encode(data)
    if kind == "missing-field":
        del data[draw(st.sampled_from(sorted(k for k in data if k not in OPTIONAL)))]
        return kind, _encode(data)
    if kind == "unknown-field":
        data[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in data))] = draw(
            JSON_VALUES)
        return kind, _encode(data)
    if kind == "wrong-message-type":
        data["type"] = draw(st.one_of(st.text(max_size=12), st.sampled_from(
            ["request", "reply", "hostlist", "alert", "epoch", "changes"])).filter(
                lambda t: t != base["type"]))
        return kind, _encode(data)
    target = data
    table = WRONG_TYPES[base["type"]]
    if base["type"] == "changes" and draw(st.booleans()):
        target, table = data["changes"][0], WRONG_TYPES["change"]
    name = draw(st.sampled_from(sorted(table)))
    target[name] = draw(table[name])
    return kind, _encode(data)


@st.composite
def sync_message(draw: st.DrawFn, *, sign: Signer, allowed: str, denied: str,
                 next_seq: int) -> Hostile:
    """A message for ``tasync.sync.<node>`` that must be quarantined.

    Args:
        sign: signs with the cluster key; broken messages are signed, so they reach the
            decoder and the allow-list rather than stopping at the signature.
        allowed: the one node that may act as master.
        denied: a node that may not.
        next_seq: the seq the node expects next (a well-formed batch would apply there).
    """
    seq = draw(st.one_of(st.sampled_from([next_seq, next_seq + 1]), st.integers(1, 2**40)))
    tag = draw(_TAGS)
    base = draw(st.sampled_from([batch_dict(origin=allowed, seq=seq, tag=tag),
                                 mark_dict(origin=allowed, base_seq=tag)]))
    mode = draw(st.sampled_from(["broken", "broken", "broken", "denied-origin", "signature"]))
    if mode == "denied-origin":
        good = batch_dict(origin=denied, seq=seq, tag=tag) if base["type"] == "changes" else \
            mark_dict(origin=denied, base_seq=tag)
        body = _encode(good)
        return Hostile("denied-origin", body, {SIGNATURE_HEADER: sign(body)})
    if mode == "signature":
        body = _encode(base)
        return Hostile("bad-signature", body, {SIGNATURE_HEADER: draw(bad_signature(sign,
                                                                                     body))})
    category, body = draw(_broken(base))
    return Hostile(category, body, {SIGNATURE_HEADER: sign(body)})


@st.composite
def alert_message(draw: st.DrawFn, *, sign: Signer, hosts: tuple[str, ...], target: str,
                  sender: str, denied_sender: str) -> Hostile:
    """An alert for a precedence list's queue that must be quarantined, never delivered."""
    base = alert_dict(hosts=hosts, target=target, tag=draw(_TAGS))
    mode = draw(st.sampled_from(["broken", "broken", "broken", "denied-sender", "signature"]))
    if mode == "denied-sender":
        body = _encode(base)
        return Hostile("denied-sender", body, {SIGNATURE_HEADER: sign(body),
                                               SENDER_HEADER: denied_sender})
    if mode == "signature":
        body = _encode(base)
        return Hostile("bad-signature", body, {SIGNATURE_HEADER: draw(bad_signature(sign, body)),
                                               SENDER_HEADER: sender})
    category, body = draw(_broken(base))
    return Hostile(category, body, {SIGNATURE_HEADER: sign(body), SENDER_HEADER: sender})


def bad_signature(sign: Signer, body: bytes) -> st.SearchStrategy[Any]:
    """Header values that are not a valid signature of ``body`` by the key ``sign`` uses."""
    good = sign(body)
    key_id = good.split(":", 1)[0]
    other, stranger = _OTHER_KEYS.setdefault(key_id, (
        KeyRing.parse(KeyRing.generate(key_id)), KeyRing.parse(KeyRing.generate("stranger"))))
    return st.one_of(
        st.none(), st.just(""), st.just(other.sign(body)), st.just(stranger.sign(body)),
        st.just(sign(body + b" ")), st.just(good.replace(":", ";")),
        st.just(good[:-1]), st.integers(-(2**63), 2**63 - 1), st.binary(max_size=40),
        st.text(max_size=80), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3),
    ).filter(lambda v: v != good)


#: Keys that are not the node's: the same key id with another secret, and an unknown id.
#: Made once per key id, so that replayed draws see the same values.
_OTHER_KEYS: dict[str, tuple[KeyRing, KeyRing]] = {}


def oversized(base: dict[str, Any], limit: int, sign: Signer,
              headers: dict[str, Any] | None = None) -> Hostile:
    """A well-formed, signed message one byte over ``limit`` (padding in an unknown field)."""
    data = dict(base, pad="")
    data["pad"] = "x" * (limit + 1 - len(_encode(data)))
    body = _encode(data)
    assert len(body) == limit + 1
    return Hostile("oversized", body, {**(headers or {}), SIGNATURE_HEADER: sign(body)})


def draw_many(strategy: st.SearchStrategy[Hostile], count: int) -> list[Hostile]:
    """``count`` examples of ``strategy``, drawn by hypothesis's engine (no shrinking needed).

    The test around the node checks them all at once after one bulk publish, which is far
    cheaper than a broker round trip per example.
    """
    drawn: list[Hostile] = []

    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(message: Hostile) -> None:
        drawn.append(message)

    while len(drawn) < count:
        collect()
    return drawn[:count]
