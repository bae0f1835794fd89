import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tasync.broker.errors import AttemptFailed
from tasync.consumers.delivery import channels
from tests.harness.webhook import Webhook

PAYLOAD = {"id": "A1", "destination": "d", "text": "disk full", "subject": "P1",
           "source": "nms", "node": "a", "delivered_at": 1.0}


@pytest.fixture
def hook() -> Iterator[Webhook]:
    with Webhook() as server:
        yield server


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if any(r.startswith("refused") for r in envelope.rcpt_tos):
            return "550 no such user"
        self.messages.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def test_file_channel_appends_one_json_line_per_alert(tmp_path: Path) -> None:
    target = tmp_path / "alerts.jsonl"
    channels.send(f"file://{target}", PAYLOAD)
    channels.send(f"file://{target}", {**PAYLOAD, "id": "A2"})
    lines = [json.loads(x) for x in target.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["A1", "A2"]
    assert lines[0] == PAYLOAD


def test_file_channel_errors(tmp_path: Path) -> None:
    with pytest.raises(AttemptFailed) as missing:
        channels.send(f"file://{tmp_path}/no/such/dir/x.jsonl", PAYLOAD)
    assert missing.value.retryable
    with pytest.raises(AttemptFailed) as remote:
        channels.send("file://server/share/x", PAYLOAD)
    assert not remote.value.retryable


def test_webhook_posts_json_with_idempotency_key(hook: Webhook) -> None:
    channels.send(hook.url, PAYLOAD)
    (request,) = hook.requests
    assert request.body == PAYLOAD
    assert request.headers["Idempotency-Key"] == "A1"
    assert request.headers["Content-Type"] == "application/json"


def test_webhook_basic_auth_from_url(hook: Webhook) -> None:
    channels.send(hook.url.replace("http://", "http://user:s%40cret@"), PAYLOAD)
    assert hook.requests[0].headers["Authorization"] == "Basic dXNlcjpzQGNyZXQ="


@pytest.mark.parametrize(("status", "retryable"), [
    (500, True), (503, True), (429, True), (404, False), (400, False), (302, False),
])
def test_webhook_failures_say_whether_to_retry(hook: Webhook, status: int, retryable: bool) -> None:
    hook.statuses = [status]
    with pytest.raises(AttemptFailed) as info:
        channels.send(hook.url.replace("/hook", "/hook?token=SECRET"), PAYLOAD)
    assert info.value.retryable is retryable
    assert str(status) in str(info.value)
    assert "SECRET" not in str(info.value)


def test_webhook_unreachable_is_retryable() -> None:
    with pytest.raises(AttemptFailed) as info:
        channels.send("http://127.0.0.1:1/x", PAYLOAD, timeout_s=2)
    assert info.value.retryable


def test_smtp_url_sends_mail(smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    channels.send(f"smtp://127.0.0.1:{port}/?to=ops@example.com,noc@example.com&from=t@x.org",
                  PAYLOAD)
    (envelope,) = box.messages
    assert envelope.rcpt_tos == ["ops@example.com", "noc@example.com"]
    assert envelope.mail_from == "t@x.org"
    text = envelope.content.decode()
    assert "Subject: P1" in text and "disk full" in text and "X-Tasync-Alert-Id: A1" in text


def test_mailto_uses_the_given_or_default_server(smtp: tuple[Mailbox, int],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    box, port = smtp
    channels.send(f"mailto:ops@example.com?smtp=127.0.0.1:{port}", PAYLOAD)
    monkeypatch.setenv(channels.ENV_SMTP_URL, f"127.0.0.1:{port}")
    channels.send("mailto:noc@example.com", PAYLOAD)
    assert [m.rcpt_tos for m in box.messages] == [["ops@example.com"], ["noc@example.com"]]


def test_mail_refusals_and_missing_recipients(smtp: tuple[Mailbox, int]) -> None:
    _box, port = smtp
    with pytest.raises(AttemptFailed) as refused:
        channels.send(f"smtp://127.0.0.1:{port}/?to=refused@example.com", PAYLOAD)
    assert not refused.value.retryable
    with pytest.raises(AttemptFailed, match="no recipient") as empty:
        channels.send(f"smtp://127.0.0.1:{port}/", PAYLOAD)
    assert not empty.value.retryable
    with pytest.raises(AttemptFailed) as down:
        channels.send("smtp://127.0.0.1:1/?to=a@b.c", PAYLOAD, timeout_s=2)
    assert down.value.retryable


def test_unknown_scheme_is_a_permanent_failure() -> None:
    with pytest.raises(AttemptFailed, match="no channel understands") as info:
        channels.send("nosuchscheme://x/y", PAYLOAD)
    assert not info.value.retryable


def test_apprise_handles_other_schemes(tmp_path: Path) -> None:
    # Apprise's json:// plugin posts to a web server; point it at a closed port: the attempt is
    # made (the URL was understood) and fails in a retryable way.
    with pytest.raises(AttemptFailed) as info:
        channels.send("json://127.0.0.1:1/", PAYLOAD)
    assert info.value.retryable


# -- mail by the standards: a real SMTP server (aiosmtpd) reads what an MTA would get ------------


def _received(box: Mailbox) -> Any:
    import email
    import email.policy

    (envelope,) = box.messages
    return email.message_from_bytes(envelope.original_content, policy=email.policy.default)


def test_mail_has_date_priority_and_an_intact_from_line(smtp: tuple[Mailbox, int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    box, port = smtp
    monkeypatch.setenv("TASYNC_MAIL_HOSTNAME", "alerts.example.org")
    text = "disk full on db1\nFrom the start of the day it grew\n.\nend"
    channels.send(f"smtp://127.0.0.1:{port}/?to=ops@example.com",
                  {**PAYLOAD, "text": text, "priority": 9})
    message = _received(box)
    assert message["Date"], "RFC 5322 requires a Date header"
    assert message["Message-ID"].endswith("@alerts.example.org>")
    assert message["From"] == "tasync@alerts.example.org"
    assert message["X-Priority"] == "1 (Highest)" and message["Importance"] == "high"
    body = message.get_content().replace("\r\n", "\n")
    assert "\nFrom the start of the day" in body and ">From" not in body
    assert body.rstrip("\n").endswith(".\nend")


@pytest.mark.parametrize(("priority", "x_priority", "importance"), [
    (0, "5 (Lowest)", "low"), (2, "4 (Low)", "low"), (5, "3 (Normal)", "normal"),
    (7, "2 (High)", "high"), (8, "1 (Highest)", "high"),
])
def test_mail_priority_headers_follow_the_alert(smtp: tuple[Mailbox, int], priority: int,
                                                x_priority: str, importance: str) -> None:
    box, port = smtp
    channels.send(f"smtp://127.0.0.1:{port}/?to=ops@example.com",
                  {**PAYLOAD, "priority": priority})
    message = _received(box)
    assert (message["X-Priority"], message["Importance"]) == (x_priority, importance)


def test_mail_subject_may_be_non_ascii(smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    subject = "Störung: Datenbank für Größe — 98 % voll ✓"
    channels.send(f"smtp://127.0.0.1:{port}/?to=ops@example.com", {**PAYLOAD, "subject": subject})
    (envelope,) = box.messages
    raw = envelope.original_content
    assert all(b < 128 for b in raw.split(b"\r\n\r\n", 1)[0]), "headers must be 7-bit encoded"
    assert _received(box)["Subject"] == subject


@pytest.mark.parametrize("subject", ["P1\r\nBcc: everyone@example.com", "P1\nx", "tab\there",
                                     "bell\x07", "del\x7f", "c1\x85"])
def test_mail_channel_refuses_a_subject_with_control_characters(smtp: tuple[Mailbox, int],
                                                                subject: str) -> None:
    box, port = smtp
    with pytest.raises(AttemptFailed) as info:
        channels.send(f"smtp://127.0.0.1:{port}/?to=ops@example.com",
                      {**PAYLOAD, "subject": subject})
    assert not info.value.retryable
    assert not box.messages


# -- Apprise against a local listener ------------------------------------------------------------


@pytest.mark.parametrize(("status", "retryable"), [(400, False), (404, False), (500, True),
                                                   (503, True), (429, True)])
def test_apprise_status_decides_the_retry(hook: Webhook, status: int, retryable: bool) -> None:
    hook.statuses = [status]
    with pytest.raises(AttemptFailed) as info:
        channels.send(hook.url.replace("http://", "json://"), PAYLOAD)
    assert info.value.retryable is retryable
    assert f"HTTP {status}" in str(info.value)
    assert len(hook.requests) == 1


@pytest.mark.parametrize(("priority", "kind"), [(9, "failure"), (8, "failure"), (7, "warning"),
                                                (6, "warning"), (5, "info"), (2, "info"),
                                                (1, "success"), (0, "success")])
def test_apprise_gets_the_priority_as_its_notify_type(hook: Webhook, priority: int,
                                                      kind: str) -> None:
    channels.send(hook.url.replace("http://", "json://"), {**PAYLOAD, "priority": priority})
    (request,) = hook.requests
    assert request.body["type"] == kind
    assert request.body["title"] == "P1" and request.body["message"] == "disk full"


@pytest.mark.parametrize(("statuses", "tries", "status"), [([400], 1, "failed"),
                                                            ([500] * 3, 3, "failed"),
                                                            ([500, 502], 3, "delivered")])
def test_apprise_4xx_is_tried_once_and_5xx_retried(hook: Webhook, tmp_path: Path,
                                                    statuses: list[int], tries: int,
                                                    status: str) -> None:
    from tasync.broker.alerts import Alert
    from tasync.broker.audit import Trail, read_trail
    from tasync.consumers.delivery.executor import Executor, RetryPolicy
    from tests.unit.consumers.test_delivery_resolve import Store

    hook.statuses = list(statuses)
    store = Store({"destination": {"chat": {"url": hook.url.replace("http://", "json://")}}})
    executor = Executor(node="a", store=store, trail=Trail(tmp_path, "a"),
                        policy=RetryPolicy(attempts=3, backoff_s=0.0),
                        wait=threading.Event().wait)
    alert = Alert(id="A1", source="nms", target_kind="destination", target="chat",
                  text="link down", priority=9, hosts=("a",))
    outcome = executor.run(alert)
    assert outcome.status == status and len(hook.requests) == tries
    assert {r.body["type"] for r in hook.requests} == {"failure"}
    if status == "failed":
        (line,) = [e for e in read_trail(tmp_path)
                   if e["event"] == "alert.failed"]
        assert f"HTTP {statuses[-1]}" in line["reason"] and line["attempts"] == str(tries)
