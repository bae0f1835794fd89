"""Issue 3, configuration replication: latency, bulk import against raw py-amqp, memory.

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
from pathlib import Path
from typing import Any

from benchmarks import raw
from benchmarks.common import (
    IMG_DIR,
    MB,
    REPO,
    RESULTS_DIR,
    Broker,
    LoadMonitor,
    Network,
    TrailFollower,
    children_cpu_s,
    code_version,
    commit_times,
    log,
    machine_info,
    median,
    summarize,
    wait_for,
    wait_quiet,
    write_json,
)
from benchmarks.profiling import PySpy, top_frames
from broker import kinds, topology
from broker.messages import Change, ChangeBatch
from broker.settings import Settings
from producers.relay import batch_messages, chunk
from tasync.client import rpc_client

BACKUP_COUNTS = (1, 3, 5)
IMPORT_BACKUPS = 3
#: Pause between two latency samples, after every backup applied the previous change.
GAP_S = 0.01
#: How long a worker is left alone before its resident memory is read.
SETTLE_S = 3.0
TARGETS = {
    "latency_p99_ms_3_backups": 50.0,
    "import_wall_s": 10.0,
    "import_vs_raw_ratio": 0.3,
    "idle_backup_rss_mb": 80.0,
}


def destination(index: int) -> tuple[str, dict[str, Any]]:
    """The ``index``-th benchmark object: a file destination, as an operator would add one."""
    return f"bench-{index:06d}", {"url": f"file:///var/tmp/tasync-bench/{index}.jsonl"}


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
                wait_for(lambda s=seq: all(f.poll() >= s for f in followers.values()),
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
    """Run one measurement once the machine is quiet enough (see ``wait_quiet``)."""
    before = None
    if args.quiet_cpu < 100:
        before = wait_quiet(max_cpu_percent=args.quiet_cpu, timeout_s=args.quiet_wait)
    result = measure()
    result["load"]["cpu_percent_before"] = before
    return result


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
            latency[backups].append(scenario(args, lambda b=backups: measure_latency(
                broker, backups=b, changes=args.changes, keep=args.keep)))
            raw_latency[backups].append(scenario(args, lambda b=backups: measure_raw_latency(
                broker, queues=b, count=args.changes)))
        if not args.objects:
            continue
        log(f"run {number}/{args.runs}: import of {args.objects} objects, 3 backups")
        profile_dir = args.profile if number == 1 else None
        imports.append(scenario(args, lambda p=profile_dir: measure_import(
            broker, objects=args.objects, keep=args.keep, profile_dir=p)))
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


def summarize_latency(runs: list[dict[str, Any]], raw_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over runs of each run's percentiles, plus every sample for the CDF."""
    def med(key: str, stat: str, rows: list[dict[str, Any]] = runs) -> float:
        return median([r[key][stat] for r in rows])

    return {
        "commit_to_all_p50_ms": med("commit_to_all_ms", "p50"),
        "commit_to_all_p99_ms": med("commit_to_all_ms", "p99"),
        "request_to_all_p50_ms": med("request_to_all_ms", "p50"),
        "request_to_all_p99_ms": med("request_to_all_ms", "p99"),
        "raw_publish_to_all_p50_ms": med("publish_to_all_ms", "p50", raw_runs),
        "raw_publish_to_all_p99_ms": med("publish_to_all_ms", "p99", raw_runs),
        "runs": [{k: v for k, v in r.items() if k != "samples_ms"} for r in runs],
        "raw_runs": raw_runs,
        "samples_ms": [x for r in runs for x in r["samples_ms"]],
    }


