"""Fixtures shared by every test: a broker, one vhost per test, and real node processes.

Each test gets its own RabbitMQ virtual host, so tests never see each other's queues or
messages. The broker is the one at ``$TASYNC_TEST_BROKER`` or 127.0.0.1:5672 when it answers,
else a RabbitMQ container through testcontainers where a Docker engine runs.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import secret_registry
from tests.network import BrokerAdmin, Network, VhostPool


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--console-screenshots", action="store_true",
                     help="write the console's browser-test screenshots to docs/img")


@pytest.fixture(scope="session", autouse=True)
def leak_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of every session, fail if a registered secret is in any log-like file.

    Tests register the passwords and keys they make (``tests.harness.secret_registry``); the
    worker logs, trails, stderr captures and command outputs of the whole session live under
    pytest's base temporary directory, and are all scanned here, whichever tests ran.
    """
    yield
    base = tmp_path_factory.getbasetemp()
    secret_registry.check_tree(base)
    check_no_tracebacks(base)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:  # one of pytest-xdist's processes: the controller scans across them all
        secret_registry.save(base.parent / f"{SECRETS_FILE_PREFIX}{worker}.json")


#: Under pytest-xdist each worker process has a base temporary directory of its own below the
#: controller's, and knows only the secrets its own tests registered. Each worker scans its own
#: files (``leak_guard``) and leaves its secrets in this file beside them; when every worker has
#: finished, the controller scans every worker's files for every worker's secrets, so a secret
#: made in one process is looked for in the outputs of the others too.
SECRETS_FILE_PREFIX = "registered-secrets-"
#: What the controller's scan found, for the summary at the end of the run.
LEAKS = pytest.StashKey[str]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On pytest-xdist's controller, the whole session's secret scan (see ``leak_guard``)."""
    config = session.config
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return  # a worker, or no xdist: leak_guard has scanned the one session's files
    factory: pytest.TempPathFactory = config._tmp_path_factory  # type: ignore[attr-defined]
    root = factory.getbasetemp()
    saved = sorted(root.glob(f"{SECRETS_FILE_PREFIX}*.json"))
    secrets: dict[str, str] = {}
    for path in saved:
        secrets.update(secret_registry.load(path))
    try:
        secret_registry.check_tree(root, secrets)
    except secret_registry.SecretLeak as leak:
        config.stash[LEAKS] = str(leak)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    """Show the controller's cross-worker leak, if any: the run has failed because of it."""
    leak = config.stash.get(LEAKS, None)
    if leak:
        terminalreporter.section("secret leak across the session", sep="=", red=True)
        terminalreporter.write_line(leak)


def check_no_tracebacks(root: Path) -> None:
    """Fail if any command a test ran (``Network.cli``'s ``cli.out`` records) printed a traceback.

    Every error a person can meet is one line; a traceback anywhere in command output, in any
    test of the session, is a bug even when that test did not look at stderr.
    """
    found = [str(path.relative_to(root)) for path in root.rglob("cli.out")
             if "Traceback (most recent call last)" in path.read_text(errors="replace")]
    assert not found, "commands printed a traceback:\n" + "\n".join(found)


@pytest.fixture(scope="session")
def broker_admin() -> Iterator[BrokerAdmin]:
    """Where tests find RabbitMQ and how they create vhosts on it."""
    if _port_open("127.0.0.1", 5672) and shutil.which("rabbitmqctl"):
        yield BrokerAdmin(host="127.0.0.1", port=5672, ctl=["rabbitmqctl"])
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:  # pragma: no cover - depends on the machine
        pytest.skip("no RabbitMQ at 127.0.0.1:5672 and testcontainers is not installed")
    try:
        container = RabbitMqContainer("rabbitmq:3.10-management").start()
    except Exception as exc:
        pytest.skip(f"no RabbitMQ at 127.0.0.1:5672 and no Docker engine ({exc})")
    try:
        wrapped = container.get_wrapped_container()
        yield BrokerAdmin(
            host=container.get_container_host_ip(),
            port=int(container.get_exposed_port(5672)),
            ctl=["docker", "exec", wrapped.id, "rabbitmqctl"],
        )
    finally:
        container.stop()


@pytest.fixture(scope="session")
def vhost_pool(broker_admin: BrokerAdmin) -> Iterator[VhostPool]:
    """Vhosts made ahead and deleted behind the tests (``tests.network.VhostPool``)."""
    pool = VhostPool(broker_admin)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def vhost(vhost_pool: VhostPool, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh vhost for one test, deleted afterwards (its name is in the test's report)."""
    name = vhost_pool.take()
    request.node.user_properties.append(("vhost", name))
    try:
        yield name
    finally:
        vhost_pool.give_back(name)


@pytest.fixture
def broker_url(broker_admin: BrokerAdmin, vhost: str) -> str:
    """The AMQP URL of this test's vhost."""
    return broker_admin.url(vhost)


@pytest.fixture
def network(broker_url: str, tmp_path: Path) -> Iterator[Network]:
    """Start real ``tasync-worker`` processes and run ``tasync`` commands against this vhost."""
    net = Network(broker_url=broker_url, root=tmp_path)
    try:
        yield net
    finally:
        net.close()
