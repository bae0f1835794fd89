"""The kept checksum equals the checksum recomputed from every object, whatever happened.

``NodeStore`` updates its checksum and object count in the transaction of every change, replay
and snapshot install (``tasync.broker.store.format_checksum``); these properties compare the kept
value with a full recomputation after random sequences of sets, deletes, imports, forced
replays and snapshot installs, on a master's store and on a backup applying the same batches.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasync.broker import store as store_module
from tasync.broker.kinds import KINDS as ALL_KINDS
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.store import NodeStore, object_hash, objects_xor

#: The canonical spelling as ``tasync.broker.store.canonical`` defines it: sorted keys, compact,
#: UTF-8, floats as msgspec writes them (``json.dumps``'s bytes for every value without a float,
#: which ``test_store.py`` shows; floats are generated here all the same).
SPELL = msgspec.json.Encoder(order="sorted").encode
#: Memory-backed when the machine has it: each example opens two fresh databases.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None
KINDS = ("destination", "group", "schedule", "node")
NAMES = ("a", "b", "c", "d", "é", "Z", '"q')
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=5)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=6)
OBJECT = st.tuples(st.sampled_from(KINDS), st.sampled_from(NAMES),
                   st.dictionaries(st.text(max_size=4), JSON, max_size=3))
STEP = st.one_of(
    st.tuples(st.just("set"), OBJECT),
    st.tuples(st.just("delete"), st.tuples(st.sampled_from(KINDS), st.sampled_from(NAMES))),
    st.tuples(st.just("import"), st.lists(OBJECT, min_size=1, max_size=12)),
    st.tuples(st.just("replay"), st.integers(0, 20)),
    st.tuples(st.just("snapshot"), st.lists(OBJECT, max_size=8)),
)


def full_checksum(store: NodeStore) -> str:
    """The checksum from the export alone, computed independently of the store's code."""
    state = json.loads(store.export_bytes())
    xor, count = 0, 0
    for kind, objects in state.items():
        for name, body in objects.items():
            text = SPELL(body).decode()
            digest = hashlib.blake2b(f"{kind}\0{name}\0{text}".encode(), digest_size=16)
            xor ^= int.from_bytes(digest.digest(), "big")
            count += 1
    return hashlib.sha256(f"tasync-objects-v1:{count}:{xor:032x}".encode()).hexdigest()


def changes_for(store: NodeStore, ops: list[tuple[str, str, str, Any]]) -> list[Change]:
    seq = store.last_seq
    return [Change(epoch=1, seq=seq + i + 1, ts=1.0 + seq + i, origin="m", op=op, kind=kind,
                   name=name, body=body) for i, (op, kind, name, body) in enumerate(ops)]


def check(store: NodeStore) -> None:
    state: dict[str, dict[str, Any]] = {kind: {} for kind in ALL_KINDS}
    for kind, name, body in store.objects():
        state.setdefault(kind, {})[name] = body
    expected = json.dumps(state, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert store.export_bytes() == expected.encode()  # the streamed export, byte for byte
    kept = store.checksum()
    assert kept == full_checksum(store)
    assert store.count() == sum(len(o) for o in json.loads(store.export_bytes()).values())
    assert store.checksum(fresh=True) == kept


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=12))
def test_kept_checksum_equals_full_checksum(steps: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        master = NodeStore(Path(tmp) / "m", durable=False)
        backup = NodeStore(Path(tmp) / "b", durable=False)
        for kind, arg in steps:
            if kind in ("set", "delete", "import"):
                if kind == "set":
                    ops = [("set", *arg)]
                elif kind == "delete":
                    ops = [("delete", *arg, None)]
                else:
                    ops = [("set", k, n, b) for k, n, b in arg]
                changes = changes_for(master, ops)
                master.commit(changes)
                backup.apply(ChangeBatch(epoch=1, origin="m", changes=tuple(changes)))
            elif kind == "replay":  # a forced replay of the last changes onto the backup
                history = backup.changes_between(max(0, backup.last_seq - arg))
                if history:
                    backup.apply(ChangeBatch(epoch=1, origin="m", changes=tuple(history)),
                                 force=True)
            else:  # a snapshot install on both: the whole configuration replaced
                objects = list({(k, n): (k, n, b) for k, n, b in arg}.values())
                seq = master.last_seq + 1
                for store in (master, backup):
                    store.replace_all(objects, seq=seq, epoch=1, ts=2.0)
            check(master)
            check(backup)
            assert backup.checksum() == master.checksum()
        master.close()
        backup.close()


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, store_module.HASH_CHUNK])
def test_objects_xor_equals_the_xor_of_each_object_hash(
        chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass hash of many objects is the XOR of each one's hash, at every count.

    Counts from 0 to 40 fold odd and even numbers of digests at every step; small chunks
    cross the chunk boundary the way 100,000 objects cross the real one.
    """
    monkeypatch.setattr(store_module, "HASH_CHUNK", chunk)
    objects = [("destination", f"d{i}", f'{{"url":"file:///tmp/{i}"}}') for i in range(40)]
    for n in range(len(objects) + 1):
        expected = 0
        for kind, name, body in objects[:n]:
            expected ^= object_hash(kind, name, body)
        assert objects_xor(iter(objects[:n])) == (n, expected), n
