"""Benchmark: training speed on this machine's hardware, and a hospital's memory with real image sizes (issue 25).

1. Throughput: training images/s of `train_epochs` on synthetic images (1 channel, 2 classes), without and with
   DP-SGD (Opacus, noise multiplier 1.0, clipping norm 1.0, physical batch = the batch), for `smallcnn` (width 32)
   and `resnet18` (width 64, `model.stem=auto` with the image size: the ImageNet stem from 128 px) at 28, 64, 128 and
   224 px (2D) and 28^3 and 64^3 (3D). Per cell: the batch is 32, or the largest of 16/8/4/2/1 whose memory
   estimate (`medfed.common.hardware.estimate_training_memory`, with DP) fits half of the device's memory (at most
   12 GiB on a CPU), halved further (down to 2) where two batches of the warm-up would take over
   `--max-cell-seconds` (30 s: the large cells on a CPU); a warm-up pass of one batch, then timed passes of N
   images, N chosen from the warm-up so a pass takes about `--cell-seconds` (4 s; never under 2 batches; N is
   recorded). Images/s counts the images a pass read (under DP Poisson sampling reads about N); the fastest of 3
   passes counts (2 where a pass takes over twice `--cell-seconds`), the one least slowed by other work on a shared
   machine (the median is in the JSON). On a GPU also mixed precision (`train.amp=auto`) without DP, and the peak
   GPU memory (`torch.cuda.max_memory_allocated`) of each pass; on a CPU, bf16 autocast with `--cpu-bf16`.
2. Memory: a hospital's peak resident memory (VmHWM of a fresh process) with
   - a 2D site: 20,000 DICOM files of 256 x 256 px, 16-bit (two classes in class subfolders, a learnable blob),
     trained at 256 px: `smallcnn` width 32, batch 32;
   - a 3D site: 300 NIfTI volumes of 128^3 (int16), trained at 128^3: `smallcnn` width 8, batch 4.
   Per site, two fresh processes. The first calls `load_site_data` with an empty cache folder: every file is
   decoded into the on-disk cache (seconds, peak). The second calls `load_site_data` again (from the cache), trains
   one pass over the training split read from disk batch by batch (`ImageFiles`; `--train-steps` batches of it on
   a CPU, where a whole epoch of the 2D site would take most of an hour) and runs `predict_proba` on the validation
   split (batch = the training batch; `--eval-images` of it on a CPU): its peak RSS is read there (floor: 2.5 GiB).
   Then, in the same process, disk vs memory: the same images, steps and seed, trained from the cache files as the
   page cache holds them (warm: this site's cache fits this machine's memory), from the cache files with their
   pages evicted first (posix_fadvise DONTNEED: cold, really read from the disk, as for a site larger than memory)
   and from the same images in memory (`ArrayDataset(np.asarray(...))`), in 12 alternated passes (cold, warm,
   memory, memory, warm, cold, twice): images/s of the fastest pass of each kind (floor: disk >= 0.9 x memory; the
   ratio over all passes is reported too). The generated sites live under `--work-dir` and are reused when present;
   the cache is decoded afresh in every run and removed after it.

    python benchmarks/hardware.py                       # ~15-20 min on 2 cores (writing the sites: +1 min)
    python benchmarks/hardware.py --quick               # a smoke run of the script (~2 min)
    python benchmarks/hardware.py --only throughput     # one part (the other part's figures are kept)

Writes docs/benchmarks.md (between the `hardware` markers) and benchmarks/results/hardware.json (`--quick` and
other sizes than the issue's: WORK_DIR/hardware-quick.json only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import write_doc  # noqa: E402  (benchmarks/ is the script's folder)

START, END = "<!-- hardware:start -->", "<!-- hardware:end -->"
HEADING = "Site hardware: training throughput and memory with real image sizes"
GIB = 2**30
RSS_FLOOR_GIB = 2.5
DISK_RATIO_FLOOR = 0.9
DP_NOISE, DP_CLIP = 1.0, 1.0
BATCHES = (32, 16, 8, 4, 2, 1)
REPEATS = 3  # timed passes per throughput cell (2 where one pass takes over twice --cell-seconds)

# (model, spatial dims, side)
CELLS = [(m, 2, s) for m in ("smallcnn", "resnet18") for s in (28, 64, 128, 224)] + \
        [(m, 3, s) for m in ("smallcnn", "resnet18") for s in (28, 64)]
QUICK_CELLS = [("smallcnn", 2, 28), ("smallcnn", 3, 28)]

# the sites of the memory part: files, side of the files, the task's image size, model width, batch
SITES = {
    "2d": {"format": "DICOM", "dims": 2, "files": 20_000, "side": 256, "image_size": 256, "width": 32, "batch": 32},
    "3d": {"format": "NIfTI", "dims": 3, "files": 300, "side": 128, "image_size": 128, "width": 8, "batch": 4},
}
QUICK_SITES = {
    "2d": {**SITES["2d"], "files": 200, "side": 64, "image_size": 64},
    "3d": {**SITES["3d"], "files": 10, "side": 32, "image_size": 32},
}
CPU_TRAIN_STEPS = {"2d": 24, "3d": 12}  # training batches of the memory run on a CPU (a whole epoch: --train-steps 0)
CPU_EVAL_IMAGES = {"2d": 512, "3d": 60}
COMPARE_PASSES = 12  # disk vs memory: passes in all (a third of each kind: cold, warm, memory), alternated
CPU_COMPARE_STEPS = {"2d": 2, "3d": 3}  # batches per pass on a CPU (with a whole epoch: 25)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# --- the machine ----------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int:
    """A memory line of /proc/self/status in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM; ru_maxrss where there is no /proc)."""
    return _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    ram = 0
    try:
        ram = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": torch.cuda.get_device_name(0), "memory_gib": props.total_memory / GIB,
               "bf16": bool(torch.cuda.is_bf16_supported())}
    cores = os.cpu_count() or 1
    described = f"{platform.machine()}, {cores} cores, {ram / GIB:.0f} GiB RAM, " + (
        f"GPU {gpu['name']} ({gpu['memory_gib']:.0f} GiB)" if gpu else "no GPU")
    return {"description": described, "arch": platform.machine(), "cpu": cpu, "cores": cores,
            "ram_gib": ram / GIB, "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags, "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "node": platform.node()}


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _train_config(batch: int, amp: str | None = None) -> Any:
    """A TrainConfig with ``batch``; ``amp`` where TrainConfig has the field (off: float32)."""
    from medfed.common.config import TrainConfig

    cfg = TrainConfig(batch_size=batch)
    if amp is not None and hasattr(cfg, "amp"):
        import dataclasses

        cfg = dataclasses.replace(cfg, amp=amp)
    return cfg


def _model(name: str, dims: int, size: int, width: int | None = None) -> Any:
    import torch
    from medfed.common.config import ModelConfig, ResNetConfig
    from medfed.common.models import build_model

    torch.manual_seed(0)
    cfg = ResNetConfig(name="resnet18", width=width or 64, stem="auto") if name == "resnet18" \
        else ModelConfig(name=name, width=width or 32)
    return build_model(cfg, spatial_dims=dims, in_channels=1, n_classes=2, image_size=size)


# --- 1. throughput --------------------------------------------------------------------------------------------


class CountedImages(np.ndarray):
    """An image array that counts the rows training reads by index arrays (its batches): under DP, Poisson sampling
    reads a random number of images per pass, so images/s counts those, not the nominal N."""

    rows_read = [0]  # (one counter for every instance: training indexes views of the array)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, np.ndarray) and key.ndim == 1:
            CountedImages.rows_read[0] += int(key.sum()) if key.dtype == bool else len(key)
        return super().__getitem__(key)


def synthetic(n: int, dims: int, size: int, seed: int) -> Any:
    """``n`` images of noise, class 1 with a brighter centre (2 classes, alternating)."""
    from medfed.common.data.arrays import ArrayDataset

    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, *(size,) * dims), dtype=np.float32) * 0.5
    labels = np.arange(n, dtype=np.int64) % 2
    images[(slice(1, None, 2), slice(None), *(slice(size // 4, 3 * size // 4),) * dims)] += 0.5  # class 1
    return ArrayDataset(images.view(CountedImages), labels)


def pick_batch(name: str, dims: int, size: int, dev: Any) -> tuple[int, float]:
    """The largest batch of :data:`BATCHES` whose DP training estimate fits the budget; (batch, estimate GiB)."""
    import torch
    from medfed.common.hardware import available_memory, estimate_training_memory

    if dev.type == "cuda":
        budget = 0.5 * torch.cuda.get_device_properties(dev.index or 0).total_memory
    else:
        budget = min(0.5 * (available_memory(dev) or 8 * GIB), 12 * GIB)
    model = _model(name, dims, size)
    for batch in BATCHES:
        estimate = estimate_training_memory(model, (1, *(size,) * dims), batch, dp=True, physical_batch_size=batch,
                                            amp_dtype=None, device=dev)
        if estimate.required <= budget or batch == 1:
            return batch, estimate.required / GIB
    raise AssertionError("unreachable")


def timed_pass(name: str, dims: int, size: int, batch: int, dev: Any, *, dp: bool, amp: str | None,
               seconds: float, max_batches: int, max_cell_s: float | None = None) -> dict[str, Any]:
    """Warm-up pass (one batch), then a pass of N images sized to take about ``seconds`` (N >= 2 batches; timed
    again with a larger N when the first timed pass came out under half of ``seconds``); images/s. With
    ``max_cell_s``, the batch is halved (down to 2, warming up again) while two warm-up batches would take longer."""
    import torch
    from medfed.client.training import DPTraining, train_epochs

    model = _model(name, dims, size)

    def run(n: int, seed: int) -> Any:
        data = synthetic(n, dims, size, seed)
        privacy = DPTraining(DP_NOISE, DP_CLIP, max_physical_batch_size=batch) if dp else None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        CountedImages.rows_read[0] = 0
        result = train_epochs(model, data, _train_config(batch, amp), epochs=1, n_classes=2, spatial_dims=dims,
                              seed=seed, privacy=privacy, device=dev)
        read = CountedImages.rows_read[0]
        if not dp and read != n:
            raise AssertionError(f"training read {read} images of {n}: the image counter misses a reading path")
        passes_read.append(read)
        return result

    passes_read: list[int] = []

    warm = run(batch, 1)
    while max_cell_s is not None and batch > 2 and 2 * warm.seconds > max_cell_s:
        batch //= 2
        log(f"  two batches would take {2 * warm.seconds:.0f} s: batch {batch}")
        warm = run(batch, 1)
    # N from the warm-up (its set-up included: an over-estimate of a batch's time, so the pass errs short); where
    # the pass came out short, N scaled up by it (set-up still included, so again it errs short)
    batches = int(min(max_batches, max(2, round(seconds / max(warm.seconds, 1e-3)))))
    result = run(batches * batch, 2)
    if result.seconds < 0.75 * seconds and batches < max_batches:
        batches = int(min(max_batches, max(batches + 1, round(batches * seconds / max(result.seconds, 1e-3)))))
        result = run(batches * batch, 3)
    n = batches * batch
    # more passes of the same N: the fastest is the one least slowed by other work on a shared machine
    passes = [passes_read[-1] / result.seconds]
    for seed in range(4, 4 + (REPEATS if result.seconds <= 2 * seconds else REPEATS - 1) - 1):
        timed = run(n, seed)
        passes.append(passes_read[-1] / timed.seconds)
    out = {"batch": batch, "n": n, "batches": batches, "images_per_s": max(passes),
           "images_per_s_median": float(np.median(passes)), "passes": passes,
           "images_read": passes_read[-len(passes):], "warmup_s": warm.seconds, "steps": result.steps}
    if dev.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def bench_throughput(cells: list[tuple[str, int, int]], seconds: float, max_batches: int, max_cell_s: float,
                     cpu_bf16: bool) -> list[dict[str, Any]]:
    import torch

    dev = device()
    has_amp = hasattr(_train_config(1), "amp")
    rows = []
    for name, dims, size in cells:
        batch, estimate = pick_batch(name, dims, size, dev)
        log(f"throughput {name} {_shape(dims, size)} batch {batch}")
        plain = timed_pass(name, dims, size, batch, dev, dp=False, amp="off", seconds=seconds,
                           max_batches=max_batches, max_cell_s=max_cell_s)
        reason = "time" if plain["batch"] < batch else "memory" if batch < BATCHES[0] else ""
        batch = plain["batch"]
        row: dict[str, Any] = {"model": name, "dims": dims, "size": size, "batch": batch, "batch_reduced_for": reason,
                               "estimate_dp_gib": estimate, "device": str(dev), "plain": plain}
        log(f"  non-DP: {plain['images_per_s']:.1f} img/s over {plain['n']} images")
        row["dp"] = timed_pass(name, dims, size, batch, dev, dp=True, amp="off", seconds=seconds,
                               max_batches=max_batches)
        log(f"  DP:     {row['dp']['images_per_s']:.1f} img/s over {row['dp']['n']} images")
        row["dp_time_ratio"] = row["plain"]["images_per_s"] / row["dp"]["images_per_s"]
        if has_amp and (dev.type == "cuda" or cpu_bf16):
            amp = "auto" if dev.type == "cuda" else "bf16"
            row["amp"] = {"mode": amp, **timed_pass(name, dims, size, batch, dev, dp=False, amp=amp,
                                                    seconds=seconds, max_batches=max_batches)}
            if dev.type == "cuda":
                row["amp"]["dtype"] = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            log(f"  non-DP {amp}: {row['amp']['images_per_s']:.1f} img/s")
        rows.append(row)
    return rows


# --- 2. memory: the generated sites ----------------------------------------------------------------------------


def _smooth_bank(rng: np.random.Generator, count: int, dims: int, side: int) -> np.ndarray:
    """``count`` smooth random fields in [0, 1] of ``side`` per axis (upsampled coarse noise)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.random((count, 1, *(8,) * dims), dtype=np.float32))
    mode = "bilinear" if dims == 2 else "trilinear"
    return F.interpolate(coarse, size=(side,) * dims, mode=mode, align_corners=False)[:, 0].numpy()


