"""The intake's HTTP application with a fake broker side: parsing, limits, answers, Alertmanager."""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tasync.broker.alerts import Alert, validated
from tasync.broker.allowlist import AllowList
from tasync.broker.audit import Trail, read_trail
from tasync.broker.errors import BrokerUnreachable, ConfigError, TopologyMissing
from tasync.broker.settings import IntakeSettings
from tasync.producers import intake_http
from tasync.producers.alertmanager import RESOLVED_PRIORITY, NotificationMemory
from tasync.producers.intake import Intake, IntakeConfig
from tasync.producers.sender import SendResult
from tasync.web import WebPart, build_app, openapi_document

DOCS = Path(__file__).resolve().parents[3] / "docs"

AM_PAYLOAD: dict[str, Any] = {
    "version": "4", "status": "firing", "receiver": "tasync",
    "groupKey": '{}:{alertname="DiskFull"}', "truncatedAlerts": 0,
    "groupLabels": {"alertname": "DiskFull"},
    "commonLabels": {"alertname": "DiskFull", "severity": "critical"},
    "alerts": [
        {"status": "firing",
         "labels": {"alertname": "DiskFull", "instance": "db1", "severity": "critical"},
         "annotations": {"summary": "disk 98% full", "runbook_url": "https://wiki/disk"},
         "startsAt": "2025-01-06T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
         "generatorURL": "http://prom:9090/graph?g0.expr=disk", "fingerprint": "abc123"},
        {"status": "resolved",
         "labels": {"alertname": "DiskFull", "instance": "db2", "severity": "critical"},
         "annotations": {}, "startsAt": "2025-01-06T09:00:00Z",
         "endsAt": "2025-01-06T09:30:00Z", "fingerprint": "def456"},
    ],
}


class FakePublisher:
    def __init__(self, fail: Exception | None = None) -> None:
        self.sent: list[Alert] = []
        self.fail = fail
        self.routes = {"remedy": ("a", "b"), "nms": ("b", "a")}

    def send_many(self, alerts: Sequence[Alert]) -> SendResult:
        if self.fail:
            raise self.fail
        checked = [validated(a) for a in alerts]
        self.sent.extend(checked)
        return SendResult(ids=[a.id for a in checked], hosts=checked[0].hosts, consumers=1)

    def resolve_route(self, route: str) -> tuple[str, ...]:
        if route not in self.routes:
            raise ConfigError(f"unknown route {route!r}")
        return self.routes[route]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(publisher: FakePublisher | None = None, *, trail: Trail | None = None,
         limits: IntakeSettings | None = None, **config: Any
         ) -> tuple[TestClient, FakePublisher, Intake]:
    fake = publisher or FakePublisher()
    service = Intake(IntakeConfig(limits=limits or IntakeSettings(), **config), fake,
                     trail=trail)
    part = WebPart("intake", intake_http.routes(service), intake_http.openapi_paths(),
                   health=lambda: {"broker": "ok"})
    return TestClient(build_app([part]), raise_server_exceptions=False), fake, service


@pytest.fixture
def client() -> Iterator[tuple[TestClient, FakePublisher, Intake]]:
    made = make(routes={"x": "remedy", "prom": "nms"})
    with made[0]:
        yield made


def post(client: TestClient, target: str, data: Any, **headers: str) -> tuple[int, Any]:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    response = client.post(target, content=body, headers=headers)
    return response.status_code, response.json()


OK = {"source": "x", "destination": "d", "message": "m"}


def test_generic_alert_uses_the_source_route(client: Any) -> None:
    http, fake, _ = client
    status, reply = post(http, "/alerts", {"source": "x", "destination": "ops",
                                           "message": "P1 opened", "id": "INC1"})
    assert status == 202 and reply == {"ids": ["INC1"], "hosts": ["a", "b"], "warnings": []}
    assert fake.sent[0].target == "ops" and fake.sent[0].hosts == ("a", "b")


def test_explicit_hosts_route_defaults_labels() -> None:
    http, fake, _ = make(default_hosts=("c",))
    post(http, "/alerts", [
        {"source": "y", "group": "g", "text": "t1", "hosts": ["b", "a"]},
        {"source": "y", "group": "g", "text": "t2", "route": "nms"},
        {"source": "y", "group": "g", "text": "t3", "labels": {"team": "db"},
         "annotations": {"runbook_url": "https://wiki/x"}},
    ])
    assert [a.hosts for a in fake.sent] == [("b", "a"), ("b", "a"), ("c",)]
    assert fake.sent[2].labels == {"team": "db"}
    assert fake.sent[2].annotations == {"runbook_url": "https://wiki/x"}
    assert len({a.id for a in fake.sent}) == 3


