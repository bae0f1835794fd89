"""Prometheus metrics of one node, read from its state when Prometheus scrapes.

``tasync-worker --metrics-port 9100`` serves ``/metrics`` in the text exposition format. The
collector reads the node's state at scrape time (store bookkeeping, readiness, the persisted
alert totals) instead of having the sync and delivery paths update metric objects: a node that
nobody scrapes pays nothing, and the hot paths carry no metrics code that could slow or break
them. The numbers are the ones ``tasync status`` and ``tasync totals`` show, so a dashboard and
the command line never disagree.

The server has a registry of its own rather than prometheus_client's global one: the process
exposes exactly tasync's metrics (no default process/GC collectors that would look like node
state), and tests can run several servers in one process.

Metrics (every sample has a ``node`` label; one scrape target is one node):

=================================== ======= ==================================================
``tasync_node_ready``                gauge   1 once the node caught up and serves
``tasync_is_master``                 gauge   1 on the master
``tasync_epoch``                     gauge   highest epoch the node has seen
``tasync_applied_seq``               gauge   highest seq applied (backup) or committed (master)
``tasync_outbox_pending_changes``    gauge   master: committed changes not yet confirmed
``tasync_lag_changes``               gauge   changes behind the master, when the node knows it
``tasync_peer_seen_age_seconds``     gauge   per ``peer``: seconds since its last beacon (a dead
                                             or hung node's grows; its own stays near 0)
``tasync_config_objects``            gauge   configuration objects held
``tasync_consumer_connected``        gauge   per consumer (``sync``, ``control``, ``delivery``)
``tasync_start_time_seconds``        gauge   when the process started (Unix time)
``tasync_changes_applied_total``     counter changes applied by this process
``tasync_alerts_<counter>_total``    counter per ``source``: received, delivered, failed,
                                             taken_over, skipped, redelivered, duplicates,
                                             refused, dead_lettered
``tasync_list_stranded``             gauge   per ``list``: 1 while its queue holds alerts
                                             and no node consumes it
``tasync_list_messages``             gauge   per ``list``: alerts waiting in its queue
``tasync_dead_letter_messages``      gauge   alerts in the dead-letter queue
``tasync_quarantine_messages``       gauge   messages in the quarantine queue
``tasync_dedup_caught_up``           gauge   1 once the node has read every other node's
                                             settled ids published before it started
``tasync_dedup_ids_learned_total``   counter ids other nodes settled, learned by this one
``tasync_sqlite_memory_bytes``       gauge   memory SQLite holds in the process (page caches)
``tasync_python_allocated_blocks``   gauge   live Python memory blocks
``tasync_malloc_in_use_bytes``       gauge   glibc heap handed out and not freed
``tasync_malloc_free_held_bytes``    gauge   freed bytes glibc keeps for reuse
=================================== ======= ==================================================

The memory gauges (``tasync.memory``) split the process's RSS into the parts that grow for
different reasons, so a rising RSS can be told apart as caches filling, objects kept, or the
allocator's high-water mark; each is absent where its source is (no glibc, say).

The alert counters come from ``totals.db``, so they survive restarts like ``tasync totals``;
a scrape reads the running sums kept in memory beside the minute buckets, so it costs the same
whatever the length of the history. The ``source`` label is bounded: sources named by the
worker's ``--metrics-source`` (and ``cli``, ``alertmanager``, ``intake`` always) keep their
name, every other one is counted as ``other``, so a client choosing sources freely cannot grow
the number of series. The list gauges are every list the network knows, as the node's last
check saw them (every ``Settings.list_check_s``); every node reports every list, because the
nodes of a stranded list are not there to report it.
A part of the state that cannot be read (the store is closing, the totals layer is absent) is
left out of that scrape rather than failing it: Prometheus then shows a gap, not a wrong zero.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector, CollectorRegistry

from tasync import memory
from tasync.broker.errors import ConfigError

log = logging.getLogger("tasync.metrics")

DEFAULT_HOST = "127.0.0.1"
"""Loopback by default: metrics reveal node names and traffic by source, so exposing them to
other hosts is a decision the operator makes with ``--metrics-host``."""

ALERT_COUNTER_HELP = {
    "received": "Alerts this node took from its queues (duplicates excluded).",
    "delivered": "Alerts this node delivered.",
    "failed": "Alerts that exhausted their retries and were dead-lettered.",
    "taken_over": "Delivered alerts for which this node was not first in the precedence list.",
    "skipped": "Alerts whose every destination was outside its schedule.",
    "redelivered": "Received alerts the broker had handed out before (a holder died).",
    "duplicates": "Alerts dropped because their id was already handled (by any node).",
    "refused": "Alerts this node refused and moved to the quarantine queue.",
    "dead_lettered": "Failed alerts this node moved to the dead-letter queue.",
}
#: The ``source`` label of every source not named in ``Settings.metrics_sources``.
OTHER_SOURCE = "other"


def _number(value: Any) -> float | None:
    """``value`` as a float, calling it first if it is callable; None when unknown."""
    if callable(value):
        value = value()
    return None if value is None else float(value)


class NodeCollector(Collector):
    """Builds every metric from the node object at each scrape.

    The node is read duck-typed so the collector works with ``tasync.node.Node`` and with the
    small fakes of the tests, and keeps working while other attributes are added or renamed:

    * ``node.ctx`` (``NodeContext``): ``node``, ``ready``, ``is_master``, ``store``,
      ``started_at``;
    * ``node.changes_applied`` (int, optional): incremented by the node per applied change;
    * ``node.lag_changes`` (int, or a callable returning int or None; optional);
    * ``node.totals`` (``tasync.consumers.totals.Totals``, optional): its ``running_sums()``, or
      ``report()["sources"]`` for an object without it;
    * ``node.consumers`` (optional): consumer loops with ``name`` and ``connected``;
    * ``node.delivery`` (optional): its ``lists.report`` (``ListsReport``) and its
      ``handled`` watcher (``caught_up``, ``ids_learned``);
    * ``node.ctx.settings.metrics_sources``: the sources named in the ``source`` label.

    Args:
        node: the running node.
    """

    def __init__(self, node: Any) -> None:
        self.node = node

    def describe(self) -> list[Metric]:
        """Nothing up front: the metric set depends on the node's state (e.g. its sources)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every metric whose source could be read during this scrape."""
        name = str(self.node.ctx.node)
        for part in (self._node_state, self._progress, self._peers, self._consumers,
                     self._alerts, self._lists, self._dedup, self._memory):
            try:
                yield from part(name)
            except Exception as exc:  # one unreadable part must not fail the whole scrape
                log.debug("metrics: %s unavailable: %s", part.__name__, exc)

    # -- parts --------------------------------------------------------------------------------

    def _node_state(self, name: str) -> Iterator[Metric]:
        ctx = self.node.ctx
        store = ctx.store
        yield _gauge("tasync_node_ready", "1 once the node has caught up and serves requests.",
                     name, 1.0 if ctx.ready.is_set() else 0.0)
        is_master = bool(ctx.is_master)
        yield _gauge("tasync_is_master", "1 if this node is the master.", name,
                     1.0 if is_master else 0.0)
        yield _gauge("tasync_epoch", "Highest epoch this node has seen (+1 per promotion).",
                     name, float(store.epoch))
        last_seq = int(store.last_seq)
        yield _gauge("tasync_applied_seq",
                     "Highest configuration change seq applied (backup) or committed (master).",
                     name, float(last_seq))
        if is_master:
            yield _gauge("tasync_outbox_pending_changes",
                         "Committed changes the broker has not confirmed yet (master only).",
                         name, float(last_seq - int(store.published_seq)))
        yield _gauge("tasync_config_objects", "Configuration objects this node holds.", name,
                     float(store.count()))
        yield _gauge("tasync_start_time_seconds", "When this node process started (Unix time).",
                     name, float(ctx.started_at))

    def _progress(self, name: str) -> Iterator[Metric]:
        applied = _number(getattr(self.node, "changes_applied", None))
        if applied is not None:
            counter = CounterMetricFamily(
                "tasync_changes_applied", "Configuration changes applied by this process.",
                labels=["node"])
            counter.add_metric([name], applied)
            yield counter
        lag = _number(getattr(self.node, "lag_changes", None))
        if lag is not None:
            yield _gauge("tasync_lag_changes", "Configuration changes this node is behind.",
                         name, lag)

    def _peers(self, name: str) -> Iterator[Metric]:
        """How long ago each node was last heard of: a dead or hung peer stands out here."""
        ctx = self.node.ctx
        ages = ctx.peers.ages(known=[n for _k, n, _b in ctx.store.objects("node")],
                              listening_since=ctx.started_at)
        if not ages:
            return
        gauge = GaugeMetricFamily("tasync_peer_seen_age_seconds",
                                  "Seconds since this node last received the peer's beacon.",
                                  labels=["node", "peer"])
        for peer, age in sorted(ages.items()):
            gauge.add_metric([name, peer], age)
        yield gauge

    def _consumers(self, name: str) -> Iterator[Metric]:
        consumers = list(getattr(self.node, "consumers", ()) or ())
        if not consumers:
            return
        gauge = GaugeMetricFamily("tasync_consumer_connected",
                                  "1 while the consumer's broker connection is up.",
                                  labels=["node", "consumer"])
        for consumer in consumers:
            gauge.add_metric([name, _consumer_label(str(consumer.name), name)],
                             1.0 if consumer.connected.is_set() else 0.0)
        yield gauge

    def _alerts(self, name: str) -> Iterator[Metric]:
        totals = getattr(self.node, "totals", None)
        if totals is None:
            return
        sums = getattr(totals, "running_sums", None)
        raw: dict[str, dict[str, Any]] = (sums() if sums is not None
                                          else totals.report().get("sources") or {})
        sources = bounded_sources(raw, self.node.ctx.settings.metrics_sources)
        counters = list(ALERT_COUNTER_HELP)
        counters += sorted({c for counts in sources.values() for c in counts} - set(counters))
        for counter in counters:
            family = CounterMetricFamily(
                f"tasync_alerts_{counter}",
                ALERT_COUNTER_HELP.get(counter, f"Alerts counted as {counter}."),
                labels=["node", "source"])
            for source, counts in sorted(sources.items()):
                if counter in counts:
                    family.add_metric([name, str(source)], float(counts[counter]))
            yield family

    def _lists(self, name: str) -> Iterator[Metric]:
        """Stranded lists and queue depths, as the node's last check saw them."""
        delivery = getattr(self.node, "delivery", None)
        if delivery is None or not delivery.lists.report.checked_at:
            return
        report = delivery.lists.report
        stranded = GaugeMetricFamily(
            "tasync_list_stranded",
            "1 while the list's queue holds alerts and no node consumes it.",
            labels=["node", "list"])
        waiting = GaugeMetricFamily("tasync_list_messages",
                                    "Alerts waiting in the list's queue.", labels=["node", "list"])
        for state in report.lists:
            stranded.add_metric([name, state.key], 1.0 if state.stranded else 0.0)
            waiting.add_metric([name, state.key], float(state.messages))
        yield stranded
        yield waiting
        if report.dead_letters is not None:
            yield _gauge("tasync_dead_letter_messages",
                         "Alerts in the dead-letter queue (tasync dead list).", name,
                         float(report.dead_letters))
        if report.quarantined is not None:
            yield _gauge("tasync_quarantine_messages",
                         "Messages in the quarantine queue (tasync quarantine list).", name,
                         float(report.quarantined))

    def _dedup(self, name: str) -> Iterator[Metric]:
        """Whether the node judges duplicates against the whole network's settled ids."""
        delivery = getattr(self.node, "delivery", None)
        if delivery is None:
            return
        watcher = delivery.handled
        yield _gauge("tasync_dedup_caught_up",
                     "1 once every other node's settled ids published before start are read.",
                     name, 1.0 if watcher.caught_up.is_set() else 0.0)
        learned = CounterMetricFamily("tasync_dedup_ids_learned",
                                      "Alert ids other nodes settled, learned by this node.",
                                      labels=["node"])
        learned.add_metric([name], float(watcher.ids_learned))
        yield learned

    def _memory(self, name: str) -> Iterator[Metric]:
        """Process memory by pool: what the soak plots beside RSS (see ``tasync.memory``)."""
        sqlite_bytes = memory.sqlite_memory_bytes()
        if sqlite_bytes is not None:
            yield _gauge("tasync_sqlite_memory_bytes",
                         "Memory SQLite has allocated in this process, page caches included.",
                         name, float(sqlite_bytes))
        yield _gauge("tasync_python_allocated_blocks",
                     "Memory blocks the Python allocator has handed out and not freed.",
                     name, float(memory.python_allocated_blocks()))
        heap = memory.malloc_stats()
        if heap is not None:
            yield _gauge("tasync_malloc_in_use_bytes",
                         "glibc heap handed out and not freed (all arenas, mmap blocks too).",
                         name, float(heap.in_use_bytes))
            yield _gauge("tasync_malloc_free_held_bytes",
                         "Freed bytes glibc keeps in its arenas for reuse.",
                         name, float(heap.free_held_bytes))


