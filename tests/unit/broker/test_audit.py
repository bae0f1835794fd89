"""The audit trail: one parseable line per event (broker/audit.py)."""

import io
import logging
import re
from pathlib import Path

import pytest

from tasync.broker import audit
from tasync.broker.audit import (
    TRAIL_NAME,
    RepeatFilter,
    Trail,
    parse_trail_line,
    read_trail,
    setup_sync_log,
    utc_now,
)
from tasync.broker.events import Event


@pytest.fixture
def trail(tmp_path: Path) -> Trail:
    t = Trail(tmp_path, "node-1")
    yield t
    t.close()


def test_line_format(trail: Trail) -> None:
    line = trail.event(Event.CHANGE_APPLIED, seq=42, kind="destination", name="d1")
    ts, node, event, *rest = line.split(" ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
    assert (node, event, rest) == ("node-1", "change.applied",
                                   ["seq=42", "kind=destination", "name=d1"])


def test_utc_now_format() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_now())


@pytest.mark.parametrize("value", [
    "disk full on /var", "it's broken", 'say "hi"', "", "a=b=c", "tab\there", "ünïcode ✓",
    "$(rm -rf /)", "back\\slash", "semi;colon", "#hash", "'", '"',
])
def test_values_round_trip(trail: Trail, value: str) -> None:
    line = trail.event("alert.failed", id="a-1", reason=value)
    assert parse_trail_line(line) == {
        "ts": line.split(" ", 1)[0], "node": "node-1", "event": "alert.failed", "id": "a-1",
        "reason": value,
    }


def test_safe_values_are_not_quoted(trail: Trail) -> None:
    line = trail.event("x", url="file:///tmp/a.jsonl", at="u@h", list="a,b", n=3)
    assert line.endswith(" url=file:///tmp/a.jsonl at=u@h list=a,b n=3")


def test_none_fields_are_left_out(trail: Trail) -> None:
    parsed = parse_trail_line(trail.event("x", a=None, b=0, c=False))
    assert "a" not in parsed
    assert (parsed["b"], parsed["c"]) == ("0", "False")


def test_read_trail_returns_every_event_in_order(trail: Trail, tmp_path: Path) -> None:
    trail.event(Event.NODE_STARTED, role="master", epoch=1)
    trail.event(Event.CHANGE_REJECTED, reason="stale epoch 1 < 2", origin="old master")
    trail.event(Event.NODE_STOPPED, seq=9)
    records = read_trail(tmp_path)
    assert [r["event"] for r in records] == ["node.started", "change.rejected", "node.stopped"]
    assert records[1]["reason"] == "stale epoch 1 < 2"
    assert records[1]["origin"] == "old master"
    assert all(r["node"] == "node-1" for r in records)
    assert (tmp_path / TRAIL_NAME).read_text().count("\n") == 3


def test_read_trail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_trail(tmp_path / "nowhere") == []


def test_two_trails_append_to_the_same_file(tmp_path: Path) -> None:
    first = Trail(tmp_path, "a")
    first.event("one")
    first.close()
    second = Trail(tmp_path, "a")
    second.event("two")
    second.close()
    assert [r["event"] for r in read_trail(tmp_path)] == ["one", "two"]


def test_value_with_newline_stays_on_one_line(trail: Trail, tmp_path: Path) -> None:
    trail.event("alert.failed", id="a-1", error="HTTP 500\nInternal Server Error")
    trail.event("alert.delivered", id="a-2")
    records = read_trail(tmp_path)
    assert [r["event"] for r in records] == ["alert.failed", "alert.delivered"]
    assert "HTTP 500" in records[0]["error"]
    assert "Internal Server Error" in records[0]["error"]


def _record(message: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("tasync.broker", level, "", 0, message, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_repeat_filter_shows_each_problem_once_until_it_clears(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("tasync.broker.audit.time.monotonic", lambda: now[0])
    shown = RepeatFilter(window_s=600.0, max_keys=2).filter
    down = "broker unreachable at amqp://x: refused"
    assert shown(_record(f"tasync-sync-a: {down}; retrying", problem=down))
    assert not shown(_record(f"tasync-control-a: {down}; retrying", problem=down))
    assert shown(_record("an info line", logging.INFO))
    assert shown(_record("an info line", logging.INFO))
    assert shown(_record("a warning without a problem"))
    assert not shown(_record("a warning without a problem"))
    now[0] += 601.0  # a lasting fault is mentioned again now and then
    assert shown(_record(f"tasync-sync-a: {down}; retrying", problem=down))
    assert shown(_record("tasync-sync-a: connected to the broker again", logging.INFO,
                         resolved=True))
    assert not shown(_record("tasync-control-a: connected to the broker again", logging.INFO,
                             resolved=True))
    assert shown(_record(f"tasync-sync-a: {down}; retrying", problem=down))  # it came back
    for n in range(3):  # memory is bounded: the oldest is forgotten
        assert shown(_record(f"problem {n}"))
    assert shown(_record(f"tasync-sync-a: {down}; retrying", problem=down))


def test_stderr_lines_are_short(tmp_path: Path) -> None:
    stream = io.StringIO()
    log = setup_sync_log(tmp_path, "a", verbose=False, stderr=stream)
    try:
        logging.getLogger("tasync.node").info("ready at seq %d", 3)
        logging.getLogger("tasync.node").debug("not shown without -v")
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            logging.getLogger("tasync.broker").exception("x: unexpected error; reconnecting")
    finally:
        for handler in log.handlers:
            handler.close()
        log.handlers.clear()
    assert stream.getvalue() == ("a INFO ready at seq 3\n"
                                 "a ERROR x: unexpected error; reconnecting (ValueError: bad)\n")
    in_file = (tmp_path / "tasync.log").read_text()
    assert " a INFO tasync.node ready at seq 3\n" in in_file
    assert "Traceback (most recent call last)" in in_file and "thing" in in_file


def test_the_trail_rotates_and_keeps_every_line(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "ROTATE_BYTES", 2000)
    trail = Trail(tmp_path, "a")
    for number in range(60):
        trail.event("alert.delivered", id=f"r{number}", destination="out")
    trail.close()
    rotated = sorted(tmp_path.glob(f"{TRAIL_NAME}.*"))
    assert rotated and all(p.stat().st_size < 2000 for p in [*rotated, tmp_path / TRAIL_NAME])
    kept = [line.split("id=")[1].split()[0] for p in [*reversed(rotated), tmp_path / TRAIL_NAME]
            for line in p.read_text().splitlines()]
    assert kept == [f"r{n}" for n in range(60 - len(kept), 60)]  # the oldest rotated away
