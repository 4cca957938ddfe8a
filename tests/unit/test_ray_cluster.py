"""Simulating on a Ray cluster: `federation.ray_address` and `federation.cpus_per_hospital` checked when the config is
composed, `medfed simulate --ray-address` as the override, a cluster that cannot be joined or cannot host a hospital
refused with the address and what to do, before Flower starts. No Ray starts here (tests/e2e/test_ray_cluster.py
runs a real two-node cluster)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from medfed.cli.main import app
from medfed.common.config import compose_config
from medfed.common.errors import ConfigError, ServiceUnavailable
from medfed.simulation import launcher, ray_cluster
from medfed.simulation.ray_cluster import ClusterNode
from tests.ray_cluster import free_port

runner = CliRunner()


@pytest.mark.parametrize("value", ["", "auto", "10.0.0.5:6379", "head.example.org:6379", "localhost:1",
                                   "[::1]:6379", "h:65535"])
def test_cluster_addresses_that_compose(value):
    assert compose_config([f"federation.ray_address='{value}'"]).federation.ray_address == value


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("ray://10.0.0.5:10001", "is a Ray Client address, which medfed does not use"),
        ("http://10.0.0.5:8265", "is a URL"),
        ("local", "asks for a private Ray, which is the empty value"),
        ("10.0.0.5:0", "has a port outside 1-65535"),
        ("10.0.0.5:70000", "has a port outside 1-65535"),
        ("10.0.0.5", "is not a Ray cluster address"),
        ("head node:6379", "is not a Ray cluster address"),
    ],
)
def test_bad_cluster_addresses_say_what_is_allowed(value, match):
    with pytest.raises(ConfigError, match=match) as raised:
        compose_config([f"federation.ray_address='{value}'"])
    text = str(raised.value)
    assert f"federation.ray_address={value!r}" in text  # the key and the bad value
    assert "auto" in text and "HOST:PORT" in text and "`ray start --head`" in text  # what is allowed
    assert "--ray-address 10.0.0.5:6379" in text  # how to write it


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_cpus_per_hospital_must_be_a_finite_number_not_below_0(value):
    with pytest.raises(ConfigError, match=r"federation.cpus_per_hospital=.* is out of range; it must be a finite"):
        compose_config([f"federation.cpus_per_hospital={value}"])


def test_each_hospital_gets_the_cpus_and_gpus_the_config_asks(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)

    # 0: the machine's cores shared among federation.parallel hospitals; on a cluster one CPU each
    assert launcher.hospital_resources(compose_config(["federation.parallel=2"])) == {"num_cpus": 4.0, "num_gpus": 0.0}
    assert launcher.hospital_resources(compose_config(["federation.ray_address=auto"]))["num_cpus"] == 1.0
    assert launcher.hospital_resources(
        compose_config(["federation.cpus_per_hospital=0.5", "federation.gpus_per_hospital=0.25"])
    ) == {"num_cpus": 0.5, "num_gpus": 0.25}


def test_more_cpus_per_hospital_than_this_machine_has_are_refused_without_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"federation.cpus_per_hospital=3 exceeds the 2 cores of this machine"):
        launcher.check_hardware(compose_config(["federation.cpus_per_hospital=3"]), tmp_path / "c")


def test_on_a_cluster_the_gpus_are_the_nodes_not_this_machines(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cluster = ["federation.ray_address=10.0.0.5:6379"]

    # a GPU per hospital: the cluster's nodes have them (each hospital checks its own device at its first message)
    assert launcher.check_hardware(compose_config([*cluster, "federation.gpus_per_hospital=1"]), tmp_path / "c") == 0
    # a CUDA device with no GPU asked of Ray is refused anywhere
    with pytest.raises(ConfigError, match="federation.gpus_per_hospital=0: Ray hides the GPUs"):
        launcher.check_hardware(compose_config([*cluster, "train.device=cuda"]), tmp_path / "c")


def test_simulate_ray_address_is_the_override_and_an_unreachable_cluster_fails_before_ray(tmp_path, no_simulation_runtime):
    # Prepare: nobody listens on this port
    address = f"127.0.0.1:{free_port()}"

    # Execute
    result = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"),
                                 "--ray-address", address, "train.rounds=1"])

    # Assert: exit code 10 (a service did not answer), naming the address and how to start a cluster
    text = " ".join(result.output.split())
    assert result.exit_code == 10, result.output
    assert f"Could not join the Ray cluster at {address}: nothing answers there" in text
    assert "ray start --head --port 6379" in text and "leave federation.ray_address empty" in text
    assert "Traceback" not in result.output and not no_simulation_runtime
    # the option is recorded as the override it stands for
    assert f"federation.ray_address='{address}'" in json.loads((tmp_path / "run" / "overrides.json").read_text())
    assert f"ray_address: {address}" in (tmp_path / "run" / "config.yaml").read_text()


def test_simulate_refuses_two_clusters(tmp_path, no_simulation_runtime):
    result = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "run"), "--ray-address", "10.0.0.5:6379",
                                 "federation.ray_address=10.0.0.6:6379"])

    assert result.exit_code == 2, result.output
    assert "name two clusters; give the cluster once" in " ".join(result.output.split())
    assert not no_simulation_runtime


def test_simulate_refuses_a_bad_ray_address_option_when_the_config_is_composed(tmp_path, no_simulation_runtime):
    result = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "run"), "--ray-address", "ray://h:10001"])

    assert result.exit_code == 2, result.output
    assert "is a Ray Client address" in " ".join(result.output.split())
    assert not (tmp_path / "run" / "config.yaml").exists() and not no_simulation_runtime


def test_auto_uses_ray_address_then_the_cluster_ray_start_recorded(monkeypatch):
    monkeypatch.setattr(ray_cluster, "_recorded_address", lambda: "10.0.0.7:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_cluster.resolve_address("auto") == "10.0.0.5:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_cluster.resolve_address("auto") == "10.0.0.7:6379"
    assert ray_cluster.resolve_address("10.0.0.9:6379") == "10.0.0.9:6379"


def test_auto_without_a_cluster_says_how_to_start_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "_recorded_address", lambda: None)

    with pytest.raises(ServiceUnavailable, match=r"federation.ray_address=auto found no Ray cluster.*ray start --head"):
        ray_cluster.resolve_address("auto")


def test_a_cluster_that_cannot_be_joined_is_a_service_unavailable():
    with pytest.raises(ServiceUnavailable, match=r"Could not join the Ray cluster at 10.0.0.5:6379 "
                                                 r"\(federation.ray_address=auto\): ConnectionError: Failed to connect\."):
        launcher._joined("10.0.0.5:6379", "auto", ConnectionError("Failed to connect"), {"num_cpus": 1.0})


def test_hospitals_the_cluster_runs_at_once_are_counted_per_node(monkeypatch):
    nodes = [ClusterNode("a", "10.0.0.5", {"CPU": 4.0}), ClusterNode("b", "10.0.0.6", {"CPU": 3.0, "GPU": 1.0})]
    monkeypatch.setattr(ray_cluster, "cluster_nodes", lambda: nodes)

    assert ray_cluster.require_capacity({"num_cpus": 2.0, "num_gpus": 0.0}, "10.0.0.5:6379") == 2 + 1
    assert ray_cluster.require_capacity({"num_cpus": 1.0, "num_gpus": 0.5}, "10.0.0.5:6379") == 2  # node b only
    with pytest.raises(ConfigError, match=r"No node of the Ray cluster at 10.0.0.5:6379 can host a simulated hospital "
                                          r"asking for 8 CPU and 0 GPU .*4 CPU / 0 GPU; 3 CPU / 1 GPU.*ray start"):
        ray_cluster.require_capacity({"num_cpus": 8.0, "num_gpus": 0.0}, "10.0.0.5:6379")
