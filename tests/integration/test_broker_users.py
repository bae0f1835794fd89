"""Per-node broker users with least privilege, and identity on the wire.

Each test gets its own vhost; the users it creates are global to the broker, so their names
carry a random tag and the fixture deletes them afterwards.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp
import amqp.exceptions
import click
import pytest

from tasync.broker import topology
from tasync.broker.connection import close_quietly, connect, ensure
from tasync.broker.errors import AccessDenied, TopologyMissing
from tasync.broker.permissions import Account, node_permissions, permissions_for
from tasync.broker.publisher import ConfirmedPublisher, Outgoing
from tasync.broker.settings import Settings
from tasync.cli_broker import plan_accounts
from tests.harness import secret_registry
from tests.network import BrokerAdmin, Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


@dataclass
class Users:
    """The accounts of one test network and what ``broker setup --users`` wrote."""

    master: str
    backup: str
    admin: str
    sender: str
    credentials: Path
    setup_stdout: str

    def url(self, user: str) -> str:
        data = json.loads(self.credentials.read_text())
        return str(data["users"][user]["url"])

    def password(self, user: str) -> str:
        data = json.loads(self.credentials.read_text())
        return str(data["users"][user]["password"])


def broker_setup(admin: BrokerAdmin, broker_url: str, *args: str, log: Path | None = None,
                 ) -> subprocess.CompletedProcess[str]:
    """``tasync broker setup --broker URL ARGS`` through the module, as an operator runs it."""
    cmd = [sys.executable, "-m", "tasync.cli_broker", "setup", "--broker", broker_url,
           "--rabbitmqctl", " ".join(admin.ctl), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if log is not None:
        log.with_suffix(".stdout").write_text(out.stdout)
        log.with_suffix(".stderr").write_text(out.stderr)
    return out


@pytest.fixture
def users(broker_admin: BrokerAdmin, broker_url: str, tmp_path: Path) -> Iterator[Users]:
    tag = uuid.uuid4().hex[:6]
    made = Users(master=f"m{tag}", backup=f"b{tag}", admin=f"ops{tag}", sender=f"snd{tag}",
                 credentials=tmp_path / "credentials.json", setup_stdout="")
    try:
        out = broker_setup(broker_admin, broker_url, "--users", "--master", made.master,
                           "--node", made.backup, "--admin", made.admin, "--sender", made.sender,
                           "--credentials-out", str(made.credentials), log=tmp_path / "setup")
        assert out.returncode == 0, out.stderr
        made.setup_stdout = out.stdout
        for user in (made.master, made.backup, made.admin, made.sender):
            secret_registry.register(f"password of broker user {user}", made.password(user))
        yield made
    finally:
        for user in (made.master, made.backup, made.admin, made.sender):
            subprocess.run([*broker_admin.ctl, "delete_user", user], capture_output=True,
                           check=False, timeout=120)


def connection(url: str) -> Any:
    return connect(Settings.from_url(url), retry_s=5.0)


def publish(url: str, message: Outgoing) -> None:
    """Publish one message with confirms on a connection of its own."""
    conn = connection(url)
    try:
        ConfirmedPublisher(conn, timeout_s=10.0).publish(message)
    finally:
        close_quietly(conn)


def refused(fn: Callable[[], object]) -> str:
    with pytest.raises(amqp.exceptions.AccessRefused) as info:
        fn()
    return str(info.value)


def config_message(user_id: str | None = None) -> Outgoing:
    return Outgoing(exchange=topology.CONFIG_EXCHANGE, routing_key="", body=b"{}",
                    user_id=user_id)


# -- part 1: the users and their permissions ------------------------------------------------------


def test_setup_creates_least_privilege_users(users: Users, broker_admin: BrokerAdmin,
                                             vhost: str) -> None:
    assert stat.S_IMODE(users.credentials.stat().st_mode) == 0o600
    data = json.loads(users.credentials.read_text())
    assert data["vhost"] == vhost
    assert set(data["users"]) == {users.master, users.backup, users.admin, users.sender}
    for user in data["users"]:
        assert users.password(user) not in users.setup_stdout
        assert users.url(user).startswith(f"amqp://{user}:")
    assert f"user {users.master}" in users.setup_stdout and "created" in users.setup_stdout

    perms = {p["user"]: p for p in json.loads(broker_admin.rabbitmqctl(
        "list_permissions", "-p", vhost, "--formatter", "json", "-q"))}
    expected = {
        users.master: Account(users.master, "node", master_capable=True),
        users.backup: Account(users.backup, "node"),
        users.admin: Account(users.admin, "admin"),
        users.sender: Account(users.sender, "sender"),
    }
    for user, account in expected.items():
        want = permissions_for(account)
        got = perms[user]
        assert (got["configure"], got["write"], got["read"]) == (want.configure, want.write,
                                                                 want.read)
    tags = {u["user"]: u["tags"] for u in json.loads(broker_admin.rabbitmqctl(
        "list_users", "--formatter", "json", "-q"))}
    assert tags[users.master] == [] and tags[users.backup] == [] and tags[users.sender] == []
    assert tags[users.admin] == ["management"]
    topics = {t["user"]: t for t in json.loads(broker_admin.rabbitmqctl(
        "list_topic_permissions", "-p", vhost, "--formatter", "json", "-q"))}
    assert topics[users.backup]["read"] == f"^(all|node\\.{users.backup})$"
    assert "master" in topics[users.master]["read"]


def test_setup_is_idempotent_and_keeps_passwords(users: Users, broker_admin: BrokerAdmin,
                                                 broker_url: str, tmp_path: Path) -> None:
    before = users.credentials.read_text()
    out = broker_setup(broker_admin, broker_url, "--users", "--master", users.master,
                       "--node", users.backup, "--admin", users.admin, "--sender", users.sender,
                       "--credentials-out", str(users.credentials), "--json",
                       log=tmp_path / "setup-again")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {row["action"] for row in report["users"]} == {"unchanged"}
    assert report["passwords_written"] == 0
    assert json.loads(users.credentials.read_text())["users"] == json.loads(before)["users"]
    close_quietly(connection(users.url(users.backup)))  # the old password still works


def test_a_second_network_on_the_broker_needs_its_own_user_names(
        broker_admin: BrokerAdmin, broker_url: str, vhost: str, tmp_path: Path) -> None:
    """Users are broker-wide: a second vhost with the same node name is refused, whole."""
    tag = uuid.uuid4().hex[:6]
    first, second = f"m{tag}", f"t-second-network-{tag}"
    broker_admin.add_vhost(second)
    try:
        made = tmp_path / "first.json"
        out = broker_setup(broker_admin, broker_url, "--users", "--master", first,
                           "--credentials-out", str(made), log=tmp_path / "setup-first")
        assert out.returncode == 0, out.stderr
        secret_registry.register(f"password of broker user {first}",
                                 json.loads(made.read_text())["users"][first]["password"])

        shared = tmp_path / "second-shared.json"
        out = broker_setup(broker_admin, broker_admin.url(second), "--users", "--master",
                           first, "--credentials-out", str(shared),
                           log=tmp_path / "setup-shared")
        assert out.returncode == 1, out.stdout
        assert out.stderr.strip() == (
            f"tasync: broker user {first!r} already has permissions on virtual host "
            f"{vhost!r}: RabbitMQ users are broker-wide, so a second tasync network on this "
            "broker needs its own node, admin and sender names (nothing was changed)")
        assert not shared.exists()
        perms = json.loads(broker_admin.rabbitmqctl("list_permissions", "-p", second,
                                                    "--formatter", "json", "--quiet"))
        assert {p["user"] for p in perms} == {"guest"}, "the refused run changed permissions"
    finally:
        subprocess.run([*broker_admin.ctl, "delete_user", first], capture_output=True,
                       check=False, timeout=120)
        broker_admin.delete_vhost(second)


def test_setup_usage_errors_are_clear(broker_admin: BrokerAdmin, broker_url: str,
                                         tmp_path: Path) -> None:
    creds = str(tmp_path / "c.json")
    cases = [  # click's usage errors: "Usage: ...", "Error: <one line>", exit 2
        (("--users", "--node", "a", "--credentials-out", creds), 2, "who may act as master"),
        (("--users", "--master", "a"), 2, "--credentials-out"),
        (("--node", "a"), 2, "only make sense with --users"),
        (("--users", "--master", "a.b", "--credentials-out", creds), 2, "invalid"),
        (("--users", "--master", "a", "--admin", "a", "--credentials-out", creds), 2, "twice"),
    ]
    for args, code, text in cases:
        out = broker_setup(broker_admin, broker_url, *args, log=tmp_path / "usage")
        assert out.returncode == code, (args, out.stderr)
        assert text in out.stderr and "Traceback" not in out.stderr
    cmd = [sys.executable, "-m", "tasync.cli_broker", "setup", "--broker", broker_url, "--users",
           "--master", f"x{uuid.uuid4().hex[:6]}", "--credentials-out", creds,
           "--rabbitmqctl", "/nonexistent/rabbitmqctl"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("tasync: /nonexistent/rabbitmqctl not found: run")
    assert len(out.stderr.strip().splitlines()) == 1


def test_master_capability_comes_from_the_hosts_file(tmp_path: Path) -> None:
    hosts = tmp_path / "tasync.hosts"
    hosts.write_text("# masters\n!rogue\nprimary\nsecondary\nnode-*\n10.0.0.0/8\n")
    accounts = plan_accounts(nodes=["rogue", "b"], hosts_file=hosts, single_master=None,
                             admins=["ops"], senders=["remedy"])
    roles = {a.name: (a.role, a.master_capable) for a in accounts}
    assert roles == {"rogue": ("node", False), "b": ("node", False),
                     "primary": ("node", True), "secondary": ("node", True),
                     "ops": ("admin", False), "remedy": ("sender", False)}
    deny_all = tmp_path / "none.hosts"
    deny_all.write_text("!b\n")
    with pytest.raises(click.UsageError, match="no node may act as master"):
        plan_accounts(nodes=["b"], hosts_file=deny_all, single_master=None, admins=[],
                      senders=[])


def test_permission_patterns_match_exactly_the_intended_names() -> None:
    def ok(pattern: str, name: str) -> bool:  # RabbitMQ: unanchored PCRE search
        return re.search(pattern, name) is not None

    b = node_permissions("b-1", master_capable=False)
    for name in ("tasync.sync.b-1", "tasync.control.b-1", "tasync.alerts.b-1",
                 "tasync.alerts.a.b-1", "tasync.alerts.b-1.c", "tasync.alerts.a.b-1.c_2"):
        assert ok(b.configure, name), name
    for name in ("tasync.sync.b-12", "tasync.sync.a", "tasync.alerts.a.b-12",
                 "tasync.alerts.xb-1", "tasync.config", "tasync.alerts", "tasync.sync.b-1x"):
        assert not ok(b.configure, name), name
    assert not ok(b.write, "tasync.config") and ok(b.write, "amq.default")
    assert ok(node_permissions("a", master_capable=True).write, "tasync.config")
    admin = permissions_for(Account("ops", "admin"))
    assert not ok(admin.write, "tasync.config")
    assert ok(admin.write, "tasync.config2") and ok(admin.write, "amq.default")
    sender = permissions_for(Account("s", "sender"))
    assert ok(sender.write, "tasync.alerts") and not ok(sender.write, "tasync.alerts.a")
    assert not ok(sender.write, "amq.default") and sender.read == "^$"


# -- part 2: identity on the wire ----------------------------------------------------------------


def test_forged_user_id_is_refused_by_the_broker(broker_url: str) -> None:
    conn = connection(broker_url)
    try:
        topology.declare_all(conn.channel(), Settings.from_url(broker_url))
    finally:
        close_quietly(conn)
    publish(broker_url, config_message(user_id="guest"))  # the connection's own user: accepted
    with pytest.raises(amqp.exceptions.PreconditionFailed) as info:
        publish(broker_url, config_message(user_id="somebody-else"))
    assert "PRECONDITION_FAILED" in str(info.value)
    assert "user_id property set to 'somebody-else' but authenticated user was 'guest'" in str(
        info.value)


def test_only_master_capable_users_write_config(users: Users, broker_url: str) -> None:
    master, backup = users.url(users.master), users.url(users.backup)
    publish(master, config_message(user_id=users.master))
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        publish(master, config_message(user_id=users.backup))  # the master cannot pose either
    text = refused(lambda: publish(backup, config_message(user_id=users.backup)))
    assert "ACCESS_REFUSED" in text and f"exchange '{topology.CONFIG_EXCHANGE}'" in text
    refused(lambda: publish(users.url(users.admin), config_message()))
    refused(lambda: publish(users.url(users.sender), config_message()))

    def via_ensure() -> None:
        def attempt(conn: Any) -> None:
            ConfirmedPublisher(conn, timeout_s=10.0).publish(config_message())
        _, conn = ensure(Settings.from_url(backup), attempt, retry_s=30.0)
        close_quietly(conn)
    with pytest.raises(AccessDenied, match="permission denied by the broker: access to exchange"):
        via_ensure()


def test_sender_publishes_alerts_only(users: Users, broker_url: str) -> None:
    conn = connection(broker_url)
    try:
        topology.declare_alert_queue(conn.channel(), [users.master, users.backup])
    finally:
        close_quietly(conn)
    sender = users.url(users.sender)
    alert = Outgoing(exchange=topology.ALERTS_EXCHANGE, body=b"{}", mandatory=True,
                     routing_key=topology.precedence_key([users.master, users.backup]),
                     user_id=users.sender)
    publish(sender, alert)
    refused(lambda: publish(sender, Outgoing(exchange="", routing_key=topology.sync_queue(
        users.backup), body=b"{}")))
    refused(lambda: publish(sender, Outgoing(exchange=topology.CONTROL_EXCHANGE,
                                             routing_key=topology.MASTER, body=b"{}")))
    conn = connection(sender)
    try:
        refused(lambda: conn.channel().basic_get(topology.alert_queue(
            [users.master, users.backup])))
    finally:
        close_quietly(conn)


def test_backup_user_reads_only_its_own_queues(users: Users, broker_url: str) -> None:
    admin = connection(broker_url)
    try:
        for hosts in ([users.master], [users.master, users.backup]):
            topology.declare_alert_queue(admin.channel(), hosts)
    finally:
        close_quietly(admin)
    conn = connection(users.url(users.backup))
    try:
        def consume(queue: str) -> None:
            conn.channel().basic_consume(queue, callback=lambda _m: None)

        consume(topology.sync_queue(users.backup))
        consume(topology.alert_queue([users.master, users.backup]))
        stream = conn.channel()
        stream.basic_qos(0, 10, False)  # a stream consumer needs a prefetch limit
        stream.basic_consume(topology.CHANGELOG_STREAM, callback=lambda _m: None,
                             arguments={"x-stream-offset": "first"})
        refused(lambda: consume(topology.sync_queue(users.master)))
        refused(lambda: consume(topology.alert_queue([users.master])))
        refused(lambda: consume(topology.QUARANTINE_QUEUE))

        control = conn.channel()
        own = topology.control_queue(users.backup)
        control.queue_declare(own, exclusive=True, auto_delete=True)
        control.queue_bind(own, topology.CONTROL_EXCHANGE, topology.ALL)
        control.queue_bind(own, topology.CONTROL_EXCHANGE, topology.node_key(users.backup))
        text = refused(lambda: conn.channel().queue_bind(own, topology.CONTROL_EXCHANGE,
                                                         topology.MASTER))
        assert "access to topic 'master'" in text
        refused(lambda: conn.channel().queue_declare(topology.control_queue(users.master),
                                                     exclusive=True, auto_delete=True))
    finally:
        close_quietly(conn)


def test_declares_fall_back_to_passive_and_keep_the_callers_channel(users: Users,
                                                                   broker_url: str) -> None:
    settings = Settings.from_url(users.url(users.backup))
    conn = connection(users.url(users.backup))
    try:
        channel = conn.channel()
        channel.basic_qos(0, 7, False)
        topology.declare_all(channel, settings)  # refused to configure: checked passively
        assert topology.declare_sync_queue(channel, users.backup) == 0  # its own: configured
        assert channel.is_open
        channel.basic_consume(topology.sync_queue(users.backup), callback=lambda _m: None)
        admin = connection(broker_url)
        try:
            admin.channel().queue_delete(topology.HOSTLISTS_QUEUE)
        finally:
            close_quietly(admin)
        with pytest.raises(TopologyMissing, match=r"queue tasync\.hostlists does not exist\): run "
                           r"`tasync broker setup`"):
            topology.declare_alerts(channel)
        assert channel.is_open
    finally:
        close_quietly(conn)


def test_workers_replicate_with_their_own_users(users: Users, network: Network,
                                                broker_url: str) -> None:
    master = network.start(users.master, role="master",
                           args=("--master", users.master, "--broker", users.url(users.master)))
    master.wait_ready()
    backup = network.start(users.backup,
                           args=("--master", users.master, "--broker", users.url(users.backup)))
    backup.wait_ready()
    admin = users.url(users.admin)
    out = network.cli("config", "set", "destination", "ops", "--url", "file:///tmp/ops.jsonl",
                      "--wait-applied", "--broker", admin)
    assert "committed" in out.stdout
    backup.wait_seq(int((master.status() or {})["applied_seq"]))
    assert network.export(users.master) == network.export(users.backup)

    # The backup's user may quarantine (default exchange) a message it refuses.
    conn = connection(broker_url)
    try:
        conn.channel().basic_publish(amqp.Message(b"not json"), exchange="",
                                     routing_key=topology.sync_queue(users.backup))
    finally:
        close_quietly(conn)

    def quarantined() -> bool:
        c = connection(broker_url)
        try:
            ok = c.channel().queue_declare(topology.QUARANTINE_QUEUE, passive=True)
            return int(ok.message_count) == 1
        finally:
            close_quietly(c)
    wait_for(quarantined, what="the malformed change in the quarantine")
    assert backup.alive
    rows = json.loads(network.cli("status", "--json", "--broker", admin,
                                  check=False).stdout)["nodes"]
    assert {r["node"] for r in rows if r.get("alive")} == {users.master, users.backup}
