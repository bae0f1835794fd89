"""Names and arguments of the broker topology (broker/topology.py)."""

from typing import Any, cast

import amqp.exceptions
import pytest
from kombu import Connection

from tasync.broker import topology
from tasync.broker.connection import ensure
from tasync.broker.errors import ConfigError, TopologyMissing
from tasync.broker.settings import Settings


@pytest.mark.parametrize("name", ["a", "node-1", "Node_2", "x" * 63, "9lives"])
def test_valid_node_names(name: str) -> None:
    assert topology.check_node_name(name) == name


@pytest.mark.parametrize("name", ["", "a.b", "a b", "-a", "_a", "x" * 64, "a*", "a#", "ä"])
def test_invalid_node_names(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid node name"):
        topology.check_node_name(name)


def test_node_name_with_trailing_newline_is_invalid() -> None:
    with pytest.raises(ConfigError):
        topology.check_node_name("node1\n")


def test_queue_and_key_names() -> None:
    assert topology.sync_queue("n1") == "tasync.sync.n1"
    assert topology.control_queue("n1") == "tasync.control.n1"
    assert topology.node_key("n1") == "node.n1"
    assert topology.alert_queue(["b", "a", "c"]) == "tasync.alerts.b.a.c"
    for fn in (topology.sync_queue, topology.control_queue, topology.node_key):
        with pytest.raises(ConfigError):
            fn("a.b")


def test_precedence_key_keeps_order() -> None:
    assert topology.precedence_key(["c", "a", "b"]) == "c.a.b"
    assert topology.precedence_key(("solo",)) == "solo"
    assert topology.precedence_key(["a", "b"]) != topology.precedence_key(["b", "a"])


def test_precedence_key_refuses_an_empty_list() -> None:
    with pytest.raises(ConfigError, match="at least one node"):
        topology.precedence_key([])


def test_precedence_key_refuses_duplicates() -> None:
    with pytest.raises(ConfigError, match="names a node twice: a b a"):
        topology.precedence_key(["a", "b", "a"])


@pytest.mark.parametrize("hosts", [["a", "b.c"], ["a", ""], ["a", "b c"], ["#"]])
def test_precedence_key_refuses_bad_names(hosts: list[str]) -> None:
    with pytest.raises(ConfigError, match="invalid node name"):
        topology.precedence_key(hosts)


@pytest.mark.parametrize("length", [1, 2, 3, 7])
def test_consumer_priority_decreases_along_the_list(length: int) -> None:
    priorities = [topology.consumer_priority(i, length) for i in range(length)]
    assert priorities == sorted(priorities, reverse=True)
    assert len(set(priorities)) == length
    assert min(priorities) >= 1  # above the default priority 0 of any other consumer


def test_changelog_arguments_come_from_settings() -> None:
    s = Settings(changelog_max_age="90m", changelog_max_bytes=12_345,
                 changelog_segment_bytes=678)
    assert topology.changelog_arguments(s) == {
        "x-queue-type": "stream", "x-max-age": "90m", "x-max-length-bytes": 12_345,
        "x-stream-max-segment-size-bytes": 678,
    }
    defaults = topology.changelog_arguments(Settings())
    assert defaults["x-max-age"] == Settings().changelog_max_age
    assert defaults["x-stream-max-segment-size-bytes"] < defaults["x-max-length-bytes"]


def test_queue_arguments() -> None:
    assert topology.sync_queue_arguments() == {"x-queue-type": "quorum"}
    args = topology.alert_queue_arguments()
    assert args["x-queue-type"] == "quorum"
    assert args["x-dead-letter-exchange"] == topology.DEAD_LETTER_EXCHANGE
    # at-least-once dead-lettering silently degrades without reject-publish (design 9).
    assert args["x-dead-letter-strategy"] == "at-least-once"
    assert args["x-overflow"] == "reject-publish"


class _Ok:
    message_count = 4


class RecordingChannel:
    """Records declare/bind calls; stands in for a channel without any broker."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        # Declares run on scratch channels of the same connection (``topology._declare``);
        # they record into this one log.
        self.connection = self

    def channel(self) -> "RecordingChannel":
        return self

    def __getattr__(self, method: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> _Ok:
            self.calls.append((method, args, kwargs))
            return _Ok()
        return record

    def named(self, method: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for m, a, k in self.calls if m == method]


def test_declare_all_wires_the_changelog_to_the_config_fanout() -> None:
    channel = RecordingChannel()
    s = Settings(changelog_max_age="1h")
    topology.declare_all(channel, s)
    exchanges = {a[0]: a[1] for a, _ in channel.named("exchange_declare")}
    assert exchanges[topology.CONFIG_EXCHANGE] == "fanout"
    assert exchanges[topology.ALERTS_EXCHANGE] == "direct"
    assert exchanges[topology.CONTROL_EXCHANGE] == "topic"
    queues = {a[0]: k for a, k in channel.named("queue_declare")}
    assert queues[topology.CHANGELOG_STREAM]["arguments"] == topology.changelog_arguments(s)
    assert all(k["durable"] for k in queues.values())
    assert ((topology.CHANGELOG_STREAM, topology.CONFIG_EXCHANGE, ""), {}) in channel.named(
        "queue_bind")


def test_declare_alert_queue_binds_by_precedence_key() -> None:
    channel = RecordingChannel()
    name = topology.declare_alert_queue(channel, ["b", "a"])
    assert name == "tasync.alerts.b.a"
    assert channel.named("queue_bind") == [((name, topology.ALERTS_EXCHANGE, "b.a"), {})]
    assert channel.named("queue_declare")[0][1]["arguments"] == topology.alert_queue_arguments()


def test_declare_sync_queue_returns_the_message_count() -> None:
    channel = RecordingChannel()
    assert topology.declare_sync_queue(channel, "n1") == 4
    assert channel.named("queue_bind") == [(("tasync.sync.n1", topology.CONFIG_EXCHANGE, ""), {})]


def _not_found(text: str) -> amqp.exceptions.NotFound:
    return amqp.exceptions.NotFound(f"NOT_FOUND - {text}", (60, 40), 404)


def test_a_404_for_a_tasync_object_is_the_topology_missing_in_one_wording() -> None:
    error = topology.missing_error(_not_found("no exchange 'tasync.alerts' in vhost 'v1'"))
    assert isinstance(error, TopologyMissing)
    assert str(error) == topology.setup_advice("v1", "exchange tasync.alerts") == (
        "virtual host 'v1' has no tasync topology (exchange tasync.alerts does not exist): "
        "run `tasync broker setup` against it")
    queue = topology.missing_error(_not_found("no queue 'tasync.dead-letter' in vhost 'v'"),
                                   vhost="v2")
    assert str(queue) == topology.setup_advice("v2", "queue tasync.dead-letter")


def test_a_404_for_something_else_is_not_the_topology() -> None:
    assert topology.missing_error(_not_found("no queue 'amq.gen-x' in vhost 'v1'")) is None
    assert topology.missing_error(_not_found("something else")) is None


def test_ensure_says_the_topology_is_missing_instead_of_retrying() -> None:
    calls = []

    def publish(_conn: object) -> None:
        calls.append(1)
        raise _not_found("no exchange 'tasync.alerts' in vhost 'v1'")

    settings = Settings.from_url("amqp://guest:guest@127.0.0.1:1/v1")
    with pytest.raises(TopologyMissing) as raised:
        ensure(settings, publish, conn=cast(Connection, RecordingChannel()), retry_s=5.0)
    assert calls == [1]
    assert str(raised.value) == topology.setup_advice("v1", "exchange tasync.alerts")
