"""Where a ClientApp runs: its node's environment, resolved once per message from the node and run configs.

A simulated hospital (a partition of a dataset on the researcher's machine) and a deployed hospital (its own
site config) differ in where their data, state and outputs live and in who sets their privacy cap. That decision
is taken here, once, from the node config; every job below the adapter reads a :class:`NodeEnv` and never looks
at Flower's ``Context`` or ``Message``. What a node keeps between messages of one run (its ledger mirror, its
personal layers) is reached through the :class:`NodeState` protocol, which the adapter implements over Flower's
``context.state``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from medfed.client.policy import RequestLog, SitePolicy
from medfed.client.privacy import SiteCap, default_state_dir, site_cap
from medfed.common import keys
from medfed.common.config import Config, FederationConfig
from medfed.common.errors import SiteDataError

if TYPE_CHECKING:
    from medfed.client.site import SiteConfig

__all__ = ["NodeEnv", "NodeState", "SiteHardware"]

logger = logging.getLogger(__name__)


class NodeState(RequestLog, Protocol):
    """What a node keeps between the messages of one run (Flower's ``context.state`` at a real node): its ledger
    mirror, its personal layers, and the requests it answered (:class:`~medfed.client.policy.RequestLog`)."""

    def ledger_entries(self) -> str | None:
        """The serialised privacy-ledger entries mirrored from the last round, if any."""

    def set_ledger_entries(self, raw: str) -> None:
        """Mirror the whole serialised ledger."""

    def kept_layers(self) -> dict[str, torch.Tensor] | None:
        """The layers this hospital kept to itself after its last training round, if any."""

    def set_kept_layers(self, kept: Mapping[str, torch.Tensor]) -> None:
        """Keep these personal layers for the next round."""


def _path(value: object) -> Path:
    return Path(str(value)).expanduser()


def _flag(value: object) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class SiteHardware:
    """A deployed hospital's hardware, from its site config (:class:`~medfed.client.site.SiteConfig`): it overrides
    the recipe's ``train.device``, ``train.device_memory_gb``, ``train.loader_workers`` and ``train.pin_memory``."""

    device: str = "auto"
    device_memory_gb: float = 0.0
    loader_workers: int = 0
    pin_memory: bool = False
    cudnn_benchmark: bool = True

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SiteHardware | None:
        """The hardware a node config declares (None: a node without a device, a simulated hospital's)."""
        if keys.NODE_DEVICE not in node_config:
            return None
        return cls(
            device=str(node_config[keys.NODE_DEVICE]),
            device_memory_gb=float(str(node_config.get(keys.NODE_DEVICE_MEMORY_GB, 0.0))),
            loader_workers=int(float(str(node_config.get(keys.NODE_LOADER_WORKERS, 0)))),
            pin_memory=_flag(node_config.get(keys.NODE_PIN_MEMORY, False)),
            cudnn_benchmark=_flag(node_config.get(keys.NODE_CUDNN_BENCHMARK, True)),
        )


@dataclass(frozen=True)
class NodeEnv:
    """The environment of one ClientApp: simulated partition or deployed site, and where its files go.

    ``partition_id`` is the simulated hospital's index (None for a deployed hospital); ``site_config`` the path
    of a deployed hospital's site config; ``state_dir`` holds its privacy ledger, kept layers and explanations;
    ``run_dir`` and ``cache_dir`` (None: the default cache) come from the researcher's run config in simulation;
    ``policy`` is what the hospital answers (a deployed hospital's site config; permissive in simulation);
    ``threads`` is the CPU threads a deployed hospital allows itself (None: the recipe's ``federation.threads``
    decides); ``hardware`` is a deployed hospital's device, memory and loaders (None in simulation, where the
    recipe's ``train.*`` keys decide; :meth:`recipe`).
    """

    partition_id: int | None
    site_config: Path | None
    state_dir: Path
    run_dir: Path | None
    cache_dir: Path | None
    threads: int | None
    policy: SitePolicy
    node_config: Mapping[str, object] = field(repr=False)
    site: SiteConfig | None = field(default=None, repr=False)  # a deployed hospital's site config, read once here
    hardware: SiteHardware | None = None

    @classmethod
    def resolve(cls, node_config: Mapping[str, object], run_config: Mapping[str, object]) -> NodeEnv:
        """Read a node's environment from its node config (the hospital's word) and the run config. A deployed
        hospital's node config names its site config, which is read again here (every message): its cap, policy,
        threads and secure-RNG choice are the file's as it is now, not as it was when the daemon started."""
        site_config = node_config.get(keys.NODE_SITE_CONFIG)
        partition = node_config.get(keys.NODE_PARTITION_ID)
        if site_config is None and partition is None:
            raise SiteDataError(
                "This SuperNode has no data configured: its node config has neither 'site-config' (a hospital "
                "daemon started with `medfed hospital start`) nor 'partition-id' (simulation)."
            )
        simulated = site_config is None
        site = None
        if not simulated:  # the site config as it is now: the hospital's edits count from its next message on
            from medfed.client.site import load_site_config, node_config_for

            site = load_site_config(_path(site_config))
            node_config = {**node_config, **node_config_for(site)}
        if keys.NODE_STATE_DIR in node_config:  # the hospital's node config decides
            state_dir = _path(node_config[keys.NODE_STATE_DIR])
        elif simulated and keys.RUN_STATE_DIR in run_config:  # in simulation the researcher's run config may
            state_dir = _path(run_config[keys.RUN_STATE_DIR])
        else:
            state_dir = default_state_dir()
        cache = run_config.get(keys.RUN_CACHE_DIR) if simulated else None
        run_dir = run_config.get(keys.RUN_DIR)
        threads = node_config.get(keys.NODE_THREADS)
        return cls(
            partition_id=int(str(partition)) if simulated else None,
            site_config=None if site_config is None else _path(site_config),
            state_dir=state_dir,
            run_dir=_path(run_dir) if run_dir else None,
            cache_dir=_path(cache) if cache else None,
            threads=None if threads is None else int(float(str(threads))),
            policy=SitePolicy.from_node_config(node_config),
            node_config=node_config,
            site=site,
            hardware=SiteHardware.from_node_config(node_config),
        )

    def recipe(self, cfg: Config) -> Config:
        """The run's config with the train.* hardware keys the site sets (its device, its memory, its loaders):
        the hospital decides these, whatever the coordinator's recipe says."""
        site = self.hardware
        if site is None:
            return cfg
        train = dataclasses.replace(cfg.train, device=site.device, device_memory_gb=site.device_memory_gb,
                                    loader_workers=site.loader_workers, pin_memory=site.pin_memory)
        return dataclasses.replace(cfg, train=train)

    @property
    def cudnn_benchmark(self) -> bool:
        """Whether cuDNN autotunes its convolutions here (the site's choice; on in simulation)."""
        return self.hardware is None or self.hardware.cudnn_benchmark

    @property
    def simulated(self) -> bool:
        """A simulated hospital: a partition on the researcher's machine."""
        return self.partition_id is not None

    def cap(self, federation: FederationConfig) -> SiteCap:
        """The site's privacy cap. A deployed hospital's comes from its node config alone (the coordinator's
        ``federation.site_*`` never sets it); in simulation ``federation.site_*`` stands in for the node config."""
        return site_cap(federation if self.simulated else FederationConfig(), self.node_config, self.partition_id)

    def run_key(self) -> str:
        """The run directory as a string key of files kept per run ('' when the run config names none)."""
        return "" if self.run_dir is None else str(self.run_dir)

    def explanations_dir(self, site_id: str, run_id: int) -> Path:
        """Where this hospital keeps a run's Grad-CAM maps: in simulation the run directory's
        ``sites/<id>/gradcam`` (the researcher's machine), in deployment the hospital's state directory (never the
        coordinator's)."""
        if self.simulated and self.run_dir is not None:
            return self.run_dir / "sites" / site_id / "gradcam"
        return self.state_dir / "explanations" / f"run-{run_id}"
