"""Simulated federations: which hospital holds which samples, and a cheap per-site loader with an on-disk cache.

:func:`build_sites` shares a dataset's development pool out to ``federation.hospitals`` hospitals
(:mod:`common.data.partition`), holds out a stratified local validation split at each, and, for the synthetic
dataset, renders each hospital's images with its own scanner style. :func:`load_site` returns one hospital's data
and is meant to be called every round from a fresh process: with ``cache_dir`` the sites are built once and then
read back from uncompressed ``.npz`` files written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np

from medfed.common.config import Config, DatasetConfig, FederationConfig, FolderConfig, MedMNISTConfig, SyntheticConfig
from medfed.common.data.arrays import ArrayDataset, DatasetInfo, DatasetSplits, SiteData
from medfed.common.data.medmnist import load_medmnist, medmnist_path
from medfed.common.data.site_spec import SiteSpec
from medfed.common.data.partition import labelled_subset, partition_indices, stratified_split
from medfed.common.data.synthetic import load_synthetic, scanner_effect
from medfed.common.atomic import atomic_write
from medfed.common.errors import ConfigError, DatasetUnavailableError, SiteDataError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DataSource",
    "LOADERS",
    "SiteData",
    "build_sites",
    "cache_key",
    "folder_site_spec",
    "forget_loaded_sites",
    "load_site",
    "load_dataset_info",
    "load_splits",
    "load_test_set",
    "site_id_for",
    "WithheldTestSplit",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_FEDERATION_KEYS = ("hospitals", "partition", "alpha", "seed", "val_fraction", "min_samples")

@dataclass(frozen=True)
class DataSource:
    """How one ``dataset.source`` is read. A pooled source (``splits``: MedMNIST, synthetic) is loaded whole and
    shared out to the simulated hospitals; a per-site source (``site`` and ``test_set``: folders) reads each
    hospital's own data, as a deployed hospital does."""

    schema: type[DatasetConfig]
    splits: Callable[[Any], DatasetSplits] | None = None
    site: Callable[[Config, int, Path | None], SiteData] | None = None
    test_set: Callable[[Config, Path | None], tuple[DatasetInfo, ArrayDataset]] | None = None


def _folder_site_of(cfg: Config, index: int, cache_dir: Path | None) -> SiteData:
    from medfed.common.data.site_spec import load_site_data

    return load_site_data(folder_site_spec(cfg, _as(cfg.dataset, FolderConfig), index, cache_dir))


def _folder_test_of(cfg: Config, cache_dir: Path | None) -> tuple[DatasetInfo, ArrayDataset]:
    dataset = _as(cfg.dataset, FolderConfig)
    return _folder_info(dataset), _folder_test_set(cfg, dataset, cache_dir)


# source -> how it is read. Extend by adding an entry; unknown sources fail listing these choices.
LOADERS: MappingProxyType[str, DataSource] = MappingProxyType({
    "medmnist": DataSource(MedMNISTConfig, splits=load_medmnist),
    "synthetic": DataSource(SyntheticConfig, splits=load_synthetic),
    "folder": DataSource(FolderConfig, site=_folder_site_of, test_set=_folder_test_of),
})

_Schema = TypeVar("_Schema", bound=DatasetConfig)


def _as(dataset_cfg: DatasetConfig, schema: type[_Schema]) -> _Schema:
    """The dataset section as its source's schema (a bare DatasetConfig gets the schema's defaults)."""
    if isinstance(dataset_cfg, schema):
        return dataset_cfg
    return schema(**{f.name: getattr(dataset_cfg, f.name) for f in fields(dataset_cfg)})


def _source(dataset_cfg: DatasetConfig) -> DataSource:
    source = LOADERS.get(dataset_cfg.source)
    if source is None:
        raise ConfigError(
            f"dataset.source={dataset_cfg.source!r} is not a known dataset source; choose one of: "
            f"{', '.join(LOADERS)} (e.g. `dataset=medmnist` on the command line)."
        )
    return source


def site_id_for(index: int) -> str:
    """The site id of simulated hospital ``index``: ``hospital-0``, ``hospital-1``, ..."""
    return f"hospital-{index}"


def load_splits(dataset_cfg: DatasetConfig) -> DatasetSplits:
    """Load the pooled dataset ``dataset_cfg.source`` names (``medmnist`` or ``synthetic``).

    Raises:
        ConfigError: an unknown source, or a per-site source (``folder``: each hospital reads its own data).
    """
    source = _source(dataset_cfg)
    if source.splits is None:
        raise ConfigError(
            f"dataset={dataset_cfg.source} has no pooled data to share out: each simulated hospital reads its own "
            "(load_site); the centralized baseline needs a pooled source such as dataset=medmnist."
        )
    return source.splits(_as(dataset_cfg, source.schema))


