"""A hospital's local tools, run on its own machine only: Grad-CAM maps of a trained model (``medfed hospital
explain``), the labelling queue of active learning (``rank``), and a simulated hospital's data as a site's files
(``export-demo``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medfed.cli.display import fail, make_console
from medfed.common.errors import ConfigError, MedfedError

if TYPE_CHECKING:  # the CLI imports numpy and the data package only when a command runs
    from medfed.common.data import ArrayDataset

__all__ = ["add_local_tools"]

logger = logging.getLogger(__name__)

console = make_console()


ModelOpt = Annotated[Path, typer.Option("--model", help="A trained model: a run's best_model.pt or model.pt.")]
RunConfigOpt = Annotated[Path | None, typer.Option(
    "--run-config", help="The config.yaml of the run that trained it (default: beside the model).")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="The model's input size (default: the run config's).")]


def hospital_explain(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="An image, a DICOM series folder, or a folder of images.")],
    out: Annotated[Path, typer.Option(help="The folder for the maps (PNG overlays, .npy maps, index.csv).")],
    run_config: RunConfigOpt = None,
    image_size: ImageSizeOpt = None,
    layer: Annotated[str | None, typer.Option(help="The layer to explain (default: the encoder's last stage).")] = None,
    target_class: Annotated[int | None, typer.Option(
        "--class", help="The class to explain (default: each image's predicted class).")] = None,
) -> None:
    """Grad-CAM maps of a trained model's predictions for any image, computed and written on this machine only."""
    from medfed.client.local_tools import load_local_model, predict, read_images
    from medfed.common.explain import gradcam_maps, save_explanations

    try:
        local = load_local_model(model, run_config=run_config, image_size=image_size)
        array, names, failed = read_images(images, local)
        maps = gradcam_maps(local.model, array, target_layer=layer, class_index=target_class)
        labels = [f"{i:05d}-" + Path(name).name.replace(".", "_") for i, name in enumerate(names)]
        save_explanations(out, array, maps, labels, predict(local, array))
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"{len(names)} Grad-CAM map(s) in {out}/ (index.csv lists them)")
    for name, reason in failed:
        console.print(f"  skipped {name}: {reason}")


def hospital_rank(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="The unlabelled images: a folder (or one image / series).")],
    out: Annotated[Path, typer.Option(help="The CSV to write: which images to label first.")],
    method: Annotated[str, typer.Option(help="entropy | margin | mc_dropout | random.")] = "entropy",
    run_config: RunConfigOpt = None,
    image_size: ImageSizeOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of mc_dropout passes and of the random order.")] = 0,
) -> None:
    """Active learning: rank this site's unlabelled images by the model's uncertainty and write the labelling
    queue (rank, path, score, prediction) as a local CSV."""
    from medfed.client.local_tools import load_local_model, predict, read_images, uncertainty_scores, write_ranking

    try:
        local = load_local_model(model, run_config=run_config, image_size=image_size)
        array, names, failed = read_images(images, local)
        probs = predict(local, array)  # once: for the scores and the CSV's predictions
        write_ranking(out, names, uncertainty_scores(local, array, method, seed=seed, probs=probs), probs, method)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"ranked {len(names)} image(s) by {method} -> {out}")
    for name, reason in failed:
        console.print(f"  skipped {name}: {reason}")


def hospital_export_demo(
    index: Annotated[int, typer.Option(help="Which simulated hospital (0-based).")],
    out: Annotated[Path, typer.Option(help="The array file (.npz) or, with --format dicom, the folder to write.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides choosing dataset and federation.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="npz: one array file; dicom: a folder of DICOM files, one "
                                                       "subfolder per class (2D greyscale tasks).")] = "npz",
) -> None:
    """Write one simulated hospital's data as a site array file or DICOM folder (for walk-throughs and tests)."""
    from medfed.common.config import compose_config
    from medfed.common.data import ArrayDataset, load_site
    from medfed.common.data.site_files import write_array_file

    try:
        if fmt not in ("npz", "dicom"):
            raise ConfigError(f"--format {fmt!r} is not allowed; choose npz or dicom.")
        cfg = compose_config(list(overrides or []))
        site = load_site(cfg, index)
        data = ArrayDataset.concat([site.train, site.val])
        if fmt == "npz":
            write_array_file(out, data)
        else:
            _write_dicom_site(out, data, site.info.class_names)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"wrote {len(site.train) + len(site.val)} images of {site.site_id} to {out}")


def _write_dicom_site(out: Path, data: ArrayDataset, class_names: tuple[str, ...]) -> None:
    """A class-subfolder DICOM site (8-bit greyscale secondary captures) from channel-first arrays in [0, 1]."""
    import numpy as np

    from medfed.common.data.dicom import write_dicom

    images, labels = data.images, data.labels
    if images.ndim != 4 or images.shape[1] != 1:
        raise ConfigError("--format dicom writes 2D greyscale images; this dataset is colour or 3D (use npz).")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pixels = np.clip(np.rint(image[0] * 255.0), 0, 255).astype(np.uint8)
        write_dicom(Path(out) / class_names[int(label)] / f"img{i:06d}.dcm", pixels)


def add_local_tools(hospital: typer.Typer) -> None:
    """Add the local tools to the ``medfed hospital`` command group (after its own commands)."""
    hospital.command("explain")(hospital_explain)
    hospital.command("rank")(hospital_rank)
    hospital.command("export-demo")(hospital_export_demo)
