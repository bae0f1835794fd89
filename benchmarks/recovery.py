"""Recovery: catch-up of missed changes and snapshot bootstrap, against a raw read.

    python -m benchmarks.recovery              # 100,000 changes, 3 runs
    python -m benchmarks.recovery --quick      # 10,000 changes, 1 run

Each run uses a fresh vhost and real ``tasync-worker`` processes: a master ``a`` and a backup
``b``. ``b`` is stopped, N destinations are imported on the master (one request, committed in
one transaction, published as messages of 1,000 changes), then:

Catch-up
    ``b`` restarts and replays the N changes it missed from the change log. Measured on its
    own trail: ``node_started`` -> ``caught_up`` (connection, head query, reading, decoding,
    judging and applying the log), and -> ``node_ready``. ``replay_s`` is the reading part
    alone: from the ``catching up from seq`` line of its ``tasync.log`` to ``caught_up``.
Raw stream read
    The same change log read from ``first`` with py-amqp alone (prefetch 200, manual acks,
    ``json.loads`` of every body, nothing else). The catch-up's rate in changes per second is
    reported as a fraction of this one, for the whole catch-up (``ratio_to_raw``, the target)
    and for the replay alone (``replay_ratio_to_raw``). This baseline is the one the target was
    first measured against and is kept as it was. For context the same read is also timed
    decoding with msgspec (``raw_read_msgspec_s``, ``ratio_to_raw_msgspec``), the parser tasync's
    catch-up uses: against it the ratio is what reading plus checking plus storing costs
    over reading alone with the fastest parser at hand.
Store floor
    The bodies the raw read got, decoded beforehand, written by ``NodeStore.apply`` into a
    fresh store: what keeping each change durably costs on its own (``store_floor_s``).
Snapshot bootstrap
    The change log is deleted and recreated empty (what retention does to old entries), and a
    new node ``d`` starts: it cannot replay, so it installs a snapshot of the N objects from the
    master. Measured on its trail: ``node_started`` -> ``snapshot_installed`` and -> ``node_ready``.
    Then ``tasync recover --node b --snapshot`` (the CLI, end to end, wall time).

Targets: catch-up of 100,000 changes <= 10 s and >= 0.3 of the raw read rate;
snapshot bootstrap of 100,000 objects <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from benchmarks import raw
from benchmarks.common import Broker, Network, log, trail_time, wait_for
from benchmarks.measure import (
    IMG_DIR,
    RESULTS_DIR,
    LoadMonitor,
    add_quiet_options,
    code_version,
    machine_info,
    median,
    print_verdict,
    require_plotting,
    run_quiet,
    shown,
    write_json,
)
from tasync.broker import topology
from tasync.broker.audit import SYNC_LOG_NAME, read_trail
from tasync.broker.fastdecode import decode_entry
from tasync.broker.messages import ChangeBatch
from tasync.broker.settings import Settings
from tasync.broker.store import NodeStore
from tasync.client import rpc_client

PART = 1000


def import_objects(url: str, count: int) -> int:
    """Import ``count`` destinations on the master through the control exchange; last seq."""
    ops = [{"op": "set", "kind": "destination", "name": f"r{i:06d}",
            "body": {"url": f"file:///tmp/r{i}.jsonl"}} for i in range(count)]
    import_id = uuid.uuid4().hex
    parts = max(1, -(-count // PART))
    with rpc_client(Settings.from_url(url)) as rpc:
        for part in range(parts):
            rpc.call_one(topology.MASTER, "import", {
                "import_id": import_id, "part": part, "parts": parts,
                "ops": ops[part * PART:(part + 1) * PART]}, timeout_s=600)
        result: dict[str, Any] = rpc.call_one(topology.MASTER, "import_commit", {
            "import_id": import_id, "parts": parts, "ops": count}, timeout_s=600)
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


def raw_stream_read(url: str, expected: int, *,
                    loads: Callable[[bytes], Any] = json.loads) -> tuple[float, list[bytes]]:
    """Seconds for py-amqp to read and JSON-decode ``expected`` changes of the change log.

    Also returns the bodies read, for ``store_floor``.
    """
    conn = raw.connect(url)
    bodies: list[bytes] = []
    try:
        channel = conn.channel()
        channel.basic_qos(0, 200, False)
        seen = 0

        def on_message(message: Any) -> None:
            nonlocal seen
            channel.basic_ack(message.delivery_tag)
            seen += len(loads(message.body).get("changes", ()))
            bodies.append(bytes(message.body))

        t0 = time.perf_counter()
        channel.basic_consume(topology.CHANGELOG_STREAM, callback=on_message,
                              arguments={"x-stream-offset": "first"})
        while seen < expected:
            conn.drain_events(timeout=30)
        return time.perf_counter() - t0, bodies
    finally:
        conn.close()


def store_floor(bodies: list[bytes], root: Path) -> float:
    """Seconds a node's store takes to write the same changes, decoded beforehand.

    Not tasync's catch-up: the part of it no reader that keeps every change durably can skip
    (``NodeStore.apply``: two SQLite rows per change, one transaction per message). Added to the
    raw read it bounds the ratio any such reader could reach against the raw read.
    """
    settings = Settings()
    batches = [b for b in (decode_entry(body, max_bytes=settings.max_message_bytes)
                           for body in bodies) if isinstance(b, ChangeBatch)]
    store = NodeStore(root / "floor", durable=True)
    try:
        t0 = time.perf_counter()
        for batch in batches:
            store.apply(batch)
        return time.perf_counter() - t0
    finally:
        store.close()


def recreate_changelog(url: str) -> None:
    """Delete the change log and declare it again, empty and bound (retention, compressed)."""
    conn = raw.connect(url)
    try:
        channel = conn.channel()
        channel.queue_delete(topology.CHANGELOG_STREAM)
        topology.declare_config(channel, Settings.from_url(url))
    finally:
        conn.close()


def replay_started(data_dir: Path) -> float:
    """When the node's last catch-up began reading the log (``tasync.log``, local time, ms)."""
    text = (data_dir / SYNC_LOG_NAME).read_text(errors="replace").splitlines()
    lines = [line for line in text if "catching up from seq" in line]
    stamp = lines[-1][:23]  # "2026-01-31 12:00:00,123"
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:]) / 1000


