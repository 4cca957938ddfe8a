"""Rules that involve several sections of the config, each a named function, checked in the order of :data:`RULES`.

A section checks its own values in its ``__post_init__``; what one section's value means for another's (secure
aggregation and the strategy, DP and the loss, self-supervised pretraining and everything it excludes) is a rule
here. :class:`~medfed.common.config.schema.Config` runs every rule after its sections are built; the first rule
broken raises :class:`~medfed.common.errors.ConfigError` saying which keys clash and how to resolve it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from medfed.common.config.dataset import FolderConfig
from medfed.common.config.strategy import ProxConfig
from medfed.common.errors import ConfigError

if TYPE_CHECKING:
    from medfed.common.config.schema import Config

__all__ = [
    "AMP_UNDER_DP",
    "RULES",
    "Rule",
    "check_rules",
    "folder_roots_match_hospitals",
    "min_train_nodes_within_hospitals",
    "mc_dropout_needs_dropout",
    "no_batch_norm_with_privacy",
    "no_batch_norm_with_secure_aggregation",
    "no_class_weighting_with_dp",
    "compression_after_the_privacy",
    "no_fedprox_with_dp",
    "no_mixed_precision_with_dp",
    "no_personalization_with_privacy",
    "secure_aggregation_needs_fedavg",
    "distributed_dp_trains_a_classifier_with_every_hospital",
    "ssl_dp_needs_hooks",
    "ssl_has_no_predictions",
    "ssl_no_personalization",
    "ssl_no_simclr_with_dp",
    "ssl_trains_from_scratch",
]

logger = logging.getLogger(__name__)

Rule = Callable[["Config"], None]
"""A check of a whole :class:`Config`: returns when it holds, raises :class:`ConfigError` when it does not."""

AMP_UNDER_DP = (
    "Opacus computes every image's gradient from hooks on the layers' activations and on the gradients flowing "
    "back; under autocast both come in reduced precision, so the per-image norms it clips to max_grad_norm are "
    "inexact and the bound on one image's influence that the epsilon rests on no longer holds exactly."
)
"""Why DP-SGD trains in float32 (``train.amp=bf16|fp16`` is refused under DP; ``auto`` means float32 there)."""


# --- self-supervised pretraining (task=ssl): what it cannot be combined with, said before anything starts --------


def ssl_no_simclr_with_dp(cfg: Config) -> None:
    """SimCLR's contrastive loss couples the images of a batch; DP-SGD's per-sample clipping cannot bound that."""
    if cfg.task == "ssl" and cfg.ssl.method == "simclr" and cfg.privacy.name == "dp":
        raise ConfigError(
            "task=ssl ssl.method=simclr cannot run with privacy=dp: the contrastive loss couples every image of a "
            "batch, so per-sample clipping does not bound one image's influence and the epsilon would not hold. Use "
            "ssl.method=mim (masked image modelling: one loss per image) with privacy=dp."
        )


def ssl_dp_needs_hooks(cfg: Config) -> None:
    """Private self-supervised pretraining computes per-sample gradients with Opacus' hooks."""
    if cfg.task == "ssl" and cfg.privacy.name == "dp" and getattr(cfg.privacy, "grad_sample_mode", "hooks") != "hooks":
        raise ConfigError("task=ssl with privacy=dp needs privacy.grad_sample_mode=hooks.")


def ssl_no_personalization(cfg: Config) -> None:
    """Self-supervised pretraining trains one shared encoder: no local layers, no local fine-tuning."""
    if cfg.task == "ssl" and cfg.personalize.enabled:
        raise ConfigError("task=ssl trains one shared encoder: leave personalize.* off.")


def ssl_has_no_predictions(cfg: Config) -> None:
    """The classifier's evaluation (MC dropout, snapshot ensemble, Grad-CAM) has nothing to evaluate in an SSL run."""
    if cfg.task == "ssl" and (cfg.evaluate.mc_samples or cfg.evaluate.snapshots or cfg.evaluate.gradcam_samples):
        raise ConfigError("evaluate.mc_samples/snapshots/gradcam_samples are for classifiers; task=ssl has no "
                          "predictions. Leave them 0 (the SSL run reports its representation quality instead).")