def bounded_sources(sources: dict[str, dict[str, Any]],
                    named: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Counters per source with every source not in ``named`` summed under ``other``."""
    keep = set(named)
    result: dict[str, dict[str, Any]] = {}
    for source, counts in sources.items():
        label = source if source in keep else OTHER_SOURCE
        into = result.setdefault(label, {})
        for counter, value in counts.items():
            into[counter] = into.get(counter, 0) + value
    return result


def _gauge(metric: str, documentation: str, node: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(metric, documentation, labels=["node"])
    gauge.add_metric([node], value)
    return gauge


def _consumer_label(thread_name: str, node: str) -> str:
    """``tasync-sync-a`` -> ``sync``: the consumer's role without the node name."""
    label = thread_name.removeprefix("tasync-")
    return label.removesuffix(f"-{node}") or thread_name


class MetricsServer:
    """A running metrics endpoint; ``close`` releases the port.

    Attributes:
        host: the address it is bound to.
        port: the port it listens on (the real one when 0 was asked for).
        registry: the registry it serves, holding the node's collector only.
    """

    def __init__(self, server: ThreadingHTTPServer, registry: CollectorRegistry) -> None:
        self._server = server
        self.registry = registry
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="tasync-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    """An HTTP server class for ``host``'s address family (IPv6 literals need AF_INET6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    return Server


def start_metrics_server(port: int, node: Any, *, host: str = DEFAULT_HOST) -> MetricsServer:
    """Serve the node's metrics on ``http://host:port/metrics`` from a daemon thread.

    Args:
        port: the TCP port; 0 picks a free one (see ``MetricsServer.port``).
        node: the running node (see ``NodeCollector`` for what is read from it).
        host: the address to bind; loopback by default, ``0.0.0.0`` or ``::`` to let
            Prometheus on other hosts scrape.

    Returns:
        The running server; callers that run until the process exits may ignore it.

    Raises:
        ConfigError: the address cannot be bound (port in use, unknown address), so the
            worker exits with a clear message instead of running without its metrics.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    handler: Callable[..., Any] = MetricsHandler.factory(registry)
    try:
        server = _server_class(host)((host, port), handler)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    running = MetricsServer(server, registry)
    log.info("metrics on http://%s:%d/metrics", host, running.port)
    return running

