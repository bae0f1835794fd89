import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from broker.alerts import Alert, validated
from broker.allowlist import AllowList
from broker.errors import BrokerUnreachable, ConfigError
from producers.intake import Intake, IntakeConfig, make_server
from producers.intake_formats import BadRequest, parse_alertmanager, parse_generic
from producers.sender import AlertSender, SendResult

AM_PAYLOAD = {
    "version": "4", "status": "firing", "receiver": "tasync", "groupKey": "{}:{}",
    "commonLabels": {"alertname": "DiskFull", "severity": "critical"},
    "alerts": [
        {"status": "firing", "labels": {"alertname": "DiskFull", "instance": "db1"},
         "annotations": {"summary": "disk 98% full"}, "startsAt": "2025-01-06T10:00:00Z",
         "fingerprint": "abc123"},
        {"status": "resolved", "labels": {"alertname": "DiskFull", "instance": "db2"},
         "annotations": {}, "startsAt": "2025-01-06T09:00:00Z", "fingerprint": "def456"},
    ],
}


class FakeSender:
    def __init__(self, fail: Exception | None = None) -> None:
        self.sent: list[Alert] = []
        self.fail = fail
        self.routes = {"remedy": ("a", "b"), "nms": ("b", "a")}

    def send_many(self, alerts: list[Alert]) -> SendResult:
        if self.fail:
            raise self.fail
        checked = [validated(a) for a in alerts]
        self.sent.extend(checked)
        return SendResult(ids=[a.id for a in checked], hosts=checked[0].hosts, consumers=1)

    def resolve_route(self, route: str) -> tuple[str, ...]:
        if route not in self.routes:
            raise ConfigError(f"unknown route {route!r}")
        return self.routes[route]


def intake(sender: FakeSender | None = None, **config: Any) -> tuple[Intake, FakeSender]:
    fake = sender or FakeSender()
    return Intake(IntakeConfig(**config), cast(AlertSender, fake)), fake


def post(service: Intake, target: str, data: Any, **headers: str) -> tuple[int, dict[str, Any]]:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return service.handle("POST", target, body, headers=headers, client="127.0.0.1")


def test_generic_alert_uses_the_source_route() -> None:
    service, fake = intake(routes={"remedy": "remedy"})
    status, reply = post(service, "/alerts", {"source": "remedy", "destination": "ops",
                                              "message": "P1 opened", "id": "INC1"})
    assert status == 202 and reply["ids"] == ["INC1"] and reply["hosts"] == ["a", "b"]
    assert fake.sent[0].target == "ops" and fake.sent[0].hosts == ("a", "b")


def test_explicit_hosts_route_and_defaults() -> None:
    service, fake = intake(default_hosts=("c",))
    post(service, "/alerts", [
        {"source": "x", "group": "g", "text": "t1", "hosts": ["b", "a"]},
        {"source": "x", "group": "g", "text": "t2", "route": "nms"},
        {"source": "x", "group": "g", "text": "t3"},
    ])
    assert [a.hosts for a in fake.sent] == [("b", "a"), ("b", "a"), ("c",)]
    assert all(a.target_kind == "group" for a in fake.sent)
    assert len({a.id for a in fake.sent}) == 3


def test_alertmanager_payload_becomes_one_alert_per_entry() -> None:
    service, fake = intake(default_route="nms")
    status, reply = post(service, "/alertmanager?destination=ops&source=prom", AM_PAYLOAD)
    assert status == 202 and len(reply["ids"]) == 2
    firing, resolved = fake.sent
    assert firing.id == "am-abc123-firing-2025-01-06T10:00:00Z"
    assert firing.subject == "[FIRING] DiskFull" and firing.priority == 9
    assert firing.text.startswith("disk 98% full") and "instance=db1" in firing.text
    assert resolved.subject == "[RESOLVED] DiskFull" and firing.source == "prom"


