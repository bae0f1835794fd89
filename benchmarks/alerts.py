"""Alerts: end-to-end throughput against raw py-amqp, failover time, the duplicate window.

    python -m benchmarks.alerts             # full: 20,000 alerts x 3 runs, 20 failovers
    python -m benchmarks.alerts --quick     # 2,000 alerts x 1 run, 5 failovers

Every scenario runs in a fresh vhost with real ``tasync-worker`` processes.

Throughput
    A master ``a`` and a backup ``b``, a ``file://`` destination, the precedence list ``a b``.
    The benchmark process sends N alerts with the sender API (``AlertSender.send_many``, what
    ``tasync send`` and the HTTP intake use: schema check, confirmed publish), in calls of
    ``--batch`` alerts. The time runs from the first send until the ``delivered_at`` of the
    last line the file channel wrote. Baseline, same run, same broker, own vhost: the very
    alert bodies published by py-amqp (persistent, confirms, 1,000 in flight) to one quorum
    queue and consumed by one consumer process with prefetch 1,000 and ``multiple`` acks
    (one per ``RAW_ACK_EVERY`` messages, and whatever is left when the socket is drained):
    the fastest the raw client moves them. Targets: tasync's rate >= 0.8 of that, and
    >= 8,000 alerts/s. The old baseline (prefetch 64, one ack per message) is measured too,
    for history: it is what the ratios before this baseline were taken against.

Duplicate window
    How long after one node delivered an alert another node would still deliver a repeat of
    its id: the time from the ``delivered_at`` of the line the file channel wrote to the
    moment the other node wrote the id into its duplicate window (``learned_at`` in its
    ``totals.db``, written by its ``tasync.handled`` follower). Measured for every alert of
    each throughput run (the window under full load) and for ``--window-alerts`` alerts sent
    one every ``--window-interval`` ms to the list ``master`` alone (an idle network).

Scrape cost
    ``Totals.report()`` over all minute buckets (what a scrape summed before) against
    ``Totals.running_sums()`` (what it reads now), for a totals file of ``--scrape-rows``
    rows, in this process.

Failover
    A master ``m`` (not in the list, so configuration stays up) and nodes ``p`` and ``s`` with
    the list ``p s``. A thread sends one alert every ``--interval`` ms. Once ``p`` delivered a
    few, ``p`` is killed with SIGKILL; the trial's time runs from just before ``kill`` to the
    ``delivered_at`` of the first line ``s`` wrote (the file is shared, so nothing is missed).
    ``p`` is restarted and, once it delivers again, the next trial begins. Target: p99 <= 200 ms
    over 20 trials.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import raw
from benchmarks.common import Broker, Network, Worker, log, wait_for
from benchmarks.measure import (
    IMG_DIR,
    RESULTS_DIR,
    LoadMonitor,
    add_quiet_options,
    code_version,
    fill_defaults,
    machine_info,
    median,
    print_verdict,
    require_plotting,
    run_quiet,
    shown,
    summarize,
    write_json,
)
from benchmarks.profiling import PySpy, top_frames
from tasync.broker import topology
from tasync.broker.alerts import Alert, encode_alert
from tasync.broker.audit import Trail
from tasync.broker.settings import Settings
from tasync.broker.signing import SENDER_HEADER
from tasync.broker.store import NodeStore
from tasync.client import rpc_client
from tasync.consumers.context import NodeContext
from tasync.consumers.totals import DB_NAME, Totals
from tasync.producers.sender import AlertSender

TARGETS = {"throughput_ratio": 0.8, "throughput_alerts_per_s": 8000, "failover_p99_ms": 200.0}
#: The raw baseline's consumer: prefetch and how many messages one ``multiple`` ack covers.
RAW_PREFETCH = 1000
RAW_ACK_EVERY = 100
#: The old baseline's consumer: the workers' former prefetch, one ack per message.
OLD_PREFETCH, OLD_ACK_EVERY = 64, 1


class LineCounter:
    """Counts the lines of an append-only file as it grows, reading only what is new."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.count = 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return 0
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        self.count += data.count(b"\n", 0, complete)
        return self.count


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every alert the file channel wrote."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def make_alerts(count: int, hosts: tuple[str, ...], *, prefix: str) -> list[Alert]:
    """``count`` alerts of 60-odd characters of text, to the ``out`` destination."""
    now = time.time()
    return [Alert(id=f"{prefix}-{i:07d}", source="bench", target_kind="destination",
                  target="out", text=f"disk /var on host{i % 97:02d} is 91% full ({i})",
                  created_at=now, hosts=hosts) for i in range(count)]