@pytest.mark.parametrize(("target", "data", "reason"), [
    ("/alerts", b"{not json", "invalid JSON"),
    ("/alerts", b"\xff\xfe", "not UTF-8"),
    ("/alerts", {**OK, "message": ""}, "message is empty"),
    ("/alerts", {**OK, "message": "x" * 40_000}, "the limit is 32768"),
    ("/alerts", {"source": "x", "message": "m"}, "exactly one of 'destination' or 'group'"),
    ("/alerts", {"destination": "d", "message": "m"}, "missing field 'source'"),
    ("/alerts", {**OK, "colour": 1}, "unknown field 'colour'"),
    ("/alerts", {**OK, "priority": "high"}, "priority"),
    ("/alerts", {**OK, "hosts": "a b"}, "list of node names"),
    ("/alerts", {**OK, "labels": {"a": 1}}, "object of strings"),
    ("/alerts", {**OK, "subject": "P1\r\nBcc: all@example.com"}, "subject is one line"),
    ("/alerts", {**OK, "subject": "bell\x07"}, "subject is one line"),
    ("/alerts", {**OK, "source": "nomap"}, "no route for source"),
    ("/alerts", {**OK, "route": "ghost"}, "unknown route 'ghost'"),
    ("/alerts", [], "no alert"),
    ("/alerts", [1], "must be a JSON object"),
    ("/alertmanager?destination=d", {"alerts": []}, "no alerts"),
    ("/alertmanager", AM_PAYLOAD, "exactly one of"),
    ("/alertmanager?destination=d", {"version": "4"}, "not an Alertmanager payload"),
    ("/alertmanager?destination=d", {**AM_PAYLOAD, "truncatedAlerts": -1}, "truncatedAlerts"),
])
def test_bad_input_is_400_with_a_reason(client: Any, target: str, data: Any,
                                        reason: str) -> None:
    http, fake, _ = client
    status, reply = post(http, target, data)
    assert status == 400, reply
    assert reason in reply["error"]
    assert not fake.sent


def test_other_answers() -> None:
    http, _, _ = make(token="s3cret", routes={"x": "remedy"})
    assert post(http, "/alerts", OK)[0] == 401
    assert post(http, "/alerts", OK, authorization="Bearer s3cret")[0] == 202
    wrong_method = http.get("/alerts")
    assert wrong_method.status_code == 405 and "takes POST" in wrong_method.json()["error"]
    assert http.get("/healthz").json() == {"ok": True, "intake": {"broker": "ok"}}
    missing = post(http, "/nope", OK)
    assert missing[0] == 404 and "/alertmanager" in missing[1]["error"]
    crash, _, _ = make(FakePublisher(RuntimeError("bug")), routes={"x": "remedy"})
    assert post(crash, "/alerts", OK) == (500, {"error": "internal error; see the intake's log"})


@pytest.mark.parametrize("error", [BrokerUnreachable("broker unreachable at amqp://x"),
                                   TopologyMissing("run `tasync broker setup`")])
def test_broker_trouble_is_503_with_retry_after(error: Exception) -> None:
    http, _, _ = make(FakePublisher(error), routes={"x": "remedy"},
                      limits=IntakeSettings(retry_after_s=7))
    response = http.post("/alerts", json=OK)
    assert response.status_code == 503 and response.headers["Retry-After"] == "7"
    assert str(error) in response.json()["error"]


def test_allow_list_checks_the_client_address() -> None:
    http, _, _ = make(allow=AllowList.parse("10.0.0.0/8"), routes={"x": "remedy"})
    status, reply = post(http, "/alerts", OK)
    assert status == 403 and "not allowed" in reply["error"]


def test_too_large_is_413_whole_never_a_partial_202() -> None:
    http, fake, _ = make(routes={"x": "remedy"},
                         limits=IntakeSettings(max_body_bytes=4096, max_alerts=10))
    status, reply = post(http, "/alerts", [OK] * 11)
    assert status == 413 and "split" in reply["error"]
    status, reply = post(http, "/alerts", {**OK, "message": "x" * 5000})
    assert status == 413 and "the limit is 4096" in reply["error"]
    chunked = http.post("/alerts", content=iter([b'{"source": "x", ', b" " * 5000, b"}"]))
    assert chunked.status_code == 413
    assert not fake.sent
    assert post(http, "/alerts", [OK] * 10)[0] == 202 and len(fake.sent) == 10


def test_default_limits_take_what_alertmanager_sends() -> None:
    http, fake, _ = make(default_route="nms")
    entry = AM_PAYLOAD["alerts"][0]
    payload = {**AM_PAYLOAD, "alerts": [
        {**entry, "fingerprint": f"{i:016x}",
         "labels": {**entry["labels"], "instance": f"db{i}"},
         "annotations": {**entry["annotations"], "description": "d" * 2000}}
        for i in range(3000)]}
    body = json.dumps(payload).encode()
    assert len(body) > 6 << 20
    status, reply = post(http, "/alertmanager?destination=ops", body)
    assert status == 202, reply
    assert len(reply["ids"]) == 3000 == len(set(reply["ids"])) == len(fake.sent)