def _dataset_seed(dataset_cfg: DatasetConfig) -> int:
    return int(getattr(dataset_cfg, "seed", 0))


def _site_seed(fed: FederationConfig, index: int) -> int:
    words = [int(fed.seed) & ((1 << 63) - 1), index, 0x5A1]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _partitions(splits: DatasetSplits, fed: FederationConfig) -> list[np.ndarray]:
    """Which images of ``splits.train`` each hospital holds (indices only: cheap for any number of hospitals)."""
    return partition_indices(
        splits.train.labels,
        fed.hospitals,
        fed.partition,
        alpha=fed.alpha,
        seed=fed.seed,
        min_size=fed.min_samples,
    )


def _build_site(splits: DatasetSplits, fed: FederationConfig, index: int, part: np.ndarray,
                dataset_seed: int) -> SiteData:
    """Hospital ``index`` holding the images ``part`` of the pool, with its stratified local validation split."""
    local = splits.train.subset(part)
    if splits.info.simulate_scanners:
        local = ArrayDataset(images=scanner_effect(local.images, index, dataset_seed), labels=local.labels)
    keep, held = stratified_split(local.labels, fed.val_fraction, seed=_site_seed(fed, index))
    site = SiteData(site_id_for(index), train=local.subset(keep), val=local.subset(held), info=splits.info)
    logger.debug(
        "%s: %d train, %d val, class counts %s",
        site.site_id, len(site.train), len(site.val), site.train.class_counts(splits.info.n_classes).tolist(),
    )
    return site


def build_sites(splits: DatasetSplits, fed: FederationConfig, *, dataset_seed: int = 0) -> list[SiteData]:
    """Share ``splits.train`` out to ``fed.hospitals`` hospitals, each with a stratified local validation split.

    Datasets marked ``info.simulate_scanners`` (the synthetic one) get each hospital's scanner style
    (:func:`common.data.synthetic.scanner_effect` with the site index and ``dataset_seed``). Every site is in
    memory at once; :func:`load_site` builds one at a time.
    """
    parts = _partitions(splits, fed)
    return [_build_site(splits, fed, index, part, dataset_seed) for index, part in enumerate(parts)]


