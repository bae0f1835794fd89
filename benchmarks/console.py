"""The console under load: ten browser sessions on a network taking 200 alerts/s.

    python -m benchmarks.console            # full: 3 runs, 60 s per phase
    python -m benchmarks.console --quick    # 1 run, 20 s per phase

A master and two backups (three ``tasync-worker`` processes), a ``file://`` destination and
the precedence list ``master b1``; a ``tasync console`` process (live pages refreshed every
second). For the whole run a thread sends ``--rate`` alerts per second through the sender API
(a tenth of them every 100 ms, each call confirmed by the broker). Each run has two phases of
``--phase`` seconds, one after the other, measured alike:

Without sessions
    The console runs but nobody looks at it.

With sessions
    ``--sessions`` headless Chromium sessions (Debian's ``chromium``, driven by Playwright;
    each its own browser context, logged in as its own console user) go round the console's
    pages, staying ``--dwell`` seconds on each: the network page polls its live fragment
    meanwhile, as an operator's open tab does.

Measured in each phase: the alerts delivered per second (lines the file channel wrote in the
phase's window) and each alert's latency from its creation to the file line (``created_at``
to ``delivered_at``). In the sessions phase also every page load (from ``goto`` to the
``load`` event, as the operator waits for it) and every live-fragment request (the browser's
own timing, request start to response end), and the console process's CPU and peak RSS.

Targets: page loads and live fragments p99 <= 1,000 ms; delivered rate with sessions >= 0.95
of the rate without (within noise: both are the offered load when the network keeps up), and
the latency p99 reported side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.alerts import configure, make_alerts, read_lines
from benchmarks.common import Broker, Network, log, wait_for
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
from tasync.broker.settings import Settings
from tasync.producers.sender import AlertSender

TARGETS = {"page_p99_ms": 1000.0, "live_p99_ms": 1000.0, "rate_ratio": 0.95}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
#: The pages an operator goes round, in order (the network page first: it stays open longest).
PAGES = ("/network", "/config/destination", "/alerts", "/network", "/config/route",
         "/alerts/dead")
HOSTS = ("master", "b1")


class Offered:
    """Sends ``rate`` alerts per second from a thread, a tenth of them every 100 ms."""

    def __init__(self, url: str, rate: int) -> None:
        self.url, self.rate = url, rate
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offered", daemon=True)

    def _run(self) -> None:
        tick_s, per_tick = 0.1, max(1, self.rate // 10)
        with AlertSender(Settings.from_url(self.url), name="bench-console") as sender:
            due, number = time.monotonic(), 0
            while not self._stop.is_set():
                number += 1
                alerts = make_alerts(per_tick, HOSTS, prefix=f"c{number}")
                try:
                    sender.send_many(alerts)
                except Exception as exc:  # recorded; the delivered rate shows whether it mattered
                    self.errors.append(repr(exc)[:200])
                else:
                    self.sent += len(alerts)
                due += tick_s
                self._stop.wait(max(0.0, due - time.monotonic()))

    def __enter__(self) -> Offered:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


class Console:
    """A ``tasync console`` process with ``users`` console users (viewers), and their passwords."""

    def __init__(self, url: str, root: Path, users: int) -> None:
        users_file = root / "console.users"
        self.passwords = {f"op{i}": secrets.token_urlsafe(12) for i in range(users)}
        for name, password in self.passwords.items():
            subprocess.run([sys.executable, "-m", "tasync", "console", "add-user", name,
                            "--role", "viewer", "--users-file", str(users_file)],
                           input=password + "\n", text=True, check=True, capture_output=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasync", "console", "--listen", "127.0.0.1:0",
             "--users-file", str(users_file), "--poll", "1", "--broker", url],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        address = self.proc.stdout.readline().strip()
        if not address:
            raise RuntimeError("the console did not start")
        self.url = f"http://{address}"
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- the sessions ------------------------------------------------------------------------------


async def _session(browser: Any, console: Console, user: str, phase_s: float, dwell_s: float,
                   times: dict[str, list[float]], errors: list[str]) -> None:
    """One operator: log in, then go round ``PAGES`` for ``phase_s``, timing every page."""
    context = await browser.new_context(viewport={"width": 1200, "height": 720})
    page = await context.new_page()

    def finished(request: Any) -> None:
        if "/live" in request.url:
            _answered(request, times["live"])

    page.on("requestfinished", finished)
    try:
        await page.goto(console.url + "/login")
        await page.fill("#user", user)
        await page.fill("#password", console.passwords[user])
        await page.click("form.login button")
        await page.wait_for_url("**/network")
        step, until = 0, time.monotonic() + phase_s
        while time.monotonic() < until:
            path = PAGES[step % len(PAGES)]
            step += 1
            started = time.perf_counter()
            response = await page.goto(console.url + path, wait_until="load")
            elapsed_ms = (time.perf_counter() - started) * 1000
            if response is None or response.status != 200:
                errors.append(f"{path}: {response.status if response else 'no response'}")
            else:
                times["load"].append(elapsed_ms)
                _answered(response.request, times["page"])
            await asyncio.sleep(dwell_s)  # the operator reads the page; its live part polls
    finally:
        await context.close()


async def _sessions(console: Console, count: int, phase_s: float,
                    dwell_s: float) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    times: dict[str, list[float]] = {"page": [], "load": [], "live": []}
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            await asyncio.gather(*(
                _session(browser, console, user, phase_s, dwell_s, times, errors)
                for user in list(console.passwords)[:count]))
            browser_cpu_s = _chromium_cpu_s()
        finally:
            await browser.close()
    if not times["page"] or not times["live"]:
        raise RuntimeError(f"the sessions timed nothing ({len(times['page'])} pages, "
                           f"{len(times['live'])} live requests): {errors[:3]}")
    return {"pages": len(times["page"]), "page_ms": summarize(times["page"], digits=1),
            "load_ms": summarize(times["load"], digits=1),
            "live_requests": len(times["live"]), "live_ms": summarize(times["live"], digits=1),
            "browser_cpu_s": round(browser_cpu_s, 1),
            "errors": errors[:20], "error_count": len(errors)}


def _chromium_cpu_s() -> float:
    """CPU seconds used so far by every Chromium process: the sessions' own cost, which on
    this machine competes with the network for the same cores."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if "chrom" in (proc.info["name"] or "") and proc.info["cpu_times"] is not None:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def _answered(request: Any, into: list[float]) -> None:
    """The time the console took to answer ``request``: from sending it to the last byte."""
    end = request.timing.get("responseEnd", -1)
    if end >= 0:
        into.append(end)


