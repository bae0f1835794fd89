"""The console under load: ten browser sessions on a network taking 200 alerts/s.

    python -m benchmarks.console            # full: 3 runs, 60 s per phase
    python -m benchmarks.console --quick    # 1 run, 20 s per phase

A master and two backups (three ``tasync-worker`` processes), a ``file://`` destination and
the precedence list ``master b1``; a ``tasync console`` process (live pages refreshed every
second). For the whole run a thread sends ``--rate`` alerts per second through the sender API
(a tenth of them every 100 ms, each call confirmed by the broker). Each run has three phases
of ``--phase`` seconds, one after the other, measured alike:

Without sessions
    The console runs but nobody looks at it.

Requests over HTTP
    ``--sessions`` HTTP clients, each logged in as its own console user, make the requests a
    browser session makes: they go round the console's pages, staying ``--dwell`` seconds on
    each, and on the network page ask for its live fragment every second. This is the
    console's own cost, without a browser on the machine.

Browser sessions
    ``--sessions`` headless Chromium sessions (Debian's ``chromium``, driven by Playwright;
    each its own browser context and console user) do the same: the network page's live part
    polls by itself, as an operator's open tab does. Chromium runs on the same two cores as the
    network, which an operator's browser would not.

Measured in each phase: the alerts delivered per second (lines the file channel wrote in the
phase's window), each alert's latency from its creation to the file line (``created_at`` to
``delivered_at``), and the console process's CPU and peak RSS. With sessions also every page
and every live fragment: the time until the console's answer was read (the browser's own
timing of the request, sent to the last byte; the HTTP client's the same way), and in the
browser phase the time until the page's ``load`` event.

Targets: pages and live fragments answered with p99 <= 1,000 ms; the delivered rate with
sessions >= 0.95 of the rate without (within noise: each is the offered load when the network
keeps up); the latency p99 reported side by side.
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
from collections.abc import Callable
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


def _http_session(console: Console, user: str, phase_s: float, dwell_s: float,
                  times: dict[str, list[float]], errors: list[str]) -> None:
    """The requests a browser session makes, made by an HTTP client: log in, go round
    ``PAGES``, and on the network page ask for its live fragment every second, as htmx does.

    Assets are left out (a browser has them cached after its first page)."""
    import httpx

    with httpx.Client(base_url=console.url, timeout=30.0) as client:
        answer = client.post("/login", headers={"Origin": console.url},
                             data={"user": user, "password": console.passwords[user]})
        if answer.status_code != 303:
            errors.append(f"login: {answer.status_code}")
            return
        step, until = 0, time.monotonic() + phase_s
        while time.monotonic() < until:
            path = PAGES[step % len(PAGES)]
            step += 1
            _timed_get(client, path, times["page"], errors)
            left = dwell_s
            while left > 0:
                wait = min(1.0, left)  # the live part's poll interval (--poll 1)
                time.sleep(wait)
                left -= wait
                if path == "/network" and wait >= 1.0:
                    _timed_get(client, "/network/live", times["live"], errors,
                               headers={"HX-Request": "true"})


def _timed_get(client: Any, path: str, into: list[float], errors: list[str],
               headers: dict[str, str] | None = None) -> None:
    started = time.perf_counter()
    answer = client.get(path, headers=headers or {})
    elapsed_ms = (time.perf_counter() - started) * 1000
    if answer.status_code == 200:
        into.append(elapsed_ms)
    else:
        errors.append(f"{path}: {answer.status_code}")


def _http_sessions(console: Console, count: int, phase_s: float,
                   dwell_s: float) -> dict[str, Any]:
    times: dict[str, list[float]] = {"page": [], "live": []}
    errors: list[str] = []
    threads = [threading.Thread(target=_http_session, args=(console, user, phase_s, dwell_s,
                                                            times, errors))
               for user in list(console.passwords)[:count]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"pages": len(times["page"]), "page_ms": summarize(times["page"], digits=1),
            "live_requests": len(times["live"]), "live_ms": summarize(times["live"], digits=1),
            "errors": errors[:20], "error_count": len(errors)}


def _idle(phase_s: float) -> dict[str, Any]:
    """Nobody looks at the console: the phase is a fixed window of the offered load."""
    time.sleep(phase_s)
    return {}


def _phase(console: Console, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``measure`` and add the window it covered and the console's CPU and peak RSS."""
    cpu0, t0 = console.cpu_s(), time.time()
    with _PeakRss(console.ps) as rss:
        result = measure()
    t1 = time.time()
    cpu = console.cpu_s() - cpu0
    return {**result, "window": (t0, t1),
            "console": {"cpu_s": round(cpu, 2), "cpu_percent": round(100 * cpu / (t1 - t0), 1),
                        "peak_rss_mb": round(rss.peak / (1 << 20), 1)}}


