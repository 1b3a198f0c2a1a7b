"""Calibration-aware segmentation losses and ``build_loss`` (METHODS.md sections 1, 4–8).

Every loss is called as ``loss(logits, labels)`` with logits float ``(B, C, H, W)`` or ``(B, C, D, H, W)`` and
integer labels ``(B, *S)`` or ``(B, 1, *S)``; it returns a differentiable float32 scalar on the logits' device,
computed in float32 even under autocast (fp16/bf16). ``SDCLoss`` and ``RegionWiseLoss`` also take distance
maps precomputed once per sample (:func:`sdc_targets`, :func:`rrw_maps`).

Example:
    >>> import torch
    >>> from LensSegCalibLib.losses import build_loss
    >>> loss = build_loss("acw", q=0.5, alpha=0.5)
    >>> logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    >>> labels = torch.randint(0, 4, (2, 8, 8))
    >>> loss(logits, labels).backward()
"""
from __future__ import annotations

import inspect

from torch import nn

from ..errors import InputError
from .acw import ACWLoss, ACWThresholdScheduler, exact_quantile
from .baseline import CELoss, DiceCELoss
from .calf import CALF_BRANCHES, CALFLoss, calf_branch, size_statistics
from .nacl import NACLLoss
from .region_wise import RegionWiseLoss, rrw_maps
from .sdc import SDCLoss, sam_targets, sdc_targets, signed_distance_maps
from .svls import SVLSLoss, svls_kernel, svls_targets

__all__ = [
    "ACWLoss",
    "ACWThresholdScheduler",
    "CALFLoss",
    "CALF_BRANCHES",
    "CELoss",
    "DiceCELoss",
    "LOSSES",
    "NACLLoss",
    "RegionWiseLoss",
    "SDCLoss",
    "SVLSLoss",
    "build_loss",
    "calf_branch",
    "exact_quantile",
    "rrw_maps",
    "sam_targets",
    "sdc_targets",
    "signed_distance_maps",
    "size_statistics",
    "svls_kernel",
    "svls_targets",
]

#: Loss names accepted by :func:`build_loss` and the classes they build.
LOSSES: dict[str, type[nn.Module]] = {
    "ce": CELoss,
    "dicece": DiceCELoss,
    "acw": ACWLoss,
    "sdc": SDCLoss,
    "nacl": NACLLoss,
    "svls": SVLSLoss,
    "rrw": RegionWiseLoss,
    "calf": CALFLoss,
}


def build_loss(name: str, **params: object) -> nn.Module:
    """Build a loss by name with keyword parameters (as stored in the model catalog's ``"loss"`` entry).

    Args:
        name: one of ``"ce", "dicece", "acw", "sdc", "nacl", "svls", "rrw", "calf"`` (case-insensitive).
        **params: constructor arguments of that loss class (see its docstring); every class accepts
            ``num_classes``. Defaults are METHODS.md's.

    Returns:
        The loss module; call it as ``loss(logits, labels)``.

    Raises:
        InputError: unknown name (the message lists the valid ones) or a parameter the loss does not take.
    """
    key = str(name).strip().lower()
    if key not in LOSSES:
        raise InputError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}.")
    cls = LOSSES[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InputError(
            f"loss {key!r} does not take parameter(s) {', '.join(unknown)}; it accepts: {', '.join(accepted)}."
        )
    return cls(**params)
