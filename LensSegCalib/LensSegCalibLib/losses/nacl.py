"""NACL — Neighbour-Aware CaLibration loss (Murugesan et al.; METHODS.md section 6).

``L = CE + α · mean |τ − z|`` on the **logits** ``z``, ``τ_c(v)`` the proportion of class c in the k-window
around v. ``border="monai"`` (default, METHODS.md [R]) delegates to ``monai.losses.NACLLoss`` (outside the
image = no class); ``border="official"`` reproduces Bala93/MarginLoss ``AdaptMarginSVLS`` (outside = class 0;
``kernel_ops="gaussian"`` = the SVLS target with replicate border). The wrapper adds what MONAI's class lacks:
labels with or without a channel axis, C and 2D/3D taken from the input, float32 under autocast, validation.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ._utils import float32_compute, one_hot, prepare_inputs
from .svls import svls_targets

__all__ = ["NACLLoss"]


class NACLLoss(nn.Module):
    """Neighbour-aware calibration: CE plus an L1/L2 penalty pulling logits towards local class proportions.

    Args:
        num_classes: expected number of logit channels ``C``; ``None`` (default) takes it from the logits.
        kernel_size: window edge ``k`` (voxels) of the ``"mean"`` kernel. Defaults to 3. The official
            ``"gaussian"`` target is the 3×3 SVLS kernel (size fixed); MONAI's uses its own 9-tap Gaussian.
        kernel_ops: ``"mean"`` (default) or ``"gaussian"``.
        distance_type: ``"l1"`` (mean absolute, default) or ``"l2"`` (mean squared).
        alpha: weight of the penalty. Defaults to 0.1.
        sigma: σ (voxels) of the Gaussian kernel. Defaults to 1.0.
        border: ``"monai"`` (default; outside the image counts as no class — MONAI's NACLLoss, reused) or
            ``"official"`` (outside counts as class 0, as the paper's code). Only the outermost layer of
            voxels differs.

    Call ``loss(logits, labels)``: logits float ``(B, C, H, W)`` or ``(B, C, D, H, W)``, labels int ``(B, *S)`` or
    ``(B, 1, *S)``. Returns a float32 scalar on the logits' device.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        kernel_size: int = 3,
        kernel_ops: Literal["mean", "gaussian"] = "mean",
        distance_type: Literal["l1", "l2"] = "l1",
        alpha: float = 0.1,
        sigma: float = 1.0,
        border: Literal["monai", "official"] = "monai",
    ) -> None:
        super().__init__()
        if kernel_ops not in ("mean", "gaussian"):
            raise InputError(f"NACLLoss kernel_ops must be 'mean' or 'gaussian'; got {kernel_ops!r}.")
        if distance_type not in ("l1", "l2"):
            raise InputError(f"NACLLoss distance_type must be 'l1' or 'l2'; got {distance_type!r}.")
        if border not in ("monai", "official"):
            raise InputError(f"NACLLoss border must be 'monai' or 'official'; got {border!r}.")
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise InputError(f"NACLLoss kernel_size must be a positive odd integer; got {kernel_size!r}.")
        self.num_classes = num_classes
        self.kernel_size = int(kernel_size)
        self.kernel_ops = kernel_ops
        self.distance_type = distance_type
        self.alpha = float(alpha)
        self.sigma = float(sigma)
        self.border = border
        self._monai: dict[tuple[int, int], nn.Module] = {}

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, kernel_ops={self.kernel_ops!r}, "
                f"distance_type={self.distance_type!r}, "
                f"alpha={self.alpha}, sigma={self.sigma}, border={self.border!r}")

    def _monai_loss(self, num_classes: int, spatial_dims: int) -> nn.Module:
        key = (num_classes, spatial_dims)
        if key not in self._monai:
            from monai.losses import NACLLoss as _MonaiNACL

            self._monai[key] = _MonaiNACL(
                classes=num_classes, dim=spatial_dims, kernel_size=self.kernel_size, kernel_ops=self.kernel_ops,
                distance_type=self.distance_type, alpha=self.alpha, sigma=self.sigma,
            )
        return self._monai[key]

    def official_targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Official-border ``τ`` ``(B, C, *S)`` float32 from int64 labels ``(B, *S)`` (outside = class 0)."""
        if self.kernel_ops == "gaussian":
            return svls_targets(labels, num_classes, self.sigma)
        spatial = labels.ndim - 1
        half = self.kernel_size // 2
        # Pad the label map with class 0, then average the one-hot over each k-window (no padding needed).
        padded = F.pad(labels, (half, half) * spatial, mode="constant", value=0)
        onehot = one_hot(padded, num_classes, torch.float32)
        pool = F.avg_pool2d if spatial == 2 else F.avg_pool3d
        return pool(onehot, self.kernel_size, 1)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z, y = prepare_inputs(logits, labels, self.num_classes)
        with float32_compute(z.device):
            if self.border == "monai":
                return self._monai_loss(z.shape[1], y.ndim - 1)(z, y)
            ce = F.cross_entropy(z, y)
            diff = self.official_targets(y, z.shape[1]) - z
            penalty = diff.abs().mean() if self.distance_type == "l1" else diff.square().mean()
            return ce + self.alpha * penalty
