"""Tests of common.data.federation: dataset dispatch, building sites, the per-site cache, the test set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medfed.common.config import Config, DatasetConfig, FederationConfig, MedMNISTConfig, StrategyConfig, SyntheticConfig
from medfed.common.data import federation
from medfed.common.data.federation import build_sites, load_site, load_splits, load_test_set, site_id_for
from medfed.common.errors import ConfigError

DATA_DIR = Path(
    os.environ.get("MEDFED_DATA_DIR", Path(__file__).resolve().parents[4].parent / "shared" / "data" / "medmnist")
)


def _no_rebuild(*_: object, **__: object) -> None:
    raise AssertionError("the cache was not used: the dataset was loaded again")


def _config(hospitals: int = 3, partition: str = "iid", **dataset: int) -> Config:
    return Config(
        dataset=SyntheticConfig(n_train=dataset.pop("n_train", 300), n_test=dataset.pop("n_test", 40), **dataset),
        federation=FederationConfig(hospitals=hospitals, partition=partition, min_samples=10),
        strategy=StrategyConfig(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
    )


@pytest.mark.parametrize(("index", "expected"), [(0, "hospital-0"), (12, "hospital-12")])
def test_site_ids(index: int, expected: str) -> None:
    # Execute / Assert
    assert site_id_for(index) == expected


def test_load_splits_dispatches_and_rejects_unknown_sources() -> None:
    # Execute
    splits = load_splits(DatasetConfig())  # a bare base config falls back to the synthetic defaults

    # Assert
    assert splits.info.name == "synthetic" and len(splits.train) == 1200
    with pytest.raises(ConfigError, match="dataset.source='dicom'.*medmnist, synthetic"):
        load_splits(DatasetConfig(source="dicom"))


@pytest.mark.parametrize(("hospitals", "partition"), [(1, "iid"), (3, "iid"), (4, "dirichlet"), (5, "quantity")])
def test_build_sites_sizes_add_up(hospitals: int, partition: str) -> None:
    # Prepare
    cfg = _config(hospitals, partition)
    splits = load_splits(cfg.dataset)

    # Execute
    sites = build_sites(splits, cfg.federation, dataset_seed=0)

    # Assert
    assert [s.site_id for s in sites] == [site_id_for(i) for i in range(hospitals)]
    assert sum(len(s.train) + len(s.val) for s in sites) == len(splits.train)
    for site in sites:
        assert len(site.val) > 0 and len(site.train) > len(site.val)
        assert site.info == splits.info


def test_synthetic_sites_get_their_own_scanner_style() -> None:
    # Prepare
    cfg = _config(2)
    splits = load_splits(cfg.dataset)

    # Execute
    sites = build_sites(splits, cfg.federation, dataset_seed=0)

    # Assert
    means = [float(s.train.images.mean()) for s in sites]
    assert abs(means[0] - means[1]) > 0.01
    assert all(0.0 <= s.train.images.min() and s.train.images.max() <= 1.0 for s in sites)


def test_medmnist_sites_keep_their_pixels() -> None:
    # Prepare
    if not (DATA_DIR / "breastmnist.npz").is_file():
        pytest.skip(f"breastmnist.npz not found in MEDFED_DATA_DIR ({DATA_DIR}); set MEDFED_DATA_DIR")
    splits = load_splits(MedMNISTConfig(name="breastmnist", data_path=str(DATA_DIR)))
    fed = FederationConfig(hospitals=3, partition="dirichlet", alpha=0.5)

    # Execute
    sites = build_sites(splits, fed)

    # Assert
    pooled = np.sort(np.concatenate([np.concatenate([s.train.images, s.val.images]) for s in sites]).sum(axis=(1, 2, 3)))
    assert np.allclose(pooled, np.sort(splits.train.images.sum(axis=(1, 2, 3))))


def test_load_site_matches_build_sites_without_cache() -> None:
    # Prepare
    cfg = _config()
    expected = build_sites(load_splits(cfg.dataset), cfg.federation, dataset_seed=cfg.dataset.seed)[1]

    # Execute
    site = load_site(cfg, 1)

    # Assert
    assert np.array_equal(site.train.images, expected.train.images)
    assert np.array_equal(site.val.labels, expected.val.labels)


def test_load_site_cache_round_trip_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    cfg = _config()
    first = load_site(cfg, 2, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*/*.npz"))
    monkeypatch.setattr(federation, "load_splits", _no_rebuild)
    federation.forget_loaded_sites()  # a fresh process: only the files remain

    # Execute
    again = load_site(cfg, 2, cache_dir=tmp_path)
    other = load_site(cfg, 0, cache_dir=tmp_path)

    # Assert
    assert files == ["site-0.npz", "site-1.npz", "site-2.npz"]
    assert not list(tmp_path.glob("*/*.tmp"))
    assert again.site_id == first.site_id == "hospital-2" and again.info == first.info
    for name in ("train", "val"):
        assert np.array_equal(getattr(again, name).images, getattr(first, name).images)
        assert np.array_equal(getattr(again, name).labels, getattr(first, name).labels)
        assert getattr(again, name).images.dtype == np.float32
    assert other.site_id == "hospital-0"


def test_a_process_reads_each_cache_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    cfg = _config()
    first = load_site(cfg, 1, cache_dir=tmp_path)
    for path in tmp_path.glob("*/site-1.npz"):
        path.unlink()
    monkeypatch.setattr(federation, "load_splits", _no_rebuild)

    # Execute
    again = load_site(cfg, 1, cache_dir=tmp_path)
    other = load_site(cfg, 2, cache_dir=tmp_path)  # written alongside site 1 (not kept in memory: read from its file)

    # Assert
    assert again is first
    assert other.site_id == "hospital-2"


def _memory(field: str) -> int:
    """This process's ``VmRSS`` or ``VmHWM`` (its peak since the last reset), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/self/status")