def configure(url: str, out: Path, nodes: tuple[str, ...]) -> None:
    """Commit the ``out`` destination and wait until the master knows every node."""
    with rpc_client(Settings.from_url(url)) as rpc:
        rpc.call_one(topology.MASTER, "commit", {"ops": [
            {"op": "set", "kind": "destination", "name": "out",
             "body": {"url": f"file://{out}"}}]}, timeout_s=30)

        def registered() -> bool:
            data = rpc.call_one(topology.MASTER, "show", {"kind": "node"}, timeout_s=10)
            return set(nodes) <= {o["name"] for o in data.get("objects", [])}

        wait_for(registered, timeout_s=60, what="every node registered", interval_s=0.2)


def two_nodes(url: str, net: Network) -> tuple[Path, LineCounter]:
    """``master`` and ``b1`` running, the ``out`` file destination committed and applied."""
    out = net.root / "out.jsonl"
    net.start(1)
    configure(url, out, ("master", "b1"))
    net.wait_in_sync()
    return out, LineCounter(out)


# -- throughput -------------------------------------------------------------------------------


def measure_throughput(broker: Broker, *, count: int, batch: int,
                       profile_dir: Path | None = None) -> dict[str, Any]:
    """Sender API -> file channel, N alerts; see the module docstring.

    With ``profile_dir``, py-spy samples both workers while the alerts flow.
    """
    with broker.fresh_vhost("alerts") as url, Network(url) as net, LoadMonitor() as load:
        out, counter = two_nodes(url, net)
        hosts = ("master", "b1")
        spies = [PySpy(w.pid, profile_dir / f"alerts-{w.name}.txt")
                 for w in net.workers.values()] if profile_dir else []
        with AlertSender(Settings.from_url(url), name="bench") as sender, \
                contextlib.ExitStack() as stack:
            sender.send(make_alerts(1, hosts, prefix="warm")[0])  # creates the list's queue
            wait_for(lambda: counter.poll() >= 1, timeout_s=30, what="the warm-up alert")
            alerts = make_alerts(count, hosts, prefix="a")
            for spy in spies:
                stack.enter_context(spy)
            cpu = {w.name: w.cpu_s() for w in net.workers.values()}
            t_cpu, t0 = time.process_time(), time.time()
            for start in range(0, count, batch):
                sender.send_many(alerts[start:start + batch])
            t_sent, sender_cpu = time.time(), time.process_time() - t_cpu
            wait_for(lambda: counter.poll() >= count + 1, timeout_s=600,
                     what=f"{count} alerts written", interval_s=0.05)
        cpu = {w.name: round(w.cpu_s() - cpu[w.name], 2) for w in net.workers.values()}
        lines = read_lines(out)[1:]
        window = dedup_window(net, lines)
    t_end = max(line["delivered_at"] for line in lines)
    by_node: dict[str, int] = {}
    for line in lines:
        by_node[line["node"]] = by_node.get(line["node"], 0) + 1
    wall = t_end - t0
    return {"alerts": count, "batch": batch, "wall_s": round(wall, 3),
            "send_s": round(t_sent - t0, 3), "alerts_per_s": round(count / wall),
            "unique_ids": len({line["id"] for line in lines}), "by_node": by_node,
            "cpu_s": {**cpu, "sender": round(sender_cpu, 2)},
            "worker_cpu_us_per_alert": round(1e6 * sum(cpu.values()) / count, 1),
            "dedup_window_ms": window, "load": load.summary(),
            **({"profiles": {s.out.stem: top_frames(s.out) for s in spies}} if spies else {})}


