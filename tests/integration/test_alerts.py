"""Alerts reach the first live server of their precedence list, and none is lost.

Real ``tasync-worker`` processes, the real broker, a real HTTP server (webhooks) in the test
process. Each test runs in its own vhost; waits are on events, never on sleeps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import pytest

from tasync.broker import topology
from tasync.broker.alerts import Alert
from tasync.broker.audit import read_trail
from tasync.broker.connection import close_quietly, connect
from tasync.broker.settings import Settings
from tasync.producers.sender import AlertSender
from tests.harness.webhook import Webhook
from tests.network import Network, NodeProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

FAST_RETRY = {"TASYNC_DELIVERY_BACKOFF_S": "0.05", "TASYNC_DELIVERY_ATTEMPTS": "5"}


# -- helpers ----------------------------------------------------------------------------------

def tasync(network: Network, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an alert command the way users do: ``tasync send ...`` (the classic -host included)."""
    return network.cli(*args, check=check)


def lines(path: Path) -> list[dict[str, Any]]:
    """The alerts a file destination received (whole lines only)."""
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def by_id(path: Path, alert_id: str) -> list[dict[str, Any]]:
    return [x for x in lines(path) if x["id"] == alert_id]


def on_broker(broker_url: str, fn: Any) -> Any:
    """Run ``fn(channel)`` on a short-lived connection to the test's vhost."""
    conn = connect(Settings.from_url(broker_url), retry_s=5.0)
    try:
        return fn(conn.channel())
    finally:
        close_quietly(conn)


def queue_state(broker_url: str, hosts: tuple[str, ...]) -> tuple[int, int]:
    """``(messages, consumers)`` of a precedence list's queue; (0, 0) when it does not exist."""
    def look(channel: Any) -> tuple[int, int]:
        try:
            ok = channel.queue_declare(topology.alert_queue(hosts), passive=True)
        except amqp.exceptions.NotFound:
            return 0, 0
        return int(ok.message_count), int(ok.consumer_count)
    result: tuple[int, int] = on_broker(broker_url, look)
    return result


def dead_letters(broker_url: str) -> list[dict[str, Any]]:
    """Every message in the dead-letter queue (taken off it)."""
    def take(channel: Any) -> list[dict[str, Any]]:
        found = []
        while (message := channel.basic_get(topology.DEAD_LETTER_QUEUE, no_ack=True)):
            found.append(json.loads(message.body))
        return found
    result: list[dict[str, Any]] = on_broker(broker_url, take)
    return result


