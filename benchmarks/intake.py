"""The HTTP intake against the sender API called in process, on the same broker, same run.

    python -m benchmarks.intake             # full: 20,000 alerts x 3 runs, 1,000 single requests
    python -m benchmarks.intake --quick     # 4,000 alerts x 1 run, 200 single requests

Every run uses a fresh vhost with a real master and a backup ``b1`` that is then stopped: the
alerts go to the precedence list ``b1``, whose queue has no consumer, so what is timed is the
way in (check, publish, broker confirm) and not delivery, and neither side shares the cores
with a delivering worker.

In process
    ``AlertSender.send_many`` (names checked, schema checked, confirmed publish) in calls of
    ``--batch`` alerts, N alerts; and ``send`` of one alert at a time for the latency.

HTTP
    A real ``tasync intake`` process (four senders) on 127.0.0.1; the benchmark posts the same
    alerts as JSON lists of ``--batch`` alerts to ``POST /alerts`` over one keep-alive
    connection (bodies encoded before the clock starts), then with four connections side by
    side; then single-alert requests one after another over one keep-alive connection, each
    timed from its first byte sent to the 202 read. Every answer must be 202.

Targets: HTTP in batches >= 0.8 of the in-process rate of the same run (median of per-run
ratios) and >= 5,000 alerts/s; the p99 of a single-alert request is reported.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.alerts import configure, make_alerts
from benchmarks.common import Broker, Network, log
from benchmarks.measure import (
    RESULTS_DIR,
    LoadMonitor,
    add_quiet_options,
    code_version,
    fill_defaults,
    machine_info,
    median,
    print_verdict,
    run_quiet,
    summarize,
    write_json,
)
from tasync.broker.alerts import Alert
from tasync.broker.settings import Settings
from tasync.producers.sender import AlertSender

TARGETS = {"ratio": 0.8, "alerts_per_s": 5000.0}
HOSTS = ("b1",)
CLIENTS = 4


def body_of(alerts: list[Alert]) -> bytes:
    return json.dumps([{"source": a.source, "destination": a.target, "message": a.text,
                        "id": a.id} for a in alerts]).encode()


def bodies(count: int, batch: int, prefix: str) -> list[bytes]:
    """Request bodies of ``batch`` alerts each, ``count`` alerts in all."""
    alerts = make_alerts(count, HOSTS, prefix=prefix)
    return [body_of(alerts[first:first + batch]) for first in range(0, count, batch)]


class Intake:
    """A ``tasync intake`` process for the benchmark."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasync", "intake", "--listen", "127.0.0.1:0", "--broker",
             url, "--default-host", *HOSTS, "--senders", str(CLIENTS)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        host, _, port = self.proc.stdout.readline().strip().rpartition(":")
        self.host, self.port = host, int(port)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def post(conn: http.client.HTTPConnection, body: bytes) -> None:
    conn.request("POST", "/alerts", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    if response.status != 202:
        raise RuntimeError(f"intake answered {response.status}: {payload[:300]!r}")


def http_rate(intake: Intake, bodies: list[bytes], count: int, clients: int) -> float:
    """Alerts per second posting ``bodies`` over ``clients`` keep-alive connections."""
    connections = [intake.connection() for _ in range(clients)]
    for conn in connections:
        post(conn, bodies[0])  # connect and warm up: the first body is posted twice

    def share(index: int) -> None:
        for body in bodies[index::clients]:
            post(connections[index], body)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(share, range(clients)))
    elapsed = time.perf_counter() - start
    for conn in connections:
        conn.close()
    return count / elapsed


def singles_ms(send_one: Any, count: int) -> list[float]:
    times = []
    for number in range(count):
        start = time.perf_counter()
        send_one(number)
        times.append(1000 * (time.perf_counter() - start))
    return times