def ssl_trains_from_scratch(cfg: Config) -> None:
    """Transfer learning (model.pretrained, model.finetune) belongs to the supervised run after pretraining."""
    if cfg.task == "ssl" and (cfg.model.pretrained or cfg.model.finetune != "full"):
        raise ConfigError("task=ssl pretrains an encoder from scratch; model.pretrained and model.finetune apply to "
                          "the supervised run that follows it.")


# --- every task ---------------------------------------------------------------------------------------------------


def mc_dropout_needs_dropout(cfg: Config) -> None:
    """MC-dropout passes are all the same without dropout in the model."""
    if cfg.evaluate.mc_samples > 0 and cfg.model.dropout <= 0.0:
        raise ConfigError(
            f"evaluate.mc_samples={cfg.evaluate.mc_samples} needs a model trained with dropout, but "
            "model.dropout=0; set model.dropout=0.2 (for example) or evaluate.mc_samples=0."
        )


def no_personalization_with_privacy(cfg: Config) -> None:
    """Local layers and fine-tuning train on a hospital's data outside the privacy accounting."""
    if cfg.personalize.enabled and (cfg.privacy.name != "none" or cfg.privacy.secure_aggregation):
        raise ConfigError(
            "personalize.* cannot run with privacy=dp, privacy=central_dp or secure aggregation yet: local layers "
            "and fine-tuning steps are training on the hospital's data that the privacy accounting does not "
            "cover. Leave personalize.local_layers=none and personalize.finetune_epochs=0 for private runs."
        )


def no_batch_norm_with_privacy(cfg: Config) -> None:
    """BatchNorm's batch statistics defeat DP-SGD's per-sample bound and would be noised like weights."""
    if cfg.model.norm == "batch" and cfg.privacy.name != "none":
        raise ConfigError(
            f"model.norm=batch cannot run with privacy={cfg.privacy.name}: BatchNorm normalises each image by "
            "its batch's statistics, so one image's influence is not bounded (DP-SGD), and its running "
            "statistics would be noised like weights (central DP). Use model.norm=group with privacy, or "
            "privacy=none."
        )


def no_batch_norm_with_secure_aggregation(cfg: Config) -> None:
    """SecAgg+ quantises into a fixed range that BatchNorm's running variances can leave."""
    if cfg.model.norm == "batch" and cfg.privacy.secure_aggregation:
        raise ConfigError(
            "model.norm=batch cannot run with privacy.secure_aggregation=true: SecAgg+ quantises every value into "
            "a fixed range ([-8, 8]), and BatchNorm's running variances can lie outside it. Use model.norm=group "
            "with secure aggregation."
        )


def secure_aggregation_needs_fedavg(cfg: Config) -> None:
    """SecAgg+ reveals only the sum of the updates; every strategy but FedAvg needs each update."""
    if cfg.privacy.secure_aggregation and cfg.strategy.name != "fedavg":
        raise ConfigError(
            f"strategy={cfg.strategy.name} cannot run with privacy.secure_aggregation=true: SecAgg+ gives the "
            "coordinator only the sum of the updates, and this strategy needs each one. Use strategy=fedavg, or "
            "turn secure aggregation off."
        )


def compression_after_the_privacy(cfg: Config) -> None:
    """A compressed update is decoded at the coordinator; only local DP (noise added before) leaves it untouched."""
    if cfg.strategy.compression == "none":
        return
    if cfg.privacy.secure_aggregation:
        raise ConfigError(
            f"strategy.compression={cfg.strategy.compression} cannot run with secure aggregation "
            f"(privacy={cfg.privacy.name}, privacy.secure_aggregation=true): SecAgg+ quantises the updates itself "
            "before masking them. Set strategy.compression=none, or turn secure aggregation off."
        )
    if cfg.privacy.name == "central_dp":
        raise ConfigError(
            f"strategy.compression={cfg.strategy.compression} cannot run with privacy=central_dp: the coordinator "
            "adds noise sized for updates clipped to privacy.clipping_norm, and rounding a clipped update can push "
            "it past that norm, so the epsilon would not hold. Use strategy.compression=none, or privacy=dp (each "
            "hospital noises its update before compressing it)."
        )


