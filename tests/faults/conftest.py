"""Fixtures of the fault-injection suite: each scenario gets its own etcd (a clean keyspace), torn down after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from etcd_fixtures import EtcdCluster


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    # Overrides the module-scoped ``etcd`` of tests/etcd_fixtures.py: a fault scenario must not
    # inherit another's leader key, leases or node records.
    cluster = EtcdCluster(1).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    """Three members of its own for one scenario (scenarios kill, freeze and restart members)."""
    cluster = EtcdCluster(3).start()
    try:
        yield cluster
    finally:
        cluster.destroy()
