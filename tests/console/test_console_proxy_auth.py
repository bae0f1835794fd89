"""Logging in through a reverse proxy's header, over HTTP against real console processes.

One node is enough: what is tested is whom the console believes, and what it lets them do.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.console.conftest import ConsoleServer, start_console
from tests.harness import secret_registry
from tests.harness.intake import stop_process
from tests.network import BrokerAdmin, Network, VhostPool

pytestmark = pytest.mark.integration

HEADER = "X-Remote-User"
ROLES = {"alice": "admin", "victor": "viewer"}


@pytest.fixture(scope="module")
def solo(vhost_pool: VhostPool, broker_admin: BrokerAdmin,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """One node, the master."""
    vhost = vhost_pool.take()
    network = Network(broker_url=broker_admin.url(vhost),
                      root=tmp_path_factory.mktemp("proxy-auth-network"))
    try:
        network.start("a", role="master").wait_ready()
        yield network
    finally:
        network.close()
        vhost_pool.give_back(vhost)


def console_with(network: Network, name: str, *extra: str) -> ConsoleServer:
    root = network.root / name
    root.mkdir()
    return start_console(network, root, ROLES, *extra)


@pytest.fixture(scope="module")
def proxied(solo: Network) -> Iterator[ConsoleServer]:
    """A console on loopback believing ``HEADER`` from loopback peers."""
    server = console_with(solo, "proxied", "--auth-header", HEADER)
    try:
        yield server
    finally:
        assert stop_process(server.proc) in (0, -15), server.log()[-2000:]
        assert "Traceback" not in server.log(), server.log()


def who(page: httpx.Response) -> str:
    found = re.search(r'<span id="who">([^<]*)</span>', page.text)
    return found.group(1) if found else ""


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


def destinations(network: Network) -> set[str]:
    shown = json.loads(network.cli("config", "show", "destination", "--json").stdout)
    return {o["name"] for o in shown}


def test_the_header_of_a_trusted_proxy_names_the_user_and_the_role_applies(
        proxied: ConsoleServer) -> None:
    with proxied.client() as client:
        page = client.get("/network", headers={HEADER: "victor"})
        assert page.status_code == 200 and who(page) == "victor (viewer)"
        assert "tasync_console=" in page.headers["set-cookie"]  # a session for the CSRF token
        refused = client.get("/config/destination/new", headers={HEADER: "victor"})
        assert refused.status_code == 403 and "your role (viewer) may not" in refused.text
    with proxied.client() as client:
        form = client.get("/config/destination/new", headers={HEADER: "alice"})
        assert form.status_code == 200 and who(form) == "alice (admin)"
        login = client.get("/login", headers={HEADER: "alice"})
        assert login.status_code == 303 and login.headers["location"].endswith("/network")
    log = proxied.log()
    assert "'victor' signed in by the proxy (viewer)" in log
    assert "'alice' signed in by the proxy (admin)" in log


def test_an_unknown_user_is_refused_and_no_header_falls_back_to_the_login(
        proxied: ConsoleServer) -> None:
    with proxied.client() as client:
        for name in ("mallory", "<script>alert(1)</script>"):
            answer = client.get("/network", headers={HEADER: name})
            assert answer.status_code == 403, name
            assert "users file does not know" in answer.text
            assert "<script>alert" not in answer.text  # shown as text
            assert "set-cookie" not in answer.headers
        assert client.get("/login", headers={HEADER: "mallory"}).status_code == 403
        answer = client.get("/network")
        assert answer.status_code == 303 and answer.headers["location"].endswith("/login")
        assert client.get("/network", headers={HEADER: ""}).status_code == 303
        # the password login still works beside the proxy
        logged_in = client.post("/login", data={"user": "victor",
                                                "password": proxied.passwords["victor"]},
                                headers={"Origin": proxied.url})
        assert logged_in.status_code == 303
        assert who(client.get("/network")) == "victor (viewer)"
    assert "refused 'mallory' named by the proxy: not in the users file" in proxied.log()


def test_a_change_through_the_proxy_still_needs_the_csrf_token_and_the_origin(
        proxied: ConsoleServer, solo: Network) -> None:
    as_alice = {HEADER: "alice", "Origin": proxied.url}
    new = {"name": "via-proxy", "url": "file:///tmp/via-proxy.jsonl"}
    with proxied.client() as client:
        # a forged form: the browser sends the proxy's credentials, but not the token
        forged = client.post("/config/destination/new", data=new, headers=as_alice)
        assert forged.status_code == 403 and "expired" in forged.text
        token = csrf_of(client.get("/config/destination/new", headers={HEADER: "alice"}))
        elsewhere = client.post("/config/destination/new", data={**new, "csrf": token},
                                headers={**as_alice, "Origin": "http://attacker.test"})
        assert elsewhere.status_code == 403 and "another site" in elsewhere.text
        assert "via-proxy" not in destinations(solo)
        # the token of another user's session does not pass for alice's
        victors = csrf_of(client.get("/network", headers={HEADER: "victor"}))
        swapped = client.post("/config/destination/new", data={**new, "csrf": victors},
                              headers=as_alice)
        assert swapped.status_code == 403 and "via-proxy" not in destinations(solo)

    with proxied.client() as client:
        token = csrf_of(client.get("/config/destination/new", headers={HEADER: "alice"}))
        saved = client.post("/config/destination/new", data={**new, "csrf": token},
                            headers=as_alice)
        assert saved.status_code == 303, saved.text
        assert "via-proxy" in destinations(solo)
        viewer_token = csrf_of(client.get("/network", headers={HEADER: "victor"}))
        refused = client.post("/config/destination/via-proxy/delete",
                              data={"csrf": viewer_token},
                              headers={HEADER: "victor", "Origin": proxied.url})
        assert refused.status_code == 403 and "your role (viewer) may not" in refused.text
    assert "via-proxy" in destinations(solo)


def test_the_header_is_ignored_from_a_peer_that_is_not_a_trusted_proxy(
        solo: Network) -> None:
    plain = console_with(solo, "plain")  # no --auth-header: the header means nothing
    picky = console_with(solo, "picky", "--auth-header", HEADER, "--trusted-proxy",
                         "127.0.0.2")
    try:
        for server in (plain, picky):
            with server.client() as client:
                answer = client.get("/network", headers={HEADER: "alice"})
                assert answer.status_code == 303, server.url
                assert answer.headers["location"].endswith("/login")
        assert "ignored x-remote-user from 127.0.0.1, which is not a trusted proxy" in \
            picky.log()
        # from the trusted proxy's address, the same header is believed
        port = picky.url.rsplit(":", 1)[1]
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=transport,
                          follow_redirects=False) as client:
            answer = client.get("/network", headers={HEADER: "alice",
                                                     "X-Forwarded-For": "127.0.0.1"})
            assert answer.status_code == 200 and who(answer) == "alice (admin)"
        # X-Forwarded-For does not make a peer a trusted proxy
        with picky.client() as client:
            answer = client.get("/network", headers={HEADER: "alice",
                                                     "X-Forwarded-For": "127.0.0.2"})
            assert answer.status_code == 303
    finally:
        for server in (plain, picky):
            assert stop_process(server.proc) in (0, -15), server.log()[-2000:]
            assert "Traceback" not in server.log(), server.log()


def test_the_header_is_refused_off_loopback_without_a_trusted_proxy(
        solo: Network, tmp_path: Path) -> None:
    users = tmp_path / "console.users"
    password = secrets.token_urlsafe(18)
    secret_registry.register("console password of alice (off loopback)", password)
    solo.cli("console", "add-user", "alice", "--role", "admin", "--users-file", str(users),
             input=password + "\n")
    done = solo.cli("console", "--listen", "0.0.0.0:0", "--users-file", str(users),
                    "--auth-header", HEADER, check=False)
    assert done.returncode == 2
    assert "needs --trusted-proxy" in done.stderr
    done = solo.cli("console", "--users-file", str(users), "--auth-header", HEADER,
                    "--trusted-proxy", "not-an-address", check=False)
    assert done.returncode == 2 and "'not-an-address' is not an IP address" in done.stderr
    done = solo.cli("console", "--users-file", str(users), "--trusted-proxy", "10.0.0.1",
                    check=False)
    assert done.returncode == 2 and "only means something with --auth-header" in done.stderr
