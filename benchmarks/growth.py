"""How tasync grows with the configuration: ``python -m benchmarks.growth [--sizes 10000 ...]``.

For each size, a fresh virtual host with a master and three backups (real processes):

* import: one ``tasync config import`` of that many objects, from the CLI's start until every
  backup applied the last change; the backups' peak RSS is sampled meanwhile;
* catch-up: a fourth backup started afterwards, until it is ready at the master's seq, and its
  RSS a few seconds after;
* status: ``tasync status --json``, wall time of the command (every node answers);
* export: ``tasync config export --data-dir`` of a backup to /dev/null, wall time and peak RSS.

Writes ``benchmarks/results/growth.json`` and prints the Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import Broker, Network, last_seq, log, wait_for
from benchmarks.measure import LoadMonitor
from benchmarks.replication import run_import_cli, write_import_file

RESULTS = Path(__file__).parent / "results" / "growth.json"
SIZES = (10_000, 100_000, 1_000_000)
BACKUPS = 3


class PeakRss:
    """Samples the summed RSS of some processes every 0.2 s; ``peak_mb`` per process."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak[name], rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self) -> dict[str, float]:
        return {n: round(v / 2**20, 1) for n, v in self.peak.items()}


def timed_command(command: list[str], *, stdout: Any = subprocess.DEVNULL) -> dict[str, Any]:
    """Run a command; its wall time, exit code and peak RSS (sampled)."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
        time.sleep(0.02)
    proc.wait()
    return {"wall_s": round(time.monotonic() - started, 2), "exit_code": proc.returncode,
            "peak_rss_mb": round(peak / 2**20, 1)}


def measure(broker: Broker, objects: int) -> dict[str, Any]:
    with broker.fresh_vhost("growth") as url, Network(url) as net, LoadMonitor() as load:
        path = write_import_file(net.root / "import.json", objects)
        net.start(BACKUPS)
        head = net.head_seq()
        last = head + objects
        pids = {w.name: w.pid for w in net.backups}
        assert net.master is not None
        pids["master"] = net.master.pid
        with PeakRss(pids) as rss:
            started = time.monotonic()
            cli = run_import_cli(url, path)
            wait_for(lambda: all(last_seq(b.db_path) >= last for b in net.backups),
                     timeout_s=3600, what=f"seq {last} on every backup", interval_s=0.1)
            import_s = time.monotonic() - started
        log(f"{objects:,}: import applied on {BACKUPS} backups in {import_s:.1f} s")
        late = net.start_worker("late")
        started = time.monotonic()
        late.wait_ready(timeout_s=3600)
        wait_for(lambda: last_seq(late.db_path) >= last, timeout_s=3600, what="late caught up")
        catch_up_s = time.monotonic() - started
        time.sleep(5.0)
        late_rss = round(late.rss_bytes() / 2**20, 1)
        status = timed_command([sys.executable, "-m", "tasync", "status", "--json",
                                "--broker", url])
        with open("/dev/null", "wb") as sink:
            export = timed_command([sys.executable, "-m", "tasync", "config", "export",
                                    "--data-dir", str(net.backups[0].data_dir)], stdout=sink)
        return {"objects": objects, "cli": cli, "import_s": round(import_s, 2),
                "peak_rss_mb": rss.peak_mb(), "catch_up_s": round(catch_up_s, 2),
                "catch_up_rss_mb_5s_after": late_rss, "status": status, "export": export,
                "load": load.summary()}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| objects | import on 3 backups (s) | backup peak RSS (MB) | master peak RSS (MB) "
             "| catch-up (s) | catch-up RSS 5 s after (MB) | `status` (s) | `export --data-dir` "
             "(s) | export peak RSS (MB) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    for r in rows:
        backups = max(v for k, v in r["peak_rss_mb"].items() if k != "master")
        lines.append(f"| {r['objects']:,} | {r['import_s']} | {backups} | "
                     f"{r['peak_rss_mb']['master']} | {r['catch_up_s']} | "
                     f"{r['catch_up_rss_mb_5s_after']} | {r['status']['wall_s']} | "
                     f"{r['export']['wall_s']} | {r['export']['peak_rss_mb']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.growth",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    broker = Broker()
    rows = [measure(broker, n) for n in args.sizes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"broker": broker.version(), "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
