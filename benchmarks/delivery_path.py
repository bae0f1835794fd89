"""The delivering worker's per-alert steps, the former way against the present way, in process.

    python -m benchmarks.delivery_path              # 20,000 alerts, best of 5
    python -m benchmarks.delivery_path --alerts 5000 --repeat 3

A profile of a delivering worker (``python -m benchmarks.alerts --throughput-only --profile
DIR``) showed where its time went: trail lines, the file channel, resolving the target again,
totals. Each step is timed here both ways on the same machine, minutes apart at most, with a
real ``NodeStore``, ``Trail`` and ``Totals`` in a temporary directory, in batches of 500 as
the worker takes them. The former ways are still what the code offers outside the delivery
worker (``Trail.event``, ``resolve``, ``Totals.count``), or are written out here (opening the
file per line, ``json.dumps``). Results in ``benchmarks/results/delivery_path.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import log
from benchmarks.measure import RESULTS_DIR, code_version, write_json
from tasync.broker.audit import Trail
from tasync.broker.messages import Change
from tasync.broker.settings import Settings
from tasync.broker.store import NodeStore
from tasync.consumers.context import NodeContext
from tasync.consumers.delivery import channels
from tasync.consumers.delivery.executor import PlanCache
from tasync.consumers.delivery.resolve import resolve
from tasync.consumers.totals import Tally, Totals

BATCH = 500


def payload(number: int) -> dict[str, Any]:
    """What the file channel writes for one alert (as ``Executor.payload`` makes it)."""
    now = time.time()
    return {"id": f"a-{number:07d}", "destination": "out",
            "text": f"disk /var on host{number % 97:02d} is 91% full ({number})",
            "subject": f"disk /var on host{number % 97:02d} is 91% full ({number})",
            "source": "bench", "priority": 5, "target_kind": "destination", "target": "out",
            "hosts": ["master", "b1"], "created_at": now, "node": "master",
            "delivered_at": now}


def best_us(step: Callable[[int], None], batch_end: Callable[[], None], *, alerts: int,
            repeat: int) -> float:
    """Best of ``repeat`` runs, CPU µs per alert, ``batch_end`` after every ``BATCH``."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for number in range(alerts):
            step(number)
            if number % BATCH == BATCH - 1:
                batch_end()
        batch_end()
        best = min(best, time.process_time() - started)
    return round(1e6 * best / alerts, 2)


def nothing() -> None:
    return None


def measure(root: Path, *, alerts: int, repeat: int) -> dict[str, dict[str, float]]:
    """Each step's cost per alert, the former way and the present way."""
    store = NodeStore(root / "store")
    store.commit([Change(epoch=1, seq=1, ts=time.time(), origin="m", op="set",
                         kind="destination", name="out",
                         body={"url": f"file://{root}/out.jsonl"})])
    trail = Trail(root / "trail", "master")
    ctx = NodeContext(settings=Settings(), node="master", data_dir=root / "totals",
                      store=store, trail=trail)
    totals = Totals(ctx)
    fields = {"source": "bench", "destination": "out", "list": "master.b1", "attempts": 1,
              "sender": "bench", "created_at": f"{time.time():.3f}"}
    path = str(root / "out.jsonl")
    cache = PlanCache(store, lambda: store.last_seq)
    tally = Tally()
    results: dict[str, dict[str, float]] = {}

    def both(name: str, old: tuple[Callable[[int], None], Callable[[], None]],
             new: tuple[Callable[[int], None], Callable[[], None]]) -> None:
        gc.collect()
        before = best_us(*old, alerts=alerts, repeat=repeat)
        after = best_us(*new, alerts=alerts, repeat=repeat)
        results[name] = {"before_us": before, "after_us": after}
        log(f"{name}: {before} -> {after} µs per alert")

    def file_old(number: int) -> None:
        line = (json.dumps(payload(number), ensure_ascii=False, separators=(",", ":"))
                + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    both("trail line", (lambda n: trail.event("alert.delivered", id=f"a-{n}", **fields),
                        nothing),
         (lambda n: trail.defer("alert.delivered", id=f"a-{n}", **fields), trail.flush))
    both("file channel", (file_old, nothing),
         (lambda n: channels.send_file(f"file://{path}", payload(n)), nothing))
    both("resolve the target", (lambda n: resolve(store, "destination", "out"), nothing),
         (lambda n: cache.resolve("destination", "out"), cache.refresh))

    def count_old(number: int) -> None:
        totals.count("bench", received=1, redelivered=0)
        totals.count("bench", delivered=1, taken_over=0)

    def count_new(number: int) -> None:
        tally.add("bench", "received")
        tally.add("bench", "delivered")

    both("totals", (count_old, nothing), (count_new, lambda: tally.add_to(totals)))
    totals.close()
    trail.close()
    store.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.delivery_path",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the best counts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tasync-path-") as tmp:
        results = measure(Path(tmp), alerts=args.alerts, repeat=args.repeat)
    total = {"before_us": round(sum(r["before_us"] for r in results.values()), 2),
             "after_us": round(sum(r["after_us"] for r in results.values()), 2)}
    log(f"together: {total['before_us']} -> {total['after_us']} µs per alert")
    write_json(RESULTS_DIR / "delivery_path.json", {
        "benchmark": "delivery_path", "alerts": args.alerts, "repeat": args.repeat,
        "code": code_version(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": results, "together": total})


if __name__ == "__main__":
    main()
