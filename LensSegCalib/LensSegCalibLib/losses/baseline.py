"""Baselines: plain cross-entropy (``"ce"``) and MONAI Dice + CE (``"dicece"``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import float32_compute, prepare_inputs

__all__ = ["CELoss", "DiceCELoss"]


class CELoss(nn.Module):
    """Plain multi-class cross-entropy, mean over all voxels of the batch (``F.cross_entropy``).

    Args:
        num_classes: expected number of logit channels ``C``; ``None`` (default) accepts any.

    Call ``loss(logits, labels)`` with logits float ``(B, C, *S)`` and labels int ``(B, *S)``/``(B, 1, *S)``;
    returns a float32 scalar on the logits' device. Computed in float32 even under autocast.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z, y = prepare_inputs(logits, labels, self.num_classes)
        with float32_compute(z.device):
            return F.cross_entropy(z, y)


class DiceCELoss(nn.Module):
    """Soft Dice + cross-entropy: ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``.

    Args:
        num_classes: expected number of logit channels ``C``; ``None`` (default) accepts any.
        include_background: include class 0 in the Dice term. Defaults to True (MONAI default).
        lambda_dice: weight of the Dice term. Defaults to 1.0.
        lambda_ce: weight of the CE term. Defaults to 1.0.
        smooth_nr: Dice numerator smoothing. Defaults to 1e-5 (MONAI).
        smooth_dr: Dice denominator smoothing. Defaults to 1e-5 (MONAI).
        batch: pool the Dice sums over the batch before dividing. Defaults to False (MONAI).

    MONAI's Dice is the mean over the batch and classes of ``1 − (2Σpy + nr)/(Σp + Σy + dr)``; the CE is
    ``F.cross_entropy`` (mean). Computed in float32 even under autocast.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        include_background: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
    ) -> None:
        super().__init__()
        from monai.losses import DiceCELoss as _MonaiDiceCE

        self.num_classes = num_classes
        self.inner = _MonaiDiceCE(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z, y = prepare_inputs(logits, labels, self.num_classes)
        with float32_compute(z.device):
            return self.inner(z, y[:, None])
