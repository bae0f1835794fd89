"""Measuring on a shared machine: statistics, load, machine facts, results files.

Split from ``benchmarks.common`` (which starts and watches tasync processes) because every
benchmark needs these whether or not it starts workers:

* ``summarize``, ``percentile``, ``median``: the statistics reported everywhere.
* ``LoadMonitor``, ``wait_quiet`` and ``run_quiet``: what else ran on the machine while we
  measured, and a bounded wait for a quieter moment before each scenario.
* ``machine_info``, ``code_version``, ``write_json``, ``shown``: what a results file records.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from benchmarks.common import Broker

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
IMG_DIR = REPO / "docs" / "img"
MB = 1 << 20


# -- statistics -------------------------------------------------------------------------------


def require_plotting() -> None:
    """Stop at once, in one line, when the figures cannot be drawn: before minutes of runs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks: the figures need matplotlib; install the bench extra: "
                         "pip install -e '.[bench]'") from None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float], *, digits: int = 2) -> dict[str, float]:
    """n, min, mean, p50, p90, p99 and max of ``values``."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": round(min(values), digits),
        "mean": round(statistics.fmean(values), digits),
        "p50": round(percentile(values, 50), digits),
        "p90": round(percentile(values, 90), digits),
        "p99": round(percentile(values, 99), digits),
        "max": round(max(values), digits),
    }


def median(values: Sequence[float], *, digits: int = 2) -> float:
    """The median of ``values``, rounded (NaN when empty)."""
    return round(statistics.median(values), digits) if values else math.nan


# -- the machine ------------------------------------------------------------------------------


class LoadMonitor:
    """Samples the machine's CPU use and load average in a thread while a scenario runs.

    Other work on a shared machine changes the numbers; this records how busy it was.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.cpu: list[float] = []
        self.load1: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)

    def _run(self) -> None:
        psutil.cpu_percent()
        while not self._stop.wait(self.interval_s):
            self.cpu.append(psutil.cpu_percent())
            self.load1.append(os.getloadavg()[0])

    def __enter__(self) -> LoadMonitor:
        self.load_before = os.getloadavg()[0]
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float | None]:
        """Load average before, mean and max during; mean machine CPU use in percent."""
        return {
            "load1_before": round(self.load_before, 2),
            "load1_max": round(max(self.load1, default=self.load_before), 2),
            "cpu_percent_mean": round(statistics.fmean(self.cpu), 1) if self.cpu else None,
        }


def wait_quiet(*, max_cpu_percent: float, timeout_s: float, sample_s: float = 3.0) -> float:
    """Wait until the machine's CPU use over ``sample_s`` is at most ``max_cpu_percent``.

    On a shared machine this keeps scenarios from starting in the middle of someone else's
    burst; after ``timeout_s`` it gives up and the scenario runs anyway. Returns the last
    CPU use seen, which the results record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        busy = psutil.cpu_percent(interval=sample_s)
        if busy <= max_cpu_percent or time.monotonic() > deadline:
            return float(busy)


def machine_info(broker: Broker) -> dict[str, Any]:
    """CPU, memory, OS, Python and RabbitMQ versions, for the results file."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "rabbitmq": broker.version(),
        "broker": f"{broker.host}:{broker.port} (loopback)",
    }


def code_version() -> dict[str, Any]:
    """The commit measured and how many files differed from it (the tree may be mid-work)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                             timeout=30, check=False)
        return out.stdout.strip()

    changed = [line for line in git("status", "--porcelain").splitlines()
               if not line[3:].startswith(("benchmarks/", "docs/"))]
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "uncommitted_files_outside_benchmarks": len(changed)}


def children_cpu_s() -> float:
    """CPU seconds of this process's finished, waited-for children (e.g. a CLI run)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(usage.ru_utime + usage.ru_stime)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_quiet(measure: Callable[[], dict[str, Any]], *, max_cpu: float,
              wait_s: float) -> dict[str, Any]:
    """Run one measurement once the machine is quiet enough (see ``wait_quiet``).

    The CPU use seen just before is stored in the result's ``load`` so a reader can tell a
    number measured on a busy machine from one measured on a quiet one.
    """
    before = wait_quiet(max_cpu_percent=max_cpu, timeout_s=wait_s) if max_cpu < 100 else None
    result = measure()
    result.setdefault("load", {})["cpu_percent_before"] = before
    return result


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (as results files record it)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def add_quiet_options(parser: argparse.ArgumentParser) -> None:
    """``--quiet-cpu`` and ``--quiet-wait``, which every benchmark hands to ``run_quiet``."""
    parser.add_argument("--quiet-cpu", type=float, default=50.0, metavar="PERCENT",
                        help="before each scenario, wait until the machine's CPU use is at "
                             "most this (default 50; 100 disables)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                        help="give up waiting for a quiet machine after this (default 30)")


def fill_defaults(args: argparse.Namespace, *, quick: dict[str, Any],
                  full: dict[str, Any]) -> argparse.Namespace:
    """Set every option the command line left out, to its ``--quick`` or full size."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def print_verdict(rows: list[dict[str, Any]]) -> None:
    """One ``PASS``/``FAIL`` line per target."""
    for row in rows:
        print(f"{'PASS' if row['pass'] else 'FAIL'}  {row['target']}: {row['value']} "
              f"(target {row['limit']})")
