"""Every alert accounted for: once across the network, nothing stranded, nothing hidden.

Real ``tasync-worker`` processes, the real broker, real HTTP endpoints in the test process.
Each test compares state (lines in file destinations, totals, queue depths, trails), never
log wording, and waits on events.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasync.broker import topology
from tasync.broker.alerts import Alert, alert_to_dict
from tasync.broker.audit import read_trail
from tasync.broker.publisher import ConfirmedPublisher, Outgoing
from tasync.broker.settings import Settings
from tasync.broker.signing import SENDER_HEADER, SIGNATURE_HEADER, KeyRing
from tasync.client import rpc_client
from tests.harness import secret_registry
from tests.integration.test_alerts import (
    FAST_RETRY,
    Webhook,
    alerts,
    by_id,
    file_destination,
    lines,
    on_broker,
    queue_state,
    sender,
    start_pair,
    totals,
)
from tests.integration.test_demo_and_metrics import free_port, scrape
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def handled(report: dict[str, Any]) -> int:
    """Alerts a node has settled one way or another (a duplicate is settled too)."""
    total = report["total"]
    return int(total["delivered"] + total["failed"] + total["skipped"] + total["duplicates"])


def handled_by(network: Network) -> dict[str, int]:
    return {node: handled(report) for node, report in totals(network).items()}


def id_counts(path: Path) -> Counter[str]:
    return Counter(line["id"] for line in lines(path))


def registered(network: Network, *names: str) -> None:
    wait_for(lambda: set(names) <= {o["name"] for o in json.loads(
        network.cli("config", "show", "node", "--json").stdout)}, what=f"{names} registered")


# -- 1. one delivery per id, network-wide ----------------------------------------------------

def test_an_id_is_delivered_once_by_the_whole_network(network: Network, tmp_path: Path) -> None:
    small = ("--prefetch", "2")
    a, b = start_pair(network, a_args=small, b_args=small)
    out = file_destination(network, tmp_path)
    batch = alerts(300, prefix="once", hosts=("a", "b"))
    wanted = {x.id for x in batch}
    with sender(network) as client:
        client.send_many(batch[:1])
        wait_for(lambda: queue_state(network.broker_url, ("a", "b"))[1] == 2,
                 what="a and b consuming a.b")
        client.send_many(batch[1:])
    wait_for(lambda: wanted <= set(id_counts(out)), timeout_s=120, what="300 alerts delivered")
    first = Counter(line["node"] for line in lines(out))
    assert first["a"] > 0 and first["b"] > 0, first  # the burst overflowed to b

    # The same ids again while both run: each node judges ids the other delivered.
    before = sum(handled_by(network).values())
    with sender(network) as client:
        client.send_many(batch)
    wait_for(lambda: sum(handled_by(network).values()) >= before + 300, timeout_s=120,
             what="the repeats settled")
    assert max(id_counts(out).values()) == 1, "an id was written twice"

    # ... and after a SIGKILL of a: b alone judges all 300.
    a.kill()
    before_b = handled_by(network)["b"]
    with sender(network) as client:
        client.send_many(batch)
    wait_for(lambda: handled_by(network)["b"] >= before_b + 300, timeout_s=120,
             what="b settled the repeats")
    assert max(id_counts(out).values()) == 1, "an id was written twice"

    # While a is down, b delivers new ids; a returns, b stops: a learned them on its return.
    late = alerts(50, prefix="late", hosts=("a", "b"))
    with sender(network) as client:
        client.send_many(late)
    wait_for(lambda: {x.id for x in late} <= set(id_counts(out)), what="late alerts delivered")
    a = network.start("a", args=small)
    a.wait_ready()
    wait_for(lambda: queue_state(network.broker_url, ("a", "b"))[1] == 2,
             what="a consuming a.b again")
    b.stop()
    before_a = handled_by(network)["a"]
    with sender(network) as client:
        client.send_many(late + batch)
    wait_for(lambda: handled_by(network)["a"] >= before_a + 350, timeout_s=120,
             what="a settled the repeats")
    counts = id_counts(out)
    assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1][:10]
    assert set(counts) == wanted | {x.id for x in late}


# -- 2. no list is ever stranded -------------------------------------------------------------

def stranded_lists(network: Network) -> set[str]:
    from tasync.alert_lists import gather_lists, stranded

    with rpc_client(Settings.from_url(network.broker_url)) as rpc:
        return {row["list"] for row in stranded(gather_lists(rpc, timeout_s=2.0))}


def test_lists_are_never_stranded_and_a_stranded_one_is_shown(network: Network,
                                                              tmp_path: Path) -> None:
    port = free_port()
    master = network.start("m", role="master", args=("--metrics-port", str(port)))
    master.wait_ready()
    a, b, c = (network.start(n) for n in ("a", "b", "c"))
    for node in (a, b, c):
        node.wait_ready()
    registered(network, "a", "b", "c")
    out = file_destination(network, tmp_path)
    network.cli("config", "set", "route", "r", "--host", "a", "--host", "b")
    network.cli("config", "set", "route", "r2", "--host", "a", "--host", "b", "--host", "c",
                "--wait-applied")
    network.cli("send", "-i", "out", "-m", "one", "--route", "r", "--id", "s1")
    network.cli("send", "-i", "out", "-m", "one", "--route", "r2", "--id", "n1")
    wait_for(lambda: by_id(out, "s1") and by_id(out, "n1"), what="s1 and n1 delivered")

    # The route is reversed: its old list a.b is drained and no route names it any more.
    network.cli("config", "set", "route", "r", "--host", "b", "--host", "a", "--wait-applied")
    wait_for(lambda: queue_state(network.broker_url, ("b", "a"))[1] == 2,
             what="a and b consuming the reversed route")
    sent = network.cli("send", "-i", "out", "-m", "two", "--id", "s2", "-host", "a", "b")
    assert "no server" not in sent.stderr, sent.stderr
    wait_for(lambda: by_id(out, "s2"), timeout_s=15, what="s2 delivered")
    assert [x["node"] for x in by_id(out, "s2")] == ["a"]

    # Node c leaves: the route drops it, c stops, a and b restart; a b c is still consumed.
    network.cli("config", "set", "route", "r2", "--host", "a", "--host", "b", "--wait-applied")
    c.stop()
    for name in ("a", "b"):
        network.nodes[name].stop()
        network.start(name).wait_ready()
    wait_for(lambda: queue_state(network.broker_url, ("b", "a"))[1] == 2,
             what="a and b consuming again")
    sent = network.cli("send", "-i", "out", "-m", "three", "--id", "n2", "-host", "a", "b", "c")
    assert "no server" not in sent.stderr, sent.stderr
    wait_for(lambda: by_id(out, "n2"), timeout_s=15, what="n2 delivered")
    assert [x["node"] for x in by_id(out, "n2")] == ["a"]
    assert stranded_lists(network) == set()

    # Both nodes of a b stopped: the warning is true, and the list shows as stranded.
    network.nodes["a"].stop()
    network.nodes["b"].stop()
    queued = network.cli("send", "-i", "out", "-m", "four", "--id", "s3", "-host", "a", "b")
    assert "no server of a b is running" in queued.stderr
    wait_for(lambda: stranded_lists(network) == {"a.b"}, what="a.b reported stranded")
    from tasync.alert_lists import broker_lists  # what status can show with no node up

    assert {r["list"] for r in broker_lists(Settings.from_url(network.broker_url))
            if r["stranded"]} == {"a.b"}
    key = ("tasync_list_stranded", (("list", "a.b"), ("node", "m")))
    wait_for(lambda: scrape(port).get(key) == 1.0, what="the stranded gauge")
    assert any(t["event"] == "alert.list_stranded" and t["list"] == "a.b"
               for t in read_trail(master.data_dir))
    network.start("a").wait_ready()
    wait_for(lambda: by_id(out, "s3"), what="s3 delivered once a returned")
    wait_for(lambda: scrape(port).get(key) == 0.0, what="the stranded gauge cleared")
    assert max(id_counts(out).values()) == 1


# -- 3. refusals reach the sender --------------------------------------------------------------

def key_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    for _key_id, secret in KeyRing.load(path).keys:
        secret_registry.register(f"accounting test key {name}", secret.hex())
    return path


def test_refusals_reach_the_sender_and_node_refusals_are_counted(network: Network,
                                                                 tmp_path: Path) -> None:
    current = key_file(tmp_path, "current.key", KeyRing.generate("k2"))
    retired = key_file(tmp_path, "retired.key", KeyRing.generate("k1"))
    forged = key_file(tmp_path, "forged.key", KeyRing.generate("k2"))
    args = ("--key-file", str(current))
    a, b = start_pair(network, a_args=args, b_args=args)
    out = file_destination(network, tmp_path)

    cases = [((), "signed"), (("--key-file", str(retired)), "k1"),
             (("--key-file", str(forged)), "k2")]
    for extra, reason in cases:
        result = network.cli("send", "-i", "out", "-m", "refused", "-host", "a", "b", *extra,
                             check=False)
        assert result.returncode == 1, (extra, result.stdout, result.stderr)
        assert reason in result.stderr and "Traceback" not in result.stderr
        assert "sent alert" not in result.stdout
    network.cli("send", "-i", "out", "-m", "signed", "--id", "good", "-host", "a", "b",
                "--key-file", str(current))
    wait_for(lambda: by_id(out, "good"), what="the signed alert delivered")
    assert [x["id"] for x in lines(out)] == ["good"]  # nothing of the refused sends arrived
    for node in (a, b):
        assert not [t for t in read_trail(node.data_dir) if t["event"] == "alert.refused"]

    # A node refuses what the sender cannot know about: counted, and shown with its reason.
    bad = {**alert_to_dict(Alert(id="q1", source="nms", target_kind="destination",
                                 target="out", text="x", hosts=("a", "b"))), "priority": 42}
    body = json.dumps(bad).encode()
    ring = KeyRing.load(current)

    def publish(channel: Any) -> None:
        ConfirmedPublisher(channel.connection).publish(Outgoing(
            exchange=topology.ALERTS_EXCHANGE, routing_key="a.b", body=body, message_id="q1",
            headers={SIGNATURE_HEADER: ring.sign(body), SENDER_HEADER: "test"}))

    on_broker(network.broker_url, lambda ch: publish(ch))
    wait_for(lambda: sum(r["sources"].get("nms", {}).get("refused", 0)
                         for r in totals(network).values()) == 1, what="the refusal counted")
    listed = json.loads(network.cli("quarantine", "list", "--json").stdout)
    assert [m["id"] for m in listed["messages"]] == ["q1"]
    assert "priority" in listed["messages"][0]["reason"]
    shown = network.cli("quarantine", "show", "q1").stdout
    assert "priority" in shown and "nms" in shown
    again = json.loads(network.cli("quarantine", "list", "--json").stdout)
    assert [m["id"] for m in again["messages"]] == ["q1"]  # browsing took nothing away


# -- 4 and 5. dead letters, requeue, trace ------------------------------------------------------

@pytest.fixture
def hook() -> Iterator[Webhook]:
    made = Webhook(always=503)
    yield made
    made.close()


def trace(network: Network, alert_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(network.cli("trace", alert_id, "--json").stdout)
    return data


def events(story: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["node"], e["event"]) for e in story["events"]]


def test_dead_letters_are_shown_requeued_once_and_traced(network: Network, tmp_path: Path,
                                                         hook: Webhook) -> None:
    a, b = start_pair(network, env=FAST_RETRY)
    out = file_destination(network, tmp_path)
    network.cli("config", "set", "destination", "hook", "--url", hook.url, "--wait-applied")

    # A delivered alert's story.
    network.cli("send", "-i", "out", "-m", "fine", "--id", "t1", "--source", "nms",
                "-host", "a", "b")
    wait_for(lambda: by_id(out, "t1"), what="t1 delivered")
    story = trace(network, "t1")
    delivered = [e for e in story["events"] if e["event"] == "alert.delivered"]
    assert [(e["node"], e["destination"], e["list"], e["source"]) for e in delivered] == [
        ("a", "out", "a.b", "nms")]
    assert delivered[0]["sender"] and float(delivered[0]["created_at"]) > 0
    assert story["outcome"] == "delivered"

    # A destination that always fails: the alert ends dead, with its reason.
    network.cli("send", "-i", "hook", "-m", "doomed", "--id", "d1", "-host", "a", "b")
    wait_for(lambda: any(t["event"] == "alert.dead_lettered" for t in read_trail(a.data_dir)),
             what="d1 dead-lettered")
    dead = json.loads(network.cli("dead", "list", "--json").stdout)
    assert [m["id"] for m in dead["messages"]] == ["d1"]
    assert "503" in dead["messages"][0]["reason"] and dead["messages"][0]["node"] == "a"
    assert "503" in network.cli("dead", "show", "d1").stdout
    story = trace(network, "d1")
    assert story["outcome"] == "dead" and "503" in story["dead"][0]["reason"]
    failed = [e for e in story["events"] if e["event"] == "alert.failed"]
    assert [(e["node"], e["destination"], e["attempts"]) for e in failed] == [("a", "hook", "5")]
    assert ("a", "alert.dead_lettered") in events(story)
    dry = network.cli("dead", "requeue", "d1", "--dry-run")
    assert "d1" in dry.stdout
    assert [m["id"] for m in json.loads(network.cli("dead", "list", "--json")
                                        .stdout)["messages"]] == ["d1"]
    assert hook.attempts["d1"] == 5 and hook.accepted == []

    # Fixed: requeued through the normal path, delivered once, audited.
    hook.always = None  # fixed: every request answered 200
    network.cli("dead", "requeue", "d1")
    wait_for(lambda: hook.accepted == ["d1"], what="d1 delivered after the requeue")
    assert json.loads(network.cli("dead", "list", "--json").stdout)["messages"] == []
    story = trace(network, "d1")
    assert story["outcome"] == "delivered"
    kinds = [e for _, e in events(story)]
    assert kinds.index("alert.dead_lettered") < kinds.index("alert.requeued") < kinds.index(
        "alert.delivered")
    requeued = [e for e in story["events"] if e["event"] == "alert.requeued"]
    assert requeued and requeued[0]["by"]
    assert sum(1 for e in story["events"] if e["event"] == "alert.failed") >= 1
    network.cli("send", "-i", "hook", "-m", "doomed", "--id", "d1", "-host", "a", "b")
    wait_for(lambda: any(e["event"] == "alert.duplicate" for e in trace(network, "d1")["events"]),
             what="the repeat of d1 judged a duplicate")
    assert hook.accepted == ["d1"]

    # Taken over after a SIGKILL: a holds it in a delivery when it dies.
    hook.hold.clear()
    network.cli("send", "-i", "hook", "-m", "held", "--id", "k1", "-host", "a", "b")
    wait_for(lambda: ("k1", "a") in hook.by_node, what="a delivering k1")
    a.kill()
    hook.hold.set()
    wait_for(lambda: ("k1", "b") in hook.by_node and "k1" in hook.accepted,
             what="b delivering k1")
    story = wait_for(lambda: (s := trace(network, "k1"))["outcome"] == "delivered" and s,
                     what="k1's story")
    taken = [e for e in story["events"] if e["event"] == "alert.taken_over"]
    assert [(e["node"], e["redelivered"]) for e in taken] == [("b", "1")]

    # Nothing known of an id: exit 1.
    unknown = network.cli("trace", "never-sent", check=False)
    assert unknown.returncode == 1 and "never-sent" in unknown.stderr
    assert b.alive