def start_pair(network: Network, *, a_args: tuple[str, ...] = (), b_args: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> tuple[NodeProcess, NodeProcess]:
    """Master ``a`` then backup ``b``; both registered as nodes so host lists may name them."""
    a = network.start("a", role="master", args=a_args, env=env)
    a.wait_ready()
    b = network.start("b", args=b_args, env=env)
    b.wait_ready()
    wait_for(lambda: {"a", "b"} <= {o["name"] for o in json.loads(
        network.cli("config", "show", "node", "--json").stdout)}, what="a and b registered")
    return a, b


def file_destination(network: Network, tmp_path: Path, name: str = "out") -> Path:
    path = tmp_path / f"{name}.jsonl"
    network.cli("config", "set", "destination", name, "--url", f"file://{path}",
                "--wait-applied")
    return path


def sender(network: Network) -> AlertSender:
    return AlertSender(Settings.from_url(network.broker_url), name="test")


def alerts(count: int, *, prefix: str, hosts: tuple[str, ...], source: str = "test",
           target: str = "out") -> list[Alert]:
    return [Alert(id=f"{prefix}-{i:05d}", source=source, target_kind="destination",
                  target=target, text=f"alert {i}", hosts=hosts) for i in range(count)]


def totals(network: Network) -> dict[str, dict[str, Any]]:
    data = json.loads(tasync(network, "totals", "--json").stdout)
    return {report["node"]: report for report in data["nodes"]}


@pytest.fixture
def webhooks() -> Iterator[list[Webhook]]:
    made: list[Webhook] = []
    yield made
    for hook in made:
        hook.close()


# -- 1. the first live server delivers --------------------------------------------------------

def test_first_live_server_delivers_and_the_next_one_when_it_is_down(
        network: Network, tmp_path: Path) -> None:
    a, b = start_pair(network)
    out = file_destination(network, tmp_path)
    tasync(network, "send", "-i", "out", "-m", "via a", "--id", "one", "-host", "a", "b")
    wait_for(lambda: by_id(out, "one"), what="alert one delivered")
    assert [x["node"] for x in by_id(out, "one")] == ["a"]

    a.stop()
    sent = tasync(network, "send", "-i", "out", "-m", "via b", "--id", "two", "-host", "a", "b",
                  "--json")
    assert json.loads(sent.stdout)["id"] == "two"
    wait_for(lambda: by_id(out, "two"), what="alert two delivered")
    assert [x["node"] for x in by_id(out, "two")] == ["b"]
    line = by_id(out, "two")[0]
    assert {"id", "destination", "text", "source", "node", "delivered_at"} <= set(line)
    taken = [t for t in read_trail(b.data_dir) if t["event"] == "alert.taken_over"]
    assert [t["id"] for t in taken] == ["two"]

    b.stop()
    queued = tasync(network, "send", "-i", "out", "-m", "nobody up", "--id", "three",
                    "-host", "a", "b")
    assert queued.returncode == 0
    assert "no server of a b is running" in queued.stderr
    assert queue_state(network.broker_url, ("a", "b"))[0] == 1
    network.start("b").wait_ready()
    wait_for(lambda: by_id(out, "three"), what="queued alert delivered after b restarted")


# -- 2. SIGKILL in the middle of 1,000 alerts -------------------------------------------------

def test_kill_of_the_first_server_loses_no_alert(network: Network, tmp_path: Path) -> None:
    a, _b = start_pair(network)
    out = file_destination(network, tmp_path)
    batch = alerts(1000, prefix="k", hosts=("a", "b"))
    with sender(network) as client:
        client.send_many(batch[:1])
        wait_for(lambda: queue_state(network.broker_url, ("a", "b"))[1] == 2,
                 what="a and b consuming a.b")
        client.send_many(batch[1:])
    wait_for(lambda: sum(1 for x in lines(out) if x["node"] == "a") >= 200,
             what="a in the middle of the batch")
    a.kill()
    wanted = {alert.id for alert in batch}
    wait_for(lambda: wanted <= {x["id"] for x in lines(out)}, timeout_s=120,
             what="every alert delivered")
    delivered = lines(out)
    counts = Counter(x["id"] for x in delivered)
    duplicates = sum(n - 1 for n in counts.values())
    by_node = Counter(x["node"] for x in delivered)
    print(f"\n1000 alerts: a delivered {by_node['a']}, b {by_node['b']}, "
          f"duplicates {duplicates}")
    assert set(counts) == wanted
    assert by_node["a"] > 0 and by_node["b"] > 0
    # a duplicate can only come from the window between a's delivery and its ack
    assert duplicates <= 2 * 64


# -- 3. SIGSTOP: hung with its connection open -------------------------------------------------

def test_hung_first_server_is_given_up_after_the_heartbeat(network: Network,
                                                           tmp_path: Path) -> None:
    a, _b = start_pair(network, a_args=("--heartbeat", "2"))
    out = file_destination(network, tmp_path)
    with sender(network) as client:
        client.send_many(alerts(1, prefix="warm", hosts=("a", "b")))
        wait_for(lambda: by_id(out, "warm-00000"), what="warm-up delivered")
        wait_for(lambda: queue_state(network.broker_url, ("a", "b"))[1] == 2,
                 what="a and b consuming a.b")
        a.signal(signal.SIGSTOP)
        try:
            batch = alerts(20, prefix="hung", hosts=("a", "b"))
            client.send_many(batch)
            wanted = {x.id for x in batch}
            wait_for(lambda: wanted <= {x["id"] for x in lines(out)}, timeout_s=90,
                     what="b delivering what the hung a held")
        finally:
            a.signal(signal.SIGCONT)
    assert {x["node"] for x in lines(out) if x["id"].startswith("hung")} == {"b"}


# -- 4. routes share the load ------------------------------------------------------------------

def test_routes_share_the_load_and_overflow_to_the_other_server(
        network: Network, tmp_path: Path, webhooks: list[Webhook]) -> None:
    start_pair(network)
    out = file_destination(network, tmp_path)
    slow = Webhook(delay_s=0.2)
    webhooks.append(slow)
    network.cli("config", "set", "destination", "slow", "--url", slow.url)
    network.cli("config", "set", "route", "remedy", "--host", "a", "--host", "b")
    network.cli("config", "set", "route", "nms", "--host", "b", "--host", "a", "--wait-applied")
    for hosts in (("a", "b"), ("b", "a")):
        wait_for(lambda h=hosts: queue_state(network.broker_url, h)[1] == 2,
                 what=f"{hosts} consumed by both")
    with sender(network) as client:
        remedy, nms = client.resolve_route("remedy"), client.resolve_route("nms")
        assert (remedy, nms) == (("a", "b"), ("b", "a"))
        for i in range(30):
            client.send(alerts(1, prefix=f"r{i}", hosts=remedy, source="remedy")[0])
            client.send(alerts(1, prefix=f"n{i}", hosts=nms, source="nms")[0])
        wait_for(lambda: len(lines(out)) >= 60, what="steady alerts delivered")
    steady = Counter((x["source"], x["node"]) for x in lines(out))
    assert steady == {("remedy", "a"): 30, ("nms", "b"): 30}
    report = totals(network)
    assert report["a"]["sources"]["remedy"]["delivered"] == 30
    assert report["b"]["sources"]["nms"]["delivered"] == 30
    assert report["a"]["sources"]["remedy"]["taken_over"] == 0

    burst = alerts(300, prefix="burst", hosts=remedy, source="remedy", target="slow")
    with sender(network) as client:
        client.send_many(burst)
    wait_for(lambda: {x.id for x in burst} <= set(slow.accepted), timeout_s=120,
             what="burst delivered")
    report = totals(network)
    a_remedy, b_remedy = report["a"]["sources"]["remedy"], report["b"]["sources"]["remedy"]
    print(f"\nburst of 300 to a slow webhook: a {a_remedy['delivered'] - 30}, "
          f"b {b_remedy['delivered']} (taken over {b_remedy['taken_over']})")
    assert b_remedy["delivered"] > 0 and b_remedy["taken_over"] == b_remedy["delivered"]
    assert a_remedy["delivered"] > 30


# -- 5. retries, then the dead-letter queue ---------------------------------------------------

def test_retries_then_delivery_and_dead_letter(network: Network, webhooks: list[Webhook]) -> None:
    a, _b = start_pair(network, env=FAST_RETRY)
    flaky, broken = Webhook(fail_first=3), Webhook(always=503)
    webhooks += [flaky, broken]
    network.cli("config", "set", "destination", "flaky", "--url", flaky.url)
    network.cli("config", "set", "destination", "broken", "--url", broken.url, "--wait-applied")
    tasync(network, "send", "-i", "flaky", "-m", "try again", "--id", "f1", "-host", "a", "b")
    wait_for(lambda: flaky.accepted == ["f1"], what="f1 accepted by the webhook")
    assert flaky.attempts["f1"] == 4

    tasync(network, "send", "-i", "broken", "-m", "never", "--id", "d1", "-host", "a", "b")
    wait_for(lambda: any(t["event"] == "alert.dead_lettered" for t in read_trail(a.data_dir)),
             what="d1 dead-lettered")
    assert broken.attempts["d1"] == 5
    dead = wait_for(lambda: dead_letters(network.broker_url), what="d1 in the dead-letter queue")
    assert [m["id"] for m in dead] == ["d1"]
    trail = read_trail(a.data_dir)
    failed = [t for t in trail if t["event"] == "alert.failed"]
    assert failed[0]["destination"] == "broken" and "503" in failed[0]["reason"]
    report = totals(network)["a"]["sources"]["cli"]
    assert (report["delivered"], report["failed"]) == (1, 1)
    assert flaky.accepted == ["f1"]  # delivered once


# -- 6. bad input ------------------------------------------------------------------------------

def test_bad_input_gets_clear_errors_and_nothing_crashes(network: Network,
                                                         tmp_path: Path) -> None:
    a, b = start_pair(network)
    file_destination(network, tmp_path)
    cases = [
        (["send", "-i", "ghost", "-m", "x", "-host", "a", "b"], "unknown destination 'ghost'"),
        (["send", "-g", "ghost", "-m", "x", "-host", "a"], "unknown group 'ghost'"),
        (["send", "-i", "out", "-m", "", "-host", "a", "b"], "the message is empty"),
        (["send", "-i", "out", "-m", "x" * 40_000, "-host", "a"], "the limit is 32768"),
        (["send", "-i", "out", "-m", "x", "-host", "a", "zz"], "unknown node 'zz'"),
        (["send", "-i", "out", "-m", "x", "--route", "ghost"], "unknown route 'ghost'"),
        (["send", "-i", "out", "-m", "x", "-host", "a", "a"], "names a node twice"),
    ]
    for args, reason in cases:
        result = tasync(network, *args, check=False)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert reason in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr

    # a hand-made message on an alert queue is quarantined, and the worker carries on
    with sender(network) as client:
        client.send_many(alerts(1, prefix="ok", hosts=("a", "b")))
        channel = client._conn.channel()
        # Confirmed, as a careful client publishes: unconfirmed publishes just before the
        # connection closes may never reach the broker when its close times out under load.
        for body in (b'{"v":1,"type":"alert","id":1}', b"\xff not json"):
            channel.basic_publish_confirm(amqp.Message(body), exchange=topology.ALERTS_EXCHANGE,
                                          routing_key="a.b", confirm_timeout=30)
    # a takes them while its prefetch window has room; under load b may take the surplus. A
    # refusal whose settlement broke (a connection reset under load) is refused again when the
    # broker hands the message back, so count the refused messages, not the lines.
    def refusals() -> set[str]:
        return {t["reason"] for node in (a, b) for t in read_trail(node.data_dir)
                if t["event"] == "alert.refused"}
    reasons = wait_for(lambda: len(refusals()) >= 2 and refusals(), what="two refusals")
    assert len(reasons) == 2, reasons

    intake = subprocess.Popen([sys.executable, "-m", "tasync", "intake", "--listen",
                               "127.0.0.1:0", "--default-host", "a", "--default-host", "b",
                               "--max-body", str(1 << 20)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=network.env)
    try:
        assert intake.stdout is not None
        address = intake.stdout.readline().strip()
        import http.client

        def post(body: bytes, path: str = "/alerts") -> tuple[int, dict[str, Any]]:
            conn = http.client.HTTPConnection(address, timeout=30)
            conn.request("POST", path, body=body)
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        status, reply = post(b"{not json")
        assert status == 400 and "invalid JSON" in reply["error"]
        status, reply = post(json.dumps({"source": "nms", "destination": "ghost",
                                         "message": "x"}).encode())
        assert status == 400 and "unknown destination 'ghost'" in reply["error"]
        status, reply = post(json.dumps({"source": "nms", "destination": "out",
                                         "message": "via the intake", "id": "web1"}).encode())
        assert status == 202 and reply["ids"] == ["web1"] and reply["hosts"] == ["a", "b"]
        status, reply = post(b"x" * (2 << 20))
        assert status == 413
    finally:
        intake.terminate()
        intake.wait(30)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: by_id(out, "web1"), what="the intake's alert delivered")
    assert a.alive and b.alive