def one_run(broker: Broker, count: int) -> dict[str, Any]:
    """Catch-up, raw read and snapshot bootstrap of ``count`` changes, in one fresh vhost."""
    with broker.fresh_vhost("recovery") as url, Network(url) as net, LoadMonitor() as load:
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
        catch_up = trail_span(b.data_dir, "node.started", "recovery.caught_up", "node.ready")
        events = read_trail(b.data_dir)
        caught = trail_time(next(e for e in reversed(events)
                                 if e["event"] == "recovery.caught_up")["ts"])
        replay_s = caught - replay_started(b.data_dir)
        raw_s, bodies = raw_stream_read(url, count)
        raw_msgspec_s, _ = raw_stream_read(url, count, loads=msgspec.json.decode)
        floor_s = store_floor(bodies, net.root)
        del bodies
        log("snapshot bootstrap")
        recreate_changelog(url)
        d = net.start_worker("d")
        d.wait_ready(600)
        wait_for(lambda: d.status().get("applied_seq", 0) >= head, timeout_s=60, what="d")
        snapshot = trail_span(d.data_dir, "node.started", "recovery.snapshot_installed",
                              "node.ready")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tasync", "recover", "--node", "b", "--snapshot",
                        "--broker", url, "--json"], check=True, capture_output=True, timeout=600)
        recover_cli_s = time.perf_counter() - t0
    catch_up_s = catch_up["recovery.caught_up"]
    return {
        "changes": count, "catch_up_s": catch_up_s, "catch_up_ready_s": catch_up["node.ready"],
        "replay_s": round(replay_s, 3),
        "catch_up_changes_per_s": round(count / catch_up_s),
        "raw_read_s": round(raw_s, 3), "raw_changes_per_s": round(count / raw_s),
        "ratio_to_raw": round(raw_s / catch_up_s, 3),
        "replay_ratio_to_raw": round(raw_s / replay_s, 3),
        "raw_read_msgspec_s": round(raw_msgspec_s, 3),
        "ratio_to_raw_msgspec": round(raw_msgspec_s / catch_up_s, 3),
        "store_floor_s": round(floor_s, 3),
        "snapshot_installed_s": snapshot["recovery.snapshot_installed"],
        "snapshot_ready_s": snapshot["node.ready"],
        "recover_snapshot_cli_s": round(recover_cli_s, 3), "load": load.summary(),
    }


