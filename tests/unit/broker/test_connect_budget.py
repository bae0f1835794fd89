"""Connecting spends the caller's budget only: no pause hidden inside the client library."""

import socket
import time

import pytest

from tasync.broker import connection
from tasync.broker.errors import BrokerUnreachable
from tasync.broker.settings import Settings


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("urls", [1, 2])
def test_a_refused_connection_is_reported_without_kombus_pause(
        monkeypatch: pytest.MonkeyPatch, urls: int) -> None:
    slept: list[float] = []
    monkeypatch.setattr("kombu.utils.functional.sleep", slept.append)
    monkeypatch.setattr(time, "sleep", slept.append)
    url = ";".join(f"amqp://guest:guest@127.0.0.1:{closed_port()}/x" for _ in range(urls))
    with pytest.raises(BrokerUnreachable, match="refused"):
        connection.connect(Settings.from_url(url), retry_s=0.0)
    assert slept == []