def summarize_import(runs: list[dict[str, Any]], batched: list[dict[str, Any]],
                     single: list[dict[str, Any]]) -> dict[str, Any]:
    rate = median([r["changes_per_s"] for r in runs], digits=0)
    rate_batched = median([r["changes_per_s"] for r in batched], digits=0)
    rate_single = median([r["changes_per_s"] for r in single], digits=0)
    return {
        "wall_s": median([r["wall_s"] for r in runs]),
        "changes_per_s": rate,
        "raw_same_batching_changes_per_s": rate_batched,
        "raw_per_message_changes_per_s": rate_single,
        "ratio_vs_raw_same_batching": round(rate / rate_batched, 3),
        "ratio_vs_raw_per_message": round(rate / rate_single, 3),
        "cli_failures": sum(1 for r in runs if r["cli"]["exit_code"]),
        "idle_backup_rss_mb": median([v for r in runs for n, v in r["rss_mb"]["idle"].items()
                                      if n != "master"]),
        "after_import_backup_rss_mb": median([v for r in runs
                                              for n, v in r["rss_mb"]["after_import"].items()
                                              if n != "master"]),
        "runs": runs,
        "raw_same_batching_runs": batched,
        "raw_per_message_runs": single,
    }


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target, the measured median and whether it is met."""
    rows = []
    lat3 = results["latency"].get(str(3))
    if lat3:
        rows.append(_verdict("commit -> applied on 3 backups, p99 (ms)",
                             lat3["commit_to_all_p99_ms"], "<=",
                             TARGETS["latency_p99_ms_3_backups"]))
    imp = results["import"]
    if imp:
        rows.append(_verdict(f"import of {results['parameters']['objects']:,} objects on 3 "
                             "backups, wall (s)", imp["wall_s"], "<=", TARGETS["import_wall_s"]))
        rows.append(_verdict("import rate / raw rate, same batching",
                             imp["ratio_vs_raw_same_batching"], ">=",
                             TARGETS["import_vs_raw_ratio"]))
        rows.append(_verdict("import rate / raw rate, one message per change",
                             imp["ratio_vs_raw_per_message"], ">=",
                             TARGETS["import_vs_raw_ratio"]))
        rows.append(_verdict("import CLI runs that failed", imp["cli_failures"], "<=", 0))
        rows.append(_verdict("idle backup RSS (MB)", imp["idle_backup_rss_mb"], "<=",
                             TARGETS["idle_backup_rss_mb"]))
    return rows


def _verdict(what: str, value: float, op: str, limit: float) -> dict[str, Any]:
    ok = value <= limit if op == "<=" else value >= limit
    return {"target": what, "value": value, "limit": f"{op} {limit:g}", "pass": ok}


# -- plots ------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def plot(results: dict[str, Any], img_dir: Path, suffix: str = "") -> list[Path]:
    """Write the latency and import figures that ``docs/benchmarks.md`` shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw, data in (("latency", plot_latency, results["latency"]),
                             ("import", plot_import, results["import"])):
        if not data:
            continue
        fig = plt.figure(figsize=(11, 4.2))
        draw(fig, results)
        fig.tight_layout()
        path = img_dir / f"replication-{name}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _backups_label(key: str) -> str:
    return f"{key} backup" + ("" if key == "1" else "s")


