"""A simulation on an existing Ray cluster: a head and a worker node started on this machine (each with its own CPU
and a resource naming it), `medfed simulate --ray-address` joining them, the hospitals running on both nodes.

The nodes are `ray start --block` processes in their own sessions, stopped by their PIDs (never `ray stop`, which
stops every Ray on the machine); the medfed process likewise (tests/e2e/test_simulation.py's helpers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from medfed.common.models.weights import load_checkpoint
from tests.e2e.test_simulation import _assert_run_outputs, _medfed
from tests.ray_cluster import LocalRayCluster

pytestmark = pytest.mark.e2e

RECIPE = ["dataset.n_train=600", "dataset.n_test=200", "train.rounds=2", "federation.hospitals=4",
          "federation.cpus_per_hospital=1", "federation.threads=1", "train.local_steps=10"]


def test_hospitals_run_on_both_nodes_of_a_ray_cluster_with_the_outputs_of_a_local_run(tmp_path):
    # Prepare: the same recipe on this machine's private Ray, for reference
    local = _medfed(["simulate", "--run-dir", "local", "--cache-dir", "cache", *RECIPE], tmp_path)
    assert local.returncode == 0, local.stdout[-3000:]

    with LocalRayCluster(workers=1, cpus=1) as cluster:
        assert sorted(cluster.nodes.values()) == ["head", "worker0"]

        # Execute
        started = time.time()
        result = _medfed(["simulate", "--run-dir", "cluster", "--cache-dir", "cache", "--ray-address",
                          cluster.address, *RECIPE], tmp_path, timeout=240)
        wall = time.time() - started

        # Assert: the cluster survives its driver (the driver only disconnected)
        assert cluster.running()

    assert result.returncode == 0, result.stdout[-3000:]
    assert f"on the Ray cluster at {cluster.address}" in result.stdout
    # the outputs of a local run, written by the driver, with the same numbers (the same seeds, sites in order)
    summary = _assert_run_outputs(tmp_path / "cluster", 2)
    assert sorted(summary["sites"]) == ["hospital-0", "hospital-1", "hospital-2", "hospital-3"]
    assert _files(tmp_path / "cluster") == _files(tmp_path / "local")
    lines = _lines(tmp_path / "cluster")
    for ours, theirs in zip(lines, _lines(tmp_path / "local"), strict=True):
        assert ours["val"] == theirs["val"] and ours["test"] == theirs["test"]
    final, _ = load_checkpoint(tmp_path / "cluster" / "model.pt")
    reference, _ = load_checkpoint(tmp_path / "local" / "model.pt")
    assert all(np.array_equal(final[k], reference[k]) for k in reference)
    # every site's entry names the Ray node it ran on, and the hospitals ran on both nodes of the cluster
    nodes = [site["ray_node"] for line in lines for site in line["sites"].values()]
    assert len(nodes) == 2 * 4
    assert set(nodes) == set(cluster.nodes), (nodes, cluster.nodes)
    # the local run's hospitals ran on its one private node
    local_nodes = {site["ray_node"] for line in _lines(tmp_path / "local") for site in line["sites"].values()}
    assert len(local_nodes) == 1 and not local_nodes & set(cluster.nodes)
    print(f"cluster run: {wall:.1f} s wall")


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
