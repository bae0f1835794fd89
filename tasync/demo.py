"""``tasync demo``: a messaging network on one machine, told step by step.

A master and two backups start; configuration changes replicate; alerts from two sources flow
by their precedence lists; the primary is killed and the backup delivers in its place; a
backup is promoted and changes the configuration; the old primary returns and recovers with
one command; totals show who carried what. Each step checks the state it claims (exports,
deliveries), so the demo fails loudly rather than narrating something that did not happen.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from tasync.broker.errors import ConfigError, ExitCode
from tasync.broker.settings import DEFAULT_BROKER_URL
from tasync.demo_network import Stage, demo_broker
from tasync.health import SEVERITY
from tasync.options import (
    DEFAULT_CONNECT_TIMEOUT_S,
    broker_url,
    connect_timeout_s,
    print_json,
)

ALERTS_PER_SOURCE = 10


def deliveries(path: Path) -> list[dict[str, Any]]:
    """The alerts a ``file://`` destination received, one JSON object per line."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Story:
    """The demo's steps, sharing the stage, the console and what each step found."""

    def __init__(self, stage: Stage, console: Console) -> None:
        self.stage = stage
        self.console = console
        self.out = stage.root / "deliveries"
        self.summary: dict[str, Any] = {}

    def step(self, title: str) -> None:
        """A heading for the next part of the story."""
        self.console.rule(f"[bold]{title}")

    def say(self, text: str) -> None:
        """One line of narration."""
        self.console.print(text)

    def run(self) -> dict[str, Any]:
        """Every step in order; returns what the steps found."""
        self.start_network()
        self.configure()
        self.send_by_precedence()
        self.fail_over()
        self.promote_and_change()
        self.recover_old_primary()
        self.show_totals()
        return self.summary

    def start_network(self) -> None:
        """Start the master, then the backups, each waited on until ready."""
        self.step("1. A master and two backups")
        self.stage.start("a", role="master")
        for node in ("b", "c"):
            self.stage.start(node)
        self.say("nodes a (master), b and c are running and caught up")

    def configure(self) -> None:
        """Destinations, a group and two routes with opposite precedence."""
        self.step("2. Configuration on the master replicates to every backup")
        self.out.mkdir(exist_ok=True)
        t = self.stage.tasync
        t("config", "set", "destination", "ops", "--url", f"file://{self.out}/ops.jsonl")
        t("config", "set", "destination", "noc", "--url", f"file://{self.out}/noc.jsonl")
        t("config", "set", "group", "oncall", "--member", "ops", "--member", "noc")
        t("config", "set", "route", "remedy", "--host", "a", "--host", "b")
        t("config", "set", "route", "nms", "--host", "b", "--host", "a", "--wait-applied")
        self.say("routes: remedy = a then b;  nms = b then a")
        self.show_status()
        self.summary["replicated"] = self.exports_identical(("a", "b", "c"))

    def send(self, source: str, route: str, destination: str, count: int) -> list[str]:
        """Send ``count`` alerts through the CLI; returns their ids."""
        ids = []
        for i in range(count):
            alert_id = f"{source}-{uuid.uuid4().hex[:8]}"
            self.stage.tasync("send", "-i", destination, "-m", f"{source} alert {i + 1}",
                              "--source", source, "--route", route, "--id", alert_id)
            ids.append(alert_id)
        return ids

    def delivered_by(self, destination: str, ids: list[str]) -> Counter[str]:
        """Wait until every id reached ``destination``; count them by delivering node."""
        path = self.out / f"{destination}.jsonl"
        wanted = set(ids)
        self.stage.wait(lambda: wanted <= {d["id"] for d in deliveries(path)},
                        what=f"{len(ids)} alerts delivered to {destination}")
        return Counter(d["node"] for d in deliveries(path) if d["id"] in wanted)

    def send_by_precedence(self) -> None:
        """Each source's alerts go to the first node of its own route."""
        self.step("3. Alerts go to the first live node of their precedence list")
        remedy = self.delivered_by("ops", self.send("remedy", "remedy", "ops", ALERTS_PER_SOURCE))
        nms = self.delivered_by("noc", self.send("nms", "nms", "noc", ALERTS_PER_SOURCE))
        self.say(f"remedy alerts delivered by: {dict(remedy)}   nms alerts by: {dict(nms)}")
        self.summary["before_failover"] = {"remedy": dict(remedy), "nms": dict(nms)}

    def fail_over(self) -> None:
        """Kill the primary; its route's next node delivers what follows."""
        self.step("4. The primary dies: the next node takes over at once")
        self.stage.kill("a")
        self.say("node a killed (SIGKILL)")
        ids = self.send("remedy", "remedy", "ops", ALERTS_PER_SOURCE)
        after = self.delivered_by("ops", ids)
        self.say(f"remedy alerts sent after the failure delivered by: {dict(after)}")
        self.summary["after_failover"] = {"remedy": dict(after)}

    def promote_and_change(self) -> None:
        """Promote a backup and change the configuration there."""
        self.step("5. Promote b to master and keep changing the configuration")
        self.stage.tasync("promote", "b")
        self.stage.tasync("config", "set", "destination", "pager",
                          "--url", f"file://{self.out}/pager.jsonl", "--wait-applied")
        self.say("b is master (epoch +1); destination 'pager' added on b and replicated to c")
        self.show_status()

    def recover_old_primary(self) -> None:
        """Restart the old primary and bring it up to date with one command."""
        self.step("6. The old primary returns and catches up with one command")
        self.stage.start("a")
        self.say(self.stage.tasync("recover", "--node", "a").strip())
        self.summary["recovered"] = self.exports_identical(("a", "b", "c"))
        self.show_status()

    def show_totals(self) -> None:
        """The totals: traffic per server and source."""
        self.step("7. Totals: the traffic through each server")
        report = self.stage.tasync_json("totals")
        table = Table("server", "source", "received", "delivered", "failed", "taken over",
                      title="tasync totals")
        for node in report["nodes"]:
            for source, counts in sorted(node["sources"].items()):
                table.add_row(node["node"], source, *(str(counts[k]) for k in
                              ("received", "delivered", "failed", "taken_over")))
        self.console.print(table)
        self.say("a carried remedy until it died; b carried nms, and remedy after the failover")
        self.summary["totals"] = report

    def exports_identical(self, nodes: tuple[str, ...]) -> bool:
        """Compare the nodes' canonical exports byte for byte."""
        exports = {n: self.stage.tasync("config", "export", "--data-dir",
                                        str(self.stage.root / n)) for n in nodes}
        same = len(set(exports.values())) == 1
        self.say(f"exports of {', '.join(nodes)}: " + ("identical" if same else "DIFFERENT"))
        if not same:
            raise ConfigError("the nodes' configurations differ")
        return same

    def show_status(self) -> None:
        """Print ``tasync status`` as a table."""
        report = self.stage.tasync_json("status", ok=(ExitCode.OK, *SEVERITY))
        table = Table("node", "role", "epoch", "seq", "alive", "ready", "in sync")
        for r in report["nodes"]:
            table.add_row(r["node"], r.get("role", "?"), str(r.get("epoch", "")),
                          str(r.get("applied_seq", "")), "yes" if r.get("alive") else "no",
                          "yes" if r.get("ready") else "no", "yes" if r.get("in_sync") else "no")
        self.console.print(table)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
def demo(*, as_json: bool) -> None:
    """Watch a tasync network work: replication, failover, promotion, recovery, totals.

    Starts a master and two backups on this machine, runs the story, checks every step's
    result, and removes everything it started. Uses the broker of --broker (in a fresh vhost
    when it can make one); when none answers within --connect-timeout it starts a private
    RabbitMQ node from the installed rabbitmq-server.

    \b
    Examples:
      tasync demo
      tasync demo --json > demo.json          a summary for scripts (the story on stderr)
    """
    console = Console(stderr=as_json)
    with tempfile.TemporaryDirectory(prefix="tasync-demo-") as tmp, \
            demo_broker(broker_url() or DEFAULT_BROKER_URL, console.print,
                        wait_s=connect_timeout_s() or DEFAULT_CONNECT_TIMEOUT_S) as url:
        stage = Stage(broker_url=url, root=Path(tmp))
        try:
            summary = Story(stage, console).run()
        finally:
            stage.stop_all()
    if as_json:
        print_json(summary)
    console.print("[bold green]demo finished: every step checked")
