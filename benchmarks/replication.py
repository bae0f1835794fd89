"""Configuration replication: latency, bulk import against raw py-amqp, memory.

    python -m benchmarks.replication            # full: 3 runs, 300 changes, 100,000 objects
    python -m benchmarks.replication --quick    # 1 run, 50 changes, 10,000 objects

Every scenario runs in a fresh vhost with real ``tasync-worker`` processes (a master and N
backups) and is repeated ``--runs`` times, interleaved, so noise from other work on the machine
spreads over all of them; the report gives the median over runs.

Latency
    One ``commit`` request at a time, sent to the master over the broker exactly as
    ``tasync config set`` sends it (no CLI start-up). The start is the change's own ``ts``,
    stamped by the master in the transaction that commits it (read back from its store); the
    end is the latest of the backups' trail lines ``change_applied seq=N`` (their own clocks,
    1 ms resolution). The next change goes out once every backup applied the previous one.
    For scale, the same fanout with N quorum queues and the stream is measured with raw
    py-amqp: one confirmed message at a time, until the last consumer received it.

Import
    ``tasync config import FILE`` (the real CLI) of N destinations into a master with three
    backups, from process start until the last backup's trail shows the last seq. Baselines in
    their own vhosts, py-amqp only: the very messages tasync publishes (1,000 changes each) and
    one message per change, both persistent, confirmed, to a fanout of three quorum queues and a
    stream, each queue drained by its own consumer process with manual acks.

Memory
    RSS of each backup after start (idle, caught up) and again after the import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import raw
from benchmarks.common import Broker, Network, TrailFollower, commit_times, log, wait_for
from benchmarks.measure import (
    IMG_DIR,
    MB,
    RESULTS_DIR,
    LoadMonitor,
    add_quiet_options,
    children_cpu_s,
    code_version,
    fill_defaults,
    machine_info,
    require_plotting,
    run_quiet,
    shown,
    summarize,
    write_json,
)
from benchmarks.profiling import PySpy, top_frames
from benchmarks.replication_report import (
    TARGETS,
    plot,
    print_summary,
    summarize_import,
    summarize_latency,
    verdicts,
)
from tasync.broker import kinds, topology
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.settings import Settings
from tasync.client import rpc_client
from tasync.producers.relay import batch_messages, chunk

BACKUP_COUNTS = (1, 3, 5)
IMPORT_BACKUPS = 3
#: Pause between two latency samples, after every backup applied the previous change.
GAP_S = 0.01
#: How long a worker is left alone before its resident memory is read.
SETTLE_S = 3.0


def destination(index: int) -> tuple[str, dict[str, Any]]:
    """The ``index``-th benchmark object: a file destination, as an operator would add one."""
    return f"bench-{index:06d}", {"url": f"file:///var/tmp/tasync-bench/{index}.jsonl"}


def applied_everywhere(followers: Iterable[TrailFollower], seq: int) -> bool:
    """Whether every followed trail shows ``seq`` applied (reads what is new)."""
    return all(f.poll() >= seq for f in followers)


def rss_mb(workers: Iterable[Any]) -> dict[str, float]:
    return {w.name: round(w.rss_bytes() / MB, 1) for w in workers}


# -- latency ----------------------------------------------------------------------------------


def measure_latency(broker: Broker, *, backups: int, changes: int, keep: bool) -> dict[str, Any]:
    """``changes`` single commits, each waited for on every backup; see the module docstring."""
    with broker.fresh_vhost(f"lat{backups}") as url, Network(url, keep=keep) as net, \
            LoadMonitor() as load:
        net.start(backups)
        time.sleep(SETTLE_S)
        idle = rss_mb(net.backups)
        followers = {w.name: TrailFollower(w.trail_path) for w in net.backups}
        sent: list[tuple[int, float, float]] = []
        with rpc_client(Settings.from_url(url)) as rpc:
            for index in range(changes):
                name, body = destination(index)
                op = {"op": "set", "kind": "destination", "name": name, "body": body}
                t_send = time.time()
                reply = rpc.call_one(topology.MASTER, "commit", {"ops": [op]}, timeout_s=30)
                t_reply = time.time()
                seq = int(reply["last_seq"])
                wait_for(partial(applied_everywhere, followers.values(), seq),
                         timeout_s=60, what=f"seq {seq} on every backup", interval_s=0.002)
                sent.append((seq, t_send, t_reply))
                time.sleep(GAP_S)
        assert net.master is not None
        committed = commit_times(net.master.db_path, [s for s, _, _ in sent])
    to_all, to_each, from_send, after_reply, rpc_ms = [], [], [], [], []
    for seq, t_send, t_reply in sent:
        applied = [f.applied_at(seq) or 0.0 for f in followers.values()]
        to_all.append(1000 * (max(applied) - committed[seq]))
        to_each += [1000 * (a - committed[seq]) for a in applied]
        from_send.append(1000 * (max(applied) - t_send))
        after_reply.append(1000 * (max(applied) - t_reply))
        rpc_ms.append(1000 * (t_reply - t_send))
    return {
        "backups": backups,
        "changes": changes,
        "commit_to_all_ms": summarize(to_all),
        "commit_to_each_ms": summarize(to_each),
        "request_to_all_ms": summarize(from_send),
        "reply_to_all_ms": summarize(after_reply),
        "commit_request_rtt_ms": summarize(rpc_ms),
        "idle_rss_mb": idle,
        "load": load.summary(),
        "samples_ms": [round(x, 2) for x in to_all],
    }


def measure_raw_latency(broker: Broker, *, queues: int, count: int) -> dict[str, Any]:
    """The broker's floor: one confirmed message at a time through the same fanout shape."""
    change = Change(epoch=1, seq=1, ts=time.time(), origin="master", op="set",
                    kind="destination", name=destination(0)[0],
                    body=kinds.load_body("destination", "x", destination(0)[1]))
    body = batch_messages([ChangeBatch(epoch=1, origin="master", changes=(change,))], None)[0]
    with broker.fresh_vhost(f"rawlat{queues}") as url, LoadMonitor() as load:
        samples = raw.latency_run(url, body.body, count=count, queues=queues, gap_s=GAP_S,
                                  stream_args=topology.changelog_arguments(Settings()))
    return {"queues": queues, "publish_to_all_ms": summarize(samples), "load": load.summary()}