def _blob(dims: int, side: int, centre: np.ndarray, radius: float) -> np.ndarray:
    axes = np.ogrid[tuple(slice(0, side) for _ in range(dims))]
    distance = sum((axis - c) ** 2 for axis, c in zip(axes, centre, strict=True))
    return np.exp(-distance / (2 * radius**2)).astype(np.float32)


def write_site(root: Path, spec: dict[str, Any]) -> float:
    """The site folder (class subfolders ``0-normal`` / ``1-lesion``): class 1 images carry a bright blob."""
    from medfed.common.data.dicom import write_dicom

    started = time.perf_counter()
    dims, side, n = spec["dims"], spec["side"], spec["files"]
    rng = np.random.default_rng(0)
    backgrounds = _smooth_bank(rng, 32, dims, side)
    blobs = [_blob(dims, side, rng.uniform(side * 0.3, side * 0.7, size=dims), side / 10) for _ in range(16)]
    for label in ("0-normal", "1-lesion"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % 2
        values = backgrounds[i % len(backgrounds)] * 1500.0 + rng.random(backgrounds.shape[1:], dtype=np.float32) * 600
        if label:
            values += blobs[i % len(blobs)] * 1200.0
        folder = root / ("0-normal", "1-lesion")[label]
        if dims == 2:
            write_dicom(folder / f"img{i:05d}.dcm", np.clip(values, 0, 4095).astype(np.uint16), modality="CT")
        else:
            import nibabel

            volume = np.clip(values - 1024.0, -1024, 3071).astype(np.int16)
            nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(folder / f"vol{i:04d}.nii"))
        if (i + 1) % max(1, n // 10) == 0:
            log(f"  wrote {i + 1}/{n} {spec['format']} files")
    return time.perf_counter() - started


def ensure_site(work: Path, key: str, spec: dict[str, Any]) -> tuple[Path, float | None]:
    """The site folder under ``work`` (written unless a complete one is there); (folder, seconds it took or None)."""
    name = f"{key}-{spec['format'].lower()}-{spec['files']}x{spec['side']}"
    folder, marker = work / name, work / f"{name}.done"
    if marker.is_file() and folder.is_dir():
        log(f"{key}: reusing {folder}")
        return folder, None
    shutil.rmtree(folder, ignore_errors=True)
    log(f"{key}: writing {spec['files']} {spec['format']} files to {folder}")
    seconds = write_site(folder, spec)
    marker.write_text(json.dumps({**spec, "write_s": seconds}) + "\n")
    return folder, seconds


def _folder_bytes(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())


# --- 2. memory: the hospital's processes (fresh interpreters running this file with --worker) ------------------


class RssSampler:
    """Samples VmRSS every ``interval`` s in a thread: the peak of a stretch of time, after the fact."""

    def __init__(self, interval: float = 0.2) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _proc_status("VmRSS")))
            self._stop.wait(interval)

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _site_spec(args: dict[str, Any]) -> Any:
    from medfed.common.data.site_spec import SiteSpec

    return SiteSpec(site_id=args["key"], data=Path(args["folder"]), n_classes=2, image_size=args["image_size"],
                    channels=1, spatial_dims=args["dims"], cache_dir=Path(args["cache"]))


