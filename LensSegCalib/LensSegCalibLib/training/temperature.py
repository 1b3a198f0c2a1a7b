"""Post-hoc temperature scaling (Guo et al. 2017): one scalar T > 0, probabilities = softmax(logits / T).

Fitted on validation phantoms by minimising the NLL over ``log T`` with LBFGS (optimising the log keeps T
positive without constraints). T > 1 softens an over-confident model; argmax, hence Dice, never changes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["fit_temperature", "apply_temperature", "temperature_nll"]

T_MIN, T_MAX = 0.05, 20.0


def _flatten(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim == 2:  # already (N, C)
        z, y = logits, labels.reshape(-1)
        m = None if mask is None else mask.reshape(-1)
    else:  # (B, C, *S) -> (N, C)
        c = logits.shape[1]
        z = logits.movedim(1, -1).reshape(-1, c)
        y = labels.reshape(-1)
        m = None if mask is None else mask.reshape(-1)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"logits give {z.shape[0]} voxels but labels {y.shape[0]}: shapes must match.")
    if m is not None:
        z, y = z[m.bool()], y[m.bool()]
    return z.float(), y.long()


def temperature_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                    mask: torch.Tensor | None = None) -> float:
    """Mean NLL of ``softmax(logits / T)`` (logits ``(N, C)`` or ``(B, C, *S)``, labels matching)."""
    z, y = _flatten(logits, labels, mask)
    with torch.no_grad():
        return float(F.cross_entropy(z / float(temperature), y))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None,
                    max_iter: int = 100, init: float = 1.0) -> float:
    """Fit T minimising the NLL of ``softmax(logits / T)``.

    Args:
        logits: ``(N, C)`` or ``(B, C, *S)`` float (any device; computed in float32 there).
        labels: ``(N,)`` or ``(B, *S)`` integer labels.
        mask: optional bool, same shape as labels: only these voxels count (e.g. a subsample).
        max_iter: LBFGS iterations (strong-Wolfe line search; converges in ~10 on a 1-parameter problem).
        init: starting temperature.

    Returns:
        T as a Python float, clipped to [0.05, 20].
    """
    z, y = _flatten(logits.detach(), labels.detach(), mask)
    if z.shape[0] == 0:
        raise ValueError("No voxel to fit the temperature on: pass a non-empty validation set.")
    log_t = torch.tensor([math.log(init)], device=z.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, T_MIN), T_MAX)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` over the channel axis 1 (``(B, C, *S)``) in float32; a new tensor."""
    return torch.softmax(logits.float() / float(temperature), dim=1)