# -- import -----------------------------------------------------------------------------------


def write_import_file(path: Path, objects: int) -> Path:
    """An export-shaped file of ``objects`` destinations, what ``config import`` reads."""
    data = {"destination": dict(destination(i) for i in range(objects))}
    path.write_text(json.dumps(data))
    return path


def measure_import(broker: Broker, *, objects: int, keep: bool,
                   profile_dir: Path | None) -> dict[str, Any]:
    """``tasync config import`` into a master with three backups, until all applied.

    The objects are all new, so the import is seqs ``head+1 .. head+objects``; the end is
    detected from the backups' trails even when the CLI itself fails (its error is recorded).
    """
    with broker.fresh_vhost("import") as url, Network(url, keep=keep) as net, \
            LoadMonitor() as load:
        path = write_import_file(net.root / "import.json", objects)
        net.start(IMPORT_BACKUPS)
        time.sleep(SETTLE_S)
        idle = rss_mb(net.workers.values())
        followers = {w.name: TrailFollower(w.trail_path) for w in net.backups}
        assert net.master is not None
        first = net.head_seq() + 1
        last = first + objects - 1
        spies = [PySpy(w.pid, profile_dir / f"import-{w.name}.txt")
                 for w in (net.master, net.backups[0])] if profile_dir else []
        with contextlib.ExitStack() as stack:
            for spy in spies:
                stack.enter_context(spy)
            cpu_before = {w.name: w.cpu_s() for w in net.workers.values()}
            cli_cpu = children_cpu_s()
            t_start = time.time()
            cli = run_import_cli(url, path)
            t_cli = time.time()
            cli["cpu_s"] = round(children_cpu_s() - cli_cpu, 2)
            if cli["exit_code"]:  # the changes arrive only if the master committed them
                wait_for(lambda: net.head_seq() >= last, timeout_s=600,
                         what=f"the master to commit seq {last} after the CLI failed")
            wait_for(lambda: all(f.poll() >= last for f in followers.values()),
                     timeout_s=3600, what=f"seq {last} on every backup", interval_s=0.05)
        cpu = {w.name: round(w.cpu_s() - cpu_before[w.name], 2) for w in net.workers.values()}
        t_commit = commit_times(net.master.db_path, [last])[last]
        applied_first = {n: f.applied_at(first) or 0.0 for n, f in followers.items()}
        applied_last = {n: f.applied_at(last) or 0.0 for n, f in followers.items()}
        time.sleep(SETTLE_S)
        after = rss_mb(net.workers.values())
    t_end = max(applied_last.values())
    wall = t_end - t_start
    out: dict[str, Any] = {
        "objects": objects,
        "changes": objects,
        "backups": IMPORT_BACKUPS,
        "cli": cli,
        "wall_s": round(wall, 2),
        "changes_per_s": round(objects / wall),
        "phases_s": {
            "cli_start_to_master_commit": round(t_commit - t_start, 2),
            "master_commit_to_cli_exit": round(t_cli - t_commit, 2),
            "cli_exit_to_last_backup_applied": round(t_end - t_cli, 2),
            "first_batch_applied_after_start": round(min(applied_first.values()) - t_start, 2),
        },
        "backup_done_s": {n: round(t - t_start, 2) for n, t in applied_last.items()},
        "cpu_s": {**cpu, "cli": cli["cpu_s"], "total": round(sum(cpu.values()) + cli["cpu_s"], 2)},
        "rss_mb": {"idle": idle, "after_import": after},
        "load": load.summary(),
    }
    if spies:
        out["profiles"] = {s.out.stem: top_frames(s.out) for s in spies}
    return out