TARGETS = {"catch_up_s": 10.0, "ratio_to_raw": 0.3, "snapshot_ready_s": 10.0}


def verdicts(summary: dict[str, float], count: int) -> list[dict[str, Any]]:
    """Each target with the median measured and whether it is met."""
    rows = [(f"catch-up of {count:,} changes, node start -> caught up (s)", "catch_up_s", "<="),
            ("catch-up rate / raw stream read rate, same run", "ratio_to_raw", ">="),
            (f"snapshot bootstrap of {count:,} objects, node start -> ready (s)",
             "snapshot_ready_s", "<=")]
    out = []
    for what, key, op in rows:
        value, limit = summary[key], TARGETS[key]
        out.append({"target": what, "value": value, "limit": f"{op} {limit:g}",
                    "pass": value <= limit if op == "<=" else value >= limit})
    return out


def plot(report: dict[str, Any], img_dir: Path, suffix: str) -> Path:
    """Rates of catch-up and raw read per run; bootstrap and catch-up seconds per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    xs = range(1, len(runs) + 1)
    fig, (rates, secs) = plt.subplots(1, 2, figsize=(11, 4.2))
    rates.bar([x - 0.27 for x in xs], [r["catch_up_changes_per_s"] for r in runs], 0.27,
              label="tasync catch-up (node start -> caught up)")
    rates.bar(list(xs), [r["changes"] / r["replay_s"] for r in runs], 0.27,
              label="tasync replay (log read -> caught up)", color="tab:cyan")
    rates.bar([x + 0.27 for x in xs], [r["raw_changes_per_s"] for r in runs], 0.27,
              label="raw py-amqp stream read + json", color="tab:grey")
    rates.set_xticks(list(xs), [f"run {x}" for x in xs])
    rates.set_ylabel("changes per second")
    rates.set_title(f"{report['changes']:,} missed changes, ratio "
                    f"{report['median']['ratio_to_raw']} (target >= {TARGETS['ratio_to_raw']})")
    rates.legend(fontsize="small")
    for offset, key, label in ((-0.2, "catch_up_s", "catch-up"),
                               (0.2, "snapshot_ready_s", "snapshot bootstrap to ready")):
        secs.bar([x + offset for x in xs], [r[key] for r in runs], 0.4, label=label)
    secs.axhline(10.0, color="grey", linestyle="--", linewidth=1, label="target 10 s")
    secs.set_xticks(list(xs), [f"run {x}" for x in xs])
    secs.set_ylabel("seconds")
    secs.set_title("Catch-up and snapshot bootstrap")
    secs.legend(fontsize="small")
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / f"recovery{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    require_plotting()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recovery",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 changes, one run")
    parser.add_argument("--runs", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--changes", type=int, default=None, help="default 100,000")
    add_quiet_options(parser)
    parser.add_argument("--img-dir", type=Path, default=IMG_DIR)
    args = parser.parse_args(argv)
    count = args.changes or (10_000 if args.quick else 100_000)
    runs = args.runs or (1 if args.quick else 3)
    broker = Broker()
    results = []
    for run in range(1, runs + 1):
        log(f"run {run}/{runs}")
        results.append(run_quiet(lambda: one_run(broker, count), max_cpu=args.quiet_cpu,
                                 wait_s=args.quiet_wait))
        log(json.dumps(results[-1]))
    keys = [k for k in results[0] if k not in ("changes", "load")]
    summary = {k: median([r[k] for r in results], digits=3) for k in keys}
    suffix = "-quick" if args.quick else ""
    report = {"benchmark": "recovery",
              "command": "python -m benchmarks.recovery " + " ".join(sys.argv[1:]),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "changes": count, "runs": results, "median": summary, "targets": TARGETS,
              "verdict": verdicts(summary, count), "machine": machine_info(broker),
              "code": code_version()}
    report["plots"] = [shown(plot(report, args.img_dir, suffix))]
    write_json(RESULTS_DIR / f"recovery{suffix}.json", report)
    print(json.dumps(summary, indent=2))
    print_verdict(report["verdict"])


if __name__ == "__main__":
    main()
