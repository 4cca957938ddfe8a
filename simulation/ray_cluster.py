"""A simulation on an existing Ray cluster (``federation.ray_address``): find it, check it answers, check it can host
a hospital.

The researcher's process (the driver) joins the cluster; the ServerApp runs in it, so the run directory and the
metrics are written where ``medfed simulate`` runs, and Flower's Ray backend places one actor per
``federation.cpus_per_hospital`` / ``federation.gpus_per_hospital`` anywhere in the cluster. Every node runs the
ClientApp, so every node needs medfed installed (the Python environment ``ray start`` ran from) and the same data,
cache and state paths. The driver only ever disconnects: a cluster it joined keeps running.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from medfed.common.errors import ConfigError, ServiceUnavailable

__all__ = ["ClusterNode", "cluster_nodes", "require_capacity", "require_reachable", "resolve_address", "unreachable"]

logger = logging.getLogger(__name__)

_HOW_TO_START = (
    "Start a cluster with `ray start --head --port 6379` on the head machine (then `ray start --address HEAD:6379` on "
    "each worker machine, from the Python environment medfed is installed in), or leave federation.ray_address empty "
    "to simulate on a private Ray on this machine."
)


@dataclass(frozen=True)
class ClusterNode:
    """An alive node of the joined cluster: its Ray node id, its address, and the resources it offers."""

    node_id: str
    address: str
    resources: dict[str, float]


def resolve_address(given: str) -> str:
    """The HOST:PORT to join for ``federation.ray_address`` (``auto``: ``$RAY_ADDRESS``, else the cluster that the
    last ``ray start`` on this machine recorded; never another process's private Ray).

    Raises:
        ServiceUnavailable: ``auto`` and no cluster was started on this machine.
    """
    if given != "auto":
        return given
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env not in ("auto", "local"):
        return env
    recorded = _recorded_address()
    if recorded:
        return recorded
    raise ServiceUnavailable(
        "federation.ray_address=auto found no Ray cluster: $RAY_ADDRESS is not set and no `ray start` on this "
        f"machine recorded one. {_HOW_TO_START}"
    )


def _recorded_address() -> str | None:
    """The address the last ``ray start --head`` (or ``--address``) on this machine wrote (Ray's own record)."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # pragma: no cover - Ray moved its record: auto then finds $RAY_ADDRESS only
        return None
    path = get_ray_address_file(None)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def require_reachable(address: str, given: str, *, timeout_s: float = 5.0) -> None:
    """The head node answers at ``address`` (a TCP connection to its port within ``timeout_s``): Ray itself retries
    an address nobody answers at for minutes.

    Raises:
        ServiceUnavailable: nothing listens there, naming the address and how to start a cluster.
    """
    try:
        host, port = _host_port(address)
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise unreachable(address, given, f"nothing answers there ({exc.__class__.__name__}: {exc})") from exc


def unreachable(address: str, given: str, reason: str) -> ServiceUnavailable:
    """The error for a cluster that could not be joined."""
    via = "" if address == given else f" (federation.ray_address={given})"
    return ServiceUnavailable(
        f"Could not join the Ray cluster at {address}{via}: {reason}. medfed joins a cluster from one of its nodes "
        f"(run `medfed simulate` on the head, say). {_HOW_TO_START}"
    )


def require_capacity(resources: Mapping[str, float], address: str) -> int:
    """How many simulated hospitals the joined cluster runs at once with ``resources`` each (Ray's ``num_cpus`` and
    ``num_gpus``), counted per node as Flower's Ray backend counts them.

    Raises:
        ConfigError: no node can host one hospital, naming what each node offers and what to change.
    """
    nodes = cluster_nodes()
    cpus, gpus = float(resources.get("num_cpus", 1)), float(resources.get("num_gpus", 0))
    fits = 0
    offered = []
    for node in nodes:
        node_cpus, node_gpus = node.resources.get("CPU", 0.0), node.resources.get("GPU", 0.0)
        offered.append(f"{node_cpus:g} CPU / {node_gpus:g} GPU")
        count = int(node_cpus // cpus)
        if gpus > 0:
            count = min(count, int(node_gpus // gpus))
        fits += count
    if fits == 0:
        _no_room(address, cpus, gpus, offered)
    logger.info("Ray cluster at %s: %d node(s) (%s), %d hospital(s) at a time", address, len(nodes),
                ", ".join(offered), fits)
    return fits


def _no_room(address: str, cpus: float, gpus: float, offered: list[str]) -> NoReturn:
    raise ConfigError(
        f"No node of the Ray cluster at {address} can host a simulated hospital asking for {cpus:g} CPU and {gpus:g} "
        f"GPU (federation.cpus_per_hospital, federation.gpus_per_hospital); its nodes offer "
        f"{'; '.join(offered) or 'nothing'}. Lower those keys, or add a node with enough: `ray start --address "
        f"{address} --num-cpus N --num-gpus M`."
    )


def cluster_nodes() -> list[ClusterNode]:
    """The alive nodes of the cluster this process joined (a node that left stays listed by Ray, without
    resources)."""
    import ray

    return [
        ClusterNode(node_id=str(n["NodeID"]), address=str(n.get("NodeManagerAddress", "")),
                    resources={str(k): float(v) for k, v in n["Resources"].items()})
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources")
    ]