# -- one run -----------------------------------------------------------------------------------


def _delivery(out: Path, start: float, end: float) -> dict[str, Any]:
    """The file lines written in ``[start, end)``: their rate and their latency."""
    lines = [x for x in read_lines(out) if start <= x["delivered_at"] < end]
    latency = [(x["delivered_at"] - x["created_at"]) * 1000 for x in lines
               if "created_at" in x]
    return {"delivered": len(lines), "alerts_per_s": round(len(lines) / (end - start), 1),
            "latency_ms": summarize(latency, digits=1)}


def measure_run(broker: Broker, args: argparse.Namespace) -> dict[str, Any]:
    """One run: the network, the offered load, the phase without sessions, then with them."""
    with broker.fresh_vhost("console") as url, Network(url) as net, LoadMonitor() as load:
        out = net.root / "out.jsonl"
        net.start(2)
        configure(url, out, ("master", "b1", "b2"))
        net.wait_in_sync()
        console = Console(url, Path(tempfile.mkdtemp(dir=net.root)), args.sessions)
        try:
            with Offered(url, args.rate) as offered:
                wait_for(lambda: out.exists() and len(read_lines(out)) >= args.rate,
                         timeout_s=60, what="the offered load flowing")
                log(f"without sessions: {args.phase:g} s")
                t0 = time.time()
                time.sleep(args.phase)  # the phase itself: a fixed window of the offered load
                t1 = time.time()
                log(f"with {args.sessions} sessions: {args.phase:g} s")
                cpu0 = console.cpu_s()
                rss = _PeakRss(console.ps)
                with rss:
                    sessions = asyncio.run(_sessions(console, args.sessions, args.phase,
                                                     args.dwell))
                t2 = time.time()
                console_cpu = console.cpu_s() - cpu0
            time.sleep(1.0)  # the last alerts of the window reach the file
            without = _delivery(out, t0, t1)
            with_sessions = _delivery(out, t1, t2)
        finally:
            console.close()
    return {"without": without, "with": with_sessions, "sessions": sessions,
            "offered_errors": offered.errors[:5], "sent": offered.sent,
            "console": {"cpu_s": round(console_cpu, 2),
                        "cpu_percent": round(100 * console_cpu / (t2 - t1), 1),
                        "peak_rss_mb": round(rss.peak / (1 << 20), 1)},
            "rate_ratio": round(with_sessions["alerts_per_s"] / without["alerts_per_s"], 3)
            if without["alerts_per_s"] else None,
            "load": load.summary()}