def no_fedprox_with_dp(cfg: Config) -> None:
    """Opacus' per-sample gradients leave FedProx's proximal term out."""
    if isinstance(cfg.strategy, ProxConfig) and cfg.strategy.mu > 0 and cfg.privacy.name == "dp":
        raise ConfigError(
            "strategy=fedprox cannot run with privacy=dp yet: Opacus builds each update from per-sample "
            "gradients, which leave the proximal term out. Use strategy=fedavg (or another aggregator) with "
            "privacy=dp, or strategy.mu=0."
        )


def distributed_dp_trains_a_classifier_with_every_hospital(cfg: Config) -> None:
    """Distributed DP plans its noise shares for every hospital in every round, and steps with one gradient."""
    if cfg.privacy.name != "distributed_dp":
        return
    if cfg.task != "classify":
        raise ConfigError("privacy=distributed_dp trains classifiers only (task=classify); self-supervised "
                          "pretraining runs with privacy=dp.")
    if cfg.strategy.fraction_train < 1.0:
        raise ConfigError(
            f"privacy=distributed_dp sizes each hospital's noise share for all {cfg.federation.hospitals} hospitals "
            f"in every round's sum, but strategy.fraction_train={cfg.strategy.fraction_train} samples fewer; set "
            "strategy.fraction_train=1.0 (privacy.sample_rate samples the images instead).")
    if cfg.train.class_weighting != "none":
        raise ConfigError(
            f"train.class_weighting={cfg.train.class_weighting} cannot run with privacy=distributed_dp: each image's "
            "gradient is clipped and summed on its own, with the plain cross-entropy loss. Use "
            "train.class_weighting=none.")


def no_class_weighting_with_dp(cfg: Config) -> None:
    """Class weights computed from a hospital's labels couple every image's loss to the others' labels."""
    if cfg.privacy.name == "dp" and cfg.train.class_weighting != "none":
        raise ConfigError(
            f"train.class_weighting={cfg.train.class_weighting} cannot run with privacy=dp: the weights are "
            "computed from the hospital's training labels, so every image's loss would depend on the others' "
            "labels, which DP-SGD's epsilon does not account for. Use train.class_weighting=none with "
            "privacy=dp."
        )


def no_mixed_precision_with_dp(cfg: Config) -> None:
    """DP-SGD's per-sample clipping needs float32 gradients (:data:`AMP_UNDER_DP`)."""
    if cfg.privacy.name in ("dp", "distributed_dp") and cfg.train.amp in ("bf16", "fp16"):
        raise ConfigError(
            f"train.amp={cfg.train.amp} cannot run with privacy={cfg.privacy.name}: {AMP_UNDER_DP} Use "
            "train.amp=auto (float32 under DP) or train.amp=off."
        )


def folder_roots_match_hospitals(cfg: Config) -> None:
    """dataset=folder: one image folder per simulated hospital."""
    if isinstance(cfg.dataset, FolderConfig) and len(cfg.dataset.data_paths) != cfg.federation.hospitals:
        raise ConfigError(
            f"dataset.data_paths has {len(cfg.dataset.data_paths)} folders but federation.hospitals="
            f"{cfg.federation.hospitals}; each simulated hospital needs its own folder."
        )


def min_train_nodes_within_hospitals(cfg: Config) -> None:
    """A round cannot wait for more hospitals than the federation has."""
    if cfg.strategy.min_train_nodes > cfg.federation.hospitals:
        raise ConfigError(
            f"strategy.min_train_nodes={cfg.strategy.min_train_nodes} exceeds federation.hospitals="
            f"{cfg.federation.hospitals}; lower strategy.min_train_nodes or add hospitals."
        )


def _dataset_side(cfg: Config) -> int | None:
    """The side in pixels of the dataset's images (every source resizes to one), None when the source has none."""
    side = getattr(cfg.dataset, "size", None) or getattr(cfg.dataset, "image_size", None)
    return side if isinstance(side, int) else None