def run_import_cli(url: str, path: Path) -> dict[str, Any]:
    """``tasync config import PATH --json``; its exit code, and its error if it failed."""
    command = [sys.executable, "-m", "tasync", "config", "import", str(path), "--json",
               "--timeout", "1800", "--broker", url]
    cli = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    if cli.returncode == 0:
        return {"exit_code": 0}
    error = (cli.stderr.strip().splitlines() or ["(no message)"])[-1][:300]
    log(f"tasync config import exited {cli.returncode}: {error}; waiting for the backups anyway")
    return {"exit_code": cli.returncode, "error": error}


def import_messages(objects: int) -> tuple[list[Any], list[Any]]:
    """The messages tasync publishes for the import (1,000 changes each), and one per change."""
    settings = Settings()
    now = time.time()
    template = kinds.load_body("destination", "x", destination(0)[1])
    changes = [
        Change(epoch=1, seq=i + 1, ts=now, origin="master", op="set", kind="destination",
               name=name, body={**template, **body})
        for i, (name, body) in enumerate(destination(i) for i in range(objects))
    ]
    batched = batch_messages(chunk(changes, max_changes=settings.batch_max_changes,
                                   max_bytes=settings.batch_max_bytes), None)
    single = batch_messages((ChangeBatch(epoch=1, origin="master", changes=(c,))
                             for c in changes), None)
    return batched, single


def measure_raw_import(broker: Broker, messages: list[Any], *, changes: int, prefetch: int,
                       label: str) -> dict[str, Any]:
    """Publish and consume the given messages with py-amqp alone (see ``benchmarks.raw``)."""
    with broker.fresh_vhost(f"raw-{label}") as url, LoadMonitor() as load:
        result = raw.fanout_run(url, [m.body for m in messages],
                                headers=[m.headers for m in messages], queues=IMPORT_BACKUPS,
                                prefetch=prefetch,
                                stream_args=topology.changelog_arguments(Settings()))
    return {
        "messages": result.messages,
        "changes": changes,
        "bytes": sum(len(m.body) for m in messages),
        "prefetch": prefetch,
        "wall_s": round(result.wall_s, 3),
        "publish_s": round(result.published - result.started, 3),
        "changes_per_s": round(changes / result.wall_s),
        "load": load.summary(),
    }


# -- the whole benchmark ----------------------------------------------------------------------


