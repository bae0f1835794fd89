"""The soak's memory samples: RSS and the memory gauges of each worker, and their trends.

RSS alone cannot tell a cache filling up to its bound from a leak, so beside each RSS sample the
soak scrapes the worker's metrics endpoint (``tasync.memory`` behind it) and the summary splits
RSS into pools that grow for different reasons:

* ``sqlite_mb``: SQLite's memory, mostly the page caches of the node's two connections (the
  store and the totals), each bounded by its ``cache_size`` (about 2 MB by default);
* ``heap_other_mb``: the rest of glibc's heap in use (py-amqp frames, large Python objects);
* ``heap_free_mb``: freed bytes glibc keeps for reuse, the allocator's high-water mark;
* ``other_mb``: RSS outside glibc's heap: Python's object arenas (it maps them itself), thread
  stacks, code;
* ``py_blocks``: live Python memory blocks, which rise steadily only if objects are kept.

``tests/faults/test_soak.py`` records the samples and ``tests/faults/report.py`` draws them; both
summarize with ``summarize`` here, so the report recomputes a recorded run the same way.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

MB = 1 << 20
#: Metrics sampled beside RSS, with the key they get in each sample; bytes become MB.
MEMORY_GAUGES = {"tasync_sqlite_memory_bytes": "sqlite_mb",
                 "tasync_malloc_in_use_bytes": "heap_mb",
                 "tasync_malloc_free_held_bytes": "heap_free_mb",
                 "tasync_python_allocated_blocks": "py_blocks"}
#: The pools the report shows, in order, with their labels; they add up to RSS (but blocks).
POOLS = {
    "other_mb": "outside glibc heap (Python arenas, stacks, code)",
    "heap_other_mb": "glibc heap in use, not SQLite",
    "sqlite_mb": "SQLite (page caches)",
    "heap_free_mb": "glibc free, held for reuse",
    "py_blocks": "Python blocks",
}


class MemorySampler(threading.Thread):
    """Samples each worker's RSS (MB) and memory gauges every ``every_s`` seconds until stopped.

    Each sample is ``{"t": s, name: rss_mb, ..., "mem": {name: {"sqlite_mb": ..., ...}}}``; a
    worker that does not answer its scrape within a second (it is SIGSTOPped) has no ``mem``
    entry that time, rather than a made-up one.

    Args:
        pids: worker name -> process id.
        metrics_ports: worker name -> its ``--metrics-port``.
        every_s: the sampling interval.
    """

    def __init__(self, pids: dict[str, int], metrics_ports: dict[str, int], *,
                 every_s: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = dict(pids)
        self.metrics_ports = metrics_ports
        self.every_s = every_s
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []

    def run(self) -> None:
        procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while not self.stop_event.wait(self.every_s):
            row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 1), "mem": {}}
            for name, proc in procs.items():
                try:
                    row[name] = round(proc.memory_info().rss / MB, 2)
                except psutil.Error:
                    row[name] = None
                gauges = scrape_memory(self.metrics_ports.get(name))
                if gauges:
                    row["mem"][name] = gauges
            self.samples.append(row)


def scrape_memory(port: int | None) -> dict[str, float]:
    """The worker's memory gauges (``MEMORY_GAUGES``), empty when it does not answer in 1 s."""
    if port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        key = MEMORY_GAUGES.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            value = sample.value if key == "py_blocks" else sample.value / MB
            found[key] = round(value, 3)
    return found


def value_of(sample: dict[str, Any], name: str, key: str) -> float | None:
    """One worker's value of KEY (``rss``, a gauge, or a pool of ``POOLS``) in one sample."""
    rss: float | None = sample.get(name)
    gauges: dict[str, float] = sample.get("mem", {}).get(name) or {}
    if key == "rss":
        return None if rss is None else float(rss)
    if key in gauges:
        return float(gauges[key])
    heap, free, sqlite = gauges.get("heap_mb"), gauges.get("heap_free_mb"), gauges.get("sqlite_mb")
    if key == "other_mb" and rss is not None and heap is not None and free is not None:
        return round(rss - heap - free, 3)
    if key == "heap_other_mb" and heap is not None and sqlite is not None:
        return round(heap - sqlite, 3)
    if key == "rss_minus_sqlite_mb" and rss is not None and sqlite is not None:
        return round(rss - sqlite, 3)
    return None


def series(samples: list[dict[str, Any]], name: str, key: str) -> list[tuple[float, float]]:
    """(seconds, value) of one worker's KEY over the run, leaving out samples without it."""
    points = [(float(s["t"]), value_of(s, name, key)) for s in samples]
    return [(t, v) for t, v in points if v is not None]


def trend(points: list[tuple[float, float]], warm_s: float) -> dict[str, float]:
    """Value at the end of warm-up and at the end, and the least-squares slope (per minute) after.

    Args:
        points: (seconds since start, value) pairs, oldest first; at least one.
        warm_s: where warm-up ends; with no point after it, the whole run counts.
    """
    after = [(t, v) for t, v in points if t >= warm_s] or points
    n = len(after)
    mean_t = sum(t for t, _ in after) / n
    mean_v = sum(v for _, v in after) / n
    var = sum((t - mean_t) ** 2 for t, _ in after) or 1.0
    slope = sum((t - mean_t) * (v - mean_v) for t, v in after) / var
    return {"warm": after[0][1], "end": after[-1][1], "peak": max(v for _, v in points),
            "slope_per_min": round(slope * 60, 3)}


def summarize(samples: list[dict[str, Any]], names: list[str], warm_s: float, *,
              tail_share: float = 0.25) -> dict[str, Any]:
    """Per worker: RSS after warm-up, at the end, peak and slope after; the same for each pool.

    The slope over the last ``tail_share`` of the run (``tail_slope_mb_per_min``) is given
    beside the one after warm-up: growth that slows down as caches fill shows as a smaller
    slope there, growth that goes on does not.

    ``gauges`` holds a ``trend`` per pool of ``POOLS`` and for ``rss_minus_sqlite_mb``, for runs
    that sampled the gauges; older runs get RSS only.
    """
    summary: dict[str, Any] = {}
    tail_s = max((float(s["t"]) for s in samples), default=0.0) * (1 - tail_share)
    for name in names:
        points = series(samples, name, "rss")
        rss = trend(points, warm_s)
        item: dict[str, Any] = {"warm_mb": rss["warm"], "end_mb": rss["end"],
                                "peak_mb": rss["peak"], "slope_mb_per_min": rss["slope_per_min"],
                                "tail_slope_mb_per_min": trend(points, tail_s)["slope_per_min"]}
        pools = {key: series(samples, name, key) for key in [*POOLS, "rss_minus_sqlite_mb"]}
        item["gauges"] = {key: trend(points, warm_s) for key, points in pools.items() if points}
        summary[name] = item
    return summary