def _dataset_spatial_dims(cfg: Config) -> int:
    """2 for images, 3 for volumes (MedMNIST's 3D datasets end in ``3d``)."""
    dims = getattr(cfg.dataset, "spatial_dims", None)
    if isinstance(dims, int):
        return dims
    return 3 if str(getattr(cfg.dataset, "name", "")).endswith("3d") else 2


def scatternet_fits(cfg: Config) -> None:
    """The scattering transform needs images wider than 2^J, and its model has no encoder to pretrain or explain."""
    if cfg.model.name != "scatternet":
        return
    from medfed.common.config.model import ScatterNetConfig, require_scatter_scale

    side = _dataset_side(cfg)
    if isinstance(cfg.model, ScatterNetConfig) and side is not None:
        require_scatter_scale(cfg.model.scatter_j, side)
    if cfg.task == "ssl":
        raise ConfigError("task=ssl cannot pretrain model=scatternet: its front end is a fixed wavelet transform "
                          "with nothing to learn. Use task=classify, or model=smallcnn / resnet18 for SSL.")
    if cfg.evaluate.gradcam_samples > 0:
        raise ConfigError("evaluate.gradcam_samples needs a convolutional encoder to explain; model=scatternet has "
                          "none. Set evaluate.gradcam_samples=0, or use model=smallcnn / resnet18.")


def aug_views_need_a_fixed_front_end(cfg: Config) -> None:
    """Augmentation multiplicity averages views over a head whose features are computed once."""
    views = cfg.train.aug_views
    if views <= 1:
        return
    fixed = cfg.model.name == "scatternet" or cfg.model.finetune == "linear_probe"
    if not fixed or cfg.task == "ssl":
        raise ConfigError(
            f"train.aug_views={views} needs a model whose features are fixed and computed once per site "
            f"(model=scatternet, or model.finetune=linear_probe with model.pretrained); got model={cfg.model.name} "
            f"with model.finetune={cfg.model.finetune}{' and task=ssl' if cfg.task == 'ssl' else ''}. "
            "Set train.aug_views=1."
        )
    head = getattr(cfg.model, "head", None)
    if _dataset_spatial_dims(cfg) == 3 and head == "cnn":
        raise ConfigError(f"train.aug_views={views} is not supported for volumes with model.head=cnn (its 3D "
                          "convolutions take one view); use model.head=linear or train.aug_views=1.")


def audit_needs_a_classifier(cfg: Config) -> None:
    """The membership-inference audit scores images by the classifier's loss."""
    if cfg.evaluate.audit and cfg.task != "classify":
        raise ConfigError(f"evaluate.audit=true needs task=classify (the attack scores each image by the "
                          f"classifier's loss); task={cfg.task} has no classifier. Set evaluate.audit=false.")


RULES: tuple[Rule, ...] = (
    ssl_no_simclr_with_dp,
    ssl_dp_needs_hooks,
    ssl_no_personalization,
    ssl_has_no_predictions,
    ssl_trains_from_scratch,
    mc_dropout_needs_dropout,
    no_personalization_with_privacy,
    no_batch_norm_with_privacy,
    no_batch_norm_with_secure_aggregation,
    secure_aggregation_needs_fedavg,
    compression_after_the_privacy,
    no_fedprox_with_dp,
    no_class_weighting_with_dp,
    distributed_dp_trains_a_classifier_with_every_hospital,
    no_mixed_precision_with_dp,
    folder_roots_match_hospitals,
    min_train_nodes_within_hospitals,
    scatternet_fits,
    aug_views_need_a_fixed_front_end,
    audit_needs_a_classifier,
)
"""Every cross-section rule, in the order they are checked (the first broken one is reported)."""


def check_rules(cfg: Config, rules: tuple[Rule, ...] = RULES) -> None:
    """Check ``cfg`` against ``rules`` in order.

    Raises:
        ConfigError: from the first rule that does not hold.
    """
    for rule in rules:
        rule(cfg)
