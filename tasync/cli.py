"""``tasync``: the operator's command line.

Exit codes: 0 ok, 1 failed, 2 usage, 3 broker unreachable.

Each command lives in its own module and is imported only when it runs (``LazyGroup``):
``tasync --help`` and ``tasync status`` do not pay for the schema library, the store or the
demo. A new command goes into ``COMMANDS`` with the first paragraph of its help, and
``connects=False`` when it never talks to the broker.

``--broker`` and ``--connect-timeout`` are the group's own options (``tasync.options``), given
before the command or after it: ``tasync --broker URL status`` and ``tasync status --broker
URL`` mean the same, and a value after the command wins.
"""

from __future__ import annotations

import sys

import click

from tasync.host_args import normalise_host_args
from tasync.lazy_group import LazyCommand, LazyGroup
from tasync.options import GLOBAL_OPTIONS, prepare, with_options

COMMANDS = {
    "broker": LazyCommand("tasync.cli_broker:broker",
                          "Prepare the broker for a tasync network."),
    "config": LazyCommand("tasync.cli_config:config",
                          "Change the master's configuration, or look at what a node holds."),
    "console": LazyCommand("tasync.console.command:console", "Serve the web console: the "
                           "network's health and its configuration, in a browser."),
    "dead": LazyCommand("tasync.cli_dead:dead", "Alerts whose delivery failed after every "
                        "retry (the dead-letter queue)."),
    "demo": LazyCommand("tasync.demo:demo", "Watch a tasync network work: replication, "
                        "failover, promotion, recovery, totals."),
    "hosts": LazyCommand("tasync.cli_hosts:hosts",
                         "Allow-list files: tasync.hosts, telaconf.hosts, telalert.hosts.",
                         connects=False),
    "intake": LazyCommand("tasync.cli_alerts:intake", "Accept alerts over HTTP (generic JSON, "
                          "Alertmanager) and queue them."),
    "key": LazyCommand("tasync.cli_key:key", "Cluster keys: make a new one, check key files.",
                       connects=False),
    "promote": LazyCommand("tasync.cli_recover:promote", "Make NODE the master (epoch + 1) "
                           "once it has drained every confirmed change."),
    "quarantine": LazyCommand("tasync.cli_dead:quarantine", "What nodes refused (bad "
                              "signature, schema, sender), with the reason."),
    "recover": LazyCommand("tasync.cli_recover:recover", "Bring NODE to the master's state, "
                           "and report what it applied and any conflicts."),
    "replay": LazyCommand("tasync.cli_replay:replay", "Replay the change log from a point in "
                          "time into nodes, or list it."),
    "send": LazyCommand("tasync.cli_alerts:send",
                        "Send an alert to the first live server of a precedence list."),
    "status": LazyCommand("tasync.cli_status:status", "Every node the network knows: role, "
                          "epoch, seq, lag, alive, ready, in sync, last seen."),
    "totals": LazyCommand("tasync.cli_alerts:totals", "Traffic through each live server, by "
                          "source: received, delivered, failed, taken over."),
    "trace": LazyCommand("tasync.cli_trace:trace", "The story of one alert across every live "
                         "node and the broker; exit 1 if unknown."),
    "wait": LazyCommand("tasync.cli_wait:wait", "Wait until nodes are ready, a master runs, or "
                        "alerts were delivered."),
}


def _prepare(command: click.Command, entry: LazyCommand) -> click.Command:
    return prepare(command, connects=entry.connects)


@with_options(*GLOBAL_OPTIONS)
@click.group(cls=LazyGroup, lazy=COMMANDS, prepare=_prepare,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tasync")
def cli() -> None:
    """tasync: an alert-messaging network over RabbitMQ, with replication and failover.

    \b
    One node is the master: change its configuration with `tasync config`, and every
    backup applies the same changes in the same order. Alerts sent with `tasync send`
    go to the first live node of a precedence list. --broker and --connect-timeout may
    be given here, before the command, or after it.
    \b
    Examples:
      tasync demo                             watch a network work, on this machine
      tasync status                           every node: alive, ready, in sync
      tasync config set route remedy --host a --host b
      tasync send -i ops -m "disk full on db1" --route remedy
      tasync send --help                      every command's options, with examples
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tasync`` command."""
    args = normalise_host_args(list(sys.argv[1:] if argv is None else argv))
    cli.main(args=args, prog_name="tasync")


if __name__ == "__main__":
    main()
