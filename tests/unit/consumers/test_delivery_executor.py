import threading
from pathlib import Path
from typing import Any

import pytest

from tasync.broker.alerts import Alert
from tasync.broker.audit import Trail, read_trail
from tasync.broker.errors import AttemptFailed, ConfigError, DeliveryAborted
from tasync.consumers.delivery.executor import (
    Executor,
    RetryPolicy,
    render_subject,
)
from tests.unit.consumers.test_delivery_resolve import Store

ALWAYS_CLOSED = {"timezone": "UTC", "windows": [{"days": ["mon"], "start": "00:00",
                                                 "end": "00:01"}]}


def alert(target: str = "hook", kind: str = "destination", **kw: Any) -> Alert:
    return Alert(id="A1", source="nms", target_kind=kind, target=target, text="link down",
                 hosts=("a", "b"), **kw)


class Channel:
    """Scripted results per URL: an exception instance to raise, or None for success."""

    def __init__(self, script: dict[str, list[Exception | None]]) -> None:
        self.script = script
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, url: str, payload: dict[str, Any], *, timeout_s: float) -> None:
        self.calls.append((url, payload))
        results = self.script.get(url, [])
        result = results.pop(0) if results else None
        if result is not None:
            raise result


STORE = Store({
    "destination": {
        "hook": {"url": "http://hook", "subject": "[{source}] {subject} via {node}"},
        "dead": {"url": "http://dead"},
        "typo": {"url": "http://typo"},
        "mail": {"url": "mailto:x@y"},
        "night": {"url": "http://night", "schedule": "closed"},
    },
    "group": {
        "seq": {"members": ["dead", "hook", "mail"], "mode": "sequence"},
        "all": {"members": ["hook", "mail"], "mode": "all"},
        "allbad": {"members": ["hook", "typo"], "mode": "all"},
        "nightonly": {"members": ["night"], "mode": "all"},
    },
    "schedule": {"closed": ALWAYS_CLOSED},
})
FAST = RetryPolicy(attempts=5, backoff_s=0.01, max_backoff_s=0.02)


def make(tmp_path: Path, channel: Channel, policy: RetryPolicy = FAST,
         stop: threading.Event | None = None) -> Executor:
    event = stop or threading.Event()
    return Executor(node="a", store=STORE, trail=Trail(tmp_path, "a"), policy=policy,
                    wait=event.wait, send=channel)


def test_retries_then_delivers_once(tmp_path: Path) -> None:
    err = AttemptFailed("webhook answered HTTP 500", retryable=True)
    channel = Channel({"http://hook": [err, err, err, None]})
    outcome = make(tmp_path, channel).run(alert())
    assert outcome.status == "delivered" and outcome.rounds == 4
    assert outcome.delivered == ["hook"]
    assert len(channel.calls) == 4
    events = [line["event"] for line in read_trail(tmp_path)]
    assert events == ["alert.delivered"]


def test_never_working_destination_fails_after_every_attempt(tmp_path: Path) -> None:
    channel = Channel({"http://dead": [AttemptFailed("HTTP 503", retryable=True)] * 10})
    outcome = make(tmp_path, channel).run(alert("dead"))
    assert outcome.status == "failed" and outcome.rounds == 5
    assert outcome.failed == {"dead": "HTTP 503"}
    (line,) = read_trail(tmp_path)
    assert line["event"] == "alert.failed" and line["destination"] == "dead"
    assert line["attempts"] == "5"


def test_permanent_error_is_not_retried(tmp_path: Path) -> None:
    channel = Channel({"http://typo": [AttemptFailed("HTTP 404", retryable=False)]})
    outcome = make(tmp_path, channel).run(alert("typo"))
    assert outcome.status == "failed" and outcome.rounds == 1 and len(channel.calls) == 1


def test_sequence_moves_on_at_once_and_stops_at_the_first_success(tmp_path: Path) -> None:
    channel = Channel({"http://dead": [AttemptFailed("down", retryable=True)] * 10})
    outcome = make(tmp_path, channel).run(alert("seq", "group"))
    assert outcome.status == "delivered" and outcome.rounds == 1
    assert [url for url, _ in channel.calls] == ["http://dead", "http://hook"]


