"""Where a hospital's data comes from: the Flower node config decides, never the coordinator.

In simulation, Flower's runtime gives every virtual SuperNode a ``partition-id``; the simulated hospital is that
partition of the configured dataset (the researcher plays every role). Deployment sites (a site config naming a
data folder) arrive with the deployment issue; until then a node without a partition id is refused clearly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from common import keys
from common.config import Config
from common.data import SiteData, load_site
from common.errors import SiteDataError

__all__ = ["default_cache_dir", "resolve_site"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where decoded site data is cached when nothing else is configured."""
    return Path("~/.cache/medfed/sites").expanduser()


def resolve_site(cfg: Config, node_config: Mapping[str, object], run_config: Mapping[str, object]) -> SiteData:
    """Load this node's site data (cheap after the first call: decoded arrays are cached on local disk)."""
    if keys.NODE_PARTITION_ID not in node_config:
        raise SiteDataError(
            "This SuperNode has no data configured: its node config lacks 'partition-id' (simulation) and "
            "deployment site configs are not supported yet. Run `medfed simulate` for a local federation."
        )
    index = int(node_config[keys.NODE_PARTITION_ID])  # type: ignore[arg-type]
    cache = run_config.get(keys.RUN_CACHE_DIR)
    cache_dir = Path(str(cache)).expanduser() if cache else default_cache_dir()
    return load_site(cfg, index, cache_dir=cache_dir)
