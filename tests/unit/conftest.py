"""Fixtures of the unit tests: the in-process broker (``tasync.broker.memory``), a vhost each."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tasync.broker import memory
from tasync.broker.settings import Settings


@pytest.fixture
def memory_settings() -> Iterator[Settings]:
    """Settings whose ``memory://`` URL makes ``tasync.broker.connection.connect`` stay in-process.

    The virtual host is this test's alone, and dropped (connections closed) at its end.
    """
    vhost = f"t-{uuid.uuid4().hex[:12]}"
    yield Settings(broker_urls=(f"memory://guest@/{vhost}",), connect_retry_s=1.0)
    memory.reset(vhost)


@pytest.fixture
def memory_broker(memory_settings: Settings) -> memory.MemoryBroker:
    """The in-process broker behind ``memory_settings``, to look at what it holds."""
    return memory.broker_for(memory_settings.vhost)
