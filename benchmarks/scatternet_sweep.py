"""How the DP head recipe of `model=scatternet` was chosen: a fast in-process stand-in of the federation, on
validation data only.

The real runs go through `medfed simulate` (benchmarks/small_site_dp.py). Choosing the recipe that way would take
hours, so this script replays the same federation in one process: the hospitals' splits from medfed's own
partitioning (5 hospitals, Dirichlet(0.5), seed 0), the scattering features (J=2, L=8, per-image GroupNorm) average-
pooled to a `pool` grid, and FedAvg (weighted by the training-set sizes) of a linear head that each hospital trains
with Opacus DP-SGD (its noise from Opacus for its own sampling rate and the run's steps). It reports the pooled
*validation* AUC of the hospitals' held-out splits (last and best round); the test split is never read. Training
epsilon is 0.75 x the target: `privacy.eval_share=0.25` goes to the metered evaluations in a real run.

    python benchmarks/scatternet_sweep.py --data-dir ../shared/data/medmnist            # ~15 min on 2 cores
    python benchmarks/scatternet_sweep.py --datasets breastmnist --pools 2 --epsilons 6 # one cell
    python benchmarks/scatternet_sweep.py --datasets breastmnist --pooled-ceiling       # the diagnostic
    python benchmarks/scatternet_sweep.py --pools 2 --epsilons 6 0.75 0 --grid 20:1:256:1 --norms default orders

Configurations tried on 2026-12-06 before the recipe in common/config/private_recipes.py was fixed (pool 2, SGD
momentum 0.9, lr 1.0, batch 256, 20 rounds x 1 local epoch): about 46 on BreastMNIST (pool 1-7, normalisation,
rounds 10-40, local epochs 1-10, batch 32-256, lr 0.05-3, SGD/Adam; epsilon 8, 6, 1, 0.75 and none) and 14 on
PneumoniaMNIST; later, per-image normalisations over other groups of maps (`--norms`), which brought the totals to
about 77 and 29, and standardisation by constants of 1/f-noise reference images (`--norms reference reference-unit`)
with a one-shot class-mean classifier, to about 122 and 33. docs/benchmarks.md ("Small-site DP") keeps the tables.
In a real deployment every configuration tried on the hospitals' data spends privacy too.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("benchmarks.scatternet_sweep")


NORMS = ("default", "orders", "orientations", "orders-rms", "order0-rest", "reference", "reference-unit")
REFERENCE_IMAGES = 500  # seeded 1/f-noise images whose features give the `reference` norms' constants


def _reference_images(n: int, side: int) -> np.ndarray:
    """``n`` grey images ``(n, 1, side, side)`` of 1/f noise (seeded), scaled to [0, 1] each: data-independent
    stand-ins of natural images, whose scattering statistics standardise the features without reading any
    hospital's (or any public) data."""
    rng = np.random.default_rng(0)
    freq = np.fft.fftfreq(side)
    radius = np.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(n, side, side)) + 1j * rng.normal(size=(n, side, side))) / radius
    images = np.real(np.fft.ifft2(spectrum))
    images = (images - images.min(axis=(1, 2), keepdims=True)) / np.ptp(images, axis=(1, 2), keepdims=True)
    return images[:, None].astype(np.float32)


def _log_pooled(model: torch.nn.Module, images: np.ndarray, pool: int) -> torch.Tensor:
    """The raw (not normalised) scattering maps of grey ``images``, averaged to a ``pool`` grid, log-scaled."""
    x = torch.from_numpy(images)
    f = model._front(x.shape[-2], x.shape[-1], x.device)(x.contiguous()).flatten(1, 2)
    return torch.log(torch.nn.functional.adaptive_avg_pool2d(f, pool).reshape(len(images), -1) + 1e-3)