def _source_identity(dataset: DatasetConfig) -> dict[str, Any] | None:
    """The identity of the file a dataset is read from (resolved path, size, modification time), so a file
    replaced at the same path is read again, never served stale from the cache; None for generated data or a file
    not there yet (a download then writes it, and the next run keys its cache by the file)."""
    if not isinstance(dataset, MedMNISTConfig):
        return None
    path = medmnist_path(dataset)
    try:
        stat = path.stat()
    except OSError:
        return None
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(cfg: Config) -> str:
    """First 16 hex digits of the sha256 of everything that decides the sites' arrays: the config, the identity of
    the source file, and a format version."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "source": _source_identity(cfg.dataset),
        "dataset": {"type": type(cfg.dataset).__name__,
                    **{k: v for k, v in asdict(cfg.dataset).items() if k != "label_fraction"}},
        "federation": {key: getattr(cfg.federation, key) for key in _FEDERATION_KEYS},
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _info_to_json(info: DatasetInfo) -> str:
    return json.dumps(asdict(info), sort_keys=True)


def _info_from_json(text: str) -> DatasetInfo:
    raw = json.loads(text)
    raw["class_names"] = tuple(raw["class_names"])
    return DatasetInfo(**raw)


def _write_atomic(path: Path, arrays: Mapping[str, Any]) -> None:
    """``np.savez`` (uncompressed) to a temp file in the same folder, then ``os.replace`` onto ``path``."""
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or ``None`` when it is absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("Ignoring unreadable cache file %s (%s); rebuilding it.", path.name, type(exc).__name__)
        return None


def _site_arrays(site: SiteData) -> dict[str, np.ndarray]:
    return {
        "site_id": np.array(site.site_id),
        "info": np.array(_info_to_json(site.info)),
        "train_images": site.train.images,
        "train_labels": site.train.labels,
        "val_images": site.val.images,
        "val_labels": site.val.labels,
    }


def _site_from_arrays(arrays: dict[str, np.ndarray]) -> SiteData:
    return SiteData(
        site_id=str(arrays["site_id"]),
        train=ArrayDataset(images=arrays["train_images"], labels=arrays["train_labels"]),
        val=ArrayDataset(images=arrays["val_images"], labels=arrays["val_labels"]),
        info=_info_from_json(str(arrays["info"])),
    )


#: Sites this process has read from a cache folder, so a Flower actor hosting several virtual hospitals reads each
#: file once per run, not once per message. Bounded: past ``_MEMORY_LIMIT_BYTES`` the oldest entries are dropped.
_IN_MEMORY: dict[tuple[str, int], SiteData] = {}
_MEMORY_LIMIT_BYTES = 2 << 30


def _site_bytes(site: SiteData) -> int:
    return sum(a.nbytes for a in (site.train.images, site.train.labels, site.val.images, site.val.labels))


def _remember(key: tuple[str, int], site: SiteData) -> SiteData:
    _IN_MEMORY[key] = site
    while len(_IN_MEMORY) > 1 and sum(_site_bytes(s) for s in _IN_MEMORY.values()) > _MEMORY_LIMIT_BYTES:
        del _IN_MEMORY[next(iter(_IN_MEMORY))]
    return site


def forget_loaded_sites() -> None:
    """Drop the sites this process keeps in memory (the next :func:`load_site` reads the cache files again)."""
    _IN_MEMORY.clear()


def load_site(cfg: Config, index: int, *, cache_dir: Path | None = None) -> SiteData:
    """Hospital ``index``'s data, i.e. ``build_sites(...)[index]``; cached under ``cache_dir`` when given. With
    ``dataset.label_fraction < 1`` (and ``task=classify``) its training split keeps only the labelled images
    (:func:`~common.data.partition.labelled_subset`, seeded by the federation seed and the site)."""
    site = _load_full_site(cfg, index, cache_dir=cache_dir)
    fraction = cfg.dataset.label_fraction
    if fraction >= 1.0 or cfg.task == "ssl":
        return site
    kept = labelled_subset(site.train.labels, fraction, seed=cfg.federation.seed * 1000 + index)
    return SiteData(site_id=site.site_id, train=site.train.subset(kept), val=site.val, info=site.info)


def _load_full_site(cfg: Config, index: int, *, cache_dir: Path | None = None) -> SiteData:
    """Hospital ``index``'s data, i.e. ``build_sites(...)[index]``; cached under ``cache_dir`` when given.

    On a cache miss every site's file is written (the pool is loaded once for all of them), building and writing one
    site at a time, so memory holds the pool and one site however many hospitals there are; without a cache folder
    only the site asked for is built. With a cache folder, the process also keeps what it read in memory, up to
    ``_MEMORY_LIMIT_BYTES`` (callers must not modify the arrays).
    """
    if not 0 <= index < cfg.federation.hospitals:
        raise ConfigError(
            f"Site index {index} is out of range: federation.hospitals={cfg.federation.hospitals} allows "
            f"0..{cfg.federation.hospitals - 1}. Raise federation.hospitals or pick a smaller index."
        )
    source = _source(cfg.dataset)
    if source.site is not None:
        return source.site(cfg, index, cache_dir)
    folder = Path(cache_dir) / cache_key(cfg) if cache_dir is not None else None
    if folder is not None:
        memory_key = (str(folder.resolve()), index)
        if memory_key in _IN_MEMORY:
            return _IN_MEMORY[memory_key]
        cached = _read_cache(folder / f"site-{index}.npz")
        if cached is not None:
            try:
                return _remember(memory_key, _site_from_arrays(cached))
            except (KeyError, ValueError, TypeError, SiteDataError) as exc:
                logger.warning("Ignoring cache file site-%d.npz with a bad layout (%s).", index, exc)
    splits = load_splits(cfg.dataset)
    parts = _partitions(splits, cfg.federation)
    seed = _dataset_seed(cfg.dataset)
    if folder is None:  # only the site asked for
        return _build_site(splits, cfg.federation, index, parts[index], seed)
    wanted = None
    for site_index, part in enumerate(parts):  # one site in memory at a time (1,000 sites: the pool and one site)
        site = _build_site(splits, cfg.federation, site_index, part, seed)
        _write_atomic(folder / f"site-{site_index}.npz", _site_arrays(site))
        if site_index == index:
            wanted = site
    logger.info("Cached %d sites under cache key %s", len(parts), folder.name)
    assert wanted is not None  # index is in range (checked above)
    return _remember((str(folder.resolve()), index), wanted)


def _folder_info(dataset: FolderConfig) -> DatasetInfo:
    return DatasetInfo(name="folder", n_classes=len(dataset.classes), channels=dataset.channels,
                       spatial_dims=dataset.spatial_dims, image_size=dataset.image_size,
                       class_names=tuple(dataset.classes))


def _folder_options(dataset: FolderConfig, cache_dir: Path | None) -> dict[str, Any]:
    return {"image_size": dataset.image_size, "spatial_dims": dataset.spatial_dims, "channels": dataset.channels,
            "cache_dir": Path(cache_dir) / "folders" if cache_dir is not None else None}


def folder_site_spec(cfg: Config, dataset: FolderConfig, index: int, cache_dir: Path | None) -> SiteSpec:
    """Simulated hospital ``index`` of ``dataset=folder``, described as a deployed hospital's site config is."""
    labels = dataset.labels[index] if dataset.labels else ""
    return SiteSpec(
        site_id=site_id_for(index), data=Path(dataset.data_paths[index]), labels=Path(labels) if labels else None,
        n_classes=len(dataset.classes), classes=tuple(dataset.classes), image_size=dataset.image_size,
        channels=dataset.channels, spatial_dims=dataset.spatial_dims, val_fraction=cfg.federation.val_fraction,
        split_seed=cfg.federation.seed, cache_dir=Path(cache_dir) / "folders" if cache_dir is not None else None,
        name="folder",
    )


