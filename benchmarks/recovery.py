"""Issue 5, recovery: catch-up of missed changes and snapshot bootstrap, against a raw read.

    python -m benchmarks.recovery              # 100,000 changes, 3 runs
    python -m benchmarks.recovery --quick      # 10,000 changes, 1 run

Each run uses a fresh vhost and real ``tasync-worker`` processes: a master ``a`` and a backup
``b``. ``b`` is stopped, N destinations are imported on the master (one request, committed in
one transaction, published as messages of 1,000 changes), then:

Catch-up
    ``b`` restarts and replays the N changes it missed from the change log. Measured on its
    own trail: ``node_started`` -> ``caught_up`` (connection, head query, reading, decoding,
    judging and applying the log), and -> ``node_ready``.
Raw stream read
    The same change log read from ``first`` with py-amqp alone (prefetch 200, manual acks,
    ``json.loads`` of every body, nothing else): the floor any reader pays. The catch-up's rate
    in changes per second is reported as a fraction of this one.
Snapshot bootstrap
    The change log is deleted and recreated empty (what retention does to old entries), and a
    new node ``d`` starts: it cannot replay, so it installs a snapshot of the N objects from the
    master. Measured on its trail: ``node_started`` -> ``snapshot_installed`` and -> ``node_ready``.
    Then ``tasync recover --node b --snapshot`` (the CLI, end to end, wall time).

Targets (issue 5): catch-up of 100,000 changes <= 10 s and >= 0.3 of the raw read rate;
snapshot bootstrap of 100,000 objects <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import raw
from benchmarks.common import (
    RESULTS_DIR,
    Broker,
    LoadMonitor,
    Network,
    code_version,
    log,
    machine_info,
    median,
    trail_time,
    wait_for,
    write_json,
)
from broker import topology
from broker.audit import read_trail
from broker.settings import Settings
from tasync.client import rpc_client

PART = 1000


def import_objects(url: str, count: int) -> int:
    """Import ``count`` destinations on the master through the control exchange; last seq."""
    ops = [{"op": "set", "kind": "destination", "name": f"r{i:06d}",
            "body": {"url": f"file:///tmp/r{i}.jsonl"}} for i in range(count)]
    import_id = uuid.uuid4().hex
    with rpc_client(Settings.from_url(url)) as rpc:
        result: dict[str, Any] = {}
        for start in range(0, count, PART):
            result = rpc.call_one(topology.MASTER, "import", {
                "import_id": import_id, "ops": ops[start:start + PART],
                "final": start + PART >= count}, timeout_s=600)
    return int(result["last_seq"])


def trail_span(data_dir: Path, start: str, *ends: str) -> dict[str, float]:
    """Seconds from the last ``start`` event to the first of each ``end`` after it."""
    events = read_trail(data_dir)
    begin = max(i for i, e in enumerate(events) if e["event"] == start)
    t0 = trail_time(events[begin]["ts"])
    spans = {}
    for end in ends:
        found = next(e for e in events[begin:] if e["event"] == end)
        spans[end] = round(trail_time(found["ts"]) - t0, 3)
    return spans


def raw_stream_read(url: str, expected: int) -> float:
    """Seconds for py-amqp to read and JSON-decode ``expected`` changes of the change log."""
    conn = raw.connect(url)
    try:
        channel = conn.channel()
        channel.basic_qos(0, 200, False)
        seen = 0

        def on_message(message: Any) -> None:
            nonlocal seen
            channel.basic_ack(message.delivery_tag)
            seen += len(json.loads(message.body).get("changes", ()))

        t0 = time.perf_counter()
        channel.basic_consume(topology.CHANGELOG_STREAM, callback=on_message,
                              arguments={"x-stream-offset": "first"})
        while seen < expected:
            conn.drain_events(timeout=30)
        return time.perf_counter() - t0
    finally:
        conn.close()


def recreate_changelog(url: str) -> None:
    """Delete the change log and declare it again, empty and bound (retention, compressed)."""
    conn = raw.connect(url)
    try:
        channel = conn.channel()
        channel.queue_delete(topology.CHANGELOG_STREAM)
        topology.declare_config(channel, Settings.from_url(url))
    finally:
        conn.close()


def one_run(broker: Broker, count: int) -> dict[str, Any]:
    with broker.fresh_vhost("recovery") as url, Network(url) as net:
        net.start_worker("a", role="master").wait_ready(120)
        b = net.start_worker("b")
        b.wait_ready(120)
        net.wait_in_sync(timeout_s=120)
        b.stop()
        log(f"importing {count:,} objects on the master")
        head = import_objects(url, count)
        log("catch-up")
        b.start()
        b.wait_ready(600)
        catch_up = trail_span(b.data_dir, "node_started", "caught_up", "node_ready")
        raw_s = raw_stream_read(url, count)
        log("snapshot bootstrap")
        recreate_changelog(url)
        d = net.start_worker("d")
        d.wait_ready(600)
        wait_for(lambda: d.status().get("applied_seq", 0) >= head, timeout_s=60, what="d")
        snapshot = trail_span(d.data_dir, "node_started", "snapshot_installed", "node_ready")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tasync", "recover", "--node", "b", "--snapshot",
                        "--broker", url, "--json"], check=True, capture_output=True, timeout=600)
        recover_cli_s = time.perf_counter() - t0
    catch_up_s = catch_up["caught_up"]
    return {
        "changes": count, "catch_up_s": catch_up_s, "catch_up_ready_s": catch_up["node_ready"],
        "catch_up_changes_per_s": round(count / catch_up_s),
        "raw_read_s": round(raw_s, 3), "raw_changes_per_s": round(count / raw_s),
        "ratio_to_raw": round(raw_s / catch_up_s, 3),
        "snapshot_installed_s": snapshot["snapshot_installed"],
        "snapshot_ready_s": snapshot["node_ready"], "recover_snapshot_cli_s": round(
            recover_cli_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 changes, one run")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--changes", type=int, default=None)
    args = parser.parse_args()
    count = args.changes or (10_000 if args.quick else 100_000)
    runs = args.runs or (1 if args.quick else 3)
    broker = Broker()
    results = []
    with LoadMonitor() as load:
        for run in range(1, runs + 1):
            log(f"run {run}/{runs}")
            results.append(one_run(broker, count))
            log(json.dumps(results[-1]))
    keys = [k for k in results[0] if k != "changes"]
    summary = {k: median([r[k] for r in results], digits=3) for k in keys}
    report = {"benchmark": "recovery", "changes": count, "runs": results, "median": summary,
              "targets": {"catch_up_s": 10.0, "ratio_to_raw": 0.3, "snapshot_ready_s": 10.0},
              "load": load.summary(), "machine": machine_info(broker), "code": code_version()}
    name = "recovery-quick.json" if args.quick else "recovery.json"
    write_json(RESULTS_DIR / name, report)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
