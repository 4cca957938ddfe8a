"""Benchmark: how fast a hospital's DICOM folder is read, and how long the site data check takes.

A site of N 2D DICOM files (default 10,000) is written from PneumoniaMNIST training images, upsampled to
SIZE x SIZE (default 256) 16-bit with a rescale slope/intercept, like a CT or CR export, in one subfolder per class.
Then, in this process:

- decode throughput on first read: every file decoded (pydicom, modality LUT, window/min-max), resized to the
  model's 28 px and written to the site cache (what round 1 of a run does), images/s;
- from the cache: the same call again (what every later round does), images/s;
- `medfed hospital check --data-path DIR` on the folder, as a hospital runs it (a fresh process: decodes every file,
  hashes for duplicates, reads each header's modality), wall seconds.

    python benchmarks/site_data.py                  # ~3 min on 2 cores
    python benchmarks/site_data.py --files 500      # a smoke run of the script

Writes docs/benchmarks.md (between the `site-data` markers) and benchmarks/results/site_data.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import run_medfed, write_doc  # noqa: E402  (benchmarks/ is the script's folder)

logger = logging.getLogger("benchmarks.site_data")
START, END = "<!-- site-data:start -->", "<!-- site-data:end -->"


def write_site(root: Path, n: int, size: int, data_dir: Path) -> float:
    """N DICOM files from PneumoniaMNIST, upsampled to ``size`` px, 16-bit; returns the seconds it took."""
    import torch
    import torch.nn.functional as F

    from medfed.common.data.dicom import write_dicom

    npz = np.load(data_dir / "pneumoniamnist.npz")
    images, labels = npz["train_images"], npz["train_labels"].reshape(-1)
    started = time.perf_counter()
    for i in range(n):
        k = i % len(images)
        big = F.interpolate(torch.from_numpy(images[k].astype(np.float32))[None, None], size=(size, size),
                            mode="bilinear", align_corners=False)[0, 0].numpy()
        pixels = np.clip(big * 16.0 + (i // len(images)), 0, 65535).astype(np.uint16)  # 12-bit range, copies differ
        write_dicom(root / ("normal", "pneumonia")[labels[k]] / f"img{i:06d}.dcm", pixels, modality="CR",
                    rescale=(1.0, -1024.0))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("medfed.common.data.site_folder", "medfed.common.data.site_folder_arrays"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from medfed.common.data.site_folder_arrays import read_labelled

    work = Path(tempfile.mkdtemp(prefix="medfed-bench-site-"))
    try:
        site, cache = work / "site", work / "cache"
        write_s = write_site(site, args.files, args.size, args.data_dir)
        logger.info("wrote %d files in %.1f s", args.files, write_s)
        options = {"image_size": 28, "spatial_dims": 2, "channels": 1, "cache_dir": cache}
        started = time.perf_counter()
        first = read_labelled(site, None, None, **options)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        again = read_labelled(site, None, None, **options)
        cached_s = time.perf_counter() - started
        assert np.array_equal(first.data.images, again.data.images)
        logger.info("first read %.1f s, from the cache %.1f s", first_s, cached_s)
        code, check_s, out = run_medfed(["hospital", "check", "--data-path", str(site), "--json", str(work / "r.json")],
                                        cwd=REPO, timeout=3600)
        if code != 0:
            raise SystemExit(f"hospital check failed (exit {code}):\n{out[-3000:]}")
        report = json.loads((work / "r.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(first.data)
    results = {"files": args.files, "size": args.size, "write_s": write_s, "first_read_s": first_s,
               "first_read_images_per_s": n / first_s, "cached_s": cached_s, "cached_images_per_s": n / cached_s,
               "check_s": check_s, "check_readable": sum(report["readable"].values()),
               "check_unreadable": len(report["unreadable"])}
    command = "python benchmarks/site_data.py" + (f" --files {args.files}" if args.files != 10_000 else "")
    section = "\n".join([
        START, "",
        f"`{command}` on {platform.node() or 'this machine'} ({platform.machine()}, CPU only): {args.files} 2D DICOM "
        f"files, {args.size} x {args.size} px 16-bit with rescale, in class subfolders, resized to 28 px.", "",
        "| | seconds | images/s |", "|---|---|---|",
        f"| first read (decode, rescale, min..max, resize, write the cache) | {first_s:.1f} | {n / first_s:.0f} |",
        f"| later rounds (from the site cache) | {cached_s:.1f} | {n / cached_s:.0f} |",
        f"| `medfed hospital check` on the folder (a fresh process) | {check_s:.1f} | {args.files / check_s:.0f} |",
        "", f"The check read {results['check_readable']} images and found {results['check_unreadable']} unreadable.",
        "", END,
    ])
    print(section)
    if args.files == 10_000:
        (REPO / "benchmarks" / "results" / "site_data.json").write_text(json.dumps(results, indent=1) + "\n")
        write_doc(section, args.doc, start=START, end=END, heading="Site data: DICOM decoding and the site check")


if __name__ == "__main__":
    main()
