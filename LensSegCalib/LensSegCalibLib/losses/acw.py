"""ACW — Adaptive Confidence-Wise loss (Liu et al., arXiv 2508.08705; METHODS.md section 1).

The official rule (XiaoLing12138/Adaptive-Confidence-Wise-Loss ``loss/ACWLoss.py``): split the voxels of the
batch at the q-quantile ``t`` of the true-class probability ``p_y`` into a high group ``p_y > t`` and a low
group ``p_y <= t`` and weight their mean NLLs by ``α`` and ``2 − α``. Differences to the official code, all
leaving its 2D values unchanged: works in 3D (voxel order does not matter), stays on the input's device (no
``.cpu()``/``.cuda()`` round trip), exact quantile without torch.quantile's 2^24-element limit (a selection,
not a sort), a fused backward (same gradient, half the work), float32 under autocast, optional per-class
thresholds, and a training callback for the adaptive threshold of the paper.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError
from ._utils import float32_compute, prepare_inputs

__all__ = ["ACWLoss", "ACWThresholdScheduler", "exact_quantile"]

_log = logging.getLogger(__name__)
_TORCH_QUANTILE_LIMIT = 2**24  # torch.quantile raises above this many elements (METHODS.md 1.4)


def _kth_and_next(values: torch.Tensor, k: int, pair: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``-th smallest (1-based) of a 1-D tensor and, if ``pair``, the ``(k+1)``-th (``k < numel``).

    The second one needs no second selection: it is the first one again when at least ``k + 1`` elements are
    ``<=`` it (ties), else the smallest element above it (one comparison pass, no host sync).
    """
    v1 = values.kthvalue(k).values
    if not pair:
        return v1, v1
    above = torch.where(values > v1, values, torch.full_like(v1, float("inf"))).amin()
    return v1, torch.where((values <= v1).sum() > k, v1, above)


