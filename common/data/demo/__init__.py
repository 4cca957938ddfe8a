"""The BreastMNIST file shipped with medfed, so that ``medfed demo`` trains on real medical images offline.

``breastmnist.npz`` is the official 28 px BreastMNIST file of MedMNIST v2 (Yang et al., Scientific Data 2023),
derived from the Breast Ultrasound Images dataset (Al-Dhabyani et al., Data in Brief 2020), CC BY 4.0: see
``ATTRIBUTION.txt`` beside it. Any config can read it with ``dataset=medmnist dataset.name=breastmnist
dataset.data_path=DIR``, where DIR is :func:`demo_data_dir`.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from medfed.common.errors import DatasetUnavailableError

__all__ = ["DEMO_DATASET", "DEMO_SHA256", "demo_data_dir"]

logger = logging.getLogger(__name__)

DEMO_DATASET = "breastmnist"
"""The MedMNIST flag of the shipped file (``dataset.name``)."""

DEMO_SHA256 = "3a22d2a4625e7dd8903f0f59030e81a3d0c222bece2e5e10927456cb50efdec1"
"""sha256 of the shipped ``breastmnist.npz`` (the official MedMNIST v2 file, Zenodo record 10519652)."""


def demo_data_dir() -> Path:
    """The installed folder that holds ``breastmnist.npz`` (pass it as ``dataset.data_path``).

    Raises:
        DatasetUnavailableError: medfed is installed in a way that leaves the file off the file system (a zip
            import) or without it.
    """
    folder = resources.files(__name__)
    if not isinstance(folder, Path) or not (folder / f"{DEMO_DATASET}.npz").is_file():
        raise DatasetUnavailableError(
            f"The {DEMO_DATASET}.npz shipped with medfed is not on the file system next to medfed.common.data.demo "
            "(a zip import, or an install without package data); reinstall medfed from its wheel or source, or "
            f"pass --data-path DIR holding {DEMO_DATASET}.npz."
        )
    return folder