@pytest.mark.parametrize(("target", "data", "reason"), [
    ("/alerts", b"{not json", "invalid JSON"),
    ("/alerts", b"\xff\xfe", "not UTF-8"),
    ("/alerts", {"source": "x", "destination": "d", "message": ""}, "message is empty"),
    ("/alerts", {"source": "x", "destination": "d", "message": "x" * 40_000,
                  "hosts": ["a"]}, "the limit is 32768"),
    ("/alerts", {"source": "x", "message": "m"}, "exactly one of 'destination' or 'group'"),
    ("/alerts", {"destination": "d", "message": "m"}, "missing field 'source'"),
    ("/alerts", {"source": "x", "destination": "d", "message": "m", "colour": 1},
     "unknown field 'colour'"),
    ("/alerts", {"source": "x", "destination": "d", "message": "m", "priority": "high"},
     "priority"),
    ("/alerts", {"source": "x", "destination": "d", "message": "m", "hosts": "a b"},
     "list of node names"),
    ("/alerts", {"source": "nomap", "destination": "d", "message": "m"}, "no route for source"),
    ("/alerts", {"source": "x", "destination": "d", "message": "m", "route": "ghost"},
     "unknown route 'ghost'"),
    ("/alerts", [], "no alert"),
    ("/alerts", [1], "must be a JSON object"),
    ("/alertmanager?destination=d", {"alerts": []}, "no alerts"),
    ("/alertmanager", AM_PAYLOAD, "exactly one of"),
    ("/alertmanager?destination=d", {"version": "4"}, "not an Alertmanager payload"),
])
def test_bad_input_is_400_with_a_reason(target: str, data: Any, reason: str) -> None:
    service, fake = intake()
    status, reply = post(service, target, data)
    assert status == 400, reply
    assert reason in reply["error"]
    assert not fake.sent


def test_other_answers() -> None:
    service, _ = intake(token="s3cret", routes={"x": "remedy"})
    ok = {"source": "x", "destination": "d", "message": "m"}
    assert post(service, "/alerts", ok)[0] == 401
    assert post(service, "/alerts", ok, authorization="Bearer s3cret")[0] == 202
    assert service.handle("GET", "/alerts", b"", headers={}, client="::1")[0] == 405
    assert service.handle("GET", "/healthz", b"", headers={}, client="::1")[0] == 200
    assert post(service, "/nope", ok)[0] == 404
    down, _ = intake(FakeSender(BrokerUnreachable("broker unreachable")), routes={"x": "remedy"})
    assert post(down, "/alerts", ok)[0] == 503
    crash, _ = intake(FakeSender(RuntimeError("bug")), routes={"x": "remedy"})
    assert post(crash, "/alerts", ok) == (500, {"error": "internal error; see the intake's log"})


def test_allow_list_checks_the_client_address() -> None:
    service, _ = intake(allow=AllowList.parse("10.0.0.0/8"), routes={"x": "remedy"})
    status, reply = post(service, "/alerts", {"source": "x", "destination": "d", "message": "m"})
    assert status == 403 and "127.0.0.1" in reply["error"]


def test_parsers_directly() -> None:
    (one,) = parse_generic({"source": "s", "destination": "d", "text": "t"}, query={})
    assert one.text == "t" and one.id is None
    with pytest.raises(BadRequest):
        parse_alertmanager([], query={"destination": "d"})


@pytest.fixture
def server() -> Iterator[tuple[int, FakeSender]]:
    service, fake = intake(routes={"x": "remedy"}, max_body_bytes=2048)
    httpd = make_server(service, host="127.0.0.1", port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1], fake
    finally:
        httpd.shutdown()
        httpd.server_close()


def request(port: int, method: str, path: str, body: bytes | None = None
            ) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, data


def test_over_http(server: tuple[int, FakeSender]) -> None:
    port, fake = server
    ok = json.dumps({"source": "x", "destination": "d", "message": "m"}).encode()
    assert request(port, "POST", "/alerts", ok)[0] == 202
    status, reply = request(port, "POST", "/alerts", b"[")
    assert status == 400 and "invalid JSON" in reply["error"]
    status, reply = request(port, "POST", "/alerts", b"x" * 5000)
    assert status == 413 and "limit is 2048" in reply["error"]
    assert request(port, "GET", "/healthz")[0] == 200
    assert len(fake.sent) == 1
