"""Datasets of medfed: MedMNIST npz and synthetic loaders, partitioners, transforms and simulated federations.

Everything a caller needs is re-exported here; the submodules hold one concept each.
"""

from __future__ import annotations

import logging

from common.data.arrays import ArrayDataset, DatasetInfo, DatasetSplits
from common.data.federation import (
    SiteData,
    build_sites,
    cache_key,
    load_site,
    load_splits,
    load_test_set,
    site_id_for,
)
from common.data.medmnist import load_medmnist, medmnist_path
from common.data.partition import partition_indices, stratified_split
from common.data.synthetic import load_synthetic, scanner_effect
from common.data.transforms import AugmentedDataset, build_augmentation, to_tensor_dataset

__all__ = [
    "ArrayDataset",
    "AugmentedDataset",
    "DatasetInfo",
    "DatasetSplits",
    "SiteData",
    "build_augmentation",
    "build_sites",
    "cache_key",
    "load_medmnist",
    "load_site",
    "load_splits",
    "load_synthetic",
    "load_test_set",
    "medmnist_path",
    "partition_indices",
    "scanner_effect",
    "site_id_for",
    "stratified_split",
    "to_tensor_dataset",
]

logger = logging.getLogger(__name__)
