import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from consumers.delivery import channels
from consumers.delivery.channels import ChannelError

PAYLOAD = {"id": "A1", "destination": "d", "text": "disk full", "subject": "P1",
           "source": "nms", "node": "a", "delivered_at": 1.0}


class Hook:
    """A local webhook answering from a script of status codes."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests.append({"body": json.loads(body), "headers": dict(self.headers),
                                      "path": self.path})
                status = hook.statuses.pop(0) if hook.statuses else 200
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "http://127.0.0.1:1/")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook([])
    yield server
    server.close()


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
    with pytest.raises(ChannelError) as missing:
        channels.send(f"file://{tmp_path}/no/such/dir/x.jsonl", PAYLOAD)
    assert missing.value.retryable
    with pytest.raises(ChannelError) as remote:
        channels.send("file://server/share/x", PAYLOAD)
    assert not remote.value.retryable


def test_webhook_posts_json_with_idempotency_key(hook: Hook) -> None:
    channels.send(hook.url, PAYLOAD)
    (request,) = hook.requests
    assert request["body"] == PAYLOAD
    assert request["headers"]["Idempotency-Key"] == "A1"
    assert request["headers"]["Content-Type"] == "application/json"


def test_webhook_basic_auth_from_url(hook: Hook) -> None:
    channels.send(hook.url.replace("http://", "http://user:s%40cret@"), PAYLOAD)
    assert hook.requests[0]["headers"]["Authorization"] == "Basic dXNlcjpzQGNyZXQ="


@pytest.mark.parametrize(("status", "retryable"), [
    (500, True), (503, True), (429, True), (404, False), (400, False), (302, False),
])
def test_webhook_failures_say_whether_to_retry(hook: Hook, status: int, retryable: bool) -> None:
    hook.statuses = [status]
    with pytest.raises(ChannelError) as info:
        channels.send(hook.url.replace("/hook", "/hook?token=SECRET"), PAYLOAD)
    assert info.value.retryable is retryable
    assert str(status) in str(info.value)
    assert "SECRET" not in str(info.value)


def test_webhook_unreachable_is_retryable() -> None:
    with pytest.raises(ChannelError) as info:
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
    with pytest.raises(ChannelError) as refused:
        channels.send(f"smtp://127.0.0.1:{port}/?to=refused@example.com", PAYLOAD)
    assert not refused.value.retryable
    with pytest.raises(ChannelError, match="no recipient") as empty:
        channels.send(f"smtp://127.0.0.1:{port}/", PAYLOAD)
    assert not empty.value.retryable
    with pytest.raises(ChannelError) as down:
        channels.send("smtp://127.0.0.1:1/?to=a@b.c", PAYLOAD, timeout_s=2)
    assert down.value.retryable


def test_unknown_scheme_is_a_permanent_failure() -> None:
    with pytest.raises(ChannelError, match="no channel understands") as info:
        channels.send("nosuchscheme://x/y", PAYLOAD)
    assert not info.value.retryable


def test_apprise_handles_other_schemes(tmp_path: Path) -> None:
    # Apprise's json:// plugin posts to a web server; point it at a closed port: the attempt is
    # made (the URL was understood) and fails in a retryable way.
    with pytest.raises(ChannelError) as info:
        channels.send("json://127.0.0.1:1/", PAYLOAD)
    assert info.value.retryable
