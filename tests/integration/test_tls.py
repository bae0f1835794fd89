"""TLS to the broker (amqps://, CA file, client certificate).

Runs against a private RabbitMQ node started for this module (``tests.harness.tls_broker``)
with a test CA made by openssl, a TLS listener and ``fail_if_no_peer_cert``; the system broker
is not touched. Skipped with the reason when rabbitmq-server or openssl is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasync.broker import topology
from tasync.broker.connection import close_quietly, connect
from tasync.broker.errors import BrokerUnreachable, ConfigError
from tasync.broker.publisher import ConfirmedPublisher, Outgoing
from tasync.broker.settings import Settings, TlsFiles
from tasync.broker.tls import check_tls_urls, tls_files
from tests.harness.rabbit_cluster import unavailable_reason
from tests.harness.tls_broker import Pki, TlsBroker
from tests.network import Network

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TlsBroker]:
    reason = unavailable_reason()
    if reason is None and shutil.which("openssl") is None:
        reason = "openssl is not installed"
    if reason is not None:
        pytest.skip(f"private TLS RabbitMQ node unavailable: {reason}")
    with TlsBroker() as broker:
        yield broker


@pytest.fixture
def pki(tls_broker: TlsBroker) -> Pki:
    assert tls_broker.pki is not None
    return tls_broker.pki


def settings_for(url: str, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None) -> Settings:
    return Settings.from_url(url, tls=tls_files(ca, cert, key, environ=TlsFiles()),
                             connect_timeout_s=5.0)


def broker_cli(*args: str, env: dict[str, str] | None = None,
               log: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASYNC_SSL_")}
    out = subprocess.run([sys.executable, "-m", "tasync.cli_broker", *args], capture_output=True,
                         text=True, timeout=120, env={**clean, **(env or {})}, check=False)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    return out


def unreachable(settings: Settings) -> str:
    with pytest.raises(BrokerUnreachable) as info:
        conn = connect(settings, retry_s=2.0)
        close_quietly(conn)
    return str(info.value)


def test_amqps_with_ca_and_client_certificate_works(tls_broker: TlsBroker, pki: Pki) -> None:
    settings = settings_for(tls_broker.tls_url(), pki.ca, pki.client_cert, pki.client_key)
    conn = connect(settings, retry_s=10.0)
    try:
        channel = conn.channel()
        topology.declare_all(channel, settings)
        topology.declare_alert_queue(channel, ["tls1"])
        publisher = ConfirmedPublisher(conn, timeout_s=10.0)
        publisher.publish(Outgoing(exchange=topology.ALERTS_EXCHANGE, routing_key="tls1",
                                   body=b"{}", mandatory=True))
        ok = channel.queue_declare(topology.alert_queue(["tls1"]), passive=True)
        assert ok.message_count == 1
        assert conn.connection.transport.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        close_quietly(conn)


def test_cli_takes_tls_files_from_options_and_environment(tls_broker: TlsBroker, pki: Pki,
                                                          tmp_path: Path) -> None:
    url = tls_broker.tls_url()
    by_option = broker_cli("setup", "--broker", url, "--ca-file", str(pki.ca),
                           "--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key),
                           log=tmp_path / "setup-options.stderr")
    assert by_option.returncode == 0, by_option.stderr
    assert "topology declared on amqps://guest:***@127.0.0.1" in by_option.stdout
    by_env = broker_cli("setup", "--broker", url, env={
        "TASYNC_SSL_CA_FILE": str(pki.ca), "TASYNC_SSL_CERT_FILE": str(pki.client_cert),
        "TASYNC_SSL_KEY_FILE": str(pki.client_key)}, log=tmp_path / "setup-env.stderr")
    assert by_env.returncode == 0, by_env.stderr


def test_without_client_certificate_fails_with_a_clear_message(tls_broker: TlsBroker, pki: Pki,
                                                               tmp_path: Path) -> None:
    message = unreachable(settings_for(tls_broker.tls_url(), pki.ca))
    assert "broker unreachable at amqps://guest:***@127.0.0.1" in message
    # TLS 1.3 alert "certificate required", or a plain close, depending on timing.
    assert "TLS: " in message and "client certificate" in message
    out = broker_cli("setup", "--broker", tls_broker.tls_url(), "--ca-file", str(pki.ca),
                     log=tmp_path / "setup-nocert.stderr")
    assert out.returncode == 3
    assert out.stderr.startswith("tasync: broker unreachable at amqps://guest:***@")
    assert "client certificate" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_untrusted_broker_certificate_is_refused(tls_broker: TlsBroker, pki: Pki) -> None:
    message = unreachable(settings_for(tls_broker.tls_url(), pki.other_ca, pki.client_cert,
                                       pki.client_key))
    assert "certificate was not accepted" in message
    assert "check --ca-file" in message


def test_client_certificate_from_another_ca_is_refused(tls_broker: TlsBroker, pki: Pki) -> None:
    message = unreachable(settings_for(tls_broker.tls_url(), pki.ca, pki.other_client_cert,
                                       pki.other_client_key))
    # The broker either sends an "unknown CA" alert or just closes the connection (it varies).
    assert "TLS: " in message and "client certificate" in message


def test_broker_host_name_is_verified(tls_broker: TlsBroker, pki: Pki) -> None:
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = ""
    if host in ("localhost", "127.0.0.1") or address != "127.0.0.1":
        pytest.skip(f"no second name for 127.0.0.1 here ({host} -> {address or 'unresolved'})")
    message = unreachable(settings_for(tls_broker.tls_url(host=host), pki.ca, pki.client_cert,
                                       pki.client_key))
    assert "certificate was not accepted" in message
    assert "mismatch" in message.lower()


def test_plain_port_with_amqps_says_so(tls_broker: TlsBroker, pki: Pki) -> None:
    plain_port = tls_broker.plain_url().rsplit(":", 1)[1].split("/")[0]
    url = f"amqps://guest:guest@127.0.0.1:{plain_port}/%2F"
    message = unreachable(settings_for(url, pki.ca, pki.client_cert, pki.client_key))
    assert "broker unreachable at amqps://guest:***@" in message
    assert "TLS" in message, message


def test_tls_files_need_an_amqps_url(tmp_path: Path, pki: Pki) -> None:
    out = broker_cli("setup", "--broker", "amqp://guest:guest@127.0.0.1:5672/%2F",
                     "--ca-file", str(pki.ca), log=tmp_path / "setup-plain.stderr")
    assert out.returncode == 2
    assert "no broker URL is amqps://" in out.stderr
    with pytest.raises(ConfigError, match="not a readable file"):
        tls_files(ca_file=tmp_path / "missing.pem", environ=TlsFiles())
    with pytest.raises(ConfigError, match="--key-file needs --cert-file"):
        tls_files(key_file=pki.client_key, environ=TlsFiles())
    with pytest.raises(ConfigError, match="TASYNC_SSL_CA_FILE"):
        tls_files(environ=TlsFiles.from_env({"TASYNC_SSL_CA_FILE": str(tmp_path / "nope.pem")}))
    check_tls_urls(("amqps://h/",), TlsFiles(ca_file="x"))
    with pytest.raises(ConfigError):
        check_tls_urls(("amqp://h/",), TlsFiles(ca_file="x"))


def test_a_network_runs_over_tls_from_the_environment_alone(tls_broker: TlsBroker, pki: Pki,
                                                            tmp_path: Path) -> None:
    """Workers and commands find the TLS files in ``$TASYNC_SSL_*``; no option names them."""
    network = Network(broker_url=tls_broker.tls_url(), root=tmp_path)
    network.env.update({"TASYNC_SSL_CA_FILE": str(pki.ca),
                        "TASYNC_SSL_CERT_FILE": str(pki.client_cert),
                        "TASYNC_SSL_KEY_FILE": str(pki.client_key)})
    try:
        network.start("tlsa", role="master").wait_ready()
        network.start("tlsb").wait_ready()
        network.cli("config", "set", "destination", "over-tls", "--url",
                    f"file://{tmp_path}/out.jsonl", "--wait-applied")
        assert network.export("tlsa") == network.export("tlsb")
        assert "over-tls" in network.export("tlsb")
    finally:
        network.close()