def am_client(trail: Trail | None = None) -> tuple[TestClient, FakePublisher, Clock]:
    http, fake, service = make(default_route="nms", trail=trail,
                               limits=IntakeSettings(retry_window_s=60))
    clock = Clock()
    service.memory = NotificationMemory(60, clock=clock)
    return http, fake, clock


def test_alertmanager_alerts_carry_fields_subjects_and_priorities() -> None:
    http, fake, _ = am_client()
    status, reply = post(http, "/alertmanager?destination=ops&source=prom", AM_PAYLOAD)
    assert status == 202 and len(reply["ids"]) == 2
    firing, resolved = fake.sent
    assert firing.subject == "[FIRING] DiskFull instance=db1"
    assert resolved.subject == "[RESOLVED] DiskFull instance=db2"
    assert firing.priority == 9 and resolved.priority == RESOLVED_PRIORITY
    assert firing.text == "disk 98% full" and firing.source == "prom"
    assert firing.labels == {"alertname": "DiskFull", "instance": "db1",
                             "severity": "critical"}
    assert firing.annotations == {"summary": "disk 98% full", "runbook_url": "https://wiki/disk",
                                  "generatorURL": "http://prom:9090/graph?g0.expr=disk"}
    assert firing.id.startswith("am-abc123-firing-") and resolved.id.startswith("am-def456-")


def test_alertmanager_retry_keeps_ids_and_a_reminder_gets_new_ones() -> None:
    http, fake, clock = am_client()
    first = post(http, "/alertmanager?destination=ops", AM_PAYLOAD)[1]["ids"]
    clock.now += 50  # Alertmanager retries within seconds; each retry renews the window
    retry = post(http, "/alertmanager?destination=ops", AM_PAYLOAD)[1]["ids"]
    clock.now += 50
    again = post(http, "/alertmanager?destination=ops", AM_PAYLOAD)[1]["ids"]
    assert first == retry == again
    clock.now += 3600  # repeat_interval later: a reminder
    reminder = post(http, "/alertmanager?destination=ops", AM_PAYLOAD)[1]["ids"]
    assert not set(reminder) & set(first)
    changed = {**AM_PAYLOAD, "alerts": AM_PAYLOAD["alerts"][:1]}
    clock.now += 1
    other = post(http, "/alertmanager?destination=ops", changed)[1]["ids"]
    assert other[0] not in first + reminder, "another notification is delivered on its own"
    assert len(fake.sent) == 2 * 4 + 1


def test_alertmanager_truncated_alerts_are_told_in_the_text_and_the_trail(
        tmp_path: Path) -> None:
    http, fake, _ = am_client(Trail(tmp_path, "intake"))
    status, _ = post(http, "/alertmanager?destination=ops",
                     {**AM_PAYLOAD, "truncatedAlerts": 1200})
    assert status == 202
    assert all("left out 1200 more alert(s)" in a.text for a in fake.sent)
    (event,) = [e for e in read_trail(tmp_path) if e["event"] == "alertmanager.truncated"]
    assert event["left_out"] == "1200" and event["sent"] == "2" and event["receiver"] == "tasync"


def test_alertmanager_sanitises_what_would_be_refused() -> None:
    http, fake, _ = am_client()
    entry = {**AM_PAYLOAD["alerts"][0], "labels": {"alertname": "Disk", "path": "/a\nb"},
             "annotations": {"summary": "s", "huge": "h" * 100_000}}
    status, _ = post(http, "/alertmanager?destination=ops", {**AM_PAYLOAD, "alerts": [entry]})
    assert status == 202
    (alert,) = fake.sent
    assert alert.subject == "[FIRING] Disk path=/a b"
    assert alert.annotations is not None and len(alert.annotations["huge"]) <= 8192


def test_the_served_openapi_description_is_the_one_in_docs(client: Any) -> None:
    http, _, _ = client
    served = http.get("/openapi.json").json()
    assert served == openapi_document([WebPart("intake", [], intake_http.openapi_paths())])
    checked_in = json.loads((DOCS / "openapi.json").read_text())
    assert served == checked_in, "regenerate: python -m tasync.web > docs/openapi.json"


def test_a_route_nobody_can_resolve_now_is_a_retry_not_a_refusal() -> None:
    class Unanswered(FakePublisher):
        def resolve_route(self, route: str) -> tuple[str, ...]:
            if self.routes.get("down"):
                raise ConfigError(f"cannot resolve route {route!r}: no node answered; name "
                                  "the servers with --host A B instead")
            return super().resolve_route(route)

    fake = Unanswered()
    http, _, _ = make(fake, routes={"x": "remedy"},
                      limits=IntakeSettings(route_cache_s=0.0))
    assert post(http, "/alerts", OK)[0] == 202
    fake.routes["down"] = ("yes",)
    assert post(http, "/alerts", OK)[0] == 202, "the hosts seen before"
    assert post(http, "/alerts", {**OK, "route": "nms"})[0] == 503
    assert post(http, "/alerts", {**OK, "route": "ghost"})[0] == 503
