"""Fixtures of the fault suite: one private three-node cluster per session, one vhost per test.

The cluster (``tests.harness.rabbit_cluster``) boots once per session, in about 20-30 s; each
test calls ``restore()`` first, so a node an earlier test killed or a disk alarm it raised never
leaks into the next test, and works in a vhost of its own, deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.cluster_net import ClusterNetwork
from tests.harness.rabbit_cluster import RabbitCluster, rabbit_cluster_fixture

__all__ = ["rabbit_cluster_fixture"]


@pytest.fixture
def cluster(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    """The session's cluster with every earlier fault undone."""
    rabbit_cluster.restore()
    return rabbit_cluster


@pytest.fixture
def fault_vhost(cluster: RabbitCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh vhost on the private cluster for one test."""
    name = f"f-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
    for char in "[]/ ":
        name = name.replace(char, "-")
    cluster.add_vhost(name)
    try:
        yield name
    finally:
        cluster.restore()
        cluster.delete_vhost(name)


@pytest.fixture
def cluster_net(cluster: RabbitCluster, fault_vhost: str,
                tmp_path: Path) -> Iterator[ClusterNetwork]:
    """Workers on the private cluster (nothing started yet: tests call ``start_trio``)."""
    net = ClusterNetwork(cluster=cluster, vhost=fault_vhost, root=tmp_path)
    try:
        yield net
    finally:
        net.close()
