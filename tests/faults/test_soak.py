"""Soak: hours of service squeezed into minutes, with faults, watching every worker's memory.

    TASYNC_SOAK_SECONDS=1200 python -m pytest tests/faults/test_soak.py -m soak -s

Defaults: 20 minutes, 50 alerts/s (two sources) and 5 changes/s (through the master's commit
request, the code behind ``tasync config set``; names cycle through a pool of 200 so the
configuration stays the same size), a fault every 3 minutes, cycling through a SIGKILL of broker
node 0, a SIGSTOP of backup ``c``, a disk alarm, a SIGKILL of broker node 1 and a SIGSTOP of the
master ``a``; each fault is healed once it has taken effect, and the time until the network is
whole again is measured. Each worker's RSS is sampled every 5 s with psutil, and beside it the
memory gauges of its metrics endpoint (``--metrics-port``; see ``tests/faults/soak_memory.py``),
so the report can say which pool grows. At the end the usual checks run (nothing committed or
confirmed lost) and the samples go to ``tests/faults/runs/soak.json``; ``python -m
tests.faults.report`` then draws ``docs/img/soak-memory.png`` and the tables of
docs/reliability.md from it.

The workers run with a duplicate window of 5 minutes (``$TASYNC_DEDUP_WINDOW_S``, the default is
an hour; ``$TASYNC_SOAK_DEDUP_WINDOW_S`` changes it): the table of seen alert ids, and with it the
page cache over it, only stops growing once the window has passed, and a soak shorter than the
window would show that filling as a trend. Redeliveries in the soak come seconds after a fault,
well inside 5 minutes, so the duplicate check is as strict as with the default.

It only runs when asked for by marker (``-m soak``), so ``-m "faults or not faults"`` does not
start a 20-minute run by accident.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults import results
from tests.faults.checks import FaultRun
from tests.faults.cluster_net import ClusterNetwork
from tests.faults.load import Load
from tests.faults.soak_memory import MemorySampler, summarize
from tests.faults.test_cluster_faults import (
    alarm_raised,
    delivered_since,
    wait_publishers_blocked,
)
from tests.harness.rabbit_cluster import DEFAULT_DISK_FREE_LIMIT
from tests.harness.rabbit_env import free_ports
from tests.waiting import wait_for

DURATION_S = float(os.environ.get("TASYNC_SOAK_SECONDS", "1200"))
ALERT_RATE = float(os.environ.get("TASYNC_SOAK_ALERTS_PER_S", "50"))
CHANGE_RATE = float(os.environ.get("TASYNC_SOAK_CHANGES_PER_S", "5"))
FAULT_EVERY_S = float(os.environ.get("TASYNC_SOAK_FAULT_EVERY_S", "180"))
DEDUP_WINDOW_S = os.environ.get("TASYNC_SOAK_DEDUP_WINDOW_S", "300")
SAMPLE_EVERY_S = 5.0
#: Memory before this share of the run is warm-up (imports, caches, SQLite pages, buffers).
WARM_UP_SHARE = 0.25


Fault = tuple[str, Callable[[], None], Callable[[], None]]


def fault_cycle(net: ClusterNetwork, run: FaultRun) -> list[Fault]:
    """The faults the soak cycles through: (name, inject, heal).

    ``inject`` returns once the fault has visibly taken effect under load (progress on the
    surviving broker nodes, alerts taken over, the alarm raised); ``heal`` undoes it.
    """
    cluster = net.cluster

    def broker_kill(index: int) -> Fault:
        def inject() -> None:
            since = time.monotonic()
            cluster.kill_node(index)
            run.wait_progress(since, changes=5, alerts=50, what="load on two broker nodes")
        return f"SIGKILL broker node {index}", inject, lambda: cluster.start_node(index)

    def sigstop(name: str, source: str) -> Fault:
        def inject() -> None:
            since = time.monotonic() + 2 * net.heartbeat_s
            net.sigstop(name)
            wait_for(lambda: delivered_since(run, source, since), timeout_s=300,
                     what=f"{source} alerts delivered while {name} hangs")
        return f"SIGSTOP worker {name}", inject, lambda: net.sigcont(name)

    def alarm() -> None:
        cluster.set_disk_free_limit(0, "1000000GB")
        wait_for(lambda: alarm_raised(cluster), timeout_s=120, interval_s=1.0, what="alarm")
        wait_publishers_blocked(net, len(run.load.alerts))

    def clear() -> None:
        cluster.set_disk_free_limit(0, DEFAULT_DISK_FREE_LIMIT)
        wait_for(lambda: not alarm_raised(cluster), timeout_s=120, interval_s=1.0,
                 what="alarm cleared")

    return [broker_kill(0), sigstop("c", "nms"), ("disk alarm", alarm, clear), broker_kill(1),
            sigstop("a", "remedy")]


@pytest.mark.soak
@pytest.mark.timeout(DURATION_S + 1800)
def test_soak(cluster_net: ClusterNetwork, request: pytest.FixtureRequest) -> None:
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the soak runs only when selected by marker: -m soak")
    net = cluster_net
    net.env["TASYNC_DEDUP_WINDOW_S"] = DEDUP_WINDOW_S
    ports = dict(zip(("a", "b", "c"), free_ports(3), strict=True))
    for name, port in ports.items():
        net.extra_args[name] = ("--metrics-port", str(port))
    net.start_trio()
    load = Load(net, change_rate=CHANGE_RATE, alert_rate=ALERT_RATE / 2, change_via="library",
                pool=200)
    run = FaultRun(net, load, fault=f"soak {DURATION_S / 60:.0f} min, faults every "
                                   f"{FAULT_EVERY_S / 60:g} min", test="test_soak")
    sampler = MemorySampler(net.first_pids, ports, every_s=SAMPLE_EVERY_S)
    sampler.start()
    run.begin()
    faults: list[dict[str, Any]] = []
    cycle = fault_cycle(net, run)
    end = sampler.t0 + DURATION_S
    while (due := sampler.t0 + FAULT_EVERY_S * (len(faults) + 1)) < end - FAULT_EVERY_S / 2:
        time.sleep(max(0.0, due - time.monotonic()))  # the soak's clock, not a wait for state
        name, inject, heal = cycle[len(faults) % len(cycle)]
        began = time.monotonic()
        run.injected()
        inject()
        run.healing()
        heal()
        recover_s = run.wait_recovered()
        faults.append({"t": round(began - sampler.t0, 1), "fault": name,
                       "fault_s": round(run.healed_at - began, 1),
                       "recover_s": round(recover_s, 1)})
    if not faults:  # a run too short for a fault: check the load alone
        run.injected()
        run.healing()
    time.sleep(max(0.0, end - time.monotonic()))
    sampler.stop_event.set()
    sampler.join()
    warm_s = DURATION_S * WARM_UP_SHARE
    data: dict[str, Any] = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                            "duration_s": DURATION_S, "alert_rate": ALERT_RATE,
                            "change_rate": CHANGE_RATE, "warm_s": warm_s,
                            "dedup_window_s": float(DEDUP_WINDOW_S),
                            "workers": sorted(net.first_pids), "faults": faults,
                            "samples": sampler.samples,
                            "summary": summarize(sampler.samples, sorted(net.first_pids), warm_s)}
    results.write_soak(data)
    row = run.finish(recover_s=max((f["recover_s"] for f in faults), default=None))
    data["row"] = row
    results.write_soak(data)
    for name, item in data["summary"].items():
        growth = item["end_mb"] - item["warm_mb"]
        assert growth < max(20.0, 0.25 * item["warm_mb"]), f"{name} grew {growth:.1f} MB"
