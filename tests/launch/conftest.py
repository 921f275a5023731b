"""A real single-node SLURM cluster for tests/launch (one per module that asks for it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from launch_slurm_cluster import SlurmCluster, slurm_available


def _cluster(tmp_path_factory: pytest.TempPathFactory, nodes: int) -> Iterator[SlurmCluster]:
    if not slurm_available():
        msg = "slurmctld/slurmd/munged not installed (run .ci/install_slurm.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI: {msg}")
        pytest.skip(msg)
    # short path: the munge socket path must stay under the 108-byte unix socket limit
    cluster = SlurmCluster(Path(tmp_path_factory.mktemp("slurm")), nodes=nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """slurmctld + slurmd on 127.0.0.1 with config/state/logs in a temp dir; torn down even on failure.

    Skipped only when the SLURM binaries are missing on a developer machine; under CI (CI=true) a missing
    SLURM is a failure (.ci/install_slurm.sh installs it).
    """
    yield from _cluster(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def slurm_cluster_2nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two emulated nodes (node1, node2: two slurmd on this host, NodeAddr 127.0.0.1); same rules."""
    yield from _cluster(tmp_path_factory, 2)
