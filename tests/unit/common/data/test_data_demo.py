"""The BreastMNIST file shipped inside medfed for `medfed demo`: found without ../shared, official and attributed."""

from __future__ import annotations

import hashlib

import numpy as np

from medfed.common.config import MedMNISTConfig
from medfed.common.data.demo import DEMO_DATASET, DEMO_SHA256, demo_data_dir
from medfed.common.data.medmnist import SPLIT_KEYS, load_medmnist


def test_the_shipped_file_is_found_in_the_package_and_holds_the_official_splits():
    # Execute
    path = demo_data_dir() / f"{DEMO_DATASET}.npz"

    # Assert: the official BreastMNIST v2 file, byte for byte, with its six arrays
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEMO_SHA256
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(SPLIT_KEYS)
        for split, n in (("train", 546), ("val", 78), ("test", 156)):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            assert images.shape == (n, 28, 28) and images.dtype == np.uint8
            assert labels.shape == (n, 1) and set(np.unique(labels)) == {0, 1}


def test_the_loader_reads_it_as_a_dataset_path():
    # Execute
    splits = load_medmnist(MedMNISTConfig(name=DEMO_DATASET, data_path=str(demo_data_dir())))

    # Assert: train + val are the development pool, test the global test set
    assert (len(splits.train), len(splits.test)) == (546 + 78, 156)
    assert splits.info.n_classes == 2 and splits.info.channels == 1 and splits.info.image_size == 28


def test_its_licence_and_sources_are_attributed_beside_it():
    text = (demo_data_dir() / "ATTRIBUTION.txt").read_text(encoding="utf-8")
    for needle in ("CC BY 4.0", "MedMNIST v2", "Scientific Data", "Al-Dhabyani", DEMO_SHA256):
        assert needle in text
