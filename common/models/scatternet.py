"""``scatternet``: a fixed wavelet-scattering front end and a small trainable head (privacy-cheap features).

Tramer and Boneh ("Differentially Private Learning Needs Better Features (or Much More Data)", ICLR 2021) showed
that on small data, DP-SGD on a linear model or a small CNN over ScatterNet features beats end-to-end CNNs: the
front end is a fixed, data-independent transform, so it costs no privacy and only a few weights must survive the
noise.

The front end is kymatio's 2D scattering transform (``J`` scales, ``L`` orientations: ``1 + J L + L^2 J (J-1) / 2``
coefficient maps per input channel at ``1 / 2^J`` of the resolution; 81 maps of 7 x 7 for J=2, L=8 on 28 px).
kymatio is the maintained implementation; medfed imports only its 2D torch front end
(``kymatio.scattering2d.frontend.torch_frontend``) because ``kymatio.torch`` also loads the 3D solid-harmonic front
end, which fails with current SciPy (``scipy.special.sph_harm`` is gone). Volumes ``(B, C, D, H, W)`` are scattered
slice by slice along ``D`` (a 2D transform per slice; the head then sees ``(B, F, D, H', W')``).

The front end holds no parameters and is kept *outside* the module tree: the model's state dict (what a hospital
sends) is the head's weights only, and :meth:`ScatterNet.front_features` gives the fixed features that a hospital
computes once and caches (:mod:`medfed.client.frozen_features`). Features are normalised per image (a GroupNorm
without weights over groups of coefficient maps): no statistic of other images is read, so nothing private enters.

The head maps features with a *views* axis ``(B, V, F, *spatial)`` to per-view logits ``(B, V, n_classes)``, so a
DP step can average several augmented views of an image into its one per-sample gradient (augmentation
multiplicity): the linear head applies one ``nn.Linear`` to ``(B, V, F')`` (Opacus sums its per-sample gradient
over the views), the 2D CNN head convolves ``(B, F, V, H, W)`` with ``(1, 3, 3)`` kernels (the views a depth axis
that no kernel crosses) and normalises each view on its own (GroupNorm without weights, views folded into the
batch). Volumes take one view.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from medfed.common.config.model import require_scatter_scale
from medfed.common.errors import ConfigError
from medfed.common.models.registry import register_model
from torch import nn

__all__ = ["ScatterNet", "scatter_channels", "scatternet"]

logger = logging.getLogger(__name__)

HEADS = ("linear", "cnn")


def scatter_channels(j: int, l: int) -> int:
    """Coefficient maps per input channel of a 2D scattering transform of order 2 with ``j`` scales, ``l`` angles."""
    return 1 + j * l + l * l * j * (j - 1) // 2


def _norm_groups(channels: int) -> int:
    """Groups of the fixed per-image normalisation: the most groups of at least three maps that divide ``channels``."""
    for groups in range(max(1, channels // 3), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class _ScatterEncoder(nn.Module):
    """The model's ``encoder`` (what representation analyses embed with): the fixed features averaged over space,
    ``(B, F)``. No parameters or buffers, so it adds nothing to the state dict."""

    def __init__(self, features: Any) -> None:
        super().__init__()
        self._features = features  # the owner's bound front_features (a plain attribute, not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._features(x)
        return out.mean(dim=tuple(range(2, out.ndim)))


class ScatterNet(nn.Module):
    """Scattering front end (fixed, no parameters, not in the state dict) and a trainable head.

    Args:
        spatial_dims: 2 (images) or 3 (volumes, scattered slice by slice).
        in_channels: input channels, >= 1.
        n_classes: output logits, >= 2.
        head: ``linear`` or ``cnn``.
        scatter_j: scales J of the transform (the image side must exceed 2^J).
        scatter_l: orientations L.
        pool: the linear head average-pools each coefficient map to a ``pool`` grid per spatial axis.
        width: channels of the CNN head's convolutions.
        dropout: dropout probability before the last linear layer.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        n_classes: int,
        head: str = "linear",
        scatter_j: int = 2,
        scatter_l: int = 8,
        pool: int = 2,
        width: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"model.head={head!r} is not a scatternet head; choose one of: {', '.join(HEADS)}.")
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims={spatial_dims!r} is not supported; choose 2 or 3.")
        self.spatial_dims, self.scatter_j, self.scatter_l, self.pool = spatial_dims, scatter_j, scatter_l, pool
        self.kind = head
        self.num_features = in_channels * scatter_channels(scatter_j, scatter_l)
        features = self.num_features
        self.normalise = nn.GroupNorm(_norm_groups(features), features, affine=False)
        self.dropout = nn.Dropout(dropout)
        if head == "linear":
            self.head = nn.Linear(features * pool**spatial_dims, n_classes)
        else:
            depth = 1 if spatial_dims == 2 else 3  # 2D: the views are the depth axis, never crossed by a kernel
            kernel, padding = (depth, 3, 3), (depth // 2, 1, 1)
            self.conv1 = nn.Conv3d(features, width, kernel, padding=padding)
            # without weights, so that each view is normalised on its own (folded into the batch) and DP-SGD's
            # per-image gradients never see a layer whose batch is images x views
            self.norm1 = nn.GroupNorm(_norm_groups(width), width, affine=False)
            self.conv2 = nn.Conv3d(width, width, kernel, padding=padding)
            self.norm2 = nn.GroupNorm(_norm_groups(width), width, affine=False)
            self.act = nn.ReLU()
            self.head = nn.Linear(width, n_classes)
        # the transform per (image side, device), built on first use; a plain dict, so not part of the module tree
        self._fronts: dict[tuple[int, int, str], Any] = {}
        self.encoder = _ScatterEncoder(self.front_features)

    def front_key(self) -> str:
        """What identifies the front end's output (the feature cache's key): transform, version and settings."""
        import importlib.metadata

        return f"kymatio-{importlib.metadata.version('kymatio')}-scatter2d-J{self.scatter_j}-L{self.scatter_l}"

    def _front(self, height: int, width: int, device: torch.device) -> Any:
        key = (height, width, str(device))
        if key not in self._fronts:
            require_scatter_scale(self.scatter_j, min(height, width))
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

            self._fronts[key] = ScatteringTorch2D(J=self.scatter_j, shape=(height, width), L=self.scatter_l).to(device)
        return self._fronts[key]

    @torch.no_grad()
    def front_features(self, images: torch.Tensor) -> torch.Tensor:
        """The fixed features ``(B, F, *spatial')`` of images ``(B, C, *spatial)``, normalised per image."""
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(f"scatternet expects {self.spatial_dims + 2}-d input, got shape {tuple(images.shape)}.")
        if self.spatial_dims == 2:
            out = self._front(images.shape[-2], images.shape[-1], images.device)(images.contiguous())
            out = out.flatten(1, 2)  # (B, C, K, H', W') -> (B, C*K, H', W')
        else:
            b, c, d, h, w = images.shape
            slices = images.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
            out = self._front(h, w, images.device)(slices.contiguous()).flatten(1, 2)
            out = out.reshape(b, d, *out.shape[1:]).transpose(1, 2)  # (B, C*K, D, H', W')
        return self.normalise(out)

    def head_views(self, features: torch.Tensor) -> torch.Tensor:
        """Per-view logits ``(B, V, n_classes)`` of features ``(B, V, F, *spatial')`` (or ``(B, F, *spatial')``, one
        view)."""
        if features.ndim == self.spatial_dims + 2:
            features = features.unsqueeze(1)
        b, v = features.shape[:2]
        if self.kind == "linear":
            pooled = nn.functional.adaptive_avg_pool2d(features.flatten(0, 1), self.pool) if self.spatial_dims == 2 \
                else nn.functional.adaptive_avg_pool3d(features.flatten(0, 1), self.pool)
            return self.head(self.dropout(pooled.reshape(b, v, -1)))
        if self.spatial_dims == 2:
            x = features.transpose(1, 2)  # (B, F, V, H', W'): the views as depth
        elif v == 1:
            x = features[:, 0]
        else:
            raise ValueError("the scatternet CNN head takes one view of a volume (train.aug_views=1 for 3D data).")
        x = self.act(self._per_view(self.norm1, self.conv1(x)))
        x = self.act(self._per_view(self.norm2, self.conv2(x)))
        if self.spatial_dims == 2:
            pooled = x.mean(dim=(3, 4)).transpose(1, 2)  # (B, V, width)
        else:
            pooled = x.mean(dim=(2, 3, 4)).unsqueeze(1)  # (B, 1, width)
        return self.head(self.dropout(pooled))

    def _per_view(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``norm`` of each view alone: 2D ``(B, C, V, H, W)`` is normalised as ``B x V`` images (volumes: one view)."""
        if self.spatial_dims == 3:
            return norm(x)
        b, c, v, h, w = x.shape
        folded = x.transpose(1, 2).reshape(b * v, c, h, w)
        return norm(folded).reshape(b, v, c, h, w).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` of images ``(B, C, *spatial)``."""
        return self.head_views(self.front_features(x)).mean(dim=1)


@register_model("scatternet")
def scatternet(
    *, spatial_dims: int, in_channels: int, n_classes: int, width: int, dropout: float, norm: str,
    head: str = "linear", scatter_j: int = 2, scatter_l: int = 8, pool: int = 2,
) -> ScatterNet:
    """Factory of ``model=scatternet`` (GroupNorm only: ``norm`` must be ``group``)."""
    if norm != "group":
        raise ConfigError(f"model.norm={norm!r} is not supported by scatternet; it normalises with GroupNorm only.")
    return ScatterNet(spatial_dims=spatial_dims, in_channels=in_channels, n_classes=n_classes, head=head,
                      scatter_j=scatter_j, scatter_l=scatter_l, pool=pool, width=width, dropout=dropout)
