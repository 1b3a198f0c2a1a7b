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

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ._utils import CHUNK_ELEMENTS, aligned_chunks

#: Upper bound on worker threads per case (CPU). The project targets 2-core machines; more cores help little
#: once the chunk ops are memory-bound.
MAX_WORKERS = 4


_RANGE_MESSAGE = (
    "probs must be probabilities in [0, 1] (softmax over the class axis) without NaN/inf; found values outside "
    "that range. Apply torch.softmax(logits, dim=1) before computing calibration metrics."
)


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
        try:
            out = torch.bincount(idx, weights=weights, minlength=length)
        except RuntimeError as err:  # negative slot: a probability far above 1
            raise InputError(_RANGE_MESSAGE) from err
        if out.numel() != length:  # only reachable when probabilities were far outside [0, 1]
            raise InputError(_RANGE_MESSAGE)
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


def count_small(idx: torch.Tensor, length: int) -> torch.Tensor:
    """Unweighted histogram of a 1-D uint8 index with ``length <= 128`` slots, about 2x faster on CPU.

    Adjacent index bytes are read as one int16 (value ``a + 256 b``, both < length), binned into
    ``256 * length`` pair slots and marginalised: half the scattered increments of a plain bincount. The byte
    order does not matter because both marginals are summed.
    """
    if idx.device.type != "cpu" or idx.dtype != torch.uint8 or length > 128 or idx.numel() < 2:
        return bincount(idx, length)
    n_even = idx.numel() - (idx.numel() % 2)
    pairs = bincount(idx[:n_even].view(torch.int16), 256 * length).view(length, 256)
    out = pairs.sum(dim=0)[:length] + pairs.sum(dim=1)
    if n_even < idx.numel():
        out += bincount(idx[n_even:], length)
    return out