class _PeakRss:
    """The highest RSS a process reaches while the block runs, sampled every 200 ms."""

    def __init__(self, ps: psutil.Process) -> None:
        self.ps, self.peak = ps, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, int(self.ps.memory_info().rss))

    def __enter__(self) -> _PeakRss:
        self.peak = int(self.ps.memory_info().rss)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run(args: argparse.Namespace) -> dict[str, Any]:
    broker = Broker()
    runs = []
    for number in range(1, args.runs + 1):
        log(f"run {number}/{args.runs}")
        runs.append(run_quiet(lambda: measure_run(broker, args), max_cpu=args.quiet_cpu,
                              wait_s=args.quiet_wait))
    page_p99 = median([r["sessions"]["page_ms"]["p99"] for r in runs], digits=1)
    live_p99 = median([r["sessions"]["live_ms"]["p99"] for r in runs], digits=1)
    ratio = median([r["rate_ratio"] or 0.0 for r in runs], digits=3)
    return {
        "benchmark": "console", "command": "python -m benchmarks.console " + " ".join(
            sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(broker),
        "code": code_version(), "targets": TARGETS, "quick": args.quick,
        "parameters": {"runs": args.runs, "phase_s": args.phase, "rate": args.rate,
                       "sessions": args.sessions, "dwell_s": args.dwell,
                       "pages": list(PAGES), "quiet_cpu_percent": args.quiet_cpu},
        "runs": runs,
        "verdict": [
            {"target": f"page load with {args.sessions} sessions, p99 (ms, median of runs)",
             "value": page_p99, "limit": f"<= {TARGETS['page_p99_ms']:g}",
             "pass": page_p99 <= TARGETS["page_p99_ms"]},
            {"target": "live fragment request, p99 (ms, median of runs)", "value": live_p99,
             "limit": f"<= {TARGETS['live_p99_ms']:g}",
             "pass": live_p99 <= TARGETS["live_p99_ms"]},
            {"target": f"alerts/s delivered with sessions / without, at {args.rate}/s offered",
             "value": ratio, "limit": f">= {TARGETS['rate_ratio']}",
             "pass": ratio >= TARGETS["rate_ratio"]},
        ]}


def plot(results: dict[str, Any], img_dir: Path, suffix: str) -> list[Path]:
    """Page and live-fragment times per run; the alert latency without and with sessions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    xs = list(range(1, len(runs) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for offset, key, label in ((-0.2, "page_ms", "page load"), (0.2, "live_ms", "live fragment")):
        left.bar([x + offset - 0.1 for x in xs], [r["sessions"][key]["p50"] for r in runs], 0.2,
                 label=f"{label} p50")
        left.bar([x + offset + 0.1 for x in xs], [r["sessions"][key]["p99"] for r in runs], 0.2,
                 label=f"{label} p99")
    left.axhline(TARGETS["page_p99_ms"], color="grey", linestyle="--", label="p99 target")
    left.set_xticks(xs, [f"run {x}" for x in xs])
    left.set_ylabel("ms")
    left.set_title(f"{results['parameters']['sessions']} browser sessions")
    left.legend(fontsize="small")
    for offset, key, label in ((-0.2, "without", "no sessions"), (0.2, "with", "sessions")):
        right.bar([x + offset for x in xs], [r[key]["latency_ms"]["p99"] for r in runs], 0.4,
                  label=f"{label}: alert latency p99")
    right.set_xticks(xs, [f"run {x}" for x in xs])
    right.set_ylabel("created -> delivered (ms)")
    right.set_title(f"{results['parameters']['rate']} alerts/s offered; rate ratio "
                    f"{results['verdict'][2]['value']}")
    right.legend(fontsize="small")
    fig.tight_layout()
    path = img_dir / f"console{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.console",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, 20 s per phase")
    parser.add_argument("--runs", type=int, help="repetitions (default 3)")
    parser.add_argument("--phase", type=float, help="seconds per phase (default 60)")
    parser.add_argument("--rate", type=int, default=200, help="alerts per second offered")
    parser.add_argument("--sessions", type=int, default=10, help="browser sessions")
    parser.add_argument("--dwell", type=float, default=1.0, metavar="SECONDS",
                        help="how long a session stays on each page (default 1)")
    add_quiet_options(parser)
    parser.add_argument("--img-dir", type=Path, default=IMG_DIR)
    args = parser.parse_args(argv)
    return fill_defaults(args, quick={"runs": 1, "phase": 20.0},
                         full={"runs": 3, "phase": 60.0})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_plotting()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh --test)")
    results = run(args)
    suffix = "-quick" if args.quick else ""
    results["plots"] = [shown(p) for p in plot(results, args.img_dir, suffix)]
    path = RESULTS_DIR / f"console{suffix}.json"
    write_json(path, results)
    print_verdict(results["verdict"])
    log(f"results in {path}")


if __name__ == "__main__":
    main()
