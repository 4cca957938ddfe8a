"""Where a hospital's data comes from, and what the hospital decides: its site config, never the coordinator.

In simulation, Flower's runtime gives every virtual SuperNode a ``partition-id``; the simulated hospital is that
partition of the configured dataset (the researcher plays every role). In deployment, the hospital's daemon passes
its site config file in the node config (``site-config``); the file names the site's data, its privacy cap, its
state directory and the app bundles it approves. See :class:`SiteConfig` for the file's keys.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfed.client.node import NodeEnv
from medfed.client.policy import DEFAULT_STAGES, SitePolicy, parse_grid, parse_stages
from medfed.common import keys
from medfed.common.atomic import atomic_write
from medfed.common.config import Config
from medfed.common.config.checks import require_device_spec
from medfed.common.data import SiteData, load_site
from medfed.common.data.site_spec import SiteSpec, load_site_data
from medfed.common.errors import ConfigError

__all__ = [
    "SiteConfig",
    "default_cache_dir",
    "load_site_config",
    "node_config_for",
    "resolve_site",
    "site_policy",
    "write_site_config",
]

logger = logging.getLogger(__name__)

_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# the site config's numeric keys and their types (YAML gives strings for typos such as "ten")
_NUMBERS: dict[str, type] = {"val_fraction": float, "split_seed": int, "max_epsilon": float, "max_delta": float,
                             "min_noise": float, "runtime_port": int, "image_size": int, "channels": int,
                             "spatial_dims": int, "device_memory_gb": float}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def default_cache_dir() -> Path:
    """Where decoded site data is cached when nothing else is configured."""
    return Path("~/.cache/medfed/sites").expanduser()


@dataclass
class SiteConfig:
    """A hospital's own settings (``site.yaml``); only the hospital edits this file.

    Keys: ``site_id`` (shown to the coordinator), ``data_path`` (the array file, see
    :mod:`common.data.site_files`, or an image folder, see :mod:`common.data.site_folder`), ``labels`` (optional
    label CSV; for a folder the ``path,label[,split][,patient_id]`` manifest), ``n_classes``, ``classes`` (a
    folder's label names in class-index order; default: the labels found, sorted), ``image_size`` /
    ``channels`` / ``spatial_dims`` (the task's model input a folder's images are resized to), ``cache_dir``
    (decoded images; default ``STATE_DIR/cache``), ``val_fraction`` and
    ``split_seed`` (the local validation split), ``max_epsilon`` / ``max_delta`` / ``min_noise`` (the privacy cap,
    cumulative over every run on this data), ``secure_rng`` (true, the default: DP-SGD rounds only with Opacus'
    secure_mode, whose RNG needs torchcsprng; a round is refused without it), ``state_dir`` (privacy ledger, audit
    log), ``approved_apps`` (sha256 of every app bundle this site runs), ``superlink`` (the coordinator's
    address), ``ca_certificate`` and ``auth_key`` (TLS root and SuperNode key), ``runtime_port`` (local port of the
    SuperNode's Runtime API), ``threads`` (CPU threads for training; 0 = every core; the site decides, whatever the
    recipe says). Relative paths are relative to the file's folder.

    Hardware (the site decides, whatever the recipe says; docs/operations.md "Hardware"): ``device`` (``auto``: the
    GPU when torch sees one, else the CPU; ``cpu``; ``cuda``; ``cuda:N``) for training and evaluation,
    ``device_memory_gb`` (the memory training may use on that device, in GiB; 0 = detect: a GPU's total memory, the
    machine's available RAM; a model that does not fit is refused before round 1), ``loader_workers`` (DataLoader
    worker processes; 0 = load in the training process), ``pin_memory`` (pinned host memory for batches bound for
    a GPU), ``cudnn_benchmark`` (cuDNN picks the fastest convolution algorithm per shape; default true).
    """

    site_id: str
    data_path: str
    n_classes: int
    labels: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    max_epsilon: float = 10.0
    max_delta: float = 1e-5
    min_noise: float = 0.0
    secure_rng: bool = True  # DP-SGD only with a cryptographically secure RNG (torchcsprng); false for experiments
    state_dir: str = "state"
    approved_apps: list[str] = field(default_factory=list)
    superlink: str = "127.0.0.1:9093"
    ca_certificate: str = "ca.crt"
    auth_key: str = "node.key"
    runtime_port: int = 9094  # the SuperNode's local Runtime API (127.0.0.1 only); one port per site on a machine
    threads: int = 0  # torch threads for training at this site; 0 = every core of the machine
    # the site's hardware: overrides the recipe's train.device / device_memory_gb / loader_workers / pin_memory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    device_memory_gb: float = 0.0  # GiB training may use on the device; 0 = detect
    loader_workers: int = 0
    pin_memory: bool = False
    cudnn_benchmark: bool = True
    # an image folder: its label names in class order, and the model input its images are resized to
    classes: list[str] = field(default_factory=list)
    image_size: int = 28
    channels: int = 1
    spatial_dims: int = 2
    cache_dir: str | None = None
    # the site's policy, checked at every message (client.policy): DP required unless it opts out for research,
    # SecAgg+ required if it says so, the stages it answers (Grad-CAM, audit off unless listed), its calibration grid
    require_dp: bool = True
    require_secure_aggregation: bool = False
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    calibration_grid: list[float] = field(default_factory=list)
    source: Path | None = field(default=None, repr=False, compare=False)  # the file it was read from
    defaults_applied: tuple[str, ...] = field(default=(), repr=False, compare=False)  # policy keys the file lacks

    def __post_init__(self) -> None:
        for key, kind in _NUMBERS.items():  # a typo ("ten", "1e-5x") names the key, not a Python ValueError
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ConfigError(f"{key}={value!r} is not a number; write a {kind.__name__} in the site config.")
            try:
                number = kind(value) if kind is float or isinstance(value, int) else int(str(value), 10)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a {'number' if kind is float else 'whole number'}; write "
                                  f"a {kind.__name__} in the site config (e.g. {getattr(SiteConfig, key)!r}).") from None
            setattr(self, key, number)
        if not 1 <= self.runtime_port <= 65535:
            raise ConfigError(f"runtime_port={self.runtime_port!r} is out of range; it must lie in [1, 65535].")
        if not _SITE_ID.match(str(self.site_id)):
            raise ConfigError(
                f"site_id={self.site_id!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-' (it is shown "
                "to the coordinator, so never a patient or staff name)."
            )
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int) or self.n_classes < 2:
            raise ConfigError(f"n_classes={self.n_classes!r} is out of range; it must be an integer >= 2.")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r} is out of range; it must lie in (0, 1).")
        if not float(self.max_epsilon) > 0.0:
            raise ConfigError(f"max_epsilon={self.max_epsilon!r} is out of range; it must be > 0 (.inf: no cap).")
        if not 0.0 < float(self.max_delta) < 1.0:
            raise ConfigError(f"max_delta={self.max_delta!r} is out of range; it must lie in (0, 1), e.g. 1e-5.")
        if not float(self.min_noise) >= 0.0:
            raise ConfigError(f"min_noise={self.min_noise!r} is out of range; it must be >= 0.")
        if not isinstance(self.secure_rng, bool):
            raise ConfigError(f"secure_rng={self.secure_rng!r} must be true or false.")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(
                f"threads={self.threads!r} is out of range; it must be an integer >= 0 (0 = every core; on a machine "
                "shared with other work or other sites, its share of the cores)."
            )
        require_device_spec("device", self.device)
        if not float(self.device_memory_gb) >= 0.0 or float(self.device_memory_gb) == float("inf"):
            raise ConfigError(
                f"device_memory_gb={self.device_memory_gb!r} is out of range; it must be a finite number >= 0 (GiB "
                "that training may use on the device; 0 = detect: a GPU's total memory, or the available RAM)."
            )
        if isinstance(self.loader_workers, bool) or not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ConfigError(f"loader_workers={self.loader_workers!r} is out of range; it must be an integer >= 0 "
                              "(0 = load batches in the training process).")
        for key in ("pin_memory", "cudnn_benchmark"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}={getattr(self, key)!r} must be true or false.")
        if self.classes and len(self.classes) != self.n_classes:
            raise ConfigError(
                f"classes has {len(self.classes)} names but n_classes={self.n_classes}; list one label per class, in "
                "the task's class order."
            )
        if self.channels not in (1, 3) or self.spatial_dims not in (2, 3) or int(self.image_size) < 8:
            raise ConfigError(
                f"image_size={self.image_size!r}, channels={self.channels!r}, spatial_dims={self.spatial_dims!r}: "
                "channels must be 1 or 3, spatial_dims 2 or 3, image_size >= 8 (the task's model input)."
            )
        for key in ("require_dp", "require_secure_aggregation"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}={getattr(self, key)!r} must be true or false.")
        parse_stages(self.stages)
        parse_grid(self.calibration_grid)
        bad = [h for h in self.approved_apps if not _SHA256.match(str(h))]
        if bad:
            raise ConfigError(
                f"approved_apps holds {bad[0]!r}, which is not a sha256 hex digest (64 lowercase hex digits); add "
                "bundles with `medfed hospital approve`."
            )

    def path(self, value: str) -> Path:
        """A path from this file, made absolute against the file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() or self.source is None else (self.source.parent / p).resolve()

    @property
    def state_path(self) -> Path:
        return self.path(self.state_dir)

    def approves(self, fab_hash: str) -> bool:
        return fab_hash in self.approved_apps

    def spec(self) -> SiteSpec:
        """The site's data as :func:`~medfed.common.data.site_spec.load_site_data` reads it (paths made absolute
        against this file's folder; decoded images cached under ``cache_dir`` or ``STATE_DIR/cache``)."""
        return SiteSpec(
            site_id=self.site_id,
            data=self.path(self.data_path),
            n_classes=self.n_classes,
            labels=self.path(self.labels) if self.labels else None,
            classes=tuple(self.classes),
            image_size=int(self.image_size),
            channels=int(self.channels),
            spatial_dims=int(self.spatial_dims),
            val_fraction=float(self.val_fraction),
            split_seed=int(self.split_seed),
            cache_dir=self.path(self.cache_dir) if self.cache_dir else self.state_path / "cache",
        )


_FIELDS = {f for f in SiteConfig.__dataclass_fields__ if f not in ("source", "defaults_applied")}
_POLICY_KEYS = ("require_dp", "require_secure_aggregation", "stages", "calibration_grid")


def site_policy(site: SiteConfig) -> SitePolicy:
    """The policy a site config declares (what its ClientApps enforce at every message)."""
    return SitePolicy(require_dp=site.require_dp, require_secure_aggregation=site.require_secure_aggregation,
                      stages=parse_stages(site.stages), calibration_grid=parse_grid(site.calibration_grid))


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate a site config file; unknown keys and bad values fail naming the key."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"Site config {path} does not exist; create one with `medfed hospital init`.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Site config {path.name} is not valid YAML ({exc}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Site config {path.name} must be a mapping of keys to values.")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ConfigError(
            f"Site config {path.name} has unknown key(s) {unknown}; allowed keys: {sorted(_FIELDS)}."
        )
    missing = [k for k in ("site_id", "data_path", "n_classes") if k not in raw]
    if missing:
        raise ConfigError(f"Site config {path.name} lacks {missing}; see `medfed hospital init --help`.")
    defaults = tuple(k for k in _POLICY_KEYS if k not in raw)
    try:
        return SiteConfig(**raw, source=path, defaults_applied=defaults)
    except TypeError as exc:
        raise ConfigError(f"Site config {path.name}: {exc}") from None


def write_site_config(site: SiteConfig, path: Path) -> None:
    """Write ``site`` to ``path`` atomically (the daemon re-reads it on every message)."""
    data: dict[str, Any] = {k: v for k, v in asdict(site).items() if k not in ("source", "defaults_applied")}
    with atomic_write(Path(path), binary=False) as handle:
        handle.write("# medfed site config: only this hospital edits it (see `medfed hospital --help`).\n")
        yaml.safe_dump(data, handle, sort_keys=False)


def node_config_for(site: SiteConfig) -> dict[str, str | float | bool]:
    """The Flower node config the hospital daemon gives its SuperNode (the ClientApp reads it)."""
    assert site.source is not None, "node_config_for needs a site config read from a file"
    return {
        keys.NODE_SITE_CONFIG: str(site.source),
        keys.NODE_STATE_DIR: str(site.state_path),
        keys.NODE_MAX_EPSILON: float(site.max_epsilon),
        keys.NODE_MAX_DELTA: float(site.max_delta),
        keys.NODE_MIN_NOISE: float(site.min_noise),
        keys.NODE_SECURE_RNG: bool(site.secure_rng),
        keys.NODE_THREADS: float(site.threads),
        keys.NODE_DEVICE: str(site.device),
        keys.NODE_DEVICE_MEMORY_GB: float(site.device_memory_gb),
        keys.NODE_LOADER_WORKERS: float(site.loader_workers),
        keys.NODE_PIN_MEMORY: bool(site.pin_memory),
        keys.NODE_CUDNN_BENCHMARK: bool(site.cudnn_benchmark),
        keys.NODE_REQUIRE_DP: bool(site.require_dp),
        keys.NODE_REQUIRE_SECURE_AGGREGATION: bool(site.require_secure_aggregation),
        keys.NODE_STAGES: ",".join(parse_stages(site.stages)),
        keys.NODE_CALIBRATION_GRID: ",".join(f"{t!r}" for t in parse_grid(site.calibration_grid)),
    }


def resolve_site(cfg: Config, env: NodeEnv) -> SiteData:
    """Load this node's site data: the hospital's own data from its site config, or a simulated partition."""
    if env.site is not None:  # the site config as NodeEnv.resolve read it for this message
        return load_site_data(env.site.spec())
    assert env.partition_id is not None  # NodeEnv.resolve: a node without a site config is a simulated partition
    return load_site(cfg, env.partition_id, cache_dir=env.cache_dir or default_cache_dir())
