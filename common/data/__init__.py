"""Datasets of medfed: MedMNIST npz and synthetic loaders, partitioners, transforms and simulated federations.

Everything a caller needs is re-exported here; the submodules hold one concept each.
"""

from __future__ import annotations

import logging

from medfed.common.data.arrays import ArrayDataset, DatasetInfo, DatasetSplits, SiteData
from medfed.common.data.federation import (
    build_sites,
    cache_key,
    load_site,
    WithheldTestSplit,
    load_dataset_info,
    load_splits,
    load_test_set,
    site_id_for,
)
from medfed.common.data.medmnist import load_medmnist, medmnist_path
from medfed.common.data.partition import partition_indices, stratified_split
from medfed.common.data.synthetic import load_synthetic, scanner_effect
from medfed.common.data.transforms import (
    BatchAugmentation,
    build_augmentation,
    build_batch_augmentation,
    to_tensor_dataset,
)

__all__ = [
    "ArrayDataset",
    "BatchAugmentation",
    "DatasetInfo",
    "DatasetSplits",
    "SiteData",
    "build_augmentation",
    "build_batch_augmentation",
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
    "WithheldTestSplit",
    "load_dataset_info",
]

logger = logging.getLogger(__name__)
