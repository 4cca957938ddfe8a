"""Benchmark: what replacing a pretrained encoder's BatchNorm by GroupNorm costs (medfed's way to use BatchNorm
weights under DP-SGD, which needs per-sample independent layers).

On one dataset (PneumoniaMNIST by default), centralized on the train + val pool, medfed's ``resnet18`` layout:
  1. train it with **BatchNorm** for ``--epochs`` (the "pretrained BN encoder"); test AUC with its running stats;
  2. load those weights into the GroupNorm ``resnet18`` through ``model.pretrained``'s loader (affine parameters kept,
     running statistics dropped): test AUC with no training (the raw cost of the swap);
  3. fine-tune the converted model for ``--finetune-epochs`` with DP-SGD off and on (epsilon 8) and, for reference,
     a GroupNorm model from scratch on the same budget: how much of the pretraining survives the swap.
Model selection does not apply (fixed epoch counts, no validation); every number is on the official test split.

    python benchmarks/norm_transfer.py            # ~5 min on 2 cores

Writes docs/benchmarks.md (between the `norm-transfer` markers) and benchmarks/results/norm_transfer.json.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import benchmark_parser, require_medmnist, write_doc  # noqa: E402

from medfed.client.privacy import SiteCap, plan_round  # noqa: E402
from medfed.client.training import DPTraining, train_epochs  # noqa: E402
from medfed.common.config import DPConfig, MedMNISTConfig, ModelConfig, TrainConfig  # noqa: E402
from medfed.common.data.medmnist import load_medmnist  # noqa: E402
from medfed.common.inference import predict_proba  # noqa: E402
from medfed.common.metrics import roc_auc  # noqa: E402
from medfed.common.models import build_model, save_checkpoint, state_dict_to_numpy  # noqa: E402
from medfed.common.models.pretrained import load_pretrained  # noqa: E402

logger = logging.getLogger("benchmarks.norm_transfer")
START, END = "<!-- norm-transfer:start -->", "<!-- norm-transfer:end -->"


def with_batch_norm(model: nn.Module) -> nn.Module:
    """The same network with every GroupNorm replaced by a BatchNorm of the same channels (same parameter names)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.GroupNorm):
            norm = nn.BatchNorm2d(child.num_channels)
            setattr(model, name, norm)
        else:
            with_batch_norm(child)
    return model


def auc(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return roc_auc(labels, predict_proba(model, images)[:, 1])


def main() -> None:
    parser = benchmark_parser(__doc__, "norm_transfer", ["pneumoniamnist"])
    parser.add_argument("--epochs", type=int, default=3, help="BatchNorm pretraining epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    name = args.datasets[0]
    splits = load_medmnist(MedMNISTConfig(name=name, data_path=str(args.data_dir)))  # train + val pool, test
    data, test_x, test_y = splits.train, splits.test.images, splits.test.labels
    if args.quick:
        data, args.epochs = data.subset(np.arange(256)), 1
    model_cfg = ModelConfig(name="resnet18")
    recipe = TrainConfig(batch_size=64, lr=1e-3)
    common = dict(n_classes=2, spatial_dims=2, device=torch.device("cpu"))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, CPU",
                               "dataset": name, "epochs": args.epochs, "finetune_epochs": args.finetune_epochs}
    started = time.time()

    torch.manual_seed(0)
    bn = with_batch_norm(build_model(model_cfg, spatial_dims=2, in_channels=1, n_classes=2))
    train_epochs(bn, data, recipe, epochs=args.epochs, seed=0, **common)
    results["batchnorm"] = auc(bn, test_x, test_y)
    logger.info("BatchNorm model after %d epochs: test AUC %.4f", args.epochs, results["batchnorm"])

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "bn.pt"
        save_checkpoint(checkpoint, state_dict_to_numpy(bn), {"round": 0})

        def converted() -> nn.Module:
            model = build_model(model_cfg, spatial_dims=2, in_channels=1, n_classes=2)
            report = load_pretrained(model, checkpoint)
            results.setdefault("dropped", sorted({k.rsplit(".", 1)[1] for k in report.skipped}))
            return model

        results["groupnorm_no_training"] = auc(converted(), test_x, test_y)
        sigma = plan_round(DPConfig(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0), SiteCap(), n_train=len(data),
                           batch_size=recipe.batch_size, local_epochs=args.finetune_epochs, rounds_left=1, entries=[],
                           run_id=0).noise_multiplier  # as a medfed hospital derives it
        results["dp_noise_multiplier"] = sigma
        for label, private in (("finetuned", None), ("finetuned_dp", DPTraining(noise_multiplier=sigma,
                                                                                 max_grad_norm=1.0))):
            for start in ("converted", "scratch"):
                torch.manual_seed(0)
                model = converted() if start == "converted" else build_model(
                    model_cfg, spatial_dims=2, in_channels=1, n_classes=2)
                t0 = time.time()
                train_epochs(model, data, recipe, epochs=args.finetune_epochs, seed=1, privacy=private, **common)
                results[f"{label}_{start}"] = auc(model, test_x, test_y)
                logger.info("%s from %s: test AUC %.4f (%.0f s)", label, start, results[f"{label}_{start}"],
                            time.time() - t0)
    results["wall_s"] = time.time() - started
    command = "python benchmarks/norm_transfer.py " + " ".join(sys.argv[1:])
    text = markdown(results, command.strip())
    print(text)
    if not args.quick:
        (REPO / "benchmarks" / "results" / "norm_transfer.json").write_text(json.dumps(results, indent=1) + "\n")
        write_doc(text, args.doc, start=START, end=END, heading="BatchNorm -> GroupNorm: the cost of the swap")


def markdown(r: dict[str, Any], command: str) -> str:
    e, f = r["epochs"], r["finetune_epochs"]
    return "\n".join([
        START, "", f"`{command}` ({r['date']}, {r['machine']}, {r['wall_s']:.0f} s; {r['dataset']}, centralized, "
        "medfed `resnet18` width 32, AdamW lr 1e-3, batch 64, test AUC on the official test split, one seed).", "",
        "| model | test AUC |", "|---|---|",
        f"| BatchNorm, trained {e} epochs (running statistics) | {r['batchnorm']:.4f} |",
        f"| the same weights as GroupNorm, no training | {r['groupnorm_no_training']:.4f} |",
        f"| GroupNorm from the converted weights, {f} epoch(s) | {r['finetuned_converted']:.4f} |",
        f"| GroupNorm from scratch, {f} epoch(s) | {r['finetuned_scratch']:.4f} |",
        f"| GroupNorm from the converted weights, {f} epoch(s) DP-SGD eps 8 | {r['finetuned_dp_converted']:.4f} |",
        f"| GroupNorm from scratch, {f} epoch(s) DP-SGD eps 8 | {r['finetuned_dp_scratch']:.4f} |",
        "", f"Dropped from the file: the BatchNorm {', '.join(r['dropped'])}.", "", END,
    ])


if __name__ == "__main__":
    main()
