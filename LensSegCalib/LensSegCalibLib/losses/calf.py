"""CALF — Conditionally Adaptive Loss Function (Alam et al., arXiv 2504.04458; METHODS.md section 5, [R]).

The dataset's foreground-size distribution (skewness S, excess kurtosis K) picks one transform ``T`` of the
true-class probability once, before training; the loss is ``−mean T(p_y)`` (or CE + soft Dice for
near-symmetric size distributions). No official code is public; this follows METHODS.md.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ._utils import float32_compute, one_hot, prepare_inputs

__all__ = ["CALFLoss", "CALF_BRANCHES", "calf_branch", "size_statistics"]

_log = logging.getLogger(__name__)
Branch = Literal["fisher", "logit", "arcsine", "log10", "ln", "bce_dice"]
CALF_BRANCHES: tuple[str, ...] = ("fisher", "logit", "arcsine", "log10", "ln", "bce_dice")
_CLAMP = 1e-7


def size_statistics(foreground_sizes: Sequence[float]) -> tuple[float, float]:
    """Population skewness and excess kurtosis (scipy ``skew``/``kurtosis`` defaults) of the sizes.

    Args:
        foreground_sizes: one foreground size per training case (voxel count, or mm³ for mixed spacings).

    Returns:
        ``(S, K)``; both NaN when all sizes are equal.
    """
    a = np.asarray(foreground_sizes, dtype=np.float64).reshape(-1)
    if a.size < 2 or not np.all(np.isfinite(a)):
        raise InputError(f"CALF needs at least two finite foreground sizes (one per training case); got {a.size}.")
    centred = a - a.mean()
    var = np.mean(centred**2)
    if var == 0:
        return float("nan"), float("nan")
    return float(np.mean(centred**3) / var**1.5), float(np.mean(centred**4) / var**2 - 3.0)


def calf_branch(skewness: float, kurtosis: float) -> str:
    """Branch of METHODS.md 5.2 for ``(S, K)`` (order matters; NaN → ``"bce_dice"``)."""
    s, k = float(skewness), float(kurtosis)
    if math.isnan(s):
        return "bce_dice"
    if s <= -1.0:
        return "fisher"
    if s <= -0.5:
        return "logit"
    if s < 0.0:
        return "arcsine"
    if s >= 1.0:
        return "log10"
    if s >= 0.5:
        return "ln"
    if s > 0.0 and k < 0.0:
        return "log10"
    return "bce_dice"


def _transform(branch: str, p: torch.Tensor) -> torch.Tensor:
    if branch == "fisher":
        return torch.atanh(p)
    if branch == "logit":
        return torch.log(p / (1.0 - p))
    if branch == "arcsine":
        return torch.asin(torch.sqrt(p))
    if branch == "log10":
        return torch.log10(p)
    return torch.log(p)  # "ln"


class CALFLoss(nn.Module):
    """Conditionally adaptive loss: a transform of ``p_y`` chosen once from the dataset's foreground sizes.

    Give either ``foreground_sizes`` (one per training case), or ``skewness`` and ``kurtosis``, or ``branch``.
    The branch is decided in the constructor, logged, and exposed as :attr:`branch` (it never changes between
    steps, unlike per-batch statistics). Branches (METHODS.md 5.2): ``S ≤ −1`` fisher, ``−1 < S ≤ −0.5``
    logit, ``−0.5 < S < 0`` arcsine, ``S ≥ 1`` log10, ``0.5 ≤ S < 1`` ln, ``0 < S < 0.5`` with ``K < 0``
    log10, otherwise (incl. constant sizes) bce_dice.

    Loss: ``−mean T(p_y)`` with ``p_y`` the softmax probability of the true class clamped to
    ``[1e-7, 1 − 1e-7]``; ``bce_dice`` = ``−mean ln p_y`` (clamped) ``+ 1 − (2Σ p_c y_c + 1e-7)/(Σ p_c + Σ y_c
    + 1e-7)``, sums over all foreground classes ``c ≥ 1`` and voxels of the batch (pooled Dice, p unclamped).
    For C = 2 this equals the paper's binary sigmoid form.

    Args:
        foreground_sizes: per-case foreground sizes (voxel counts, or mm³ for mixed spacings).
        skewness: precomputed ``S`` (needs ``kurtosis`` too).
        kurtosis: precomputed excess kurtosis ``K``.
        branch: force a branch (one of :data:`CALF_BRANCHES`), e.g. the one logged by a previous run.
        num_classes: expected number of logit channels ``C``; ``None`` (default) accepts any.

    Call ``loss(logits, labels)``; returns a float32 scalar on the logits' device. The fisher and logit
    branches are negative and bounded only by the clamp.
    """

    def __init__(
        self,
        foreground_sizes: Sequence[float] | None = None,
        skewness: float | None = None,
        kurtosis: float | None = None,
        branch: Branch | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        given = sum(x is not None for x in (foreground_sizes, skewness if kurtosis is None else kurtosis, branch))
        if (skewness is None) != (kurtosis is None):
            raise InputError("CALFLoss needs both skewness and kurtosis (or neither).")
        if given != 1:
            raise InputError("CALFLoss needs exactly one of: foreground_sizes (one per training case), "
                             "skewness + kurtosis, or branch.")
        self.skewness: float | None = None
        self.kurtosis: float | None = None
        if branch is not None:
            if branch not in CALF_BRANCHES:
                raise InputError(f"unknown CALF branch {branch!r}; valid: {', '.join(CALF_BRANCHES)}.")
            self.branch = str(branch)
        else:
            if foreground_sizes is not None:
                skewness, kurtosis = size_statistics(foreground_sizes)
            self.skewness, self.kurtosis = float(skewness), float(kurtosis)  # type: ignore[arg-type]
            self.branch = calf_branch(self.skewness, self.kurtosis)
        self.num_classes = num_classes
        _log.info("CALF branch %s (skewness %s, excess kurtosis %s)", self.branch, self.skewness, self.kurtosis)

    def extra_repr(self) -> str:
        return f"branch={self.branch!r}, skewness={self.skewness}, kurtosis={self.kurtosis}"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z, y = prepare_inputs(logits, labels, self.num_classes)
        with float32_compute(z.device):
            p = torch.softmax(z, dim=1)
            p_y = p.gather(1, y.unsqueeze(1)).clamp(_CLAMP, 1.0 - _CLAMP)
            if self.branch != "bce_dice":
                return -_transform(self.branch, p_y).mean()
            ce = -torch.log(p_y).mean()
            fg_p = p[:, 1:]
            fg_y = one_hot(y, z.shape[1], p.dtype)[:, 1:]
            dice = (2.0 * (fg_p * fg_y).sum() + 1e-7) / (fg_p.sum() + fg_y.sum() + 1e-7)
            return ce + 1.0 - dice
