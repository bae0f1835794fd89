"""The parts that account for every alert, in process: records, windows, settling, lists, trace.

Pure logic and SQLite only; the broker-facing behaviour is in
``tests/integration/test_alert_accounting.py``.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import amqp
import amqp.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasync.broker import messages
from tasync.broker.alerts import Handled, decode_handled, encode_handled
from tasync.broker.audit import TRAIL_NAME, Trail, read_trail
from tasync.broker.errors import ConfigError, SendRefused
from tasync.broker.publisher import Outgoing
from tasync.broker.settings import Settings
from tasync.broker.signing import KeyRing
from tasync.broker.store import NodeStore
from tasync.cli_trace import story
from tasync.consumers.context import NodeContext
from tasync.consumers.delivery.lists import ListMonitor
from tasync.consumers.delivery.settle import Settler
from tasync.consumers.delivery.trace import trail_lines
from tasync.consumers.quarantine import UNKNOWN_SOURCE, alert_identity
from tasync.consumers.totals import (
    COUNTERS,
    Totals,
    open_db,
    record_handled,
    stream_offset,
)
from tasync.producers.sender import STRANDED_RECHECK_S, AlertSender
from tests.unit.fastpaths import MAX, agree, json_values


def context(path: Path, node: str = "a") -> NodeContext:
    return NodeContext(settings=Settings(), node=node, data_dir=path, store=NodeStore(path),
                       trail=Trail(path, node))


# -- handled records ----------------------------------------------------------------------------


def good_record() -> dict[str, Any]:
    return json.loads(encode_handled(Handled(node="a", at=1.7e9, ids=("x-1", "y"),
                                             outcomes="df")))


def test_a_record_round_trips_and_lists_its_outcomes() -> None:
    record = Handled(node="b", at=2.5, ids=("1", "2", "3"), outcomes="dfs")
    body = encode_handled(record)
    assert decode_handled(body, max_bytes=MAX) == record
    assert messages.decode(body, max_bytes=MAX, expect="handled") == record
    assert record.items() == [("1", "delivered"), ("2", "failed"), ("3", "skipped")]


RECORD_MUTATIONS: list[tuple[str, Any]] = [
    ("v", 2), ("v", True), ("type", "alert"), ("node", "a b"), ("node", ""), ("node", 3),
    ("at", -1), ("at", "1"), ("at", True), ("at", float("inf")), ("at", 10**400),
    ("ids", ["x"]), ("ids", ["has space", "y"]), ("ids", "xy"), ("ids", [1, 2]),
    ("outcomes", "dx"), ("outcomes", "d"), ("outcomes", 5), ("marker", "m" * 65),
    ("extra", 1),
]


def same_verdict(data: Any) -> None:
    agree(data, decode_handled, "handled")


@pytest.mark.parametrize(("key", "value"), RECORD_MUTATIONS)
def test_the_fast_record_decoder_agrees_with_the_schema(key: str, value: Any) -> None:
    data = good_record()
    data[key] = value
    same_verdict(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(good_record())), json_values)
def test_the_fast_record_decoder_agrees_on_any_value(key: str, value: Any) -> None:
    data = good_record()
    data[key] = value
    same_verdict(data)


# -- the duplicate window: other nodes' ids, running sums, an older file -------------------------


def test_ids_of_other_nodes_join_the_window_with_the_offset(tmp_path: Path) -> None:
    totals = Totals(context(tmp_path), dedup_window_s=3600)
    db = open_db(tmp_path)
    now = 1e10  # any time inside the window
    assert record_handled(db, [Handled(node="b", at=now, ids=("x", "y"), outcomes="df")],
                          stream="s", offset=41, at=now, cutoff=0) == 2
    assert totals.seen_outcomes(["x", "y", "z"]) == {"x": ("delivered", "b"),
                                                     "y": ("failed", "b")}
    assert stream_offset(db, "s") == (41, now)
    # A later success replaces a failure (a requeued dead letter); nothing replaces a success.
    record_handled(db, [Handled(node="c", at=now, ids=("y", "x"), outcomes="df")],
                   stream="s", offset=42, at=now, cutoff=0)
    assert totals.seen_outcomes(["x", "y"]) == {"x": ("delivered", "b"),
                                                "y": ("delivered", "c")}
    # A record older than the window moves the offset only.
    assert record_handled(db, [Handled(node="b", at=5.0, ids=("old",), outcomes="d")],
                          stream="s", offset=43, at=5.0, cutoff=10.0) == 0
    assert stream_offset(db, "s") == (43, 5.0)
    assert not totals.is_seen("old")
    # This node's own ids say so (node None), pending or written.
    totals.mark_seen("mine", "delivered")
    assert totals.seen_outcomes(["mine"]) == {"mine": ("delivered", None)}
    totals.flush()
    assert totals.seen_outcomes(["mine"]) == {"mine": ("delivered", None)}
    assert totals.lookup("x") == {"ts": now, "outcome": "delivered", "node": "b",
                                  "learned_at": pytest.approx(totals.lookup("x")["learned_at"])}


def test_running_sums_equal_the_buckets_and_survive_a_restart(tmp_path: Path) -> None:
    totals = Totals(context(tmp_path))
    for minute in range(50):
        totals.count("nms", now=60.0 * minute, received=2, delivered=1, refused=1)
    totals.count("remedy", dead_lettered=3)
    assert totals.running_sums()["nms"]["received"] == 100  # pending counts too
    totals.close()
    again = Totals(context(tmp_path))
    sums = again.running_sums()
    assert sums["nms"] == {**dict.fromkeys(COUNTERS, 0), "received": 100, "delivered": 50,
                           "refused": 50}
    assert again.report()["sources"] == again.report(since=0)["sources"] == sums
    assert again.report()["total"]["dead_lettered"] == 3


OLD_SCHEMA = """
CREATE TABLE totals (
    bucket INTEGER NOT NULL, source TEXT NOT NULL,
    received INTEGER NOT NULL DEFAULT 0, delivered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, skipped INTEGER NOT NULL DEFAULT 0,
    taken_over INTEGER NOT NULL DEFAULT 0, redelivered INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, source));