def measure(broker: Broker, *, count: int, batch: int, singles: int) -> dict[str, Any]:
    """One run: in process, then over HTTP, same vhost; see the module docstring."""
    with broker.fresh_vhost("intake") as url, Network(url) as net, LoadMonitor() as load:
        net.start(1)
        configure(url, net.root / "out.jsonl", ("master", "b1"))
        net.workers["b1"].stop()
        with AlertSender(Settings.from_url(url), name="bench") as sender:
            sender.send(make_alerts(1, HOSTS, prefix="warm")[0])  # the list's queue exists
            alerts = make_alerts(count, HOSTS, prefix="p")
            start = time.perf_counter()
            for first in range(0, count, batch):
                sender.send_many(alerts[first:first + batch])
            in_process = count / (time.perf_counter() - start)
            one = make_alerts(singles, HOSTS, prefix="ps")
            in_process_ms = singles_ms(lambda n: sender.send(one[n]), singles)
        intake = Intake(url)
        try:
            over_http = http_rate(intake, bodies(count, batch, "h"), count, 1)
            over_http_4 = http_rate(intake, bodies(count, batch, "hp"), count, CLIENTS)
            conn = intake.connection()
            single_bodies = [body_of(make_alerts(1, HOSTS, prefix=f"hs{n}"))
                             for n in range(singles)]
            post(conn, single_bodies[0])
            http_ms = singles_ms(lambda n: post(conn, single_bodies[n]), singles)
            conn.close()
        finally:
            intake.close()
    return {"alerts": count, "batch": batch,
            "in_process_alerts_per_s": round(in_process),
            "http_alerts_per_s": round(over_http),
            f"http_{CLIENTS}_connections_alerts_per_s": round(over_http_4),
            "ratio": round(over_http / in_process, 3),
            "single_in_process_ms": summarize(in_process_ms),
            "single_http_ms": summarize(http_ms), "load": load.summary()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    broker = Broker()
    results: dict[str, Any] = {
        "benchmark": "intake", "command": "python -m benchmarks.intake " + " ".join(sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(broker),
        "code": code_version(), "targets": TARGETS, "quick": args.quick,
        "parameters": {"runs": args.runs, "alerts": args.alerts, "batch": args.batch,
                       "singles": args.singles}}
    runs = []
    for number in range(1, args.runs + 1):
        log(f"run {number}/{args.runs}: {args.alerts:,} alerts in process and over HTTP")
        runs.append(run_quiet(lambda: measure(broker, count=args.alerts, batch=args.batch,
                                              singles=args.singles),
                              max_cpu=args.quiet_cpu, wait_s=args.quiet_wait))
        log(f"  {runs[-1]['http_alerts_per_s']:,} alerts/s over HTTP, "
            f"{runs[-1]['in_process_alerts_per_s']:,} in process")
    key = f"http_{CLIENTS}_connections_alerts_per_s"
    summary = {
        "in_process_alerts_per_s": median([r["in_process_alerts_per_s"] for r in runs], digits=0),
        "http_alerts_per_s": median([r["http_alerts_per_s"] for r in runs], digits=0),
        key: median([r[key] for r in runs], digits=0),
        "ratio": median([r["ratio"] for r in runs], digits=3),
        "single_http_p50_ms": median([r["single_http_ms"]["p50"] for r in runs]),
        "single_http_p99_ms": median([r["single_http_ms"]["p99"] for r in runs]),
        "single_in_process_p99_ms": median([r["single_in_process_ms"]["p99"] for r in runs])}
    results["summary"] = summary
    results["runs"] = runs
    results["verdict"] = [
        {"target": "HTTP in batches vs AlertSender in process, same run (median ratio)",
         "value": summary["ratio"], "limit": ">= 0.8",
         "pass": summary["ratio"] >= TARGETS["ratio"]},
        {"target": f"HTTP in batches of {args.batch} (alerts/s, median)",
         "value": summary["http_alerts_per_s"], "limit": ">= 5000",
         "pass": summary["http_alerts_per_s"] >= TARGETS["alerts_per_s"]},
        {"target": "single-alert request over keep-alive, p99 (ms; reported)",
         "value": summary["single_http_p99_ms"], "limit": "reported", "pass": True}]
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.intake",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,000 alerts, 1 run")
    parser.add_argument("--runs", type=int, help="repetitions (default 3)")
    parser.add_argument("--alerts", type=int, help="alerts per run and side (default 20,000)")
    parser.add_argument("--batch", type=int, default=500, help="alerts per call or request")
    parser.add_argument("--singles", type=int, help="single-alert requests (default 1,000)")
    add_quiet_options(parser)
    args = parser.parse_args(argv)
    return fill_defaults(args, quick={"runs": 1, "alerts": 4_000, "singles": 200},
                         full={"runs": 3, "alerts": 20_000, "singles": 1_000})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    path = RESULTS_DIR / f"intake{'-quick' if args.quick else ''}.json"
    write_json(path, results)
    print_verdict(results["verdict"])
    log(f"results in {path}")


if __name__ == "__main__":
    main()
