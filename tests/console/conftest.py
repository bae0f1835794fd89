"""Fixtures of the console's tests: one network and one console process per module, a browser.

The browser is Debian's Chromium driven by Playwright's Python package (``executable_path``:
Playwright never downloads a browser here). Browser tests skip, saying why, only where that
Chromium is missing; the console's HTTP tests run regardless.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import secret_registry
from tests.harness.intake import stop_process
from tests.network import BrokerAdmin, Network, VhostPool

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: Retries in a blink, so that a failing destination dead-letters its alert within a second.
FAST_RETRY = {"TASYNC_DELIVERY_BACKOFF_S": "0.05", "TASYNC_DELIVERY_ATTEMPTS": "3"}
#: Screenshots of the main pages, shown in docs/console.md.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "img"


@dataclass
class ConsoleServer:
    """A running ``tasync console``: its URL, its users' passwords, its stderr."""

    url: str
    passwords: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[str] = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def client(self, user: str | None = None) -> httpx.Client:
        """An HTTP client, logged in as ``user`` when one is named (as a browser would)."""
        client = httpx.Client(base_url=self.url, timeout=30.0, follow_redirects=False)
        if user is not None:
            answer = client.post("/login", data={"user": user, "password": self.passwords[user]},
                                 headers={"Origin": self.url})
            assert answer.status_code == 303, answer.text
        return client


def start_console(network: Network, root: Path, roles: dict[str, str],
                  *extra: str) -> ConsoleServer:
    """Add ``roles`` (name -> role) with fresh passwords, and start the console on a free port."""
    users_file = root / "console.users"
    passwords = {}
    for name, role in roles.items():
        passwords[name] = secrets.token_urlsafe(18)
        secret_registry.register(f"console password of {name}", passwords[name])
        network.cli("console", "add-user", name, "--role", role, "--users-file",
                    str(users_file), input=passwords[name] + "\n")
    log_path = root / "console.stderr"
    with open(log_path, "a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasync", "console", "--listen", "127.0.0.1:0",
             "--users-file", str(users_file), "--poll", "1", *extra],
            stdout=subprocess.PIPE, stderr=err, text=True, env=network.env)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    assert address, f"the console did not start: {log_path.read_text()[-2000:]}"
    return ConsoleServer(f"http://{address}", passwords, log_path, proc)


@pytest.fixture(scope="module")
def trio(vhost_pool: VhostPool, broker_admin: BrokerAdmin,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """Nodes a (master), b and c, shared by the tests of one module; quick to dead-letter.

    Route ``ab`` (a, then b) exists from the start: the alert pages' tests send along it, and
    each must pass alone (``-k``) or on another test process than the others.
    """
    vhost = vhost_pool.take()
    network = Network(broker_url=broker_admin.url(vhost),
                      root=tmp_path_factory.mktemp("console-network"))
    try:
        network.start("a", role="master", env=FAST_RETRY).wait_ready()
        for name in ("b", "c"):
            network.start(name, env=FAST_RETRY).wait_ready()
        network.cli("config", "set", "route", "ab", "--host", "a", "--host", "b",
                    "--wait-applied")
        yield network
    finally:
        network.close()
        vhost_pool.give_back(vhost)


@pytest.fixture(scope="module")
def console(trio: Network) -> Iterator[ConsoleServer]:
    """A console on ``trio`` with an admin (alice), an operator (olga) and a viewer (victor)."""
    server = start_console(trio, trio.root, {"alice": "admin", "olga": "operator",
                                             "victor": "viewer"})
    try:
        yield server
    finally:
        # uvicorn stops gracefully on SIGTERM, then raises the signal again: -15 is a clean end.
        assert stop_process(server.proc) in (0, -15), server.log()[-2000:]
        assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, one for the module."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package "
                    "(scripts/setup.sh --test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def log_in(browser: Any, console: ConsoleServer, user: str) -> Any:
    """A new browser page (its own cookies) logged in as ``user``, on the network page."""
    context = browser.new_context(viewport={"width": 1200, "height": 720})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(console.url + "/login")
    page.fill("#user", user)
    page.fill("#password", console.passwords[user])
    page.click("form.login button")
    page.wait_for_url("**/network")
    return page


#: Where ``screenshot`` writes: docs/img with ``--console-screenshots``, else a temporary
#: directory, so an ordinary test run leaves the checkout as it was.
_SHOTS_DIR: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def screenshots_dir(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = (SCREENSHOTS if request.config.getoption("--console-screenshots")
              else tmp_path_factory.mktemp("console-screenshots"))
    _SHOTS_DIR[:] = [chosen]
    return chosen


def screenshot(page: Any, name: str) -> None:
    """Save the whole page as console-NAME.png (docs/img with ``--console-screenshots``)."""
    target = _SHOTS_DIR[0] / f"console-{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 0, f"empty screenshot {target}"