CREATE TABLE seen (id TEXT PRIMARY KEY, ts REAL NOT NULL, outcome TEXT NOT NULL);
INSERT INTO totals(bucket, source, received, delivered) VALUES (0, 'nms', 4, 3), (60, 'nms', 1, 1);
"""


def test_a_file_of_the_previous_release_is_brought_up_to_date(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "totals.db")
    old.executescript(OLD_SCHEMA)
    old.execute("INSERT INTO seen VALUES ('x', ?, 'delivered')", (1e10,))
    old.commit()
    old.close()
    totals = Totals(context(tmp_path))
    assert totals.report()["sources"]["nms"]["received"] == 5
    assert totals.report()["sources"]["nms"]["refused"] == 0
    assert totals.seen_outcomes(["x"]) == {"x": ("delivered", None)}
    totals.count("nms", received=1, refused=2)
    totals.close()
    assert Totals(context(tmp_path)).report(since=0)["sources"]["nms"]["refused"] == 2


# -- settling a batch -----------------------------------------------------------------------------


class FakeChannel:
    """A confirm-mode channel whose broker confirms each publish while the next one is sent,
    as py-amqp does when ``basic_publish`` drains events on a blockable connection."""

    def __init__(self) -> None:
        self.events: dict[str, set[Callable[..., None]]] = defaultdict(set)
        self.published: list[amqp.Message] = []
        self.nack: set[int] = set()

    def confirm_select(self) -> None:
        pass

    def basic_publish(self, message: amqp.Message, **_: Any) -> None:
        for tag in range(1, len(self.published) + 1):
            if tag not in getattr(self, "_confirmed", set()):
                self._confirmed = getattr(self, "_confirmed", set()) | {tag}
                event = "basic_nack" if tag in self.nack else "basic_ack"
                for handler in list(self.events[event]):
                    handler(tag, False)
        self.published.append(message)

    def confirm_rest(self) -> None:
        for handler in list(self.events["basic_ack"]):
            handler(len(self.published), True)


class FakeConn:
    def __init__(self) -> None:
        self.channels: list[FakeChannel] = []

    def channel(self) -> FakeChannel:
        self.channels.append(FakeChannel())
        return self.channels[-1]


def copies(count: int) -> list[Outgoing]:
    return [Outgoing(exchange="", routing_key="q", body=b"x") for _ in range(count)]


def test_a_batch_is_settled_once_after_its_last_confirm(tmp_path: Path) -> None:
    conn = FakeConn()
    settler = Settler(conn, node="a", keyring=KeyRing.parse(KeyRing.generate("k1")))
    calls: list[bool] = []
    settler.settle(handled=[("x", "delivered"), ("y", "failed")], copies=copies(3),
                   done=calls.append)
    assert calls == []  # three early confirms arrived while publishing: not all of them
    conn.channels[0].confirm_rest()
    assert calls == [True]
    record = decode_handled(conn.channels[0].published[-1].body, max_bytes=MAX)
    assert record.items() == [("x", "delivered"), ("y", "failed")] and record.node == "a"
    assert conn.channels[0].published[-1].properties["application_headers"]["tasync-sig"]
    settler.settle(handled=[], copies=[], done=calls.append)
    assert calls == [True, True]  # nothing to publish: settled at once


def test_a_refused_publish_hands_the_batch_back() -> None:
    conn = FakeConn()
    settler = Settler(conn, node="a", keyring=None)
    conn.channels[0].nack = {1}
    calls: list[bool] = []
    settler.settle(handled=[("x", "delivered")], copies=copies(1), done=calls.append)
    conn.channels[0].confirm_rest()
    assert calls == [False]


# -- stranded lists -------------------------------------------------------------------------------


class QueueChannel:
    def __init__(self, queues: dict[str, tuple[int, int]]) -> None:
        self.queues = queues

    def queue_declare(self, name: str, passive: bool) -> Any:
        if name not in self.queues:
            raise amqp.exceptions.NotFound("no queue")
        messages_, consumers = self.queues[name]
        return type("Ok", (), {"message_count": messages_, "consumer_count": consumers})


def test_a_list_is_stranded_while_alerts_wait_and_nobody_consumes(tmp_path: Path) -> None:
    queues = {"tasync.alerts.a.b": (3, 0), "tasync.alerts.b.a": (0, 0),
              "tasync.dead-letter": (2, 0), "tasync.quarantine": (0, 0)}
    conn = type("Conn", (), {"channel": lambda self: QueueChannel(queues)})()
    trail = Trail(tmp_path, "m")
    monitor = ListMonitor("m", trail, known=lambda: [("a", "b"), ("b", "a"), ("c",)],
                          consumed=lambda: ["b.a"], every_s=60)
    monitor.reset(conn)
    report = monitor.check()
    assert [(s.key, s.stranded, s.exists) for s in report.lists] == [
        ("a.b", True, True), ("b.a", False, True), ("c", False, False)]
    assert (report.dead_letters, report.quarantined) == (2, 0)
    answer = report.to_dict("m")
    assert [r["consumed_here"] for r in answer["lists"]] == [False, True, False]
    monitor.check()  # still stranded: no second line
    queues["tasync.alerts.a.b"] = (3, 1)
    monitor.check()
    events = [(t["event"], t["list"]) for t in read_trail(tmp_path)]
    assert events == [("alert.list_stranded", "a.b"), ("alert.list_recovered", "a.b")]


# -- the story of one alert -----------------------------------------------------------------------


def test_trail_lines_of_one_id_across_rotated_files(tmp_path: Path) -> None:
    trail = Trail(tmp_path, "a")
    trail.event("alert.delivered", id="a1", destination="out")
    trail.event("alert.delivered", id="a10", destination="out")
    (tmp_path / TRAIL_NAME).rename(tmp_path / f"{TRAIL_NAME}.1")
    trail.close()
    trail = Trail(tmp_path, "a")
    trail.event("alert.duplicate", id="a1", first="b")
    trail.event("alert.delivered", id="it's $odd", destination="out")
    (tmp_path / TRAIL_NAME).open("a").write("2026-01-01T00:00:00Z a alert.failed id='a1\n")
    assert [(t["event"], t["id"]) for t in trail_lines(tmp_path, "a1")] == [
        ("alert.delivered", "a1"), ("alert.duplicate", "a1")]
    assert [t["event"] for t in trail_lines(tmp_path, "it's $odd")] == ["alert.delivered"]


def test_a_story_merges_nodes_by_time_and_tells_the_outcome() -> None:
    a = {"node": "a", "seen": {"outcome": "failed"}, "lines": [
        {"ts": "2026-01-01T00:00:01Z", "node": "a", "event": "alert.failed", "id": "d"},
        {"ts": "2026-01-01T00:00:02Z", "node": "a", "event": "alert.dead_lettered", "id": "d"}]}
    b = {"node": "b", "seen": None, "lines": [
        {"ts": "2026-01-01T00:00:03Z", "node": "b", "event": "alert.requeued", "id": "d",
         "by": "ops@host"},
        {"ts": "2026-01-01T00:00:04Z", "node": "b", "event": "alert.delivered", "id": "d",
         "created_at": "12.5", "sender": "cli", "list": "a.b", "source": "nms"}]}
    told = story("d", [b, a], {"dead": [], "quarantined": []})
    assert [e["event"] for e in told["events"]] == [
        "alert.failed", "alert.dead_lettered", "alert.requeued", "alert.delivered"]
    assert told["outcome"] == "delivered"
    assert told["accepted"] == {"created_at": 12.5, "sender": "cli", "list": "a.b",
                                "source": "nms"}
    assert story("d", [a], {"dead": [{"id": "d"}], "quarantined": []})["outcome"] == "dead"
    assert story("q", [], {"dead": [], "quarantined": [{"id": "q"}]})["outcome"] == "refused"


def test_a_refused_message_gives_what_identity_it_can() -> None:
    good = amqp.Message(b'{"id": "x1", "source": "nms"}', message_id=None)
    assert alert_identity(good) == ("x1", "nms")
    assert alert_identity(amqp.Message(b"\xff garbage", message_id="m-1")) == (
        "m-1", UNKNOWN_SOURCE)
    assert alert_identity(amqp.Message(b'{"id": "has space", "source": "-bad"}')) == (
        None, UNKNOWN_SOURCE)
    assert alert_identity(amqp.Message(b'[1, 2]')) == (None, UNKNOWN_SOURCE)


# -- the sender asks before it publishes ----------------------------------------------------------


def policy_sender(answer: dict[str, Any] | None, keyring: KeyRing | None) -> AlertSender:
    sender = AlertSender(Settings(), name="t", keyring=keyring)
    asked: list[dict[str, Any]] = []

    def ask(op: str, args: dict[str, Any]) -> dict[str, Any] | None:
        assert op == "alert_policy"
        asked.append(args)
        return answer

    sender._ask = ask  # type: ignore[method-assign]
    return sender


@pytest.mark.parametrize(("answer", "key_id", "refused"), [
    ({"signed": True, "key_ids": ["k2"], "challenge": "ok"}, None, "signed alerts only"),
    ({"signed": True, "key_ids": ["k2"], "challenge": "unknown key id 'k1'"}, "k1",
     "'k1' is not one"),
    ({"signed": True, "key_ids": ["k2", "k1"], "challenge": "bad signature"}, "k2",
     "secret differs"),
])
def test_the_sender_refuses_what_every_node_would_refuse(answer: dict[str, Any],
                                                         key_id: str | None,
                                                         refused: str) -> None:
    ring = KeyRing.parse(KeyRing.generate(key_id)) if key_id else None
    sender = policy_sender(answer, ring)
    with pytest.raises(SendRefused, match=refused):
        sender.check_policy([])
    assert isinstance(SendRefused("x"), ConfigError)  # exit 1, a 400 at the intake


def test_the_sender_passes_what_the_network_accepts_and_warns_when_nobody_answers() -> None:
    ring = KeyRing.parse(KeyRing.generate("k2"))
    warnings: list[str] = []
    policy_sender({"signed": True, "key_ids": ["k2"], "challenge": "ok"}, ring).check_policy(
        warnings)
    policy_sender({"signed": False, "key_ids": []}, None).check_policy(warnings)
    assert warnings == []
    policy_sender(None, ring).check_policy(warnings)
    assert warnings == ["no node answered: names and signing were not checked"]
    # A dead letter keeps its own signature: its key id is judged, not this sender's key.
    signed = {"signed": True, "key_ids": ["k2"], "challenge": "missing signature"}
    policy_sender(signed, None).check_policy([], signature="k2:" + "0" * 64)
    with pytest.raises(SendRefused, match="'k0'"):
        policy_sender(signed, None).check_policy([], signature="k0:" + "0" * 64)


def test_the_sender_asks_who_runs_a_stranded_list_once_while_its_verdict_is_fresh(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sender = AlertSender(Settings(), name="t")
    sender._announced.add("a.b")  # the list was announced by an earlier send
    asked: list[tuple[str, ...]] = []

    def running(hosts: tuple[str, ...]) -> list[str]:
        asked.append(hosts)
        return []

    now = [1000.0]
    monkeypatch.setattr(sender, "_running", running)
    monkeypatch.setattr("tasync.producers.sender.time.monotonic", lambda: now[0])
    verdicts = [sender._nobody_consumes(("a", "b")) for _ in range(50)]
    assert asked == [("a", "b")]  # one question for fifty alerts, not a second each
    assert all(v == (0, verdicts[0][1]) and "no server of a b" in str(v[1]) for v in verdicts)
    now[0] += STRANDED_RECHECK_S
    sender._nobody_consumes(("a", "b"))
    assert len(asked) == 2  # stale: asked again, so a node that started is seen