def _folder_test_set(cfg: Config, dataset: FolderConfig, cache_dir: Path | None) -> ArrayDataset:
    """The test folder's labelled images, or else every hospital's images marked ``split=test``."""
    from medfed.common.data.site_folder_arrays import load_folder, read_labelled

    options = _folder_options(dataset, cache_dir)
    if dataset.test_data_path:
        return read_labelled(dataset.test_data_path, dataset.test_labels or None, list(dataset.classes), **options).data
    parts = []
    for index, root in enumerate(dataset.data_paths):
        labels = dataset.labels[index] if dataset.labels else ""
        test = load_folder(root, labels or None, list(dataset.classes), val_fraction=cfg.federation.val_fraction,
                           seed=cfg.federation.seed, **options).test
        if test is not None:
            parts.append(test)
    if not parts:
        raise DatasetUnavailableError(
            "dataset=folder has no test set: set dataset.test_data_path to a folder of labelled test images, or mark "
            "test images with split=test in the hospitals' manifests."
        )
    return ArrayDataset.concat(parts)


class WithheldTestSplit(ConfigError):
    """Something asked for the test split of a run that must not read it (``evaluate.test_split=false``)."""

    def __init__(self) -> None:
        super().__init__(
            "This run withholds the test split (evaluate.test_split=false: a `medfed tune` trial, whose choices rest "
            "on validation data only), and something asked to read it. Run with evaluate.test_split=true to report "
            "test metrics."
        )


def load_dataset_info(cfg: Config, *, cache_dir: Path | None = None) -> DatasetInfo:
    """The dataset's description (classes, channels, size) without reading its test split: the first simulated
    hospital's."""
    return load_site(cfg, 0, cache_dir=cache_dir).info


def load_test_set(cfg: Config, *, cache_dir: Path | None = None) -> tuple[DatasetInfo, ArrayDataset]:
    """The global test set (the official test split; for synthetic data a mix of scanner styles; for folders the
    test folder or the hospitals' ``split=test`` images). Refused (:class:`WithheldTestSplit`) when the run
    withholds it (``evaluate.test_split=false``)."""
    if not cfg.evaluate.test_split:
        raise WithheldTestSplit()
    source = _source(cfg.dataset)
    if source.test_set is not None:
        return source.test_set(cfg, cache_dir)
    path = Path(cache_dir) / cache_key(cfg) / "test.npz" if cache_dir is not None else None
    if path is not None:
        cached = _read_cache(path)
        if cached is not None:
            try:
                test = ArrayDataset(images=cached["images"], labels=cached["labels"])
                return _info_from_json(str(cached["info"])), test
            except (KeyError, ValueError, TypeError, SiteDataError) as exc:
                logger.warning("Ignoring cache file test.npz with a bad layout (%s).", exc)
    splits = load_splits(cfg.dataset)
    if path is not None:
        _write_atomic(path, {"info": np.array(_info_to_json(splits.info)), "images": splits.test.images,
                             "labels": splits.test.labels})
    return splits.info, splits.test
