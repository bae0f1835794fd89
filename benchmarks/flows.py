"""Which files and functions the two main flows pass through, counted from a real run.

``python -m benchmarks.flows`` starts a master ``a`` and a backup ``b``, then follows:

* **config**: ``tasync config set destination x --url ...`` until the row is on the backup;
* **send**: ``tasync send -i d0 -m hello --host a b`` until the line is in the file.

Every process (the command and both nodes) runs with ``benchmarks/flowtrace`` on
``PYTHONPATH``, which stamps each call of a project function. A function counts for a flow
when its process ran it during the flow and, for a node, did not also run it in an idle
window of the same length just before: heartbeats, status files and polls are the node's
background, not the flow. Functions only, not module bodies run at import.

The result is printed per process and as a union, and written to
``benchmarks/results/flows.json``; docs/architecture.md draws the same paths. This is a
count of where a reader must look to follow a request, not a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Broker, Network, log, wait_for
from benchmarks.measure import RESULTS_DIR, write_json

TRACE_PATH = Path(__file__).resolve().parent / "flowtrace"
#: Quiet time before a flow, the window the nodes' background is read from: longer than the
#: longest periodic check a node runs (stranded lists, every 5 s).
IDLE_S = 6.0


def tasync(url: str, env: dict[str, str], *args: str) -> None:
    """Run one command as a user would; stop with its message when it fails."""
    out = subprocess.run([sys.executable, "-m", "tasync", *args],
                         env={**env, "TASYNC_BROKER_URL": url},
                         capture_output=True, text=True, timeout=120, check=False)
    if out.returncode:
        raise SystemExit(f"tasync {' '.join(args)} exited {out.returncode}: {out.stderr}")


def config_flow(url: str, env: dict[str, str], net: Network, out: Path) -> None:
    """Set a destination on the master and wait until the backup holds the row."""
    tasync(url, env, "config", "set", "destination", "x", "--url", f"file://{out}/x.log")
    head = net.head_seq()
    backup = net.backups[0]
    wait_for(lambda: backup.status().get("applied_seq", 0) >= head, timeout_s=30,
             what="the row on the backup", interval_s=0.02)


def send_flow(url: str, env: dict[str, str], _net: Network, out: Path) -> None:
    """Send one alert and wait until its line is in the destination's file."""
    tasync(url, env, "send", "-i", "d0", "-m", "flow-probe", "--host", "a", "b")
    target = out / "d0.log"
    wait_for(lambda: target.exists() and b"flow-probe" in target.read_bytes(), timeout_s=30,
             what="the alert's line", interval_s=0.02)


FLOWS: dict[str, Callable[[str, dict[str, str], Network, Path], None]] = {
    "config": config_flow, "send": send_flow}


def who(argv: list[str]) -> str:
    """The process a record came from: the command, or the node named on its command line."""
    return argv[argv.index("--node") + 1] if "--node" in argv else "command"


def flow_functions(records: list[dict[str, Any]], flow: tuple[float, float],
                   idle: tuple[float, float]) -> dict[str, set[str]]:
    """Per process, the functions run during ``flow`` and (for nodes) not while ``idle``."""
    def within(times: list[float], span: tuple[float, float]) -> bool:
        return any(span[0] <= t <= span[1] for t in times)

    found: dict[str, set[str]] = defaultdict(set)
    for record in records:
        name = who(record["argv"])
        for key, times in record["calls"].items():
            if within(times, flow) and (name == "command" or not within(times, idle)):
                found[name].add(key)
    return found


def summary(found: dict[str, set[str]]) -> dict[str, Any]:
    """Files and function counts per process, and the union over processes."""
    per: dict[str, Any] = {}
    for name, keys in sorted(found.items()):
        files: dict[str, int] = defaultdict(int)
        for key in keys:
            files[key.split("::")[0]] += 1
        per[name] = {"files": dict(sorted(files.items())), "functions": len(keys)}
    union_files = sorted({key.split("::")[0] for keys in found.values() for key in keys})
    union_functions = {key for keys in found.values() for key in keys}
    return {"processes": per, "files": union_files, "file_count": len(union_files),
            "function_count": len(union_functions)}


def measure(broker: Broker, flow_name: str) -> dict[str, Any]:
    """One flow on a fresh two-node network."""
    with tempfile.TemporaryDirectory(prefix="tasync-flow-") as tmp, \
            broker.fresh_vhost("flows") as url:
        trace_dir, out = Path(tmp, "trace"), Path(tmp, "out")
        trace_dir.mkdir()
        out.mkdir()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(TRACE_PATH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "TASYNC_FLOW_TRACE_DIR": str(trace_dir)}
        plain = {k: v for k, v in env.items() if k != "TASYNC_FLOW_TRACE_DIR"}
        tasync(url, plain, "broker", "setup")
        saved = dict(os.environ)
        os.environ.update(env)  # Worker.start hands the environment on
        try:
            net = Network(url, root=Path(tmp, "nodes"))
            with net:
                net.master = net.start_worker("a", role="master")
                net.master.wait_ready(60)
                net.start_worker("b").wait_ready(60)
                tasync(url, plain, "config", "set", "destination", "d0", "--url",
                       f"file://{out}/d0.log")
                net.wait_in_sync(timeout_s=60)
                time.sleep(1.0)  # let the last change's after-work finish before the idle window
                idle = (time.time(), time.time() + IDLE_S)
                time.sleep(IDLE_S)
                started = time.time()
                FLOWS[flow_name](url, env, net, out)
                flow = (started, time.time() + 0.2)
                time.sleep(0.3)
                dumped = len(list(trace_dir.glob("*.json")))
                for worker in net.workers.values():
                    os.kill(worker.pid, signal.SIGUSR2)
                wait_for(lambda: len(list(trace_dir.glob("*.json"))) >= dumped + 2,
                         timeout_s=10, what="the nodes' records", interval_s=0.05)
                records = [json.loads(p.read_text()) for p in trace_dir.glob("*.json")]
        finally:
            os.environ.clear()
            os.environ.update(saved)
        commands = [r for r in records if who(r["argv"]) == "command"
                    and any(a in r["argv"] for a in ("send", "config"))]
        nodes = [r for r in records if who(r["argv"]) != "command"]
        # The command's record of this flow is the newest one written by a command process.
        return summary(flow_functions(nodes + commands[-1:], flow, idle))


def show(name: str, result: dict[str, Any]) -> None:
    log(f"{name}: {result['file_count']} files, {result['function_count']} functions")
    for process, part in result["processes"].items():
        log(f"  {process}: {len(part['files'])} files, {part['functions']} functions")
        for path, count in part["files"].items():
            log(f"    {path} ({count})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flows",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(FLOWS), help="one flow instead of both")
    args = parser.parse_args(argv)
    broker = Broker()
    results = {name: measure(broker, name) for name in ([args.only] if args.only else FLOWS)}
    for name, result in results.items():
        show(name, result)
    write_json(RESULTS_DIR / "flows.json", results)


if __name__ == "__main__":
    main()