def _first_argmax(pc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over classes and the lowest class index reaching it (numpy/torch tie rule), as uint8 when C <= 256.

    ``torch.max/argmax(dim=0)`` on a (C, n) chunk are 5-40x slower on CPU, and ``where``/``masked_fill`` with a
    random mask are branchy; a strict ``>`` running maximum with byte arithmetic keeps the first maximum and
    costs a few vector passes per class.
    """
    num_classes = pc.shape[0]
    conf = pc[0].clone()
    arg_dtype = torch.uint8 if num_classes <= 256 else torch.int64
    arg = torch.zeros(pc.shape[1], dtype=arg_dtype, device=pc.device)
    for c in range(1, num_classes):
        greater = torch.gt(pc[c], conf)
        greater = greater.view(torch.uint8) if arg_dtype == torch.uint8 else greater.to(arg_dtype)  # free view
        torch.maximum(conf, pc[c], out=conf)
        # arg < c always, so "c where strictly greater, else keep" is a max with greater * c (branch-free)
        torch.maximum(arg, greater * c, out=arg)
    return conf, arg


def _dump_masked(idx: torch.Tensor, keep: torch.Tensor, dump: int) -> torch.Tensor:
    """``idx`` where ``keep`` else ``dump``, with arithmetic (no branchy where/masked_fill)."""
    k = keep.view(torch.uint8) if idx.dtype == torch.uint8 else keep.to(idx.dtype)
    return idx * k + (1 - k) * dump


@dataclass(frozen=True)
class _Plan:
    """What to bin and how (shared by the worker threads of one case)."""

    n_bins: int
    num_classes: int
    top: bool
    classwise: bool
    scores: bool
    offsets: torch.Tensor  # (C, 1) float64: c*K + M + 1

    @property
    def k(self) -> int:
        return self.n_bins + 2

    @property
    def cw_len(self) -> int:
        return self.num_classes * self.k + 1  # + dump slot


def _bin_chunks(plan: _Plan, chunks: list[list[torch.Tensor | None]], device: torch.device) -> dict:
    """Accumulate the raw slot statistics of a list of chunks (runs in a worker thread)."""
    k, cw_len, n_bins = plan.k, plan.cw_len, plan.n_bins
    cw_dtype, top_dtype = _index_dtype(cw_len), _index_dtype(2 * k + 1)
    f64 = torch.float64
    acc: dict[str, torch.Tensor] = {}
    if plan.top:
        acc["top_count"] = torch.zeros(2 * k + 1, dtype=torch.int64, device=device)
        acc["top_conf"] = torch.zeros(k + 1, dtype=f64, device=device)
    if plan.classwise:
        for name, dt in (("cw_count", torch.int64), ("cw_prob", f64), ("cw_hit", torch.int64)):
            acc[name] = torch.zeros(cw_len, dtype=dt, device=device)
    if plan.scores:
        acc["nll_sum"] = torch.zeros(1, dtype=f64, device=device)
        acc["brier_sum"] = torch.zeros(1, dtype=f64, device=device)
        acc["n_scored"] = torch.zeros(1, dtype=torch.int64, device=device)
    buf64: torch.Tensor | None = None
    buf_idx: torch.Tensor | None = None
    for pc, yc, mc, cmc in chunks:
        y = yc[0].long()
        keep = None if mc is None else mc[0]
        if keep is not None:  # labels outside the mask may be anything (e.g. 255 = ignore): make them safe
            y = y * keep
        if plan.classwise:
            n_el = pc.numel()
            # One reused float64 buffer holds first the slots, then the weights: extra memory per worker is
            # one float64 chunk plus one byte per probability, and no allocator churn between chunks.
            if buf64 is None or buf64.numel() < n_el:
                buf64 = torch.empty(n_el, dtype=f64, device=device)
                buf_idx = torch.empty(n_el, dtype=cw_dtype, device=device)
            work = buf64[:n_el].view(pc.shape)
            idx = buf_idx[:n_el].view(pc.shape)
            # float64 promotion inside add: exact for float32/float16/bfloat16 inputs (no rounding at edges)
            torch.add(plan.offsets, pc, alpha=-n_bins, out=work)
            if device.type != "cpu":  # index_add_ must never see an out-of-range index (device assert)
                work.clamp_(0, cw_len - 2)
            idx.copy_(work)  # truncation = floor for the non-negative slots
            work.copy_(pc)  # now the float64 weights
            if keep is not None:
                idx = _dump_masked(idx, keep.unsqueeze(0), cw_len - 1)
            if cmc is not None:
                idx = _dump_masked(idx, cmc, cw_len - 1)
            flat = idx.view(-1)
            acc["cw_count"] += count_small(flat, cw_len)
            acc["cw_hit"] += bincount(idx.gather(0, y.unsqueeze(0)).view(-1), cw_len)
            acc["cw_prob"] += bincount(flat, cw_len, work.view(-1))  # float64 sums
            del idx, flat, work
        if plan.top:
            conf, arg = _first_argmax(pc)
            confd = conf.to(f64)
            slot = torch.add(float(n_bins + 1), confd, alpha=-n_bins)
            if device.type != "cpu":  # conf is in [1/C, 1]: only invalid input leaves 0..M+1 (CPU: caught later)
                slot.clamp_(0, n_bins + 1)
            slot = slot.to(top_dtype)
            hit = arg == (y if arg.dtype == torch.int64 else y.to(arg.dtype))
            hit = hit.view(torch.uint8) if top_dtype == torch.uint8 else hit.to(top_dtype)
            tidx = slot + hit * k
            if keep is not None:
                slot = _dump_masked(slot, keep, k)
                tidx = _dump_masked(tidx, keep, 2 * k)
            acc["top_count"] += count_small(tidx, 2 * k + 1)
            acc["top_conf"] += bincount(slot, k + 1, confd)
        if plan.scores:
            pd = pc.to(f64)
            py = pd.gather(0, y.unsqueeze(0))[0]
            per_voxel_nll = -torch.log(py.clamp(min=1e-12))
            per_voxel_brier = (pd * pd).sum(0) - 2.0 * py + 1.0
            del pd
            if keep is not None:
                kf = keep.to(f64)
                per_voxel_nll = per_voxel_nll * kf
                per_voxel_brier = per_voxel_brier * kf
                acc["n_scored"] += keep.sum()
            else:
                acc["n_scored"] += py.numel()
            acc["nll_sum"] += per_voxel_nll.sum()
            acc["brier_sum"] += per_voxel_brier.sum()
    return acc


_THREAD_LOCK = threading.Lock()
_THREAD_USERS = 0
_SAVED_THREADS = 1
_POOL: ThreadPoolExecutor | None = None


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """Run torch CPU ops single-threaded while our worker threads split the chunks.

    Why: each chunk op is small (~10^5 elements); with torch's intra-op pool every op synchronises threads,
    and on a loaded machine (CI, training next door) that costs up to 15x. Coarse-grained workers (one per
    core, each op serial) scale instead. The previous setting is restored when the last user leaves.
    """
    global _THREAD_USERS, _SAVED_THREADS
    with _THREAD_LOCK:
        if _THREAD_USERS == 0:
            _SAVED_THREADS = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREAD_USERS += 1
    try:
        yield
    finally:
        with _THREAD_LOCK:
            _THREAD_USERS -= 1
            if _THREAD_USERS == 0:
                torch.set_num_threads(_SAVED_THREADS)


def _n_workers(device: torch.device, n_chunks: int) -> int:
    if device.type != "cpu" or n_chunks < 4:
        return 1
    with _THREAD_LOCK:
        budget = _SAVED_THREADS if _THREAD_USERS > 0 else torch.get_num_threads()
    return max(1, min(budget, os.cpu_count() or 1, MAX_WORKERS, n_chunks // 2))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _THREAD_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="lenssegcalib-metrics")
        return _POOL


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
        SlotStats with int64 counts and float64 sums on ``probs.device``. On CPU the chunks are split over
        up to ``torch.get_num_threads()`` worker threads (interleaved, merged in a fixed order, so the result
        is deterministic).
    """
    num_classes = int(probs.shape[0])
    dev = probs.device
    plan = _Plan(
        n_bins=n_bins, num_classes=num_classes, top=top, classwise=classwise, scores=scores,
        offsets=(torch.arange(num_classes, dtype=torch.float64, device=dev) * (n_bins + 2) + (n_bins + 1)).view(
            -1, 1
        ),
    )
    total = int(np.prod(probs.shape[1:], dtype=np.int64))
    # Chunk: at most CHUNK_ELEMENTS probabilities, and at most 1/32 of the case (memory bound for small cases).
    n_voxels = max(1024, min(CHUNK_ELEMENTS // max(num_classes, 1), -(-total // 32)))
    chunks = list(
        aligned_chunks([probs, labels.unsqueeze(0), None if mask is None else mask.unsqueeze(0), class_mask], n_voxels)
    )
    workers = _n_workers(dev, len(chunks))
    if workers == 1:
        parts = [_bin_chunks(plan, chunks, dev)]
    else:
        with _single_threaded_ops():
            futures = [_pool().submit(_bin_chunks, plan, chunks[w::workers], dev) for w in range(workers)]
            parts = [f.result() for f in futures]
    acc = parts[0]
    for part in parts[1:]:
        for name in acc:
            acc[name] += part[name]
    k = plan.k
    out = SlotStats(n_bins=n_bins, num_classes=num_classes)
    if top:
        out.top_count = acc["top_count"][:k] + acc["top_count"][k : 2 * k]
        out.top_hit = acc["top_count"][k : 2 * k].clone()
        out.top_conf = acc["top_conf"][:k]
    if classwise:
        out.cw_count = acc["cw_count"][:-1].view(num_classes, k)
        out.cw_prob = acc["cw_prob"][:-1].view(num_classes, k)
        out.cw_hit = acc["cw_hit"][:-1].view(num_classes, k)
    if scores:
        out.nll_sum, out.brier_sum, out.n_scored = acc["nll_sum"], acc["brier_sum"], acc["n_scored"]
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
        raise InputError(_RANGE_MESSAGE)