def dedup_window(net: Network, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Per delivered alert: when each other node learned its id, after its delivery (ms)."""
    learned: dict[str, dict[str, float]] = {}
    for worker in net.workers.values():
        db = sqlite3.connect(f"file:{worker.data_dir / DB_NAME}?mode=ro", uri=True)
        try:
            learned[worker.name] = dict(db.execute(
                "SELECT id, learned_at FROM seen WHERE learned_at IS NOT NULL").fetchall())
        finally:
            db.close()
    samples, missing = [], 0
    for line in lines:
        for name, ids in learned.items():
            if name == line["node"]:
                continue
            at = ids.get(line["id"])
            if at is None:
                missing += 1
            else:
                samples.append(1000 * (at - line["delivered_at"]))
    return {**summarize(samples), "not_learned": missing}


def measure_window(broker: Broker, *, count: int, interval_s: float) -> dict[str, Any]:
    """Alerts to ``master`` alone, one every ``interval_s``: how soon ``b1`` learns each id."""
    with broker.fresh_vhost("window") as url, Network(url) as net, LoadMonitor() as load:
        out, counter = two_nodes(url, net)
        with AlertSender(Settings.from_url(url), name="bench-window") as sender:
            for alert in make_alerts(count, ("master",), prefix="w"):
                sender.send(alert)
                time.sleep(interval_s)
        wait_for(lambda: counter.poll() >= count, timeout_s=120, what="window alerts written")
        wait_for(lambda: dedup_window(net, read_lines(out))["not_learned"] == 0, timeout_s=60,
                 what="every id learned by b1", interval_s=0.2)
        window = dedup_window(net, read_lines(out))
    return {"alerts": count, "interval_ms": interval_s * 1000, "dedup_window_ms": window,
            "load": load.summary()}


def measure_scrape(*, rows: int) -> dict[str, Any]:
    """What a metrics scrape cost before (sum the buckets) and costs now (running sums)."""
    with tempfile.TemporaryDirectory(prefix="tasync-scrape-") as tmp:
        path = Path(tmp)
        ctx = NodeContext(settings=Settings(), node="s", data_dir=path, store=NodeStore(path),
                          trail=Trail(path, "s"))
        totals = Totals(ctx)
        sources = [f"src{n}" for n in range(20)]
        for minute in range(rows // len(sources)):
            for source in sources:
                totals.count(source, now=60.0 * minute, received=1, delivered=1)
            if minute % 1000 == 0:
                totals.flush()
        totals.flush()
        started = time.perf_counter()
        totals.report()
        sums_ms = 1000 * (time.perf_counter() - started)
        started = time.perf_counter()
        totals.report(since=0)
        buckets_ms = 1000 * (time.perf_counter() - started)
        totals.close()
        ctx.store.close()
    return {"rows": rows, "running_sums_ms": round(sums_ms, 3),
            "bucket_sum_ms": round(buckets_ms, 1)}


def measure_raw(broker: Broker, *, count: int, prefetch: int = RAW_PREFETCH,
                ack_every: int = RAW_ACK_EVERY) -> dict[str, Any]:
    """The same alert bodies through one quorum queue with py-amqp alone."""
    alerts = make_alerts(count, ("a", "b"), prefix="a")
    bodies = [encode_alert(a) for a in alerts]
    headers = [{SENDER_HEADER: "bench"} for _ in alerts]
    with broker.fresh_vhost("rawalerts") as url, LoadMonitor() as load:
        result = raw.fanout_run(url, bodies, headers=headers, queues=1, prefetch=prefetch,
                                window=1000, ack_every=ack_every)
    return {"alerts": count, "prefetch": prefetch, "ack_every": ack_every,
            "wall_s": round(result.wall_s, 3),
            "publish_s": round(result.published - result.started, 3),
            "alerts_per_s": round(count / result.wall_s), "load": load.summary()}


# -- failover ---------------------------------------------------------------------------------


class Trickle:
    """Sends one alert every ``interval_s`` from a thread, with its own sender connection."""

    def __init__(self, url: str, hosts: tuple[str, ...], interval_s: float) -> None:
        self.url, self.hosts, self.interval_s = url, hosts, interval_s
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickle", daemon=True)

    def _ids(self) -> Iterator[Alert]:
        number = 0
        while True:
            number += 1
            yield make_alerts(1, self.hosts, prefix=f"f{number}")[0]

    def _run(self) -> None:
        with AlertSender(Settings.from_url(self.url), name="bench-trickle") as sender:
            for alert in self._ids():
                if self._stop.wait(self.interval_s):
                    return
                try:
                    sender.send(alert)
                except Exception as exc:  # recorded; the trial shows whether it mattered
                    self.errors.append(repr(exc)[:200])
                else:
                    self.sent += 1  # confirmed by the broker

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


def first_by(lines: list[dict[str, Any]], node: str, after: float) -> float | None:
    """``delivered_at`` of the first line ``node`` wrote at or after ``after``."""
    times = [line["delivered_at"] for line in lines
             if line["node"] == node and line["delivered_at"] >= after]
    return min(times, default=None)


def one_failover(primary: Worker, out: Path, *, warm: int) -> dict[str, Any]:
    """Kill ``primary`` once it delivers, time the secondary's first delivery, restart it."""
    counter = LineCounter(out)
    counter.poll()
    mark = time.time()
    wait_for(lambda: (first_by(read_lines(out), primary.name, mark) is not None
                      and counter.poll() >= warm), timeout_s=60,
             what=f"{primary.name} delivering", interval_s=0.02)
    t_kill = time.time()
    os.kill(primary.pid, signal.SIGKILL)
    primary.proc.wait(10)  # type: ignore[union-attr]
    t_taken = wait_for(lambda: first_by(read_lines(out), "s", t_kill), timeout_s=30,
                       what="the secondary's first delivery", interval_s=0.01)
    primary.start()
    primary.wait_ready(60)
    return {"failover_ms": round(1000 * (t_taken - t_kill), 2)}


def measure_failover(broker: Broker, *, trials: int, interval_s: float) -> dict[str, Any]:
    """``trials`` SIGKILLs of the primary while alerts flow; see the module docstring."""
    with broker.fresh_vhost("failover") as url, Network(url) as net, LoadMonitor() as load:
        out = net.root / "out.jsonl"
        net.start_worker("m", role="master").wait_ready(120)
        primary = net.start_worker("p")
        secondary = net.start_worker("s")
        primary.wait_ready(120)
        secondary.wait_ready(120)
        configure(url, out, ("m", "p", "s"))
        net.wait_in_sync()
        runs = []
        with Trickle(url, ("p", "s"), interval_s) as trickle:
            for number in range(1, trials + 1):
                runs.append(one_failover(primary, out, warm=5))
                log(f"failover {number}/{trials}: {runs[-1]['failover_ms']} ms")
        lines = read_lines(out)
    samples = [r["failover_ms"] for r in runs]
    ids = [line["id"] for line in lines]
    return {"trials": trials, "interval_ms": interval_s * 1000, "failover_ms": summarize(samples),
            "samples_ms": samples, "alerts_sent": trickle.sent, "send_errors": trickle.errors[:5],
            "lines_written": len(ids), "duplicate_lines": len(ids) - len(set(ids)),
            "load": load.summary()}


# -- the whole benchmark ----------------------------------------------------------------------


def measure_throughput_runs(broker: Broker, args: argparse.Namespace,
                            quiet: Callable[[Callable[[], dict[str, Any]]], dict[str, Any]]
                            ) -> dict[str, Any]:
    """tasync, the raw baseline and the old baseline, interleaved, ``args.runs`` times."""
    tasync_runs, raw_runs, old_runs = [], [], []
    for number in range(1, args.runs + 1):
        log(f"run {number}/{args.runs}: {args.alerts:,} alerts through tasync")
        profile_dir = args.profile if number == 1 else None
        tasync_runs.append(quiet(functools.partial(measure_throughput, broker,
                                                   count=args.alerts, batch=args.batch,
                                                   profile_dir=profile_dir)))
        log(f"run {number}/{args.runs}: raw baseline (prefetch {RAW_PREFETCH}, multiple acks)")
        raw_runs.append(quiet(lambda: measure_raw(broker, count=args.alerts)))
        log(f"run {number}/{args.runs}: old baseline (prefetch {OLD_PREFETCH}, single acks)")
        old_runs.append(quiet(lambda: measure_raw(broker, count=args.alerts,
                                                  prefetch=OLD_PREFETCH,
                                                  ack_every=OLD_ACK_EVERY)))
        log(f"run {number}/{args.runs}: tasync {tasync_runs[-1]['alerts_per_s']:,}/s, raw "
            f"{raw_runs[-1]['alerts_per_s']:,}/s, old baseline {old_runs[-1]['alerts_per_s']:,}/s")

    def ratios(base: list[dict[str, Any]]) -> list[float]:
        return [t["alerts_per_s"] / r["alerts_per_s"] for t, r in zip(tasync_runs, base,
                                                                       strict=True)]

    return {"alerts_per_s": median([r["alerts_per_s"] for r in tasync_runs], digits=0),
            "raw_alerts_per_s": median([r["alerts_per_s"] for r in raw_runs], digits=0),
            "ratio": median(ratios(raw_runs), digits=3),
            "old_raw_alerts_per_s": median([r["alerts_per_s"] for r in old_runs], digits=0),
            "old_ratio": median(ratios(old_runs), digits=3),
            "runs": tasync_runs, "raw_runs": raw_runs, "old_raw_runs": old_runs}


def throughput_verdict(thr: dict[str, Any]) -> list[dict[str, Any]]:
    """The two throughput targets: the ratio to the raw path, and the rate itself."""
    return [
        {"target": "alerts/s vs raw py-amqp (prefetch 1,000, multiple acks), same run "
                   "(median of per-run ratios)",
         "value": thr["ratio"], "limit": f">= {TARGETS['throughput_ratio']}",
         "pass": thr["ratio"] >= TARGETS["throughput_ratio"]},
        {"target": "alerts/s end to end (median)", "value": thr["alerts_per_s"],
         "limit": f">= {TARGETS['throughput_alerts_per_s']:,}",
         "pass": thr["alerts_per_s"] >= TARGETS["throughput_alerts_per_s"]}]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput (interleaved with its baseline) ``args.runs`` times, then the failovers."""
    broker = Broker()

    def quiet(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return run_quiet(measure, max_cpu=args.quiet_cpu, wait_s=args.quiet_wait)

    results: dict[str, Any] = {
        "benchmark": "alerts", "command": "python -m benchmarks.alerts " + " ".join(sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(broker),
        "code": code_version(), "targets": TARGETS, "quick": args.quick,
        "parameters": {"runs": args.runs, "alerts": args.alerts, "batch": args.batch,
                       "window_alerts": args.window_alerts,
                       "window_interval_ms": args.window_interval * 1000,
                       "scrape_rows": args.scrape_rows,
                       "trials": args.trials, "interval_ms": args.interval * 1000,
                       "quiet_cpu_percent": args.quiet_cpu}}
    results["throughput"] = measure_throughput_runs(broker, args, quiet)
    if args.throughput_only:
        results["verdict"] = throughput_verdict(results["throughput"])
        return results
    log(f"duplicate window: {args.window_alerts} alerts, one every "
        f"{args.window_interval * 1000:g} ms")
    results["dedup_window"] = quiet(lambda: measure_window(
        broker, count=args.window_alerts, interval_s=args.window_interval))
    results["dedup_window"]["under_load_p99_ms"] = [
        r["dedup_window_ms"].get("p99") for r in results["throughput"]["runs"]]
    log(f"scrape cost over {args.scrape_rows:,} totals rows")
    results["scrape"] = measure_scrape(rows=args.scrape_rows)
    log(f"failover: {args.trials} trials")
    results["failover"] = quiet(lambda: measure_failover(broker, trials=args.trials,
                                                         interval_s=args.interval))
    results["verdict"] = [
        *throughput_verdict(results["throughput"]),
        {"target": f"failover SIGKILL -> first delivery by the secondary, p99 over "
                   f"{args.trials} (ms)", "value": results["failover"]["failover_ms"]["p99"],
         "limit": "<= 200",
         "pass": results["failover"]["failover_ms"]["p99"] <= TARGETS["failover_p99_ms"]}]
    return results


def plot(results: dict[str, Any], img_dir: Path, suffix: str) -> list[Path]:
    """Rates of tasync, the raw path and the old baseline per run; the failover times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    failover = results.get("failover")
    fig, axes = plt.subplots(1, 2 if failover else 1, figsize=(11 if failover else 6, 4.2),
                             squeeze=False)
    rates = axes[0][0]
    thr = results["throughput"]
    runs = range(1, len(thr["runs"]) + 1)
    rates.bar([r - 0.27 for r in runs], [x["alerts_per_s"] for x in thr["runs"]], 0.27,
              label="tasync: sender API -> file channel")
    rates.bar(list(runs), [x["alerts_per_s"] for x in thr["raw_runs"]], 0.27,
              label=f"raw py-amqp, prefetch {RAW_PREFETCH}, multiple acks", color="tab:grey")
    rates.bar([r + 0.27 for r in runs], [x["alerts_per_s"] for x in thr["old_raw_runs"]],
              0.27, label=f"old baseline: prefetch {OLD_PREFETCH}, single acks",
              color="lightgrey")
    rates.axhline(TARGETS["throughput_alerts_per_s"], color="grey", linestyle="--",
                  label="rate target")
    rates.set_xticks(list(runs), [f"run {r}" for r in runs])
    rates.set_ylabel("alerts per second")
    rates.set_title(f"{results['parameters']['alerts']:,} alerts, ratio {thr['ratio']:.2f} "
                    f"(target >= {TARGETS['throughput_ratio']})")
    rates.legend(fontsize="small", loc="lower right")
    if failover:
        fail = axes[0][1]
        samples = sorted(failover["samples_ms"])
        fail.plot(range(1, len(samples) + 1), samples, marker="o")
        fail.axhline(TARGETS["failover_p99_ms"], color="grey", linestyle="--",
                     label="p99 target")
        fail.set_xlabel("trial (sorted)")
        fail.set_ylabel("SIGKILL -> first delivery by secondary (ms)")
        stats = failover["failover_ms"]
        fail.set_title(f"Failover: p50 {stats['p50']} ms, p99 {stats['p99']} ms")
        fail.set_ylim(bottom=0)
        fail.legend(fontsize="small")
    fig.tight_layout()
    path = img_dir / f"alerts{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alerts",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2,000 alerts, 1 run, 5 failovers, 50 window alerts")
    parser.add_argument("--runs", type=int, help="throughput repetitions (default 3)")
    parser.add_argument("--alerts", type=int, help="alerts per throughput run (default 20,000)")
    parser.add_argument("--batch", type=int, default=1000, help="alerts per send_many call")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the throughput runs and their baselines (no duplicate "
                             "window, scrape cost or failover); results in alerts-throughput"
                             "[-quick].json")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy both workers during the first throughput run (raw "
                             "profiles in DIR, the busiest functions in the results)")
    parser.add_argument("--trials", type=int, help="failovers (default 20)")
    parser.add_argument("--interval", type=lambda s: float(s) / 1000, default=0.005,
                        metavar="MS", help="pause between two failover alerts (default 5)")
    parser.add_argument("--window-alerts", type=int, help="alerts of the idle duplicate-window "
                        "measurement (default 200)")
    parser.add_argument("--window-interval", type=lambda s: float(s) / 1000, default=0.02,
                        metavar="MS", help="pause between two of them (default 20)")
    parser.add_argument("--scrape-rows", type=int, help="totals rows for the scrape cost "
                        "(default 1,000,000)")
    add_quiet_options(parser)
    parser.add_argument("--img-dir", type=Path, default=IMG_DIR)
    args = parser.parse_args(argv)
    return fill_defaults(args, quick={"runs": 1, "alerts": 2_000, "trials": 5,
                                      "window_alerts": 50, "scrape_rows": 100_000},
                         full={"runs": 3, "alerts": 20_000, "trials": 20,
                               "window_alerts": 200, "scrape_rows": 1_000_000})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_plotting()
    results = run(args)
    suffix = ("-throughput" if args.throughput_only else "") + ("-quick" if args.quick else "")
    results["plots"] = [shown(p) for p in plot(results, args.img_dir, suffix)]
    path = RESULTS_DIR / f"alerts{suffix}.json"
    write_json(path, results)
    print_verdict(results["verdict"])
    log(f"results in {path}")


if __name__ == "__main__":
    main()
