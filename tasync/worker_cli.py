"""``tasync-worker``: run one messaging server (sync, delivery, control) until SIGTERM."""

from __future__ import annotations

from pathlib import Path

import click

from tasync.broker.protocol import Role
from tasync.broker.settings import DEFAULT_METRICS_SOURCES, key_file_from_env
from tasync.node import Node, NodeOptions
from tasync.options import broker_url_param, handle_errors, make_settings, with_options


@with_options(broker_url_param)
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--node", required=True, metavar="NAME",
              help="This server's name: letters, digits, '-' and '_'.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the node keeps its configuration store, trail and logs.")
@click.option("--role", type=click.Choice([role.value for role in Role]), default=None,
              help="Start as master or backup; default: the role stored in --data-dir, "
                   "else backup.")
@click.option("--hosts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="tasync.hosts allow-list: who may act as sync master.")
@click.option("--master", "single_master", metavar="NAME", default=None,
              help="The single node allowed to act as master (instead of --hosts-file).")
@click.option("--conf-hosts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="telaconf.hosts allow-list (on the master): who may change configuration.")
@click.option("--alert-hosts-file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="telalert.hosts allow-list: who may send alerts "
                                 "(default: <data-dir>/telalert.hosts when it exists).")
@click.option("--key-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, envvar="TASYNC_CLUSTER_KEY_FILE",
              help="Cluster key file: sign and verify every change.")
@click.option("--heartbeat", "heartbeat_s", type=click.FloatRange(min=0), default=10.0,
              show_default=True, metavar="SECONDS",
              help="AMQP heartbeat; a hung node is given up after about twice this.")
@click.option("--prefetch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Alerts a node holds unacknowledged; more go to the next node in the list.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve Prometheus metrics on this port (/metrics); off by default.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="Address the metrics server binds; 0.0.0.0 lets other hosts scrape.")
@click.option("--metrics-source", "metrics_sources", multiple=True, metavar="SOURCE",
              envvar="TASYNC_METRICS_SOURCES",
              help="An alert source to name in the metrics (repeatable); "
                   f"{', '.join(DEFAULT_METRICS_SOURCES)} always are, every other one is "
                   "counted as 'other'.")
@click.option("-v", "--verbose", is_flag=True,
              help="Per-message detail in tasync.log and on stderr.")
@handle_errors
def main(*, node: str, data_dir: Path, role: str | None, hosts_file: Path | None,
         single_master: str | None, conf_hosts_file: Path | None,
         alert_hosts_file: Path | None, key_file: Path | None, heartbeat_s: float, prefetch: int,
         metrics_port: int | None, metrics_host: str, metrics_sources: tuple[str, ...],
         verbose: bool) -> None:
    """Run a tasync node: apply configuration changes, deliver alerts, answer requests.

    It logs to <data-dir>/tasync.log and, one short line per event (for journald and docker
    logs), to stderr; a fault that keeps it from working, such as an unreachable broker or a
    wrong vhost, is said there at once, and once.

    \b
    Examples:
      tasync-worker --node a --data-dir /var/lib/tasync/a --role master
      tasync-worker --node b --data-dir /var/lib/tasync/b
      tasync-worker --node c --data-dir /srv/c --metrics-port 9100 --metrics-source nms
    """
    named = tuple(sorted({*DEFAULT_METRICS_SOURCES, *metrics_sources}))
    settings = make_settings(heartbeat_s=heartbeat_s, prefetch=prefetch,
                             metrics_sources=named)
    options = NodeOptions(
        node=node, data_dir=data_dir, role=role, verbose=verbose,
        key_file=key_file or key_file_from_env(),
        hosts_file=hosts_file, single_master=single_master, conf_hosts_file=conf_hosts_file,
        alert_hosts_file=alert_hosts_file, metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    Node(settings, options).run()


if __name__ == "__main__":
    main()