def _order_statistics(flat: torch.Tensor, k: int, pair: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k``-th and (``pair``) ``(k+1)``-th smallest elements of a 1-D tensor (1-based, exact).

    On large CPU inputs a strided sample brackets the wanted ranks (Floyd–Rivest): one counting pass, one
    masked selection, then the selection on the ~5 % of elements inside the bracket; the full selection is
    the fallback whenever the bracket misses (the result is exact either way, only the time differs). On
    CUDA ``kthvalue`` (radix select) is used directly: no host synchronisation.
    """
    n = flat.numel()
    pair = pair and k < n
    if flat.device.type == "cpu" and n >= 1 << 16:
        sample = flat[:: max(1, n // 16384)]
        ns = sample.numel()
        centre = (k - 0.5) / n * ns
        margin = 3.0 * math.sqrt(ns)  # ~3 standard deviations of a sample rank
        lo_v = sample.kthvalue(max(1, int(centre - margin))).values
        hi_v = sample.kthvalue(min(ns, int(centre + margin) + 1)).values
        n_below = int((flat < lo_v).sum())
        inside = torch.masked_select(flat, (flat >= lo_v) & (flat <= hi_v))
        if n_below < k and n_below + inside.numel() >= k + int(pair):
            return _kth_and_next(inside, k - n_below, pair)
    return _kth_and_next(flat, k, pair)


def exact_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of all elements of ``x``, exact and without a size limit.

    Bit-identical to ``torch.quantile(x.flatten(), q)`` wherever that runs (``numel <= 2^24``): the rank
    ``q·(n − 1)`` is formed in ``x``'s dtype exactly as ATen does and the two order statistics are
    interpolated with ``torch.lerp``. Above 2^24 elements the rank is formed in float64 from the Python
    float ``q`` (float32 cannot hold ``n − 1`` exactly any more).

    Cost: a selection (O(n)), never a sort; see :func:`_order_statistics`. Not differentiable (thresholds).

    Args:
        x: tensor of any shape, at least one element, no NaN (float16/bfloat16/integers are taken as float32).
        q: quantile level in ``[0, 1]``.

    Returns:
        0-d tensor on ``x``'s device, float64 for float64 input, else float32.

    Raises:
        InputError: empty ``x`` or ``q`` outside ``[0, 1]``.
    """
    if not 0.0 <= float(q) <= 1.0:
        raise InputError(f"quantile level q must lie in [0, 1]; got {q!r}.")
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # half types: float16 cannot even hold the rank n - 1 above 65504
    n = flat.numel()
    if n == 0:
        raise InputError("cannot take a quantile of an empty tensor; check that the batch has voxels.")
    if n <= _TORCH_QUANTILE_LIMIT:
        # Same arithmetic as ATen's quantile: rank = q * (n - 1) in the input dtype (CPU scalar, no sync).
        rank = torch.tensor(float(q), dtype=flat.dtype) * (n - 1)
        lo = int(rank.floor())
        weight = (rank - lo).to(flat.device)
        has_fraction = bool(rank != lo)
    else:
        rank64 = float(q) * (n - 1)
        lo = min(int(math.floor(rank64)), n - 1)
        weight = torch.tensor(rank64 - lo, dtype=flat.dtype, device=flat.device)
        has_fraction = rank64 != lo
    pair = has_fraction and lo + 1 < n
    v_lo, v_hi = _order_statistics(flat, lo + 1, pair)
    # lerp(v_lo, v_hi, 0) == v_lo exactly, as torch.quantile gives for an integer rank.
    return torch.lerp(v_lo, v_hi, weight) if pair else v_lo


class _WeightedTrueClassNLL(torch.autograd.Function):
    """``Σ_i w_i · −log(p_y,i + eps)`` with ``p = softmax(z)`` and weights ``w = weights_fn(p_y)``.

    The weights (group sizes and the detached threshold) are piecewise constant in ``z``, so their gradient
    is zero, as in the official code. The fused backward ``∂/∂z = w·p_y/(p_y + eps) · (p − onehot(y))`` costs
    one pass instead of autograd's gather-scatter plus softmax backward (about half the ACW step on CPU).
    """

    @staticmethod
    def forward(ctx, z, y, weights_fn, eps):  # type: ignore[override]
        p = torch.softmax(z, dim=1)
        p_y = p.gather(1, y.unsqueeze(1)).reshape(-1)
        w = weights_fn(p_y)
        denom = p_y + eps
        ctx.save_for_backward(p, y, w * p_y / denom)
        return -(w * torch.log(denom)).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        p, y, coef = ctx.saved_tensors
        c = (coef * grad_output).reshape(y.shape).unsqueeze(1)
        grad = p * c
        grad.scatter_add_(1, y.unsqueeze(1), -c)
        return grad, None, None, None


class ACWLoss(nn.Module):
    """Adaptive Confidence-Wise loss (official rule, METHODS.md 1.1; per-class option 1.3).

    ``loss = α · mean_{p_y > t} −log(p_y + eps) + (2 − α) · mean_{p_y <= t} −log(p_y + eps)`` with
    ``t = quantile(p_y, q)`` over all voxels of the batch (all classes pooled), ``p_y`` the softmax probability
    of the true class. Ties go to the low group, ``t`` is detached, an empty group contributes 0 (e.g. when
    the softmax saturates and ``t = 1``). With ``α = 1`` and ``q = 0.5`` the loss is 2 × CE.

    Args:
        q: quantile level of the confidence threshold, in ``[0, 1]``. Defaults to 0.5 (METHODS.md [R]; the
            official class has no default). An :class:`ACWThresholdScheduler` may change it between epochs.
        alpha: weight of the high-confidence group, in ``[0, 2]``; the low group gets ``2 − alpha``.
            Defaults to 0.5 (METHODS.md [R]): ``alpha < 1`` up-weights the low-confidence voxels.
        per_class: one threshold per ground-truth class (over that class's voxels of the whole batch); the
            loss is then the mean over the classes present in the batch. Defaults to False (official: pooled).
        eps: added inside the log, ``log(p + eps)``; caps a voxel's loss at ``−ln(eps)``. Defaults to 1e-7.
        num_classes: expected number of logit channels ``C``; ``None`` (default) accepts any.

    Call ``loss(logits, labels)``: logits float ``(B, C, H, W)`` or ``(B, C, D, H, W)``, labels int ``(B, *S)``
    or ``(B, 1, *S)``. Returns a float32 scalar on the logits' device (float32 even under autocast).

    Example:
        >>> import torch
        >>> loss = ACWLoss(q=0.5, alpha=1.0)
        >>> z, y = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
        >>> round(float(loss(z, y)), 6)  # 2 × CE = 2 ln 2 (up to eps)
        1.386294
    """

    def __init__(
        self,
        q: float = 0.5,
        alpha: float = 0.5,
        per_class: bool = False,
        eps: float = 1e-7,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(q) <= 1.0:
            raise InputError(f"ACWLoss q must lie in [0, 1]; got {q!r}.")
        if not 0.0 <= float(alpha) <= 2.0:
            raise InputError(f"ACWLoss alpha must lie in [0, 2] (the low group gets 2 - alpha); got {alpha!r}.")
        if not eps > 0:
            raise InputError(f"ACWLoss eps must be > 0; got {eps!r}.")
        self.q = float(q)
        self.alpha = float(alpha)
        self.per_class = bool(per_class)
        self.eps = float(eps)
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"q={self.q}, alpha={self.alpha}, per_class={self.per_class}, eps={self.eps}"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z, y = prepare_inputs(logits, labels, self.num_classes)
        with float32_compute(z.device):
            if self.per_class:
                flat_y = y.reshape(-1)
                return _WeightedTrueClassNLL.apply(
                    z, y, lambda p_y: self._per_class_weights(p_y, flat_y, z.shape[1]), self.eps
                )
            return _WeightedTrueClassNLL.apply(z, y, self._pooled_weights, self.eps)

    def _group_weights(self, p_y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-voxel weights ``α/|H|`` (``p_y > t``) or ``(2 − α)/|L|``; an empty group simply has no voxels."""
        high = (p_y > t).to(p_y.dtype)
        n_high = high.sum()
        n_low = high.numel() - n_high
        w_high = self.alpha / n_high.clamp(min=1)
        w_low = (2.0 - self.alpha) / n_low.clamp(min=1)
        return high * (w_high - w_low) + w_low  # arithmetic select: ~3× faster than torch.where on CPU

    def _pooled_weights(self, p_y: torch.Tensor) -> torch.Tensor:
        return self._group_weights(p_y, exact_quantile(p_y, self.q))

    def _per_class_weights(self, p_y: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        counts = torch.bincount(y, minlength=num_classes).tolist()  # one sync: which classes are present
        present = [c for c, n in enumerate(counts) if n > 0]
        w = torch.zeros_like(p_y)
        for c in present:
            sel = y == c
            p_c = p_y[sel]
            w[sel] = self._group_weights(p_c, exact_quantile(p_c, self.q)) / len(present)
        return w


@dataclass
class ACWThresholdScheduler:
    """Adaptive quantile level for :class:`ACWLoss`: a hill climb on validation IoU (METHODS.md 1.2, [R]).

    Call :meth:`step` after each validation epoch with the mean foreground IoU ``J``. The first call only
    records ``J``. Each later call: if ``J <= J_previous`` (equal = no improvement) the direction flips and the
    step halves; then, if the step is still ``>= min_delta``, ``q ← clip(q + direction·delta, *bounds)``,
    otherwise ``q`` is frozen for the rest of training. ``J_previous`` is always the previous epoch's ``J``.
    When ``loss`` is given its ``q`` is updated in place; every step is logged and kept in ``history``.

    Args:
        loss: the :class:`ACWLoss` to drive, or ``None`` to only compute ``q``.
        q: starting quantile level. Defaults to 0.5.
        delta: starting step. Defaults to 0.1.
        direction: starting direction, +1 or −1. Defaults to +1.
        bounds: ``(low, high)`` clip range for ``q``. Defaults to ``(0.1, 0.9)``.
        min_delta: smallest step still taken; below it ``q`` freezes. Defaults to 0.0125.

    Example:
        >>> sched = ACWThresholdScheduler()
        >>> [round(sched.step(j), 4) for j in (0.50, 0.60, 0.55)]
        [0.5, 0.6, 0.55]
    """

    loss: ACWLoss | None = None
    q: float = 0.5
    delta: float = 0.1
    direction: int = 1
    bounds: tuple[float, float] = (0.1, 0.9)
    min_delta: float = 0.0125
    frozen: bool = False
    previous_iou: float | None = None
    history: list[dict[str, float | int | bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise InputError(f"ACWThresholdScheduler direction must be +1 or -1; got {self.direction!r}.")
        low, high = self.bounds
        if not 0.0 <= low <= high <= 1.0:
            raise InputError(f"ACWThresholdScheduler bounds must satisfy 0 <= low <= high <= 1; got {self.bounds!r}.")
        if self.delta <= 0 or self.min_delta <= 0:
            raise InputError("ACWThresholdScheduler delta and min_delta must be > 0.")
        if self.loss is not None:
            self.loss.q = self.q

    def state_dict(self) -> dict[str, object]:
        """JSON-serialisable state for checkpoints (everything but the attached loss)."""
        return {"q": self.q, "delta": self.delta, "direction": self.direction, "bounds": list(self.bounds),
                "min_delta": self.min_delta, "frozen": self.frozen, "previous_iou": self.previous_iou,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` output (resuming training); sets the attached loss's ``q``."""
        self.q = float(state["q"])  # type: ignore[arg-type]
        self.delta = float(state["delta"])  # type: ignore[arg-type]
        self.direction = int(state["direction"])  # type: ignore[call-overload]
        self.bounds = tuple(state["bounds"])  # type: ignore[assignment,arg-type]
        self.min_delta = float(state["min_delta"])  # type: ignore[arg-type]
        self.frozen = bool(state["frozen"])
        prev = state["previous_iou"]
        self.previous_iou = None if prev is None else float(prev)  # type: ignore[arg-type]
        self.history = [dict(h) for h in state["history"]]  # type: ignore[union-attr]
        if self.loss is not None:
            self.loss.q = self.q

    def step(self, mean_foreground_iou: float) -> float:
        """Record one validation epoch's mean foreground IoU and return the ``q`` to use next."""
        iou = float(mean_foreground_iou)
        if not math.isfinite(iou):
            raise InputError(f"mean foreground IoU must be a finite number; got {mean_foreground_iou!r}.")
        if self.previous_iou is not None and not self.frozen:
            if iou <= self.previous_iou:
                self.direction = -self.direction
                self.delta = self.delta / 2.0
            if self.delta >= self.min_delta:
                self.q = min(max(self.q + self.direction * self.delta, self.bounds[0]), self.bounds[1])
            else:
                self.frozen = True
        self.previous_iou = iou
        if self.loss is not None:
            self.loss.q = self.q
        record = {"epoch": len(self.history), "iou": iou, "q": self.q, "delta": self.delta,
                  "direction": self.direction, "frozen": self.frozen}
        self.history.append(record)
        _log.info("ACW threshold: epoch %(epoch)d IoU %(iou).4f -> q %(q).4f (delta %(delta)g, direction "
                  "%(direction)+d, frozen %(frozen)s)", record)
        return self.q
