"""Real etcd for tests: the fixtures ``etcd``, ``etcd_cluster3``, ``etcd_tls`` and ``etcd_auth``
over the local-fleet harness (gpufleet_dev.localetcd, which holds the members and clusters).

tests/conftest.py registers this module as a pytest plugin, so the fixtures are available to
every test module; ``EtcdCluster`` and ``EtcdMember`` can be used directly for members of a
test's own. Without an etcd binary the tests that need one skip. Set ``GPUFLEET_ETCD_BIN`` to
test another build.

The fixtures are synchronous so they can be module-scoped (one etcd for many tests; a single
member starts in well under a second); tests use unique key prefixes so they do not see each
other's keys. Tests that stop or kill members restore them before they finish.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gpufleet_dev import localetcd
from gpufleet_dev.localetcd import (  # noqa: F401  (re-exported: the tests import them from here)
    ETCD_BIN,
    NO_ETCD,
    ROOT_PASSWORD,
    USER,
    USER_PASSWORD,
    USER_PREFIX,
    EtcdMember,
    etcdctl,
)
from gpufleet_dev.localtls import TlsFiles, make_tls  # noqa: F401

SKIP_REASON = NO_ETCD
requires_etcd = pytest.mark.skipif(ETCD_BIN is None, reason=SKIP_REASON)


class EtcdCluster(localetcd.EtcdCluster):
    """The harness's cluster; a test that makes one without an etcd binary skips."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        if ETCD_BIN is None:
            pytest.skip(SKIP_REASON)
        super().__init__(*args, **kw)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    """One plain etcd member for the module (tests use their own key prefixes)."""
    cluster = EtcdCluster(1).start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def etcd_cluster3() -> Iterator[EtcdCluster]:
    """Three members; tests that stop or kill members bring them back before they end."""
    cluster = EtcdCluster(3).start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def etcd_tls() -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(1, tls=True).start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def etcd_auth() -> Iterator[EtcdCluster]:
    """Auth enabled; simple tokens expire after 2 s of disuse, to exercise re-authentication."""
    cluster = EtcdCluster(1, auth=True, extra_args=["--auth-token", "simple", "--auth-token-ttl", "2"]).start()
    yield cluster
    cluster.destroy()
