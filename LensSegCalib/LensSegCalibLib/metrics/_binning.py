"""The vectorised binning kernel behind every ECE-type metric and the CalibrationAccumulator.

One case ``(C, *S)`` is walked in chunks of about ``CHUNK_ELEMENTS`` probabilities. Per chunk, each probability
is mapped to a *slot* with one fused float64 operation and a cast to a one-byte index, and all classes are
binned with a single ``bincount`` (CPU) or ``index_add_`` (CUDA, no host sync) over ``class * K + slot``.
Sufficient statistics (count, sum of confidence, sum of hits) are accumulated in int64/float64, so any split
of a case into chunks or slabs gives the same result (METHODS.md 0.4).

Slots (K = M + 2 per class) implement the bin rule of METHODS.md 0.3 exactly on the stored value:
``slot = floor((M + 1) - M * p)`` computed in float64 (exact for float32/float16 inputs), so

    p = 0            -> slot M + 1 -> bin 0          (rule 0.3: p = 0 falls in bin 0)
    p in (m/M, (m+1)/M] -> slot M - m -> bin m     (= clip(ceil(p*M) - 1, 0, M - 1))
    p in (1, 1 + 1/M)   -> slot 0     -> bin M - 1 (float rounding of a softmax above 1)

Masked-out voxels go to one extra "dump" slot that is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ._utils import CHUNK_ELEMENTS, aligned_chunks


def _index_dtype(n_slots: int) -> torch.dtype:
    """Smallest index dtype for ``n_slots`` slots: uint8 (1 byte, 4x cheaper to write than int32) if it fits."""
    return torch.uint8 if n_slots <= 256 else torch.int32


def bincount(idx: torch.Tensor, length: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Histogram of ``idx`` (values in ``0..length-1``) on idx's device, exact length.

    CPU: ``torch.bincount`` (fast for uint8). CUDA: ``index_add_`` into a preallocated buffer, which avoids the
    device->host sync that ``torch.bincount`` does to find the maximum. Counts are int64, weighted sums
    keep the weights' dtype (callers pass float64).
    """
    if idx.device.type == "cpu":
        out = torch.bincount(idx, weights=weights, minlength=length)
        if out.numel() != length:  # only reachable when probabilities were far outside [0, 1]
            raise InputError(
                "probs must be probabilities in [0, 1] (softmax over the class axis); found values outside that "
                "range. Apply torch.softmax(logits, dim=1) before computing calibration metrics."
            )
        return out
    if weights is None:
        out = torch.zeros(length, dtype=torch.int64, device=idx.device)
        return out.index_add_(0, idx.long(), torch.ones_like(idx, dtype=torch.int64))
    out = torch.zeros(length, dtype=weights.dtype, device=idx.device)
    return out.index_add_(0, idx.long(), weights)


def slot_to_bin(n_bins: int, device: torch.device) -> torch.Tensor:
    """Map slot ``0..M+1`` to bin index (see module docstring); int64 ``(M + 2,)``."""
    m = n_bins
    mapping = [m - 1] + [m - s for s in range(1, m + 1)] + [0]
    return torch.tensor(mapping, dtype=torch.int64, device=device)


@dataclass
class SlotStats:
    """Per-slot sufficient statistics of one case (tensors on the input's device).

    Shapes: top-label ``(K,)``; class-wise ``(C, K)``; K = n_bins + 2. ``None`` when not requested.
    """

    n_bins: int
    num_classes: int
    top_count: torch.Tensor | None = None
    top_conf: torch.Tensor | None = None
    top_hit: torch.Tensor | None = None
    cw_count: torch.Tensor | None = None
    cw_prob: torch.Tensor | None = None
    cw_hit: torch.Tensor | None = None
    nll_sum: torch.Tensor | None = None
    brier_sum: torch.Tensor | None = None
    n_scored: torch.Tensor | None = None

    def merge_(self, other: SlotStats) -> SlotStats:
        """Add ``other``'s statistics into self (in place on this accumulator object, never on inputs)."""
        for name in ("top_count", "top_conf", "top_hit", "cw_count", "cw_prob", "cw_hit",
                     "nll_sum", "brier_sum", "n_scored"):
            a, b = getattr(self, name), getattr(other, name)
            if b is None:
                continue
            setattr(self, name, b.clone() if a is None else a + b)
        return self


