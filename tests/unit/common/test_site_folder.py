"""A hospital's image folder and the site data check, on files the tests write: DICOM made from MedMNIST images, a
DICOM series, PNG, NIfTI, and broken inputs (truncated, not DICOM, no pixel data, manifest problems)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medfed.cli.main import app
from medfed.common.data.site_folder import check_site, read_entry, scan_site
from tests.conftest import DICOM_PATIENT as PATIENT  # a header value that must never appear in a report
from tests.conftest import write_dicom


def _images(n: int) -> np.ndarray:
    """Real ultrasound images (BreastMNIST) when the shared data is here, else a fixed random pattern."""
    from tests.conftest import shared_medmnist

    path = shared_medmnist("breastmnist")
    if path is not None:
        return np.load(path)["train_images"][:n]
    return np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.fixture
def site(tmp_path) -> Path:
    """benign/: 4 DICOM (one a duplicate of another), 1 PNG, 1 NIfTI volume; malignant/: 3 DICOM, a 3-slice series;
    broken files in both; a top-level unlabelled DICOM."""
    import nibabel
    from PIL import Image

    images = _images(12)
    root = tmp_path / "site"
    for i in range(3):
        write_dicom(root / "benign" / f"b{i}.dcm", images[i])
    shutil.copy(root / "benign" / "b0.dcm", root / "benign" / "b0_copy.dcm")  # the same image twice
    Image.fromarray(images[3]).save(root / "benign" / "b3.png")
    nibabel.save(nibabel.Nifti1Image(np.stack([images[4]] * 5, axis=-1).astype(np.float32), np.eye(4)),
                 root / "benign" / "vol.nii.gz")
    for i in range(3):
        write_dicom(root / "malignant" / f"m{i}.dcm", images[5 + i])
    for k, z in enumerate([2.0, 0.0, 1.0]):
        write_dicom(root / "malignant" / "series1" / f"s{k}.dcm", images[8 + k], z=z)
    data = (root / "malignant" / "m0.dcm").read_bytes()
    (root / "malignant" / "cut.dcm").write_bytes(data[: len(data) - 300])  # truncated inside the pixels
    (root / "benign" / "notes.dcm").write_text("not an image")  # a text file with a .dcm name
    write_dicom(root / "unsorted.dcm", images[11])  # no class folder: unlabelled
    return root


def test_class_subfolders_give_labels_and_series_are_one_entry(site):
    scan = scan_site(site)
    kinds = {e.path: e.kind for e in scan.entries}
    assert scan.classes == ["benign", "malignant"]
    assert kinds["malignant/series1"] == "series" and kinds["benign/vol.nii.gz"] == "nifti"
    assert kinds["benign/b3.png"] == "image" and kinds["malignant/m0.dcm"] == "dicom"
    assert {e.path: e.label for e in scan.entries}["unsorted.dcm"] is None
    assert len(scan.entries) == 13


def test_entries_decode_to_channel_first_arrays(site):
    scan = scan_site(site)
    by_path = {e.path: e for e in scan.entries}
    image = read_entry(site, by_path["benign/b1.dcm"])
    assert image.shape == (1, 28, 28) and image.dtype == np.float32
    np.testing.assert_allclose(read_entry(site, by_path["benign/b3.png"])[0], _images(4)[3] / 255.0, atol=1e-6)
    assert read_entry(site, by_path["benign/vol.nii.gz"]).shape == (1, 5, 28, 28)
    series = read_entry(site, by_path["malignant/series1"])
    assert series.shape == (1, 3, 28, 28)
    images = _images(12)
    raw = images[8:11].astype(float)[[1, 2, 0]]  # slices at z = 0, 1, 2
    np.testing.assert_allclose(series[0], (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_the_check_counts_what_is_usable_and_what_is_not(site):
    report = check_site(site)

    assert report.readable == {"(unlabelled)": 1, "benign": 6, "malignant": 4}
    assert report.usable == 10
    reasons = sorted(p["reason"] for p in report.unreadable)
    assert len(reasons) == 2
    assert any("not a DICOM file" in r for r in reasons) and any("pixel data does not match" in r for r in reasons)
    paths = [e.path for e in scan_site(site).entries]
    assert [sorted(paths[i] for i in group) for group in report.duplicates] == [["benign/b0.dcm",
                                                                                 "benign/b0_copy.dcm"]]
    assert report.shapes["1 x 28 x 28"] == 9 and report.kinds["series"] == 1
    assert report.modalities == {"US": 9}  # 8 readable DICOM files and 1 series
    text = json.dumps(report.as_dict())
    assert PATIENT not in text and "PID-12345" not in text and str(site) not in text and "notes.dcm" not in text


def test_a_manifest_gives_labels_splits_patients_and_its_problems(site):
    manifest = site / "labels.csv"
    manifest.write_text(
        "path,label,split,patient_id\n"
        "benign/b0.dcm,benign,train,p1\n"
        "benign/b1.dcm,benign,val,p2\n"
        "malignant/m0.dcm,malignant,train,p3\n"
        "malignant/series1,malignant,test,p3\n"
        "malignant/gone.dcm,malignant,train,p4\n"  # no such file
        "benign/b2.dcm,cyst,train,p5\n"  # a label the task does not have
        "benign/b3.png,benign,holdout,p6\n"  # not a split
        ",benign,train,p7\n"  # no path
    )
    scan = scan_site(site, manifest, classes=["benign", "malignant"])
    by_path = {e.path: e for e in scan.entries}
    assert by_path["malignant/series1"].kind == "series" and by_path["malignant/series1"].split == "test"
    assert by_path["benign/b1.dcm"].patient_id == "p2"
    assert by_path["benign/b2.dcm"].label is None  # unknown label: kept unlabelled
    assert scan.unknown_labels == {"cyst": 1} and scan.missing_files == 1 and scan.bad_rows == 2
    # everything else in the folder (8 files) has no row: kept, unlabelled; the series' slices are not counted
    assert scan.unlisted == 8
    assert not any(e.path.startswith("malignant/series1/") for e in scan.entries)


def test_a_manifest_without_path_and_label_columns_is_refused(site):
    (site / "bad.csv").write_text("file,class\nbenign/b0.dcm,benign\n")
    from medfed.common.errors import SiteDataError

    with pytest.raises(SiteDataError, match=r"needs a header 'path,label'"):
        scan_site(site, site / "bad.csv")


def test_hospital_check_prints_writes_json_and_fails_only_when_nothing_is_usable(site, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["hospital", "check", "--data-path", str(site), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "readable: benign" in result.output and "unreadable (skipped)" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["usable_labelled"] == 10

    from medfed.client.site import SiteConfig, write_site_config

    write_site_config(SiteConfig(site_id="st-marys", data_path=str(site), n_classes=2,
                                 classes=["benign", "malignant"]), tmp_path / "site.yaml")
    by_config = runner.invoke(app, ["hospital", "check", "--config", str(tmp_path / "site.yaml")])
    assert by_config.exit_code == 0 and "DICOM modality US" in by_config.output
    assert runner.invoke(app, ["hospital", "check"]).exit_code != 0  # neither --data-path nor --config

    broken = tmp_path / "broken"
    (broken / "benign").mkdir(parents=True)
    (broken / "benign" / "x.dcm").write_text("junk")
    result = runner.invoke(app, ["hospital", "check", "--data-path", str(broken)])
    assert result.exit_code == 1
    assert "not a DICOM file" in result.output


def test_real_dicom_files_of_every_kind_pass_the_check(tmp_path):
    # pydicom's own test files: CT, MR (multi-frame), RLE and JPEG 2000 compressed, colour, palette
    source = Path(pydicom.__file__).parent / "data" / "test_files"
    root = tmp_path / "real" / "any"
    root.mkdir(parents=True)
    names = ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "examples_palette.dcm",
             "rtplan.dcm"]
    for name in names:
        shutil.copy(source / name, root / name)
    report = check_site(tmp_path / "real")
    assert report.readable == {"any": 5}
    assert [p["reason"] for p in report.unreadable] == [report.unreadable[0]["reason"]]
    assert "no pixel data" in report.unreadable[0]["reason"]


# --- training data from a folder ---------------------------------------------------------------------------------
def _load(site: Path, labels=None, **kwargs):
    from medfed.common.data.site_folder_arrays import load_folder

    options = {"image_size": 16, "spatial_dims": 2, "channels": 1, "val_fraction": 0.3, "seed": 0}
    return load_folder(site, labels, None, **{**options, **kwargs})


def test_a_folder_becomes_resized_splits_skipping_bad_files(site):
    data = _load(site)
    assert data.classes == ["benign", "malignant"]
    assert len(data.train) + len(data.val) == 10 and data.test is None
    assert data.skipped == 2 and data.unlabelled == 1
    assert data.train.images.shape[1:] == (1, 16, 16) and data.train.images.dtype == np.float32
    assert set(data.val.labels.tolist()) == {0, 1}  # stratified
    rgb = _load(site, channels=3)
    assert rgb.train.images.shape[1:] == (3, 16, 16)
    volumes = _load(site, spatial_dims=3, image_size=8)
    assert volumes.train.images.shape[1:] == (1, 8, 8, 8)


def test_decoded_images_come_from_the_cache_the_second_time(site, tmp_path, monkeypatch):
    for broken in ("malignant/cut.dcm", "benign/notes.dcm"):  # unreadable files are tried again every time
        (site / broken).unlink()
    first = _load(site, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npy"))) == 10  # every readable labelled file, once

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr("medfed.common.data.site_folder.read_entry", no_decoding)
    second = _load(site, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.train.images, second.train.images)
    # a changed file is decoded again
    write_dicom(site / "benign" / "b1.dcm", _images(12)[7])
    with pytest.raises(AssertionError, match="decoded again"):
        _load(site, cache_dir=tmp_path / "cache")


def test_with_a_cache_the_splits_stay_on_disk_and_read_as_decoded(site, tmp_path):
    # Prepare / Execute
    from medfed.common.data.image_files import ImageFiles

    in_memory = _load(site)
    on_disk = _load(site, cache_dir=tmp_path / "cache")

    # Assert: the splits are views of the cache files (nothing read yet), with the same pixels, labels and order
    for split in ("train", "val"):
        lazy, eager = getattr(on_disk, split), getattr(in_memory, split)
        assert isinstance(lazy.images, ImageFiles) and isinstance(eager.images, np.ndarray)
        np.testing.assert_array_equal(lazy.images[:], eager.images)
        assert lazy.labels.tolist() == eager.labels.tolist()
    # a torn cache file is decoded again, not read as a short image
    torn = sorted((tmp_path / "cache" / "decoded").glob("*.npy"))[0]
    torn.write_bytes(torn.read_bytes()[:-8])
    again = _load(site, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.train.images[:], in_memory.train.images)
    np.testing.assert_array_equal(again.val.images[:], in_memory.val.images)


def test_a_patient_never_straddles_train_val_and_test(site):
    rows = ["path,label,split,patient_id"]
    unusable = ("cut.dcm", "notes.dcm", "b0_copy.dcm")  # unreadable, and a duplicate image
    files = [e.path for e in scan_site(site).entries if e.label is not None and not e.path.endswith(unusable)]
    for i, path in enumerate(files):  # 9 images of 4 patients; one image of patient p0 is marked test
        label = path.split("/")[0]
        split = "test" if path == files[0] else ""
        rows.append(f"{path},{label},{split},p{i % 4}")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")

    data = _load(site, labels=site / "labels.csv", val_fraction=0.3)

    assert data.test is not None and len(data.test) == 3  # all of p0's images (0, 4, 8) follow the marked one
    assert len(data.train) + len(data.val) + len(data.test) == 9 and data.unlabelled == 4  # rows-less files
    # by content: no image is in two splits
    parts = [data.train.images, data.val.images, data.test.images]
    keys = [{img.tobytes() for img in part} for part in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


def test_a_deployed_hospital_trains_from_its_folder(site, tmp_path):
    # Prepare: a site config whose data is the image folder (as `medfed hospital start` gives the ClientApp)
    from medfed.client.node import NodeEnv
    from medfed.client.site import SiteConfig, resolve_site, write_site_config
    from medfed.common import keys
    from medfed.common.config import compose_config

    config = tmp_path / "site.yaml"
    write_site_config(SiteConfig(site_id="st-marys", data_path=str(site), n_classes=2,
                                 classes=["benign", "malignant"], image_size=28), config)

    # Execute
    data = resolve_site(compose_config([]), NodeEnv.resolve({keys.NODE_SITE_CONFIG: str(config)}, {}))

    # Assert: resized to the task's input, cached in the site's state directory
    assert len(data.train) + len(data.val) == 10
    assert data.train.images.shape[1:] == (1, 28, 28) and data.info.class_names == ("benign", "malignant")
    assert len(list((tmp_path / "state" / "cache" / "decoded").glob("*.npy"))) == 10

    wrong = tmp_path / "wrong.yaml"
    write_site_config(SiteConfig(site_id="st-marys", data_path=str(site), n_classes=3), wrong)
    from medfed.common.errors import SiteDataError

    with pytest.raises(SiteDataError, match="has 2 labels but n_classes=3"):
        resolve_site(compose_config([]), NodeEnv.resolve({keys.NODE_SITE_CONFIG: str(wrong)}, {}))


def test_export_demo_writes_a_dicom_site_that_the_check_reads_back(tmp_path):
    from medfed.common.config import compose_config
    from medfed.common.data import load_site

    overrides = ["dataset.n_train=100", "dataset.n_test=20"]
    result = CliRunner().invoke(app, ["hospital", "export-demo", "--index", "1", "--out", str(tmp_path / "site"),
                                      "--format", "dicom", *overrides])
    assert result.exit_code == 0, result.output
    site = load_site(compose_config(overrides), 1)
    report = check_site(tmp_path / "site")
    assert sum(report.readable.values()) == len(site.train) + len(site.val) and not report.unreadable
    assert report.readable == {str(c): int((np.concatenate([site.train.labels, site.val.labels]) == c).sum())
                               for c in range(2)}


def test_a_site_config_and_a_simulated_folder_describe_the_same_site_alike(site, tmp_path):
    # Prepare: the same folder as a deployed hospital's site.yaml and as simulated hospital 0 of dataset=folder
    from medfed.client.site import SiteConfig
    from medfed.common.config import Config, FederationConfig, FolderConfig, StrategyConfig
    from medfed.common.data.federation import folder_site_spec
    from medfed.common.data.site_spec import load_site_data

    classes = ["benign", "malignant"]
    deployed = SiteConfig(site_id="hospital-0", data_path=str(site), n_classes=2, classes=classes, image_size=16,
                          val_fraction=0.3, split_seed=0, cache_dir=str(tmp_path / "cache-a")).spec()
    cfg = Config(dataset=FolderConfig(data_paths=[str(site)], classes=classes, image_size=16),
                 federation=FederationConfig(hospitals=1, val_fraction=0.3, seed=0),
                 strategy=StrategyConfig(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1))
    simulated = folder_site_spec(cfg, cfg.dataset, 0, tmp_path / "cache-b")
    # Execute: the one loader
    a, b = load_site_data(deployed), load_site_data(simulated)
    # Assert: one description, one result (the simulated site names its dataset "folder")
    assert (deployed.data, deployed.classes, deployed.val_fraction) == (simulated.data, simulated.classes, 0.3)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    assert (a.info.name, b.info.name) == ("site:hospital-0", "folder")


def test_a_missing_data_path_names_the_key_to_fix(tmp_path):
    from medfed.common.data.site_spec import SiteSpec, load_site_data
    from medfed.common.errors import SiteDataError

    with pytest.raises(SiteDataError, match="data path does not exist; set data_path"):
        load_site_data(SiteSpec(site_id="a", data=tmp_path / "nowhere", n_classes=2))


def test_the_old_data_option_still_works_with_a_deprecation_message(site, tmp_path):
    from typer.testing import CliRunner

    from medfed.cli.main import app

    runner = CliRunner()
    old = runner.invoke(app, ["hospital", "check", "--data", str(site)])
    assert old.exit_code == 0
    assert "--data is deprecated" in old.output and "--data-path" in old.output
    both = runner.invoke(app, ["hospital", "check", "--data", str(site), "--data-path", str(site)])
    assert both.exit_code != 0 and "give the data path once" in both.output