def measure_run(broker: Broker, args: argparse.Namespace) -> dict[str, Any]:
    """One run: the network and its offered load, then the three phases one after the other."""
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
                idle = _phase(console, lambda: _idle(args.phase))
                log(f"{args.sessions} sessions' requests over HTTP: {args.phase:g} s")
                http = _phase(console, lambda: _http_sessions(console, args.sessions,
                                                              args.phase, args.dwell))
                log(f"{args.sessions} browser sessions: {args.phase:g} s")
                browsers = _phase(console, lambda: asyncio.run(_sessions(
                    console, args.sessions, args.phase, args.dwell)))
            time.sleep(1.0)  # the last alerts of the window reach the file
            for phase in (idle, http, browsers):
                phase["delivery"] = _delivery(out, *phase.pop("window"))
        finally:
            console.close()
    base = idle["delivery"]["alerts_per_s"]
    return {"without": idle, "http": http, "browsers": browsers,
            "offered_errors": offered.errors[:5], "sent": offered.sent,
            "rate_ratio": {name: round(p["delivery"]["alerts_per_s"] / base, 3) if base else None
                           for name, p in (("http", http), ("browsers", browsers))},
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
    def med(path: Callable[[dict[str, Any]], float]) -> float:
        return median([path(r) for r in runs], digits=1)

    page_p99 = med(lambda r: r["browsers"]["page_ms"]["p99"])
    live_p99 = med(lambda r: r["browsers"]["live_ms"]["p99"])
    ratio = median([r["rate_ratio"]["browsers"] or 0.0 for r in runs], digits=3)
    http_ratio = median([r["rate_ratio"]["http"] or 0.0 for r in runs], digits=3)
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
            {"target": f"page answered, {args.sessions} browser sessions, p99 (ms, median of "
                       "runs)", "value": page_p99, "limit": f"<= {TARGETS['page_p99_ms']:g}",
             "pass": page_p99 <= TARGETS["page_p99_ms"]},
            {"target": "live fragment answered, p99 (ms, median of runs)", "value": live_p99,
             "limit": f"<= {TARGETS['live_p99_ms']:g}",
             "pass": live_p99 <= TARGETS["live_p99_ms"]},
            {"target": f"alerts/s delivered with browser sessions / without, {args.rate}/s "
                       "offered", "value": ratio, "limit": f">= {TARGETS['rate_ratio']}",
             "pass": ratio >= TARGETS["rate_ratio"]},
            {"target": "the same with the sessions' requests over HTTP (no browser)",
             "value": http_ratio, "limit": f">= {TARGETS['rate_ratio']}",
             "pass": http_ratio >= TARGETS["rate_ratio"]},
        ]}


PHASES = (("without", "no sessions"), ("http", "requests over HTTP"),
          ("browsers", "browser sessions"))


def plot(results: dict[str, Any], img_dir: Path, suffix: str) -> list[Path]:
    """Answer times per phase; the alerts' latency per phase, run by run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    xs = list(range(1, len(runs) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.2
    bars = [(phase, key, label) for phase in ("http", "browsers")
            for key, label in (("page_ms", "page"), ("live_ms", "live fragment"))]
    for i, (phase, key, label) in enumerate(bars):
        left.bar([x + (i - 1.5) * width for x in xs], [r[phase][key]["p99"] for r in runs],
                 width, label=f"{label} p99, {dict(PHASES)[phase]}")
    left.axhline(TARGETS["page_p99_ms"], color="grey", linestyle="--", label="p99 target")
    left.set_xticks(xs, [f"run {x}" for x in xs])
    left.set_ylabel("answered (ms)")
    left.set_title(f"{results['parameters']['sessions']} sessions: the console's answers")
    left.set_ylim(0, left.get_ylim()[1] * 1.6)  # room for the legend above the bars
    left.legend(fontsize="x-small", loc="upper left")
    for i, (phase, label) in enumerate(PHASES):
        right.bar([x + (i - 1) * 0.27 for x in xs],
                  [r[phase]["delivery"]["latency_ms"]["p99"] for r in runs], 0.27,
                  label=label)
    right.set_xticks(xs, [f"run {x}" for x in xs])
    right.set_ylabel("alert created -> delivered, p99 (ms)")
    right.set_title(f"{results['parameters']['rate']} alerts/s offered: all delivered")
    right.set_ylim(0, right.get_ylim()[1] * 1.3)
    right.legend(fontsize="x-small", loc="upper left")
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