def test_all_mode_retries_only_what_failed(tmp_path: Path) -> None:
    channel = Channel({"mailto:x@y": [AttemptFailed("421 busy", retryable=True), None]})
    outcome = make(tmp_path, channel).run(alert("all", "group"))
    assert outcome.status == "delivered" and outcome.rounds == 2
    assert [url for url, _ in channel.calls] == ["http://hook", "mailto:x@y", "mailto:x@y"]


def test_all_mode_with_a_permanent_failure_fails(tmp_path: Path) -> None:
    channel = Channel({"http://typo": [AttemptFailed("HTTP 404", retryable=False)]})
    outcome = make(tmp_path, channel).run(alert("allbad", "group"))
    assert outcome.status == "failed"
    assert outcome.delivered == ["hook"] and list(outcome.failed) == ["typo"]


def test_destination_outside_its_schedule_is_skipped_with_a_trail_line(tmp_path: Path) -> None:
    channel = Channel({})
    outcome = make(tmp_path, channel).run(alert("nightonly", "group"))
    assert outcome.status == "skipped" and not channel.calls
    (line,) = read_trail(tmp_path)
    assert line["event"] == "alert.skipped" and line["reason"] == "outside schedule closed"


def test_unknown_target_fails_without_delivery(tmp_path: Path) -> None:
    outcome = make(tmp_path, Channel({})).run(alert("nope"))
    assert outcome.status == "failed" and "unknown destination" in outcome.reason


def test_stop_during_backoff_aborts(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    channel = Channel({"http://dead": [AttemptFailed("down", retryable=True)] * 10})
    with pytest.raises(DeliveryAborted):
        make(tmp_path, channel, RetryPolicy(attempts=3, backoff_s=10), stop).run(alert("dead"))


def test_inline_first_round_then_resume(tmp_path: Path) -> None:
    err = AttemptFailed("HTTP 500", retryable=True)
    channel = Channel({"http://hook": [err, None]})
    executor = make(tmp_path, channel)
    first = executor.run(alert(), max_rounds=1)
    assert first.status == "retry" and first.progress is not None
    final = executor.run(alert(), first.progress)
    assert final.status == "delivered" and final.rounds == 2


def test_payload_and_subject_template(tmp_path: Path) -> None:
    channel = Channel({})
    make(tmp_path, channel).run(alert(subject="P1"))
    payload = channel.calls[0][1]
    assert payload["subject"] == "[nms] P1 via a"
    assert {"id", "destination", "text", "source", "node", "delivered_at"} <= set(payload)
    assert payload["node"] == "a" and payload["destination"] == "hook"


def test_subject_default_and_no_attribute_access() -> None:
    assert render_subject(None, alert(), node="a", destination="d") == "link down"
    assert render_subject("{id.__class__}", alert(), node="a", destination="d") == \
        "{id.__class__}"


def test_policy_from_env() -> None:
    policy = RetryPolicy.from_env({"TASYNC_DELIVERY_ATTEMPTS": "3",
                                   "TASYNC_DELIVERY_BACKOFF_S": "0.1"})
    assert policy.attempts == 3 and [policy.delay(n) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert RetryPolicy(backoff_s=1, max_backoff_s=5).delay(10) == 5
    with pytest.raises(ConfigError):
        RetryPolicy.from_env({"TASYNC_DELIVERY_ATTEMPTS": "zero"})


def test_labels_and_annotations_reach_the_payload_as_fields(tmp_path: Path) -> None:
    channel = Channel({})
    executor = make(tmp_path, channel)
    executor.run(alert(labels={"alertname": "DiskFull", "instance": "db1"},
                       annotations={"runbook_url": "https://wiki/disk"}))
    executor.run(alert())
    (_, rich), (_, plain) = channel.calls
    assert rich["labels"] == {"alertname": "DiskFull", "instance": "db1"}
    assert rich["annotations"] == {"runbook_url": "https://wiki/disk"}
    assert "labels" not in plain and "annotations" not in plain
