"""Where a simulated hospital ran: the Ray node of the actor that computed a reply.

Flower's simulation runs every ClientApp inside a Ray actor; a run on a Ray cluster spreads those actors over the
cluster's nodes, and the coordinator records which node computed each site's reply (``ray_node`` in metrics.jsonl).
A deployed hospital's ClientApp runs in a process of its own daemon, never in a Ray actor, so it never sends one:
the check needs no run config, and it never imports Ray where Ray is not already loaded.
"""

from __future__ import annotations

import logging
import sys

from medfed.common import keys

__all__ = ["ray_node_id", "simulation_placement"]

logger = logging.getLogger(__name__)


def ray_node_id() -> str | None:
    """The id of the Ray node this process runs on, when it is a Ray actor (a simulated hospital); else None."""
    ray = sys.modules.get("ray")  # loaded by the Ray worker that runs the actor; absent in a deployed hospital
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # a driver (the researcher's process), not a hospital's actor
        return None
    return str(context.get_node_id())


def simulation_placement() -> dict[str, str]:
    """The entries a simulated hospital's reply adds to its site record: ``{RAY_NODE: node id}`` inside a Ray actor,
    nothing elsewhere (a deployed hospital, a ClientApp called in-process)."""
    node = ray_node_id()
    return {keys.RAY_NODE: node} if node else {}
