"""Schema of the ``federation`` group: how the simulated federation is made from one dataset."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

from medfed.common.config.checks import require_choice, require_fraction, require_positive
from medfed.common.config.choices import ATTACKS, PARTITIONS, Attack, Partition
from medfed.common.errors import ConfigError

__all__ = [
    "FederationConfig",
    "require_ray_address",
]

logger = logging.getLogger(__name__)

# HOST:PORT of a Ray cluster's head node (its GCS): a host name, an IPv4 address or a bracketed IPv6 address
_RAY_HOST_PORT = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")


def require_ray_address(key: str, value: object) -> None:
    """``""`` (a private Ray on this machine), ``auto`` or ``HOST:PORT`` (a Ray cluster's head node); the error says
    which form was meant and how to write it."""
    text = value if isinstance(value, str) else ""
    match = _RAY_HOST_PORT.match(text)
    if text in ("", "auto") or (match is not None and 1 <= int(match["port"]) <= 65535):
        return
    why = "is not a Ray cluster address"
    if text.startswith("ray://"):
        why = ("is a Ray Client address, which medfed does not use (run `medfed simulate` on a node of the cluster, "
               "the head say, with the head's HOST:PORT)")
    elif "://" in text:
        why = "is a URL (the dashboard's?), not the address of the cluster's head node"
    elif text == "local":
        why = "asks for a private Ray, which is the empty value"
    elif match is not None:
        why = "has a port outside 1-65535"
    raise ConfigError(
        f"{key}={value!r} {why}. Allowed: auto (the cluster `ray start` last started on this machine, or "
        "$RAY_ADDRESS), HOST:PORT (the head node's address that `ray start --head` prints, port 6379 by default, e.g. "
        f"`{key}=10.0.0.5:6379` or `medfed simulate --ray-address 10.0.0.5:6379`), or empty (the default) for a "
        "private Ray on this machine."
    )


@dataclass
class FederationConfig:
    """How the simulated federation is made: how many hospitals and how the data is split between them."""

    hospitals: int = 3
    partition: Partition = Partition.iid  # iid | dirichlet (label skew) | quantity
    alpha: float = 0.5  # concentration of the dirichlet and quantity partitions
    seed: int = 0
    val_fraction: float = 0.2  # each hospital's held-out local validation split (stratified)
    min_samples: int = 10  # every hospital holds at least this many images
    threads: int = 0  # torch threads per hospital process; 0 = all cores / parallel

    parallel: int = 1  # hospitals trained at once in simulation
    # GPUs per simulated hospital (Ray's client_resources num_gpus: 0.5 lets two share a GPU); 0 = none asked
    gpus_per_hospital: float = 0.0
    # CPUs per simulated hospital (Ray's client_resources num_cpus; 0.5 lets two share a core); 0 = this machine's
    # cores / parallel (1 on a Ray cluster)
    cpus_per_hospital: float = 0.0
    # where the simulated hospitals run: "" = a private Ray on this machine; "auto" = the cluster `ray start` last
    # started on this machine (or $RAY_ADDRESS); "HOST:PORT" = a Ray cluster's head node (the driver joins it)
    ray_address: str = ""
    # Each simulated hospital's own privacy cap (in deployment a hospital sets it in its node config):
    # cumulative epsilon over every run on its data, the largest delta it accepts, the least noise it accepts.
    site_max_epsilon: float = math.inf
    site_max_epsilon_each: list[float] = field(default_factory=list)  # per hospital, overrides site_max_epsilon
    site_max_delta: float = 1e-5
    site_min_noise: float = 0.0
    # A robustness experiment (simulation only; a deployed hospital never reads it): the first `attackers`
    # simulated hospitals send a poisoned update, scaled (`scale`: global + attack_scale x their update) or
    # replaced by Gaussian noise (`noise`: global + N(0, attack_scale^2) per weight).
    attack: Attack = Attack.none
    attackers: int = 1
    attack_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.hospitals < 1:
            raise ConfigError(f"federation.hospitals={self.hospitals!r} is out of range; it must be >= 1.")
        require_choice("federation.partition", self.partition, PARTITIONS)
        require_positive("federation.alpha", self.alpha)
        require_fraction("federation.val_fraction", self.val_fraction, high_open=True)
        if self.min_samples < 1:
            raise ConfigError(f"federation.min_samples={self.min_samples!r} is out of range; it must be >= 1.")
        if self.threads < 0:
            raise ConfigError(f"federation.threads={self.threads!r} is out of range; use 0 (auto) or more.")
        if self.parallel < 1:
            raise ConfigError(f"federation.parallel={self.parallel!r} is out of range; it must be >= 1.")
        require_positive("federation.gpus_per_hospital", self.gpus_per_hospital, allow_zero=True)
        require_positive("federation.cpus_per_hospital", self.cpus_per_hospital, allow_zero=True)
        require_ray_address("federation.ray_address", self.ray_address)
        for key, cap in [("federation.site_max_epsilon", self.site_max_epsilon)] + [
            (f"federation.site_max_epsilon_each[{i}]", c) for i, c in enumerate(self.site_max_epsilon_each)
        ]:
            if not cap > 0:
                raise ConfigError(f"{key}={cap!r} is out of range; it must be > 0 (inf: no cap).")
        if self.site_max_epsilon_each and len(self.site_max_epsilon_each) != self.hospitals:
            raise ConfigError(
                f"federation.site_max_epsilon_each has {len(self.site_max_epsilon_each)} values but "
                f"federation.hospitals={self.hospitals}; give one cap per hospital or leave it empty."
            )
        require_fraction("federation.site_max_delta", self.site_max_delta, high_open=True)
        require_positive("federation.site_min_noise", self.site_min_noise, allow_zero=True)
        require_choice("federation.attack", self.attack, ATTACKS)
        if self.attack != "none" and not 1 <= self.attackers < self.hospitals:
            raise ConfigError(
                f"federation.attackers={self.attackers!r} is out of range; with federation.attack={self.attack} it "
                f"must lie in [1, federation.hospitals={self.hospitals}) (some hospitals must stay honest)."
            )
        require_positive("federation.attack_scale", self.attack_scale)