def scenario(args: argparse.Namespace, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement once the machine is quiet enough (see ``run_quiet``)."""
    return run_quiet(measure, max_cpu=args.quiet_cpu, wait_s=args.quiet_wait)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every scenario ``args.runs`` times, interleaved; returns the results document."""
    broker = Broker()
    started = time.time()
    results: dict[str, Any] = {
        "benchmark": "replication",
        "command": "python -m benchmarks.replication " + " ".join(sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(broker),
        "code": code_version(),
        "parameters": {"runs": args.runs, "changes": args.changes, "objects": args.objects,
                       "backups": list(args.backups), "gap_ms": GAP_S * 1000,
                       "settle_s": SETTLE_S, "quiet_cpu_percent": args.quiet_cpu,
                       "quiet_wait_s": args.quiet_wait},
        "targets": TARGETS,
    }
    latency: dict[int, list[dict[str, Any]]] = {b: [] for b in args.backups}
    raw_latency: dict[int, list[dict[str, Any]]] = {b: [] for b in args.backups}
    imports: list[dict[str, Any]] = []
    raw_batched: list[dict[str, Any]] = []
    raw_single: list[dict[str, Any]] = []
    batched, single = import_messages(args.objects) if args.objects else ([], [])
    for number in range(1, args.runs + 1):
        for backups in args.backups if args.changes else ():
            log(f"run {number}/{args.runs}: latency, {backups} backups, {args.changes} changes")
            latency[backups].append(scenario(args, partial(
                measure_latency, broker, backups=backups, changes=args.changes, keep=args.keep)))
            raw_latency[backups].append(scenario(args, partial(
                measure_raw_latency, broker, queues=backups, count=args.changes)))
        if not args.objects:
            continue
        log(f"run {number}/{args.runs}: import of {args.objects} objects, 3 backups")
        profile_dir = args.profile if number == 1 else None
        imports.append(scenario(args, partial(
            measure_import, broker, objects=args.objects, keep=args.keep,
            profile_dir=profile_dir)))
        log(f"run {number}/{args.runs}: raw baselines")
        raw_batched.append(scenario(args, lambda: measure_raw_import(
            broker, batched, changes=args.objects, prefetch=64, label="batched")))
        raw_single.append(scenario(args, lambda: measure_raw_import(
            broker, single, changes=args.objects, prefetch=1000, label="single")))
    results["duration_s"] = round(time.time() - started)
    results["latency"] = {str(b): summarize_latency(latency[b], raw_latency[b])
                          for b in args.backups if latency[b]}
    results["import"] = summarize_import(imports, raw_batched, raw_single) if imports else {}
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replication",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 run, 50 changes, 10,000 objects (a smoke test, not a result)")
    parser.add_argument("--runs", type=int, help="repetitions of every scenario (default 3)")
    parser.add_argument("--changes", type=int, help="latency samples per run (default 300)")
    parser.add_argument("--objects", type=int, help="objects imported (default 100,000)")
    parser.add_argument("--backups", type=lambda s: tuple(int(x) for x in s.split(",")),
                        default=BACKUP_COUNTS, help="backup counts for latency (default 1,3,5)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy the master and one backup during the first import")
    add_quiet_options(parser)
    parser.add_argument("--keep", action="store_true", help="keep the workers' data dirs")
    parser.add_argument("--out", type=Path,
                        help="results file (default benchmarks/results/replication.json, "
                             "replication-quick.json with --quick)")
    parser.add_argument("--img-dir", type=Path, default=IMG_DIR)
    args = parser.parse_args(argv)
    suffix = "-quick" if args.quick else ""
    args.out = args.out or RESULTS_DIR / f"replication{suffix}.json"
    args.img_suffix = suffix
    return fill_defaults(args, quick={"runs": 1, "changes": 50, "objects": 10_000},
                         full={"runs": 3, "changes": 300, "objects": 100_000})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_plotting()
    results = run(args)
    results["quick"] = args.quick
    results["verdict"] = verdicts(results)
    results["plots"] = [shown(p) for p in plot(results, args.img_dir, args.img_suffix)]
    write_json(args.out, results)
    print_summary(results)
    log(f"results in {args.out}")


if __name__ == "__main__":
    main()