def test_a_thousand_sites_are_built_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: 1,000 hospitals sharing a 20,000-image pool (19.5 MiB), the pool already loaded; the peak is reset
    cfg = _config(1000, n_train=20_000, image_size=16)
    splits = load_splits(cfg.dataset)
    monkeypatch.setattr(federation, "load_splits", lambda _dataset: splits)
    pool = splits.train.images.nbytes
    Path("/proc/self/clear_refs").write_text("5")
    before = _memory("VmRSS")

    # Execute: the first site asked for writes every site's cache file
    site = load_site(cfg, 7, cache_dir=tmp_path)

    # Assert: the peak grew by far less than the pool (every site at once would hold another pool: measured 1.0 x
    # when all were built first, 0.01 x one at a time); each site's file is there and is build_sites' site
    growth = _memory("VmHWM") - before
    assert growth < 0.25 * pool, f"peak grew {growth / 2**20:.1f} MiB for a {pool / 2**20:.1f} MiB pool"
    folder = tmp_path / federation.cache_key(cfg)
    assert len(list(folder.glob("site-*.npz"))) == 1000
    expected = build_sites(splits, cfg.federation)
    for index, got in [(7, site), (999, load_site(cfg, 999, cache_dir=tmp_path))]:
        np.testing.assert_array_equal(got.train.images, expected[index].train.images)
        np.testing.assert_array_equal(got.val.labels, expected[index].val.labels)


def test_cache_key_changes_with_the_partition(tmp_path: Path) -> None:
    # Prepare
    load_site(_config(3, "iid"), 0, cache_dir=tmp_path)

    # Execute
    load_site(_config(3, "quantity"), 0, cache_dir=tmp_path)

    # Assert
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_corrupt_cache_file_is_rebuilt(tmp_path: Path) -> None:
    # Prepare
    cfg = _config()
    first = load_site(cfg, 0, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*/site-0.npz")
    cache_file.write_bytes(b"half a file")
    federation.forget_loaded_sites()

    # Execute
    again = load_site(cfg, 0, cache_dir=tmp_path)

    # Assert
    assert np.array_equal(again.train.images, first.train.images)


@pytest.mark.parametrize("index", [-1, 3])
def test_load_site_rejects_an_index_out_of_range(index: int) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="federation.hospitals=3"):
        load_site(_config(3), index)


def test_test_set_mixes_scanner_styles_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    cfg = _config()
    info, test = load_test_set(cfg, cache_dir=tmp_path)
    monkeypatch.setattr(federation, "load_splits", _no_rebuild)

    # Execute
    info_again, test_again = load_test_set(cfg, cache_dir=tmp_path)

    # Assert
    assert len(test) == 40 and info == info_again
    assert np.array_equal(test.images, test_again.images)


def test_a_medmnist_file_replaced_at_the_same_path_is_read_again(tmp_path: Path) -> None:
    # Prepare: a MedMNIST-layout file, its sites cached
    def write(seed: int) -> None:
        rng = np.random.default_rng(seed)
        arrays = {}
        for split, n in (("train", 60), ("val", 20), ("test", 10)):
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
        np.savez(tmp_path / "breastmnist.npz", **arrays)

    write(0)
    cfg = Config(
        dataset=MedMNISTConfig(name="breastmnist", data_path=str(tmp_path)),
        federation=FederationConfig(hospitals=2, partition="iid", min_samples=10),
        strategy=StrategyConfig(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
    )
    cache = tmp_path / "cache"
    first = load_site(cfg, 0, cache_dir=cache)
    key = federation.cache_key(cfg)
    # Execute: the hospital replaces the file (new content, same path)
    write(1)
    os.utime(tmp_path / "breastmnist.npz", ns=(1, 1))  # a different modification time even on a coarse clock
    federation.forget_loaded_sites()
    again = load_site(cfg, 0, cache_dir=cache)
    # Assert: a new cache entry, built from the new file
    assert federation.cache_key(cfg) != key
    assert not np.array_equal(first.train.images, again.train.images)


def test_every_source_is_registered_and_a_folder_has_no_pooled_splits() -> None:
    from medfed.common.config import FolderConfig

    assert set(federation.LOADERS) == {"medmnist", "synthetic", "folder"}
    assert all((s.splits is None) != (s.site is None) for s in federation.LOADERS.values())
    with pytest.raises(ConfigError, match="dataset=folder has no pooled data to share out"):
        load_splits(FolderConfig(data_paths=["a"], classes=["x", "y"]))
