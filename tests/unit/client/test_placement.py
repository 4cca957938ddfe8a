"""A simulated hospital's reply names the Ray node it ran on; a hospital outside a Ray actor (deployed, or a
ClientApp called in-process) names none."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from medfed.client.placement import ray_node_id, simulation_placement
from medfed.common import keys


def _fake_ray(*, initialized: bool, actor_id: str | None, node_id: str = "node-a"):
    context = SimpleNamespace(get_actor_id=lambda: actor_id, get_node_id=lambda: node_id)
    return SimpleNamespace(is_initialized=lambda: initialized, get_runtime_context=lambda: context)


def test_inside_a_ray_actor_the_reply_names_its_node(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(initialized=True, actor_id="actor-1", node_id="node-a"))

    assert ray_node_id() == "node-a"
    assert simulation_placement() == {keys.RAY_NODE: "node-a"}


@pytest.mark.parametrize(
    "ray",
    [
        None,  # a deployed hospital: Ray is not even loaded
        _fake_ray(initialized=False, actor_id=None),  # loaded, never started
        _fake_ray(initialized=True, actor_id=None),  # a driver (the researcher's process), not an actor
    ],
)
def test_outside_a_ray_actor_the_reply_names_no_node(monkeypatch, ray):
    if ray is None:
        monkeypatch.delitem(sys.modules, "ray", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "ray", ray)

    assert ray_node_id() is None
    assert simulation_placement() == {}
