"""One description of a hospital's data, whoever writes it: a deployed hospital's ``site.yaml`` or a simulated
hospital of ``dataset=folder``; and the one loader both use.

A hospital's data is an image folder (DICOM files or series, NIfTI, PNG/JPEG; see
:mod:`medfed.common.data.site_folder`) or an array file (see :mod:`medfed.common.data.site_files`), with an
optional label file. The folder's images are decoded once, resized to the task's input and cached; the split into
training and validation data keeps each patient on one side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medfed.common.data.arrays import DatasetInfo, SiteData
from medfed.common.data.partition import stratified_split
from medfed.common.data.site_files import load_array_file
from medfed.common.errors import SiteDataError

__all__ = ["SiteSpec", "load_site_data"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSpec:
    """A hospital's data: where it is and what the task expects of it.

    ``data`` is an image folder or an array file; ``labels`` an optional label file (for a folder the
    ``path,label[,split][,patient_id]`` manifest; none: class subfolders). ``classes`` names the labels in
    class-index order (empty: the labels found in the folder, sorted; an array file's labels are indices).
    ``image_size``, ``channels`` and ``spatial_dims`` are the task's model input a folder's images are resized to;
    ``val_fraction`` and ``split_seed`` decide the local validation split; ``cache_dir`` keeps decoded images
    (None: no cache). ``name`` is the dataset name the site reports (``DatasetInfo.name``).
    """

    site_id: str
    data: Path
    n_classes: int
    labels: Path | None = None
    classes: tuple[str, ...] = ()
    image_size: int = 28
    channels: int = 1
    spatial_dims: int = 2
    val_fraction: float = 0.2
    split_seed: int = 0
    cache_dir: Path | None = None
    name: str = ""


def load_site_data(spec: SiteSpec) -> SiteData:
    """Load a hospital's training and validation data from its spec (folder or array file).

    Raises:
        SiteDataError: the data cannot be read, its labels do not match ``n_classes``/``classes``, or it holds
            too few labelled images for a training and a validation split.
    """
    if spec.data.is_dir():
        return _folder_site(spec)
    if not spec.data.is_file():
        raise SiteDataError(
            f"Site {spec.site_id}'s data path does not exist; set data_path in the site config (in simulation "
            "dataset.data_paths) to its image folder or array file."
        )
    data = load_array_file(spec.data, n_classes=spec.n_classes, labels_csv=spec.labels)
    keep, held = stratified_split(data.labels, spec.val_fraction, seed=spec.split_seed)
    if len(keep) == 0 or len(held) == 0:
        raise SiteDataError(
            f"Site {spec.site_id} has {len(data)} labelled images, too few for a training and a validation "
            "split; a site needs at least 2 images of one class."
        )
    info = DatasetInfo(
        name=spec.name or f"site:{spec.site_id}",
        n_classes=spec.n_classes,
        channels=int(data.images.shape[1]),
        spatial_dims=data.images.ndim - 2,
        image_size=int(data.images.shape[-1]),
        class_names=tuple(str(i) for i in range(spec.n_classes)),
    )
    return SiteData(spec.site_id, train=data.subset(keep), val=data.subset(held), info=info)


def _folder_site(spec: SiteSpec) -> SiteData:
    """A hospital's image folder: decoded once (cached), resized to the task's input, split without patient
    leakage."""
    from medfed.common.data.site_folder_arrays import load_folder

    folder = load_folder(
        spec.data,
        spec.labels,
        list(spec.classes) or None,
        image_size=spec.image_size,
        spatial_dims=spec.spatial_dims,
        channels=spec.channels,
        val_fraction=spec.val_fraction,
        seed=spec.split_seed,
        cache_dir=spec.cache_dir,
    )
    if len(folder.classes) != spec.n_classes:
        raise SiteDataError(
            f"Site {spec.site_id}'s folder has {len(folder.classes)} labels but n_classes={spec.n_classes}; "
            "list the task's classes in the site config (classes: [...]) so every hospital numbers them alike."
        )
    if folder.skipped:
        logger.warning("site %s: %d unreadable files skipped (see `medfed hospital check`)", spec.site_id,
                       folder.skipped)
    info = DatasetInfo(
        name=spec.name or f"site:{spec.site_id}", n_classes=spec.n_classes, channels=spec.channels,
        spatial_dims=spec.spatial_dims, image_size=spec.image_size, class_names=tuple(folder.classes),
    )
    return SiteData(spec.site_id, train=folder.train, val=folder.val, info=info)
