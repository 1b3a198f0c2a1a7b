"""SVLS — Spatially Varying Label Smoothing (Islam & Glocker, IPMI 2021; METHODS.md section 7).

Target = ½·one-hot + ½·(Gaussian-weighted mean of the neighbours' one-hots) with a replicate border; loss =
``mean_v −Σ_c target_c · log_softmax_c``. Same values as the official ``CELossWithSVLS`` (mobarakol/SVLS);
differences: 2D and 3D in one class, no hard-coded ``.cuda()``, float32 under autocast, only the kernel size
3 (the official code hard-codes the centre index, so other sizes are broken there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ._utils import float32_compute, one_hot, prepare_inputs

__all__ = ["SVLSLoss", "svls_kernel", "svls_targets"]


def svls_kernel(spatial_dims: int, sigma: float = 1.0) -> torch.Tensor:
    """The SVLS 3×3 (2D) or 3×3×3 (3D) kernel, float64, summing to 1 with centre weight ½.

    Gaussian ``exp(−|x − centre|²/(2σ²))`` normalised to sum 1; the centre weight is replaced by the sum of
    the others and the kernel divided by its new sum (official construction: centre 1, neighbours 1, /2).
    """
    if spatial_dims not in (2, 3):
        raise InputError(f"SVLS works in 2D or 3D; got spatial_dims={spatial_dims!r}.")
    if not sigma > 0:
        raise InputError(f"SVLS sigma must be > 0; got {sigma!r}.")
    offsets = torch.arange(-1.0, 2.0, dtype=torch.float64)
    grids = torch.meshgrid(*([offsets] * spatial_dims), indexing="ij")
    sq = sum(g.square() for g in grids)
    g = torch.exp(-sq / (2.0 * sigma**2))
    g = g / g.sum()
    centre = (1,) * spatial_dims
    neighbours = 1.0 - g[centre]
    g[centre] = neighbours
    return g / (2.0 * neighbours)


def svls_targets(labels: torch.Tensor, num_classes: int, sigma: float = 1.0) -> torch.Tensor:
    """SVLS soft targets: one-hot ``(B, C, *S)`` correlated with :func:`svls_kernel`, replicate border.

    Args:
        labels: int64 ``(B, H, W)`` or ``(B, D, H, W)``.
        num_classes: ``C``.
        sigma: Gaussian σ in voxels. Defaults to 1.

    Returns:
        float32 ``(B, C, *S)`` summing to 1 over C; equal to the one-hot away from interfaces.
    """
    spatial = labels.ndim - 1
    kernel = svls_kernel(spatial, sigma).to(device=labels.device, dtype=torch.float32)
    onehot = one_hot(labels, num_classes, torch.float32)
    padded = F.pad(onehot, (1, 1) * spatial, mode="replicate")
    weight = kernel.expand(num_classes, 1, *kernel.shape)
    conv = F.conv2d if spatial == 2 else F.conv3d
    return conv(padded, weight, groups=num_classes)


class SVLSLoss(nn.Module):
    """Cross-entropy against spatially varying label-smoothing targets (METHODS.md section 7).

    Args:
        sigma: σ (voxels) of the 3×3 / 3×3×3 Gaussian. Defaults to 1.0 (official ``CELossWithSVLS(sigma=1)``).
        num_classes: expected number of logit channels ``C``; ``None`` (default) accepts any.

    Call ``loss(logits, labels)`` with logits float ``(B, C, H, W)`` / ``(B, C, D, H, W)`` (3×3×3 kernel in 3D),
    labels int ``(B, *S)``/``(B, 1, *S)``; returns ``mean_v −Σ_c target_c log_softmax_c`` as a float32 scalar on
    the logits' device.
    """

    def __init__(self, sigma: float = 1.0, num_classes: int | None = None) -> None:
        super().__init__()
        svls_kernel(2, sigma)  # validates sigma
        self.sigma = float(sigma)
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z, y = prepare_inputs(logits, labels, self.num_classes)
        with float32_compute(z.device):
            target = svls_targets(y, z.shape[1], self.sigma)
            return -(target * torch.log_softmax(z, dim=1)).sum(dim=1).mean()