def _first_argmax(pc: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over classes and the lowest index reaching it (numpy/torch tie rule), loop over the C classes.

    ``torch.max(dim=0)`` over a (C, n) chunk is ~30x slower on CPU than C element-wise passes, hence the loop
    over classes (a handful of cheap vector ops, not the bottleneck).
    """
    conf = pc[0].clone()
    arg = torch.zeros_like(like)
    for c in range(1, pc.shape[0]):
        greater = pc[c] > conf
        torch.maximum(conf, pc[c], out=conf)
        arg.masked_fill_(greater, c)
    return conf, arg


def case_slot_stats(
    probs: torch.Tensor,
    labels: torch.Tensor,
    n_bins: int,
    mask: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
    *,
    top: bool = True,
    classwise: bool = True,
    scores: bool = False,
) -> SlotStats:
    """Bin one case.

    Args:
        probs: ``(C, *S)`` float probabilities of one case (any float dtype, any device).
        labels: ``(*S)`` integer labels in ``0..C-1`` (range checked by the caller).
        n_bins: M.
        mask: ``(*S)`` bool, voxels to include (all if None). Applies to every statistic.
        class_mask: ``(C, *S)`` bool, per-class voxel selection for the class-wise statistics only (BECE_c);
            combined with ``mask``.
        top, classwise, scores: which statistics to collect (top-label bins; class-wise bins; NLL and Brier
            sums).

    Returns:
        SlotStats with int64 counts and float64 sums on ``probs.device``.
    """
    num_classes = int(probs.shape[0])
    k = n_bins + 2
    dev = probs.device
    n_voxels = max(1024, CHUNK_ELEMENTS // max(num_classes, 1))
    cw_len = num_classes * k + 1  # + dump slot
    cw_dtype = _index_dtype(cw_len)
    top_dtype = _index_dtype(2 * k + 1)
    f64 = torch.float64
    # Per-class offset folded into the slot computation: slot + c*K = floor((c*K + M + 1) - M*p).
    offsets = (torch.arange(num_classes, dtype=f64, device=dev) * k + (n_bins + 1)).view(-1, 1)
    out = SlotStats(n_bins=n_bins, num_classes=num_classes)
    zeros_i = lambda n: torch.zeros(n, dtype=torch.int64, device=dev)  # noqa: E731
    zeros_f = lambda n: torch.zeros(n, dtype=f64, device=dev)  # noqa: E731
    if top:
        top_count, top_conf = zeros_i(2 * k + 1), zeros_f(k + 1)
    if classwise:
        cw_count, cw_prob, cw_hit = zeros_i(cw_len), zeros_f(cw_len), zeros_i(cw_len)
    if scores:
        nll_sum, brier_sum, n_scored = zeros_f(1), zeros_f(1), zeros_i(1)
    chunks = aligned_chunks(
        [probs, labels.unsqueeze(0), None if mask is None else mask.unsqueeze(0), class_mask], n_voxels
    )
    for pc, yc, mc, cmc in chunks:
        y = yc[0].long()
        keep = None if mc is None else mc[0]
        pd = pc.to(f64)  # exact for float32/float16/bfloat16: the slot below is computed without rounding
        if classwise:
            slots = torch.add(offsets, pd, alpha=-n_bins)
            if dev.type != "cpu":  # index_add_ must never see an out-of-range index (device assert)
                slots.clamp_(0, cw_len - 2)
            idx = slots.to(cw_dtype)
            if keep is not None:
                idx.masked_fill_(~keep.unsqueeze(0), cw_len - 1)
            if cmc is not None:
                idx.masked_fill_(~cmc, cw_len - 1)
            flat = idx.view(-1)
            cw_count += bincount(flat, cw_len)
            cw_prob += bincount(flat, cw_len, pd.view(-1))
            cw_hit += bincount(idx.gather(0, y.unsqueeze(0)).view(-1), cw_len)
        if top:
            conf, arg = _first_argmax(pd if pc.dtype == f64 else pc, y)
            confd = conf.to(f64)
            slot = torch.add(float(n_bins + 1), confd, alpha=-n_bins).clamp_(0, n_bins + 1).to(top_dtype)
            if keep is not None:
                slot.masked_fill_(~keep, k)
            tidx = slot + (arg == y).to(top_dtype) * k
            if keep is not None:
                tidx.masked_fill_(~keep, 2 * k)
            top_count += bincount(tidx, 2 * k + 1)
            top_conf += bincount(slot, k + 1, confd)
        if scores:
            py = pd.gather(0, y.unsqueeze(0))[0]
            per_voxel_nll = -torch.log(py.clamp(min=1e-12))
            per_voxel_brier = (pd * pd).sum(0) - 2.0 * py + 1.0
            if keep is not None:
                per_voxel_nll = per_voxel_nll[keep]
                per_voxel_brier = per_voxel_brier[keep]
            nll_sum += per_voxel_nll.sum()
            brier_sum += per_voxel_brier.sum()
            n_scored += per_voxel_nll.numel()
    if top:
        out.top_count = top_count[:k] + top_count[k : 2 * k]
        out.top_hit = top_count[k : 2 * k].clone()
        out.top_conf = top_conf[:k]
    if classwise:
        out.cw_count = cw_count[:-1].view(num_classes, k)
        out.cw_prob = cw_prob[:-1].view(num_classes, k)
        out.cw_hit = cw_hit[:-1].view(num_classes, k)
    if scores:
        out.nll_sum, out.brier_sum, out.n_scored = nll_sum, brier_sum, n_scored
    return out


def fold_slots(stats: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Fold slot statistics ``(..., K)`` into bins ``(..., M)`` (sum of the slots that map to each bin)."""
    mapping = slot_to_bin(n_bins, stats.device)
    shape = (*stats.shape[:-1], n_bins)
    out = torch.zeros(shape, dtype=stats.dtype, device=stats.device)
    return out.index_add_(stats.ndim - 1, mapping, stats)


def check_prob_range(stats: SlotStats, class_mask_used: bool) -> None:
    """Raise InputError when the statistics show probabilities outside [0, 1] or non-finite values.

    Every class of a voxel lands in its own class block unless ``p`` is outside [0, 1 + 1/M), so equal
    per-class counts (without per-class masks) and finite sums certify the input range for free.
    """
    bad = False
    if stats.top_conf is not None and not bool(torch.isfinite(stats.top_conf).all()):
        bad = True
    if stats.cw_prob is not None:
        if not bool(torch.isfinite(stats.cw_prob).all()):
            bad = True
        elif not class_mask_used:
            per_class = stats.cw_count.sum(dim=1)
            bad = bad or bool((per_class != per_class[0]).any())
    if bad:
        raise InputError(
            "probs must be probabilities in [0, 1] (softmax over the class axis) without NaN/inf; found values "
            "outside that range. Apply torch.softmax(logits, dim=1) before computing calibration metrics."
        )