def _norm_groups(j: int, l: int, norm: str) -> list[list[int]]:
    """Channel groups of one input channel's scattering maps (kymatio's order: order 0; order 1 by scale, then
    angle; order 2 by (j1, angle1), then (j2 > j1, angle2)) for a per-image normalisation variant."""
    keys: list[tuple[int, ...]] = [(0,)] + [(1, j1) for j1 in range(j) for _ in range(l)]
    keys += [(2, j1, j2, a1) for j1 in range(j) for a1 in range(l) for j2 in range(j1 + 1, j) for _ in range(l)]
    if norm in ("orders", "orders-rms"):
        keys = [k[:3] for k in keys]  # (order, scales): angles pooled
    elif norm == "order0-rest":
        keys = [k[:1] if k[0] == 0 else (1,) for k in keys]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


@functools.cache
def _reference_stats(model: torch.nn.Module, pool: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and deviation per feature of :func:`_reference_images`' log-pooled features: constants of the transform
    at this pool and image side, computed once (not again for every hospital and split)."""
    ref = _log_pooled(model, _reference_images(REFERENCE_IMAGES, side), pool)
    return ref.mean(dim=0), ref.std(dim=0)


def _features(model: torch.nn.Module, images: np.ndarray, pool: int, norm: str = "default") -> torch.Tensor:
    """Pooled features of ``images``: the model's own (``default``, per-image GroupNorm over triples of maps), a
    per-image normalisation over other groups of maps, or (``reference``) the log of the raw pooled maps
    standardised per feature with the mean and deviation of :func:`_reference_images`' features (constants of the
    transform, read from no data), ``reference-unit`` then scaled to unit length per image (the comparison in
    docs/benchmarks.md; grey images)."""
    with torch.no_grad():
        x = torch.from_numpy(images)
        if norm.startswith("reference"):
            mean, std = _reference_stats(model, pool, x.shape[-1])
            z = (_log_pooled(model, images, pool) - mean) / std
            return z / z.norm(dim=1, keepdim=True) if norm == "reference-unit" else z
        if norm == "default":
            f = model.front_features(x)
        else:
            f = model._front(x.shape[-2], x.shape[-1], x.device)(x.contiguous()).flatten(1, 2)
            for group in _norm_groups(model.scatter_j, model.scatter_l, norm):
                part = f[:, group]
                if norm == "orders-rms":
                    part = part / (part.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-6)
                else:
                    part = (part - part.mean(dim=(1, 2, 3), keepdim=True)) / (part.std(dim=(1, 2, 3), keepdim=True)
                                                                             + 1e-6)
                f[:, group] = part
        return torch.nn.functional.adaptive_avg_pool2d(f, pool).reshape(len(images), -1)


def run(train: list[tuple[torch.Tensor, torch.Tensor]], val: tuple[torch.Tensor, np.ndarray], *, epsilon: float | None,
        rounds: int, epochs: int, batch: int, lr: float) -> tuple[float, float]:
    """FedAvg of a DP-SGD linear head; (last, best) pooled validation AUC."""
    from medfed.common.metrics import roc_auc
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    torch.manual_seed(0)
    dim = train[0][0].shape[1]
    weight, bias = torch.zeros(2, dim), torch.zeros(2)
    plans = []
    for x, _ in train:
        rate = 1.0 / math.ceil(len(x) / batch)
        steps = rounds * epochs * math.ceil(len(x) / batch)
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=rate,
                                     steps=steps) if epsilon else 0.0
        plans.append((rate, sigma))
    best, last = 0.0, 0.0
    for _ in range(rounds):
        new_w, new_b, total = torch.zeros_like(weight), torch.zeros_like(bias), 0
        for (x, y), (rate, sigma) in zip(train, plans, strict=True):
            head = torch.nn.Linear(dim, 2)
            head.weight.data.copy_(weight)
            head.bias.data.copy_(bias)
            optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                                 batch_size=max(1, round(rate * len(y))))
            forward = head
            if epsilon:
                forward, optimizer, loader = PrivacyEngine().make_private(
                    module=head, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=1.0)
            for _ in range(epochs):
                for xb, yb in loader:
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(forward(xb), yb).backward()
                    optimizer.step()
            new_w += len(y) * head.weight.data
            new_b += len(y) * head.bias.data
            total += len(y)
        weight, bias = new_w / total, new_b / total
        with torch.no_grad():
            scores = torch.softmax(val[0] @ weight.T + bias, 1)[:, 1].numpy()
        last = roc_auc(val[1] == 1, scores)
        best = max(best, last)
    return last, best


def pooled_ceiling(sites: list, test: tuple[np.ndarray, np.ndarray], model: torch.nn.Module, pools: list[int],
                   norms: list[str]) -> None:
    """A diagnostic, not a selection: logistic regression without DP on all hospitals' training features pooled,
    its test AUC per pool and regularisation (what the features can give this federation's data at best)."""
    from medfed.common.metrics import roc_auc
    from sklearn.linear_model import LogisticRegression  # the test extra

    labels = np.concatenate([s.train.labels for s in sites])
    for norm, pool in itertools.product(norms, pools):
        x = torch.cat([_features(model, s.train.images, pool, norm) for s in sites]).numpy()
        x_test = _features(model, test[0], pool, norm).numpy()
        for c in (0.003, 0.03, 0.3):
            fitted = LogisticRegression(max_iter=5000, C=c).fit(x, labels)
            logger.info("pooled logistic regression, norm %s, pool %d, C %g: test AUC %.3f", norm, pool, c,
                        roc_auc(test[1] == 1, fitted.predict_proba(x_test)[:, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    parser.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist"])
    parser.add_argument("--pools", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[6.0, 0.75])
    parser.add_argument("--norms", nargs="+", default=["default"], choices=NORMS,
                        help="per-image normalisations to compare (default: the model's own)")
    parser.add_argument("--grid", nargs="+", default=None, metavar="ROUNDS:EPOCHS:BATCH:LR",
                        help="head recipes to try (default: the three the recipe was chosen from)")
    parser.add_argument("--pooled-ceiling", action="store_true",
                        help="only the diagnostic: pooled non-DP logistic regression, test AUC (selects nothing)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", module="opacus")  # its secure-RNG notice on every make_private
    from medfed.common.config import ScatterNetConfig, compose_config
    from medfed.common.data.federation import load_site
    from medfed.common.models import build_model

    model = build_model(ScatterNetConfig(), spatial_dims=2, in_channels=1, n_classes=2)
    grid = [(20, 1, 256, 1.0), (20, 1, 256, 3.0), (20, 2, 256, 1.0)]  # rounds, local epochs, batch, lr
    if args.grid:
        grid = [(int(r), int(e), int(b), float(lr)) for r, e, b, lr in (g.split(":") for g in args.grid)]
    for name in args.datasets:
        cfg = compose_config(["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={args.data_dir}",
                              "federation.hospitals=5", "federation.partition=dirichlet", "federation.alpha=0.5",
                              "federation.seed=0"])
        sites = [load_site(cfg, i) for i in range(cfg.federation.hospitals)]
        if args.pooled_ceiling:
            from medfed.common.data import load_test_set

            _, test = load_test_set(cfg)
            pooled_ceiling(sites, (test.images, test.labels), model, [1, 2, 3, 4, 7], args.norms)
            continue
        for norm, pool in itertools.product(args.norms, args.pools):
            train = [(_features(model, s.train.images, pool, norm), torch.from_numpy(s.train.labels)) for s in sites]
            val = (torch.cat([_features(model, s.val.images, pool, norm) for s in sites]),
                   np.concatenate([s.val.labels for s in sites]))
            for epsilon, (rounds, epochs, batch, lr) in itertools.product(args.epsilons, grid):
                last, best = run(train, val, epsilon=epsilon or None, rounds=rounds, epochs=epochs, batch=batch, lr=lr)
                logger.info("%s norm %s pool %d epsilon %g: %d rounds x %d epochs, batch %d, lr %g: validation AUC "
                            "last %.3f best %.3f", name, norm, pool, epsilon, rounds, epochs, batch, lr, last, best)


if __name__ == "__main__":
    main()