def plot_latency(fig: Any, results: dict[str, Any]) -> None:
    """Left: CDF of every sample; right: p50 and p99 against the raw fanout's."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    latency = results["latency"]
    limit = TARGETS["latency_p99_ms_3_backups"]
    cdf, bars = fig.subplots(1, 2)
    for key, data in latency.items():
        samples = sorted(data["samples_ms"])
        cdf.step(samples, [(i + 1) / len(samples) for i in range(len(samples))], where="post",
                 label=_backups_label(key))
    cdf.axvline(limit, color="grey", linestyle="--", linewidth=1, label="p99 target (3)")
    cdf.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    cdf.set_xscale("log")
    cdf.xaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]))
    cdf.xaxis.set_major_formatter(ScalarFormatter())
    cdf.xaxis.set_minor_formatter(NullFormatter())
    cdf.set_xlabel("commit on master -> applied on every backup (ms, log scale)")
    cdf.set_ylabel("fraction of changes")
    runs = results["parameters"]["runs"]
    cdf.set_title(f"Latency CDF ({runs} run{'s' * (runs != 1)} pooled)")
    cdf.legend(loc="lower right", fontsize="small")
    keys = list(latency)
    width = 0.2
    series = [("commit_to_all_p50_ms", "tasync p50"), ("commit_to_all_p99_ms", "tasync p99"),
              ("raw_publish_to_all_p50_ms", "raw fanout p50"),
              ("raw_publish_to_all_p99_ms", "raw fanout p99")]
    for offset, (field, label) in enumerate(series):
        bars.bar([x + (offset - 1.5) * width for x in range(len(keys))],
                 [latency[k][field] for k in keys], width, label=label)
    bars.axhline(limit, color="grey", linestyle="--", linewidth=1, label="p99 target (3)")
    bars.set_xticks(range(len(keys)), [_backups_label(k) for k in keys])
    bars.set_ylabel("ms (median over runs)")
    bars.set_title("tasync against raw py-amqp, same fanout")
    bars.legend(fontsize="small")


def plot_import(fig: Any, results: dict[str, Any]) -> None:
    """Left: changes/s of tasync and both raw baselines; right: the import's phases."""
    imp = results["import"]
    rates, phases = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    labels = ["tasync import\n(CLI -> 3 backups)", "raw, same batching\n(1,000 / message)",
              "raw, one change\nper message"]
    values = [imp["changes_per_s"], imp["raw_same_batching_changes_per_s"],
              imp["raw_per_message_changes_per_s"]]
    rates.bar(labels, values, color=["tab:blue", "tab:grey", "tab:olive"])
    rates.set_yscale("log")
    for i, value in enumerate(values):
        rates.annotate(f"{value:,.0f}/s", (i, value), ha="center", va="bottom", fontsize=9)
    rates.set_ylabel("changes on all 3 backups per second (log)")
    rates.set_title(f"{results['parameters']['objects']:,} changes, median of runs")
    left = 0.0
    for name in ("cli_start_to_master_commit", "master_commit_to_cli_exit",
                 "cli_exit_to_last_backup_applied"):
        width_s = median([r["phases_s"][name] for r in imp["runs"]])
        phases.barh([0], [width_s], left=left, height=0.5, label=name.replace("_", " "))
        left += width_s
    phases.axvline(TARGETS["import_wall_s"], color="grey", linestyle="--", linewidth=1,
                   label=f"target {TARGETS['import_wall_s']:g} s")
    phases.set_yticks([])
    phases.set_ylim(-0.5, 1.6)
    phases.set_xlabel("seconds from CLI start (median of runs)")
    phases.set_title("Where the import time goes")
    phases.legend(fontsize="small", loc="upper left")


def print_summary(results: dict[str, Any]) -> None:
    for key, data in results["latency"].items():
        print(f"latency, {key} backups: commit->all p50 {data['commit_to_all_p50_ms']} ms, "
              f"p99 {data['commit_to_all_p99_ms']} ms (raw fanout p50 "
              f"{data['raw_publish_to_all_p50_ms']}, p99 {data['raw_publish_to_all_p99_ms']})")
    imp = results["import"]
    if imp:
        print(f"import: {imp['wall_s']} s, {imp['changes_per_s']:,.0f} changes/s; raw same "
              f"batching {imp['raw_same_batching_changes_per_s']:,.0f}/s, raw per message "
              f"{imp['raw_per_message_changes_per_s']:,.0f}/s; RSS idle "
              f"{imp['idle_backup_rss_mb']} MB, after {imp['after_import_backup_rss_mb']} MB")
    for row in results["verdict"]:
        print(f"{'PASS' if row['pass'] else 'FAIL'}  {row['target']}: {row['value']} "
              f"(target {row['limit']})")


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
    parser.add_argument("--quiet-cpu", type=float, default=50.0, metavar="PERCENT",
                        help="before each scenario, wait until the machine's CPU use is at "
                             "most this (default 50; 100 disables)")
    parser.add_argument("--quiet-wait", type=float, default=120.0, metavar="SECONDS",
                        help="give up waiting for a quiet machine after this (default 120)")
    parser.add_argument("--keep", action="store_true", help="keep the workers' data dirs")
    parser.add_argument("--out", type=Path,
                        help="results file (default benchmarks/results/replication.json, "
                             "replication-quick.json with --quick)")
    parser.add_argument("--img-dir", type=Path, default=IMG_DIR)
    args = parser.parse_args(argv)
    suffix = "-quick" if args.quick else ""
    args.out = args.out or RESULTS_DIR / f"replication{suffix}.json"
    args.img_suffix = suffix
    quick = {"runs": 1, "changes": 50, "objects": 10_000}
    full = {"runs": 3, "changes": 300, "objects": 100_000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    results["quick"] = args.quick
    results["verdict"] = verdicts(results)
    results["plots"] = [_shown(p) for p in plot(results, args.img_dir, args.img_suffix)]
    write_json(args.out, results)
    print_summary(results)
    log(f"results in {args.out}")


if __name__ == "__main__":
    main()