def worker_decode(args: dict[str, Any]) -> dict[str, Any]:
    from medfed.common.data.site_spec import load_site_data

    before = _proc_status("VmRSS")
    started = time.perf_counter()
    site = load_site_data(_site_spec(args))
    seconds = time.perf_counter() - started
    n = len(site.train) + len(site.val)
    return {"decode_s": seconds, "images": n, "images_per_s": n / seconds, "rss_before_gib": before / GIB,
            "peak_rss_gib": peak_rss() / GIB, "images_type": type(site.train.images).__name__}


def _evict(images: Any) -> None:
    """Drop the page cache of the image files (posix_fadvise DONTNEED: this process's files only)."""
    for key in images.keys:
        fd = os.open(images.folder / f"{key}.npy", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def worker_train(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    from medfed.client.training import train_epochs
    from medfed.common.data.arrays import ArrayDataset
    from medfed.common.data.image_files import ImageFiles
    from medfed.common.data.site_spec import load_site_data
    from medfed.common.inference import predict_proba
    from medfed.common.metrics import roc_auc

    dev = device()
    torch.set_num_threads(os.cpu_count() or 1)
    dims, batch, width, size = args["dims"], args["batch"], args["width"], args["image_size"]
    started = time.perf_counter()
    site = load_site_data(_site_spec(args))
    load_s = time.perf_counter() - started
    if not isinstance(site.train.images, ImageFiles):
        raise SystemExit(f"expected the site's images on disk (ImageFiles), got {type(site.train.images).__name__}")
    rng = np.random.default_rng(0)
    steps = args["train_steps"]
    n_train = len(site.train) if not steps else min(len(site.train), steps * batch)
    n_val = len(site.val) if not args["eval_images"] else min(len(site.val), args["eval_images"])

    def some(split: Any, n: int) -> Any:  # n images of a split, drawn at random (both classes), or all of it
        return split if n == len(split) else split.subset(np.sort(rng.permutation(len(split))[:n]))

    train, val = some(site.train, n_train), some(site.val, n_val)
    cfg = _train_config(batch)
    model = _model("smallcnn", dims, size, width)
    sampler = RssSampler()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    result = train_epochs(model, train, cfg, epochs=1, n_classes=2, spatial_dims=dims, seed=0, device=dev)
    t1 = time.perf_counter()
    train_peak = peak_rss()
    probs = predict_proba(model, val.images, batch_size=args["eval_batch"], device=dev)
    t2 = time.perf_counter()
    out: dict[str, Any] = {
        "load_from_cache_s": load_s, "train_split": len(site.train), "val_split": len(site.val),
        "trained_images": n_train, "steps": result.steps, "train_s": result.seconds,
        "train_images_per_s": n_train / result.seconds, "full_epoch": n_train == len(site.train),
        "evaluated_images": n_val, "eval_s": t2 - t1, "eval_images_per_s": n_val / (t2 - t1),
        "val_auc": roc_auc(val.labels, probs[:, 1]), "peak_rss_train_gib": train_peak / GIB,
        "peak_rss_gib": peak_rss() / GIB,
        # the training's resident memory in its first and second half: flat when a longer epoch needs no more
        "rss_train_first_half_gib": sampler.peak(t0, (t0 + t1) / 2) / GIB,
        "rss_train_second_half_gib": sampler.peak((t0 + t1) / 2, t1) / GIB,
        "decoded_gib": (len(site.train) + len(site.val)) * float(np.prod(site.train.images.image_shape)) * 4 / GIB,
    }
    sampler.stop()
    if dev.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    # disk vs memory: the same images and steps, same seed, from the cache files as the page cache holds them
    # (warm: this site's cache fits this machine's memory), from the files with their pages evicted first (cold: read
    # from the disk, as for a site larger than memory) and from a numpy array; alternated so that a slower stretch of
    # a shared machine falls on every kind
    per_pass = max(1, args["compare_steps"]) * batch
    chosen = np.sort(rng.permutation(len(site.train))[:min(per_pass, len(site.train))])
    on_disk = site.train.subset(chosen)
    in_memory = ArrayDataset(np.asarray(on_disk.images), on_disk.labels)
    rates: dict[str, list[float]] = {"cold": [], "warm": [], "memory": []}
    for kind in ("cold", "warm", "memory", "memory", "warm", "cold") * (COMPARE_PASSES // 6):
        if kind == "cold":
            _evict(on_disk.images)
        data = in_memory if kind == "memory" else on_disk
        passed = train_epochs(model, data, cfg, epochs=1, n_classes=2, spatial_dims=dims, seed=1, device=dev)
        rates[kind].append(len(data) / passed.seconds)
        log(f"  {kind}: {rates[kind][-1]:.2f} img/s")
    out["compare_images_per_pass"] = len(chosen)
    out["compare_passes"] = rates
    # images/s over all passes of a kind (the same images in each): the harmonic mean of the passes' rates
    for kind in rates:
        out[f"{kind}_images_per_s"] = len(rates[kind]) / sum(1 / r for r in rates[kind])
        # the fastest pass of each kind: what is left when other work on a shared machine slowed some passes
        out[f"{kind}_images_per_s_best"] = max(rates[kind])
    for kind in ("warm", "cold"):
        out[f"{kind}_memory_ratio"] = out[f"{kind}_images_per_s"] / out["memory_images_per_s"]
        out[f"{kind}_memory_ratio_best"] = out[f"{kind}_images_per_s_best"] / out["memory_images_per_s_best"]
    return out


def run_worker(phase: str, args: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run ``phase`` in a fresh interpreter (this file with --worker); its result JSON."""
    result = work / f"worker-{args['key']}-{phase}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    started = time.perf_counter()
    code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--worker", phase,
                            "--worker-args", json.dumps(args), "--worker-out", str(result)], env=env)
    if code != 0 or not result.is_file():
        raise SystemExit(f"the {phase} process of site {args['key']} failed (exit {code})")
    return {**json.loads(result.read_text()), "process_s": time.perf_counter() - started}


def bench_memory(sites: dict[str, dict[str, Any]], work: Path, quick: bool, train_steps: int | None,
                 eval_images: int | None) -> dict[str, Any]:
    cuda = device().type == "cuda"
    results = {}
    for key, spec in sites.items():
        folder, write_s = ensure_site(work, key, spec)
        cache = work / f"cache-{folder.name}"
        shutil.rmtree(cache, ignore_errors=True)  # decoded afresh: the first process measures the decoding
        steps = train_steps if train_steps is not None else (2 if quick else 0 if cuda else CPU_TRAIN_STEPS[key])
        evals = eval_images if eval_images is not None else (0 if quick or cuda else CPU_EVAL_IMAGES[key])
        args = {"key": key, "folder": str(folder), "cache": str(cache), "dims": spec["dims"],
                "image_size": spec["image_size"], "width": spec["width"], "batch": spec["batch"],
                "eval_batch": spec["batch"], "train_steps": steps, "eval_images": evals,
                "compare_steps": 1 if quick else CPU_COMPARE_STEPS[key] if steps else 25}
        log(f"{key}: decoding into the site cache (a fresh process)")
        decode = run_worker("decode", args, work)
        log(f"{key}: decoded {decode['images']} images in {decode['decode_s']:.1f} s, peak "
            f"{decode['peak_rss_gib']:.2f} GiB")
        log(f"{key}: training from the cache and evaluating (a fresh process)")
        train = run_worker("train", args, work)
        log(f"{key}: peak {train['peak_rss_gib']:.2f} GiB, {train['train_images_per_s']:.1f} img/s; disk/memory "
            f"{train['warm_memory_ratio_best']:.3f} (page cache warm), {train['cold_memory_ratio_best']:.3f} (cold), "
            "fastest passes")
        results[key] = {**spec, "folder_gib": _folder_bytes(folder) / GIB, "cache_gib": _folder_bytes(cache) / GIB,
                        "write_s": write_s, "decode": decode, "train": train, "settings": args}
        shutil.rmtree(cache, ignore_errors=True)  # (the decoded copy is large; the site folder is kept for reuse)
    return results


# --- the report ----------------------------------------------------------------------------------------------


def floors(memory: dict[str, Any]) -> list[tuple[str, bool]]:
    checks = []
    for key, r in memory.items():
        peak = max(r["train"]["peak_rss_gib"], r["decode"]["peak_rss_gib"])
        checks.append((f"{key} site: peak RSS {peak:.2f} GiB <= {RSS_FLOOR_GIB} GiB", peak <= RSS_FLOOR_GIB))
        t = r["train"]
        for kind, what in (("warm", "the page cache warm (the site's cache fits this machine's memory)"),
                           ("cold", "the files' pages evicted first (read from the disk: a site larger than memory)")):
            ratio = t[f"{kind}_memory_ratio_best"]
            checks.append((f"{key} site: images/s from the disk cache, {what}: {ratio:.3f} x from memory >= "
                           f"{DISK_RATIO_FLOOR} (fastest pass of each kind; over all passes "
                           f"{t[f'{kind}_memory_ratio']:.3f})", ratio >= DISK_RATIO_FLOOR))
    if "2d" in memory:
        size = memory["2d"]["train"]["decoded_gib"]
        checks.append((f"2d site: decoded {size:.2f} GiB > {RSS_FLOOR_GIB} GiB (the site exceeds the memory floor)",
                       size > RSS_FLOOR_GIB))
    return checks


def _shape(dims: int, size: int) -> str:
    return "x".join([str(size)] * dims)


def _rate(value: float) -> str:
    """Images/s with about three significant digits."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 \
        else f"{value:.3f}"


def _timing(result: dict[str, Any]) -> list[str]:
    """How long the parts took and the command(s) that reproduce them."""
    parts = result.get("parts", {})
    commands = {p["command"] for p in parts.values()}
    load = "; ".join(f"{name} {p['load_before']:.1f} -> {p['load_after']:.1f}" for name, p in parts.items())
    shared = f" Load average during the parts ({load}) on {result['machine']['cores']} cores: the machine was " \
             "shared with other work, so the CPU figures vary by tens of percent from run to run."
    if len(commands) == 1:
        took = ", ".join(f"{name} {p['wall_s'] / 60:.1f}" for name, p in parts.items())
        return [f"Whole script {result['wall_s'] / 60:.1f} min ({took} min).{shared} Reproduce with:", "",
                f"    {commands.pop()}", ""]
    lines = [f"The parts were run separately.{shared} Reproduce with:", ""]
    for name, p in parts.items():
        lines.append(f"    {p['command']}    # {name}: {p['wall_s'] / 60:.1f} min, {p['date']}")
    return [*lines, ""]


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = m["gpu"]
    lines = [START, "",
             f"Measured {result['date']} on {m['description']} ({m['cpu']}; torch {m['torch']}, Python "
             f"{m['python']}). " + (f"GPU: {gpu['name']}." if gpu else "GPU: none was available to this session; "
                                    "every figure is the CPU's (torch's threads = the cores)."),
             *_timing(result)]
    rows = result.get("throughput")
    if rows:
        amp_col = any("amp" in r for r in rows)
        gpu_col = any("peak_gpu_mib" in r["plain"] for r in rows)
        head = "| model | input | batch | non-DP img/s | DP img/s | DP/non-DP time | N non-DP / DP |"
        rule = "|---|---|---:|---:|---:|---:|---:|"
        if amp_col:
            head += " non-DP amp img/s | amp speed-up |"
            rule += "---:|---:|"
        if gpu_col:
            head += " peak GPU MiB non-DP / DP |"
            rule += "---:|"
        lines += ["Training throughput: `train_epochs` on synthetic 1-channel images, 2 classes, AdamW; DP = Opacus "
                  f"DP-SGD (noise {DP_NOISE}, clip {DP_CLIP}, Poisson sampling, physical batch = batch); images/s "
                  f"of one `train_epochs` call on N images (its set-up included), the fastest of {REPEATS} such "
                  f"calls ({REPEATS - 1} for the slowest cells) after a one-batch warm-up, counting the images the "
                  "call read (under DP, Poisson sampling reads about N). "
                  "resnet18: width 64, `model.stem=auto` "
                  "(the ImageNet stem at 128 px and up); smallcnn: width 32. The batch is 32 unless the DP memory "
                  "estimate asked for less (m) or two batches would have taken over "
                  f"{result['max_cell_seconds']:.0f} s (t). DP/non-DP time = non-DP img/s / DP img/s.", "", head,
                  rule]
        for r in rows:
            mark = {"memory": " (m)", "time": " (t)"}.get(r.get("batch_reduced_for", ""), "")
            line = (f"| {r['model']} | {_shape(r['dims'], r['size'])} | {r['batch']}{mark} | "
                    f"{_rate(r['plain']['images_per_s'])} | {_rate(r['dp']['images_per_s'])} | "
                    f"x{r['dp_time_ratio']:.2f} | "
                    f"{r['plain']['n']} / {r['dp']['n']} |")
            if amp_col:
                a = r.get("amp")
                line += (f" {_rate(a['images_per_s'])} ({a.get('dtype', a['mode'])}) | "
                         f"x{a['images_per_s'] / r['plain']['images_per_s']:.2f} |") if a else " - | - |"
            if gpu_col:
                line += f" {r['plain'].get('peak_gpu_mib', 0):.0f} / {r['dp'].get('peak_gpu_mib', 0):.0f} |"
            lines.append(line)
        lines.append("")
    memory = result.get("memory")
    if memory:
        lines += ["A hospital's memory and disk cache with real image sizes: each figure from a fresh process "
                  "(peak RSS = VmHWM). `load_site_data` with a cache folder decodes the site into one .npy file per "
                  "image (decode s, its own process); a second process loads the site from that cache, trains "
                  "`smallcnn` on the training split read from disk batch by batch, and runs `predict_proba` on the "
                  "validation split. Images/s from the disk cache vs in memory: the same images, steps and seed, "
                  "trained from the cache files as the page cache holds them (warm), from the files with their pages "
                  "evicted first (cold: read from the disk) and from a numpy array, in alternated passes: images/s "
                  "and ratio of the fastest pass of each kind (the least slowed by other work; over all passes in "
                  "brackets).", "",
                  "| site | decoded GiB | decode s | peak RSS decoding GiB | peak RSS training + evaluation GiB | "
                  "floor | img/s in memory | img/s on disk warm / cold | ratio warm / cold | floor (>= "
                  f"{DISK_RATIO_FLOOR}) warm / cold |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for key, r in memory.items():
            t, d = r["train"], r["decode"]
            peak = max(t["peak_rss_gib"], d["peak_rss_gib"])
            site = (f"{key}: {r['files']:,} {r['format']} {_shape(r['dims'], r['side'])}, smallcnn width {r['width']} "
                    f"batch {r['batch']} at {_shape(r['dims'], r['image_size'])}")

            def verdict(ok: bool) -> str:
                return "met" if ok else "NOT met"

            lines.append(
                f"| {site} | {t['decoded_gib']:.2f} | {d['decode_s']:.0f} | {d['peak_rss_gib']:.2f} | "
                f"{t['peak_rss_gib']:.2f} | <= {RSS_FLOOR_GIB}: {verdict(peak <= RSS_FLOOR_GIB)} | "
                f"{_rate(t['memory_images_per_s_best'])} | {_rate(t['warm_images_per_s_best'])} / "
                f"{_rate(t['cold_images_per_s_best'])} | "
                f"{t['warm_memory_ratio_best']:.3f} ({t['warm_memory_ratio']:.3f}) / "
                f"{t['cold_memory_ratio_best']:.3f} ({t['cold_memory_ratio']:.3f}) | "
                f"{verdict(t['warm_memory_ratio_best'] >= DISK_RATIO_FLOOR)} / "
                f"{verdict(t['cold_memory_ratio_best'] >= DISK_RATIO_FLOOR)} |")
        lines += ["", "Per site:", ""]
        for key, r in memory.items():
            t = r["train"]
            epoch = (f"a whole epoch ({t['trained_images']:,} images)" if t["full_epoch"] else
                     f"{t['steps']} batches ({t['trained_images']:,} of the {t['train_split']:,} training images; a "
                     f"whole epoch would take about {t['train_split'] / t['train_images_per_s'] / 60:.0f} min at "
                     "this speed)")
            lines.append(
                f"- {key}: site folder {r['folder_gib']:.2f} GiB, cache {r['cache_gib']:.2f} GiB; decoding "
                f"{r['decode']['images_per_s']:.0f} images/s; loading from the cache {t['load_from_cache_s']:.1f} s; "
                f"trained {epoch} at {_rate(t['train_images_per_s'])} img/s (resident memory peak "
                f"{t['rss_train_first_half_gib']:.2f} GiB in the first half of training, "
                f"{t['rss_train_second_half_gib']:.2f} GiB in the second; {t['peak_rss_train_gib']:.2f} GiB at its "
                f"end); evaluated {t['evaluated_images']:,} of {t['val_split']:,} validation images in "
                f"{t['eval_s']:.0f} s (batch {r['settings']['eval_batch']}; validation AUC {t['val_auc']:.3f})"
                + (f"; peak GPU memory {t['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in t else "") + ".")
        lines += ["", "Floors:", ""]
        lines += [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in floors(memory)]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def _quiet() -> None:
    """Silence warnings that say nothing about the measurement (Opacus' secure-RNG note, MONAI's optional codec)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("monai").setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the figures")
    parser.add_argument("--only", choices=("throughput", "memory"), help="run one part (keeps the other's figures)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/medfed-hardware"),
                        help="where the generated sites live (reused when there)")
    parser.add_argument("--cell-seconds", type=float, default=None,
                        help="aim of each timed throughput pass (default 4; 1 with --quick)")
    parser.add_argument("--max-batches", type=int, default=200, help="most batches in one timed throughput pass")
    parser.add_argument("--max-cell-seconds", type=float, default=30.0,
                        help="a smaller batch (down to 2) where 2 batches would take longer than this")
    parser.add_argument("--cpu-bf16", action="store_true", help="on a CPU also time bf16 autocast without DP")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="training batches of the memory run (0: a whole epoch; default: 0 on a GPU, "
                             f"{CPU_TRAIN_STEPS} on a CPU)")
    parser.add_argument("--eval-images", type=int, default=None,
                        help=f"validation images evaluated (0: all; default: all on a GPU, {CPU_EVAL_IMAGES} on a CPU)")
    parser.add_argument("--files-2d", type=int, default=0, help="DICOM files of the 2D site (a smoke run when not "
                        "the default 20,000: results go to WORK_DIR/hardware-quick.json, the doc is left alone)")
    parser.add_argument("--files-3d", type=int, default=0, help="NIfTI volumes of the 3D site (likewise; default 300)")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _quiet()
    if args.worker:
        work = {"decode": worker_decode, "train": worker_train}[args.worker]
        args.worker_out.write_text(json.dumps(work(json.loads(args.worker_args)), indent=1) + "\n")
        return

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    started = time.time()
    command = "python benchmarks/hardware.py" + "".join(f" {a}" for a in sys.argv[1:])
    results_dir = REPO / "benchmarks" / "results"
    sites = {key: dict(spec) for key, spec in (QUICK_SITES if args.quick else SITES).items()}
    for key, files in (("2d", args.files_2d), ("3d", args.files_3d)):
        if files:
            sites[key]["files"] = files
    trial = args.quick or sites != SITES  # a smoke run: its own results file, and the doc is left alone
    out = args.work_dir / "hardware-quick.json" if trial else results_dir / "hardware.json"
    previous = json.loads(out.read_text()) if out.is_file() and args.only else {}
    info = machine()
    log(f"machine: {info['description']}; {info['cpu']}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": command, "machine": info, "date": time.strftime("%Y-%m-%d"),
                              "quick": args.quick, "floors": {"peak_rss_gib": RSS_FLOOR_GIB,
                                                              "disk_memory_ratio": DISK_RATIO_FLOOR}}
    parts = dict(previous.get("parts", {}))

    def part(name: str, began: float, load: float) -> None:
        parts[name] = {"command": command, "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - began,
                       "load_before": load, "load_after": os.getloadavg()[0]}

    if args.only != "memory":
        began, load = time.time(), os.getloadavg()[0]
        seconds = args.cell_seconds if args.cell_seconds is not None else (1.0 if args.quick else 4.0)
        cells = QUICK_CELLS if args.quick else CELLS
        result["max_cell_seconds"] = args.max_cell_seconds
        result["throughput"] = bench_throughput(cells, seconds, args.max_batches, args.max_cell_seconds,
                                                args.cpu_bf16)
        part("throughput", began, load)
    elif "throughput" in previous:
        result["throughput"], result["max_cell_seconds"] = previous["throughput"], previous["max_cell_seconds"]
    if args.only != "throughput":
        began, load = time.time(), os.getloadavg()[0]
        result["memory"] = bench_memory(sites, args.work_dir, args.quick, args.train_steps, args.eval_images)
        part("memory", began, load)
        result["floor_checks"] = [{"check": text, "met": ok} for text, ok in floors(result["memory"])]
    elif "memory" in previous:
        result["memory"], result["floor_checks"] = previous["memory"], previous.get("floor_checks")
    result["wall_s"] = time.time() - started
    result["parts"] = {name: parts[name] for name in ("throughput", "memory") if name in parts}
    results_dir.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    section = render(result)
    print(section)
    if not trial:
        write_doc(section, args.doc, start=START, end=END, heading=HEADING)
    log(f"wrote {out}" + ("" if trial else f" and {args.doc}"))


if __name__ == "__main__":
    main()
