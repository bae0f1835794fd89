"""The console's pieces without a network: mounting, guards, origins, forms and field errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tasync.broker.settings import Settings
from tasync.console.app import console_part
from tasync.console.config_view import GENERAL, body_from_form, check, field_errors
from tasync.console.sessions import Sessions, csrf_ok, same_origin
from tasync.console.users import add_user
from tasync.intake_app import open_intake
from tasync.producers.intake import IntakeConfig
from tasync.web import build_app

#: Nothing listens here: the console and the intake must still serve their pages.
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"


def test_the_console_mounts_beside_the_intake(tmp_path: Path) -> None:
    add_user(tmp_path / "users", "alice", "admin", "correct horse")
    settings = Settings.from_env(NO_BROKER, connect_timeout_s=0.5, connect_retry_s=0.5)
    with open_intake(IntakeConfig(default_hosts=("a",)), settings) as intake:
        app = build_app([intake, console_part(settings, tmp_path / "users",
                                              prefix="/console")])
        client = TestClient(app, base_url="http://console.test")
        login = client.get("/console/login")
        assert login.status_code == 200 and 'action="/console/login"' in login.text
        assert "script-src 'self'" in login.headers["content-security-policy"]
        assert client.get("/console/static/htmx.min.js").status_code == 200
        assert client.post("/alerts", json={}).headers["content-type"].startswith(
            "application/json")  # still the intake's, not a console page
        answer = client.post("/console/login", data={"user": "alice", "password":
                                                     "correct horse"},
                             headers={"Origin": "http://console.test"}, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/network"
        assert "Path=/console" in answer.headers["set-cookie"]
        page = client.get("/console/network")
        assert "Cannot ask the network" in page.text and "guest:guest" not in page.text


def test_a_login_from_another_site_is_refused(tmp_path: Path) -> None:
    add_user(tmp_path / "users", "alice", "admin", "correct horse")
    app = build_app([console_part(Settings.from_env(NO_BROKER), tmp_path / "users")])
    client = TestClient(app, base_url="http://console.test")
    answer = client.post("/login", data={"user": "alice", "password": "correct horse"},
                         headers={"Origin": "http://elsewhere.test"}, follow_redirects=False)
    assert answer.status_code == 403 and "set-cookie" not in answer.headers


@pytest.mark.parametrize(("headers", "same"), [
    ({"host": "c:80", "origin": "http://c:80"}, True),
    ({"host": "c:80", "origin": "http://evil:80"}, False),
    ({"host": "c:80", "origin": "null"}, False),
    ({"host": "c:80", "referer": "http://c:80/config"}, True),
    ({"host": "c:80", "referer": "http://evil/"}, False),
    ({"host": "c:80", "sec-fetch-site": "cross-site"}, False),
    ({"host": "c:80"}, True),
])
def test_same_origin(headers: dict[str, str], same: bool) -> None:
    assert same_origin(headers) is same


def test_sessions_end_and_csrf_tokens_are_theirs() -> None:
    sessions = Sessions(ttl_s=60)
    one, two = sessions.create("alice"), sessions.create("alice")
    assert sessions.get(one.token) is one and one.csrf != two.csrf
    assert csrf_ok(one, one.csrf) and not csrf_ok(one, two.csrf) and not csrf_ok(one, None)
    sessions.drop(one.token)
    assert sessions.get(one.token) is None and sessions.get(two.token) is two
    ended = Sessions(ttl_s=-1)
    assert ended.get(ended.create("x").token) is None


def test_a_form_becomes_a_body_and_its_errors_go_beside_fields() -> None:
    body, errors = body_from_form("group", {"members": " a\n\nb \n", "mode": "sequence"})
    assert body == {"members": ["a", "b"], "mode": "sequence"} and errors == {}
    _, errors = body_from_form("schedule", {"windows": "[{"})
    assert errors["windows"].startswith("not valid JSON")
    _, errors = check("destination", "bad name", {"url": "x", "subject": "a\x01"})
    assert set(errors) == {"name", "subject"} and "U+0001" in errors["subject"]
    _, errors = check("schedule", "office", {"timezone": "Mars/Base", "windows":
                                              '[{"days": ["mon"], "start": "09:00", '
                                              '"end": "08:00"}]'})
    assert "unknown time zone" in errors["timezone"]
    assert errors["windows"] == "0: end: start must be before end"
    body = {"url": "file:///x", "schedule": "nights"}
    assert field_errors("destination", body, "refused", {"references": [
        "destination d: schedule 'nights' does not exist"]}) == {
        "schedule": "destination d: schedule 'nights' does not exist"}
    assert field_errors("destination", body, "refused", {}) == {GENERAL: "refused"}
