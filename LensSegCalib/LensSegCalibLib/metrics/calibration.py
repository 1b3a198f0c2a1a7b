"""Calibration metrics: ECE (top-label), class-wise ECE, pECE, NLL, Brier, reliability bins, and the
slab-by-slab ``CalibrationAccumulator``. Definitions: ``shared/METHODS.md`` sections 0, 3 and 9.

Inputs are torch tensors or numpy arrays: ``probs`` ``(B, C, *S)`` (softmax probabilities, any float dtype),
``labels`` ``(B, *S)`` integers in ``0..C-1`` (a ``(B, 1, *S)`` channel axis is accepted), optional ``mask``
``(B, *S)`` bool (voxels to include, e.g. the visible region or ``labels != 0`` for ECE_fg). Every metric is
computed per case (``b`` fixed) and then averaged over cases skipping NaN (``reduction="mean"``);
``reduction="none"`` returns the per-case values. Computation stays on the input's device, in chunks, with
float64 accumulation (see ``_binning``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from ._binning import (
    RANGE_MESSAGE,
    SlotStats,
    bincount,
    case_slot_stats,
    check_prob_range,
    fold_slots,
    serial_cpu_ops,
)
from ._utils import (
    CHUNK_ELEMENTS,
    Reduction,
    aligned_chunks,
    as_tensor,
    check_n_bins,
    check_probs_labels,
    check_reduction,
    nanmean,
)

__all__ = [
    "Reliability",
    "CalibrationResult",
    "CalibrationAccumulator",
    "ece",
    "classwise_ece",
    "pece",
    "nll",
    "brier",
    "reliability",
]


# --------------------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reliability:
    """Reliability-diagram bins (METHODS.md 9.8). Arrays are ``(M,)`` (top-label) or ``(C, M)`` (per class).

    Attributes:
        edges: ``(M + 1,)`` bin edges on [0, 1]; bin m holds ``(m/M, (m+1)/M]`` and p = 0 is in bin 0.
        count: number of voxels per bin (int64).
        mean_confidence: mean confidence per bin; NaN for an empty bin.
        accuracy: fraction of hits per bin (top-label: argmax == label; per class: label == c); NaN if empty.
        gap: ``mean_confidence - accuracy`` (> 0 over-confident); NaN if empty.
        ece: binned calibration error of these bins (float, or ``(C,)`` per class); NaN if no voxel.
    """

    edges: np.ndarray
    count: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray
    gap: np.ndarray
    ece: float | np.ndarray

    @property
    def centers(self) -> np.ndarray:
        """``(M,)`` bin centres, for plotting."""
        return 0.5 * (self.edges[:-1] + self.edges[1:])


@dataclass(frozen=True)
class CalibrationResult:
    """Result of ``CalibrationAccumulator.compute()``; everything it was fed counts as ONE case.

    Attributes:
        ece: top-label ECE (METHODS.md 9.5); NaN if no voxel was fed.
        classwise_ece: mean over all C classes of the per-class ECE (9.6).
        classwise_ece_per_class: ``(C,)`` per-class ECE, background first.
        reliability: top-label ``Reliability`` (``(M,)`` arrays).
        classwise_reliability: per-class ``Reliability`` (``(C, M)`` arrays).
        n_voxels: voxels counted (inside the masks).
        nll: mean negative log-likelihood (9.7), NaN unless the accumulator was built with ``scores=True``.
        brier: mean Brier score summed over classes (9.7), NaN unless ``scores=True``.
    """

    ece: float
    classwise_ece: float
    classwise_ece_per_class: np.ndarray
    reliability: Reliability
    classwise_reliability: Reliability
    n_voxels: int
    nll: float = float("nan")
    brier: float = float("nan")


# --------------------------------------------------------------------------------------------------------
# From sufficient statistics to numbers
# --------------------------------------------------------------------------------------------------------
def _edges(n_bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def _binned(count: torch.Tensor, conf: torch.Tensor, hit: torch.Tensor, n_bins: int) -> Reliability:
    """Fold slot statistics ``(..., K)`` into a Reliability with ``(..., M)`` arrays (numpy float64)."""
    cnt = fold_slots(count, n_bins).cpu().numpy()
    sconf = fold_slots(conf, n_bins).cpu().numpy()
    shit = fold_slots(hit.to(torch.float64), n_bins).cpu().numpy()
    total = cnt.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(cnt > 0, sconf / np.maximum(cnt, 1), np.nan)
        acc = np.where(cnt > 0, shit / np.maximum(cnt, 1), np.nan)
        # sum_m (n_m / N) |acc_m - conf_m| = sum_m |hits_m - conf_sum_m| / N  (empty bins contribute 0)
        err = np.where(total > 0, np.abs(shit - sconf).sum(axis=-1) / np.maximum(total, 1), np.nan)
    ece_value: float | np.ndarray = float(err) if np.ndim(err) == 0 else err
    return Reliability(_edges(n_bins), cnt.astype(np.int64), mean_conf, acc, mean_conf - acc, ece_value)


def _top(stats: SlotStats) -> Reliability:
    return _binned(stats.top_count, stats.top_conf, stats.top_hit, stats.n_bins)


def _classwise(stats: SlotStats) -> Reliability:
    return _binned(stats.cw_count, stats.cw_prob, stats.cw_hit, stats.n_bins)


def _per_case_stats(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    n_bins: int,
    mask: np.ndarray | torch.Tensor | None,
    *,
    top: bool = False,
    classwise: bool = False,
    scores: bool = False,
) -> list[SlotStats]:
    n_bins = check_n_bins(n_bins)
    with serial_cpu_ops(as_tensor(probs, "probs").device):
        p, y, m = check_probs_labels(probs, labels, mask)
        out = []
        for b in range(p.shape[0]):
            st = case_slot_stats(
                p[b], y[b], n_bins, None if m is None else m[b], top=top, classwise=classwise, scores=scores
            )
            check_prob_range(st, class_mask_used=False)
            if not (top or classwise):  # NLL/Brier alone: no bins certify the range, check it directly
                lo, hi = torch.aminmax(p[b])
                if not (float(lo) >= -1e-6 and float(hi) <= 1.0 + 1e-6):  # NaN fails both
                    raise InputError(RANGE_MESSAGE)
            out.append(st)
    return out


def _reduce(values: np.ndarray, reduction: str) -> float | np.ndarray:
    """``values`` ``(B, ...)`` per case -> NaN-skipping mean over cases, or as is for "none"."""
    values = np.asarray(values, dtype=np.float64)
    if check_reduction(reduction) == "none":
        return values
    return nanmean(values, axis=0)


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------
def ece(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    n_bins: int = 15,
    mask: np.ndarray | torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> float | np.ndarray:
    """Top-label expected calibration error (METHODS.md 9.5).

    ``conf = max_c p``, ``hit = [argmax_c p == label]`` (ties -> lowest class index), equal-width bins with
    rule 0.3, ``ECE = sum_m (n_m / N) |acc_m - conf_m|`` per case.

    Args:
        probs: ``(B, C, *S)`` probabilities summing to 1 over C.
        labels: ``(B, *S)`` integer reference labels in ``0..C-1``.
        n_bins: number of bins M. Defaults to 15.
        mask: optional ``(B, *S)`` bool; only these voxels count (``labels != 0`` gives ECE_fg).
        reduction: "mean" (NaN-skipping mean over cases, a float) or "none" (``(B,)`` per case).

    Returns:
        float in [0, 1] (or ``(B,)`` array); NaN for a case with no voxel inside the mask.

    Raises:
        InputError: shapes, dtypes, label range, probabilities outside [0, 1], n_bins < 1.

    Example:
        >>> import torch
        >>> p = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.8]]]])  # (B=1, C=2, 1, 2)
        >>> round(ece(p, torch.tensor([[[0, 1]]])), 6)
        0.15
    """
    per_case = [_top(st).ece for st in _per_case_stats(probs, labels, n_bins, mask, top=True)]
    return _reduce(np.array(per_case), reduction)


def classwise_ece(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    n_bins: int = 15,
    mask: np.ndarray | torch.Tensor | None = None,
    reduction: Reduction = "mean",
    per_class: bool = False,
) -> float | np.ndarray:
    """Class-wise ECE (METHODS.md 9.6): per class c (background included) the ECE of ``p_c`` against
    ``[label == c]`` over all voxels; CW-ECE = mean over the C classes. Equals MONAI
    ``CalibrationErrorMetric(num_bins=M)`` (mean over channels).

    Args:
        probs, labels, n_bins, mask, reduction: as in ``ece``.
        per_class: return the per-class values instead of their mean.

    Returns:
        float (mean over cases), ``(B,)`` (reduction "none"), ``(C,)`` (per_class) or ``(B, C)``
        (per_class and "none"). NaN for a case with no voxel inside the mask.
    """
    per_case = np.stack(
        [np.atleast_1d(_classwise(st).ece) for st in _per_case_stats(probs, labels, n_bins, mask, classwise=True)]
    )
    if not per_class:
        per_case = per_case.mean(axis=1)
    return _reduce(per_case, reduction)


def reliability(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    n_bins: int = 15,
    mask: np.ndarray | torch.Tensor | None = None,
    classwise: bool = False,
) -> Reliability:
    """Reliability-diagram bins (METHODS.md 9.8): per bin count, mean confidence, accuracy and gap.

    The bins pool every voxel of every case in the batch (a diagram describes the voxel population; call it
    per case for per-case diagrams).

    Args:
        probs, labels, n_bins, mask: as in ``ece``.
        classwise: per-class bins (``(C, M)`` arrays, confidence ``p_c``, hit ``[label == c]``) instead of
            top-label bins (``(M,)``).

    Returns:
        Reliability; empty bins have NaN mean confidence/accuracy/gap.
    """
    stats = _per_case_stats(probs, labels, n_bins, mask, top=not classwise, classwise=classwise)
    total = SlotStats(stats[0].n_bins, stats[0].num_classes)
    for st in stats:
        total.merge_(st)
    return _classwise(total) if classwise else _top(total)


def nll(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> float | np.ndarray:
    """Mean negative log-likelihood per case, ``mean_v -ln max(p_label, 1e-12)`` (METHODS.md 9.7), nats.

    Args:
        probs, labels, mask, reduction: as in ``ece``.

    Returns:
        float >= 0 (or ``(B,)``); NaN for a case with no voxel inside the mask.
    """
    stats = _per_case_stats(probs, labels, 1, mask, scores=True)
    per_case = [_score(st.nll_sum, st.n_scored) for st in stats]
    return _reduce(np.array(per_case), reduction)


def brier(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> float | np.ndarray:
    """Mean Brier score per case, ``mean_v sum_c (p_c - [label == c])^2`` in [0, 2] (METHODS.md 9.7; summed
    over classes, not divided by C).

    Args:
        probs, labels, mask, reduction: as in ``ece``.

    Returns:
        float (or ``(B,)``); NaN for a case with no voxel inside the mask.
    """
    stats = _per_case_stats(probs, labels, 1, mask, scores=True)
    per_case = [_score(st.brier_sum, st.n_scored) for st in stats]
    return _reduce(np.array(per_case), reduction)


def _score(total: torch.Tensor, count: torch.Tensor) -> float:
    n = int(count.item())
    return float(total.item()) / n if n > 0 else float("nan")


def pece(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    n_bins: int = 10,
    fp_weight: float = 2.0,
    reduction: Reduction = "mean",
) -> float | np.ndarray:
    """Pixel-wise ECE with false-positive offset, as the SDC repository defines it (METHODS.md 3).

    Foreground confidence ``p = 1 - probs[:, 0]``, ``y = [label != 0]``; bins ``(m/M, (m+1)/M]`` with
    ``p = 0`` in **no** bin (but counted in N); per bin ``a = mean p``, ``b = mean y``,
    ``f = mean p over y = 0`` (0 if none); ``pECE = sum_m (n_m / N) |a - b + fp_weight * f|``.

    Args:
        probs: ``(B, C, *S)``; class 0 is background.
        labels: ``(B, *S)``.
        n_bins: M. Defaults to 10 (official).
        fp_weight: w. Defaults to 2.0 (official); 0 gives the binary foreground ECE.
        reduction: "mean" or "none".

    Returns:
        float >= 0, not bounded by 1 (or ``(B,)``).
    """
    n_bins = check_n_bins(n_bins)
    with serial_cpu_ops(as_tensor(probs, "probs").device):
        per_case = _pece_cases(probs, labels, n_bins, float(fp_weight))
    return _reduce(np.array(per_case), reduction)


def _pece_cases(
    probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, n_bins: int, fp_weight: float
) -> list[float]:
    p, y, _ = check_probs_labels(probs, labels)
    if p.numel():  # pECE reads only class 0: check its range (logits passed by mistake gave numbers > 1)
        lo, hi = torch.aminmax(p[:, 0])
        if not (float(lo) >= -1e-6 and float(hi) <= 1.0 + 1e-6):  # NaN fails both
            raise InputError(RANGE_MESSAGE)
    k = n_bins + 2
    per_case = []
    for b in range(p.shape[0]):
        cnt = torch.zeros(2 * k, dtype=torch.int64, device=p.device)
        psum = torch.zeros(2 * k, dtype=torch.float64, device=p.device)
        n_total = 0
        for pc, yc in aligned_chunks([p[b, :1], y[b].unsqueeze(0)], CHUNK_ELEMENTS):
            fg = 1.0 - pc[0].to(torch.float64)  # exact in float64; = 0 exactly where probs[0] == 1
            slot = torch.add(float(n_bins + 1), fg, alpha=-n_bins).clamp_(0, n_bins + 1).to(torch.uint8)
            idx = slot + (yc[0] != 0).to(torch.uint8) * k  # second half: foreground voxels
            cnt += bincount(idx, 2 * k)
            psum += bincount(idx, 2 * k, fg)
            n_total += int(fg.numel())
        if not bool(torch.isfinite(psum).all()):
            raise InputError("probs contain NaN/inf; pass softmax probabilities.")
        # slot M + 1 (p == 0) is dropped: no bin, but counted in N
        c_bg, c_fg = cnt[: k - 1], cnt[k : 2 * k - 1]
        s_bg, s_fg = psum[: k - 1], psum[k : 2 * k - 1]
        c_bg = fold_slots(torch.cat([c_bg, c_bg.new_zeros(1)]), n_bins).double()
        c_fg = fold_slots(torch.cat([c_fg, c_fg.new_zeros(1)]), n_bins).double()
        s_bg = fold_slots(torch.cat([s_bg, s_bg.new_zeros(1)]), n_bins)
        s_fg = fold_slots(torch.cat([s_fg, s_fg.new_zeros(1)]), n_bins)
        n_bin = c_bg + c_fg
        safe = n_bin.clamp(min=1)
        a = (s_bg + s_fg) / safe
        bfrac = c_fg / safe
        f = torch.where(c_bg > 0, s_bg / c_bg.clamp(min=1), torch.zeros_like(s_bg))
        terms = torch.where(n_bin > 0, n_bin * (a - bfrac + fp_weight * f).abs(), torch.zeros_like(a))
        per_case.append(float(terms.sum().item()) / n_total if n_total > 0 else float("nan"))
    return per_case


# --------------------------------------------------------------------------------------------------------
# Accumulator
# --------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationAccumulator:
    """Accumulate calibration statistics slab by slab; ``compute()`` equals the whole-volume result.

    Everything fed through ``update`` counts as ONE case: the accumulator pools voxels (for a batch of
    independent cases, use one accumulator per case, or the per-case functions). Memory is O(C * n_bins)
    plus one chunk, so a 512^3 4-class volume never needs all its probabilities at once.

    Args:
        n_bins: number of bins M. Defaults to 15.
        scores: also accumulate NLL and Brier (an extra pass per chunk). Defaults to False.

    Example:
        >>> import torch
        >>> acc = CalibrationAccumulator(n_bins=15)
        >>> probs = torch.softmax(torch.randn(1, 3, 8, 16, 16), dim=1)
        >>> labels = torch.randint(0, 3, (1, 8, 16, 16))
        >>> for z in range(0, 8, 4):
        ...     acc.update(probs[:, :, z:z + 4], labels[:, z:z + 4])
        >>> abs(acc.compute().ece - ece(probs, labels)) < 1e-12
        True
    """

    n_bins: int = 15
    scores: bool = False
    _stats: SlotStats | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.n_bins = check_n_bins(self.n_bins)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._stats = None

    def update(
        self,
        probs: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add a batch or slab: ``probs`` ``(B, C, *S)``, ``labels`` ``(B, *S)``, optional ``mask`` ``(B, *S)``.

        Raises:
            InputError: invalid inputs, or a class count different from earlier updates.
        """
        with serial_cpu_ops(as_tensor(probs, "probs").device):
            self._update(probs, labels, mask)

    def _update(
        self,
        probs: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None,
    ) -> None:
        p, y, m = check_probs_labels(probs, labels, mask)
        if self._stats is not None and self._stats.num_classes != p.shape[1]:
            raise InputError(
                f"probs has {p.shape[1]} classes but earlier updates had {self._stats.num_classes}. "
                "Use one accumulator per model/class set (reset() starts over)."
            )
        for b in range(p.shape[0]):
            st = case_slot_stats(
                p[b], y[b], self.n_bins, None if m is None else m[b], top=True, classwise=True, scores=self.scores
            )
            check_prob_range(st, class_mask_used=False)
            if self._stats is None:
                self._stats = SlotStats(self.n_bins, st.num_classes)
            self._stats.merge_(st)

    def compute(self) -> CalibrationResult:
        """Return the CalibrationResult of everything fed so far (one case).

        Raises:
            InputError: nothing was fed yet.
        """
        if self._stats is None:
            raise InputError("CalibrationAccumulator.compute() called before update(); feed probs/labels first.")
        st = self._stats
        top = _top(st)
        cw = _classwise(st)
        per_class = np.atleast_1d(np.asarray(cw.ece, dtype=np.float64))
        nll_v = _score(st.nll_sum, st.n_scored) if st.nll_sum is not None else float("nan")
        brier_v = _score(st.brier_sum, st.n_scored) if st.brier_sum is not None else float("nan")
        return CalibrationResult(
            ece=float(top.ece),
            classwise_ece=float(per_class.mean()),
            classwise_ece_per_class=per_class,
            reliability=top,
            classwise_reliability=cw,
            n_voxels=int(top.count.sum()),
            nll=nll_v,
            brier=brier_v,
        )
