"""The vectorised binning kernel behind every ECE-type metric and the CalibrationAccumulator.

One case ``(C, *S)`` is walked in chunks of about ``CHUNK_ELEMENTS`` probabilities. Per chunk, each probability
is mapped to a *slot* with one fused float64 operation and a cast to an int32 index, and all classes are
binned with a single ``bincount`` (CPU) or ``index_add_`` (CUDA, no host sync) over ``class * K + slot``
(+ a lane offset, see ``_bin_chunks``).
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

#: Copies of every histogram (element i counts in copy i mod LANES), see ``_bin_chunks``.
LANES = 8

#: Upper bound on worker threads per case (CPU). The project targets 2-core machines; more cores help little
#: once the chunk ops are memory-bound.
MAX_WORKERS = 4


RANGE_MESSAGE = (
    "probs must be probabilities in [0, 1] (softmax over the class axis) without NaN/inf; found values outside "
    "that range. Apply torch.softmax(logits, dim=1) before computing calibration metrics."
)


def bincount(idx: torch.Tensor, length: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Histogram of ``idx`` (values in ``0..length-1``) on idx's device, exact length.

    CPU: ``torch.bincount``. CUDA: ``index_add_`` into a preallocated buffer, which avoids the
    device->host sync that ``torch.bincount`` does to find the maximum. Counts are int64, weighted sums
    keep the weights' dtype (callers pass float64).
    """
    if idx.device.type == "cpu":
        try:
            out = torch.bincount(idx, weights=weights, minlength=length)
        except RuntimeError as err:  # negative slot: a probability far above 1
            raise InputError(RANGE_MESSAGE) from err
        if out.numel() != length:  # only reachable when probabilities were far outside [0, 1]
            raise InputError(RANGE_MESSAGE)
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
    n_kept: torch.Tensor | None = None  # voxels inside the mask (int64 scalar tensor)

    def merge_(self, other: SlotStats) -> SlotStats:
        """Add ``other``'s statistics into self (in place on this accumulator object, never on inputs)."""
        for name in ("top_count", "top_conf", "top_hit", "cw_count", "cw_prob", "cw_hit",
                     "nll_sum", "brier_sum", "n_scored", "n_kept"):
            a, b = getattr(self, name), getattr(other, name)
            if b is None:
                continue
            setattr(self, name, b.clone() if a is None else a + b)
        return self


def top_label(pc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence ``max_c p`` and index ``argmax_c p`` over axis 0 of ``(C, *S)``, ties -> lowest index.

    ``torch.max/argmax(dim=0)`` on a (C, n) chunk are 5-40x slower on CPU (``argmax`` over the class axis of a
    ``(4, 4, 800, 800)`` block took 0.46 s, this 0.01 s), and broadcast comparisons or ``where``/``masked_fill``
    with random masks are slow too (bool outputs, branches). A running strict maximum over the rows with byte
    arithmetic is the fastest exact form found: because the class index grows along the loop, "c where strictly
    greater, else keep" is ``max(arg, greater * c)``. Returns ``(conf, arg)``: conf in ``pc``'s dtype, arg uint8
    (int64 beyond 256 classes), both ``(*S)`` on ``pc``'s device.
    """
    rows = pc.unbind(0)
    conf = rows[0].clone()
    arg_dtype = torch.uint8 if len(rows) <= 256 else torch.int64
    arg = torch.zeros(conf.shape, dtype=arg_dtype, device=pc.device)
    for c in range(1, len(rows)):
        greater = torch.gt(rows[c], conf)
        greater = greater.view(torch.uint8) if arg_dtype == torch.uint8 else greater.to(arg_dtype)  # free view
        torch.maximum(conf, rows[c], out=conf)
        torch.maximum(arg, greater * c, out=arg)
    return conf, arg


def _top_label(pc: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence and hit ``[argmax_c p == y]`` of a ``(C, n)`` chunk (see :func:`top_label`)."""
    conf, arg = top_label(pc)
    hit = arg == (y if arg.dtype == torch.int64 else y.to(arg.dtype))
    return conf, hit


def _dump_masked(idx: torch.Tensor, keep: torch.Tensor, dump: int) -> torch.Tensor:
    """``idx`` where ``keep`` else ``dump``, with arithmetic (no branchy where/masked_fill)."""
    k = keep.view(torch.uint8) if idx.dtype == torch.uint8 else keep.to(idx.dtype)
    return idx * k + (1 - k) * dump


@dataclass(frozen=True)
class _Plan:
    """What to bin and how (shared, read-only, by the worker threads of one case)."""

    n_bins: int
    num_classes: int
    top: bool
    classwise: bool
    scores: bool
    offsets: torch.Tensor  # (C, 1) float64: c*K + M + 1
    top_offset: torch.Tensor  # (1,) float64: M + 1
    lane_cw: torch.Tensor  # (C * n_max,) int32: (i mod LANES) * cw_len
    lane_top: torch.Tensor  # (n_max,) int32: (i mod LANES) * top_len

    @property
    def k(self) -> int:
        return self.n_bins + 2

    @property
    def cw_len(self) -> int:
        return self.num_classes * self.k + 1  # + dump slot

    @property
    def top_len(self) -> int:
        return 2 * self.k + 1  # misses, hits, dump


def _lanes(n: int, length: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int32, device=device) % LANES) * length


def _bin_chunks(plan: _Plan, chunks: list[list[torch.Tensor | None]], device: torch.device) -> dict:
    """Accumulate the raw per-lane slot statistics of a list of chunks (runs in a worker thread).

    Histograms are kept ``LANES`` times (element i counts in copy ``i mod LANES``): consecutive increments then
    hit different memory cells, which removes the store-to-load dependency chains of a plain bincount on
    smooth data (long runs of one slot: 4x faster weighted sums on a segmentation-like volume, 2x on noise).
    """
    k, n_bins = plan.k, plan.n_bins
    cw_len, top_len = plan.cw_len, plan.top_len
    f64, i32 = torch.float64, torch.int32
    acc: dict[str, torch.Tensor] = {}
    if plan.top:
        acc["top_count"] = torch.zeros(LANES * top_len, dtype=torch.int64, device=device)
        acc["top_conf"] = torch.zeros(LANES * top_len, dtype=f64, device=device)
    if plan.classwise:
        for name, dt in (("cw_count", torch.int64), ("cw_prob", f64), ("cw_hit", torch.int64)):
            acc[name] = torch.zeros(LANES * cw_len, dtype=dt, device=device)
    acc["n_kept"] = torch.zeros((), dtype=torch.int64, device=device)
    if plan.scores:
        acc["nll_sum"] = torch.zeros(1, dtype=f64, device=device)
        acc["brier_sum"] = torch.zeros(1, dtype=f64, device=device)
        acc["n_scored"] = torch.zeros(1, dtype=torch.int64, device=device)
    # Reused per-worker buffers (the top-label part reuses them after the class-wise part): extra memory is
    # one float64 + one int32 per probability of a chunk, plus an int32 per voxel for the hits.
    buf64 = torch.empty(0, dtype=f64, device=device)
    buf32 = torch.empty(0, dtype=i32, device=device)
    hit32 = torch.empty(0, dtype=i32, device=device)
    for pc, yc, mc, cmc in chunks:
        y = yc[0].long()
        keep = None if mc is None else mc[0]
        if keep is not None:  # labels outside the mask may be anything (e.g. 255 = ignore): make them safe
            y = y * keep
        n = pc.shape[1]
        acc["n_kept"] += n if keep is None else keep.sum()
        if plan.classwise:
            n_el = pc.numel()
            if buf64.numel() < n_el:
                buf64 = torch.empty(n_el, dtype=f64, device=device)
                buf32 = torch.empty(n_el, dtype=i32, device=device)
                hit32 = torch.empty(n, dtype=i32, device=device)
            work, idx = buf64[:n_el].view(pc.shape), buf32[:n_el].view(pc.shape)
            # float64 promotion inside add: exact for float32/float16/bfloat16 inputs (no rounding at edges)
            torch.add(plan.offsets, pc, alpha=-n_bins, out=work)
            if device.type != "cpu":  # index_add_ must never see an out-of-range index (device assert)
                work.clamp_(0, cw_len - 2)
            idx.copy_(work)  # truncation = floor for the non-negative slots
            if keep is not None:
                idx = _dump_masked(idx, keep.unsqueeze(0), cw_len - 1)
            if cmc is not None:
                idx = _dump_masked(idx, cmc, cw_len - 1)
            hits = torch.gather(idx, 0, y.unsqueeze(0), out=hit32[:n].view(1, n)).view(-1)
            hits += plan.lane_cw[:n]
            flat = idx.reshape(-1)
            flat += plan.lane_cw[:n_el]
            work.copy_(pc)  # now the float64 weights
            acc["cw_count"] += bincount(flat, LANES * cw_len)
            acc["cw_prob"] += bincount(flat, LANES * cw_len, work.view(-1))
            acc["cw_hit"] += bincount(hits, LANES * cw_len)
            del work, idx, flat, hits
        if plan.top:
            if buf64.numel() < n:
                buf64 = torch.empty(n, dtype=f64, device=device)
                buf32 = torch.empty(n, dtype=i32, device=device)
            t64, tidx = buf64[:n], buf32[:n]
            conf, hit = _top_label(pc, y)
            torch.add(plan.top_offset, conf, alpha=-n_bins, out=t64)  # float64 promotion: exact slot
            if device.type != "cpu":  # conf is in [1/C, 1]: only invalid input leaves 0..M+1 (CPU: caught later)
                t64.clamp_(0, n_bins + 1)
            tidx.copy_(t64)
            tidx.add_(hit.view(torch.uint8), alpha=k)  # hits in the second half of the slots
            if keep is not None:
                tidx = _dump_masked(tidx, keep, top_len - 1)
            tidx += plan.lane_top[:n]
            t64.copy_(conf)  # now the float64 weights
            acc["top_count"] += bincount(tidx, LANES * top_len)
            acc["top_conf"] += bincount(tidx, LANES * top_len, t64)
            del t64, tidx
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
    """Run torch CPU ops single-threaded while we bin (our worker threads, if any, split the chunks).

    Why: each chunk op is small (~10^5 elements); with torch's intra-op pool every op synchronises threads,
    and on a loaded machine (CI, training next door) that costs up to 15x (one 2M-element ``aminmax`` took
    20 ms instead of 0.5 ms at load 9 on 2 cores). Coarse-grained workers (one per idle core, each op serial)
    scale instead. Re-entrant; the previous setting is restored when the last user leaves. Other threads of
    the process run their torch CPU ops single-threaded meanwhile (results unchanged).
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


@contextmanager
def serial_cpu_ops(device: torch.device) -> Iterator[None]:
    """``_single_threaded_ops`` for CPU tensors, nothing for other devices (public entry points use it)."""
    if device.type == "cpu":
        with _single_threaded_ops():
            yield
    else:
        yield


def _idle_cores() -> float:
    """Cores not busy right now (CPU count minus the 1-minute load average, which includes this process)."""
    try:
        return (os.cpu_count() or 1) - os.getloadavg()[0] + 1.0
    except OSError:  # getloadavg unavailable (some containers): assume idle
        return float(os.cpu_count() or 1)


def _n_workers(device: torch.device, n_chunks: int) -> int:
    """Worker threads for one case: one per idle core the torch thread budget allows, else 1.

    On a loaded machine (CI workers, training next door) extra Python threads only add GIL hand-offs that each
    wait for the scheduler (measured: 2 workers 1.8x slower than 1 at load 9 on 2 cores), so they are used only
    when cores are idle.
    """
    if device.type != "cpu" or n_chunks < 4:
        return 1
    with _THREAD_LOCK:
        budget = _SAVED_THREADS if _THREAD_USERS > 0 else torch.get_num_threads()
    workers = min(budget, os.cpu_count() or 1, MAX_WORKERS, n_chunks // 2, int(_idle_cores() + 0.5))
    return max(1, workers)


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
    with serial_cpu_ops(probs.device):
        return _case_slot_stats(probs, labels, n_bins, mask, class_mask, top=top, classwise=classwise, scores=scores)


def _case_slot_stats(
    probs: torch.Tensor,
    labels: torch.Tensor,
    n_bins: int,
    mask: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    *,
    top: bool,
    classwise: bool,
    scores: bool,
) -> SlotStats:
    num_classes = int(probs.shape[0])
    dev = probs.device
    total = int(np.prod(probs.shape[1:], dtype=np.int64))
    budget = _n_workers(dev, 1 << 62)  # workers the machine allows now (not limited by the chunk count)
    # Chunk: at most CHUNK_ELEMENTS probabilities and at most 1/(64 * workers) of the case, so that all workers'
    # buffers (12 bytes per chunk element) plus allocator slack stay well below 25 % of a float32 probability
    # tensor (measured at 128^3 x 4: 1 worker 14 %, 2 workers 13 %).
    n_voxels = max(1024, min(CHUNK_ELEMENTS // max(num_classes, 1), -(-total // (64 * budget))))
    chunks = list(
        aligned_chunks([probs, labels.unsqueeze(0), None if mask is None else mask.unsqueeze(0), class_mask], n_voxels)
    )
    n_max = max((c[0].shape[1] for c in chunks), default=0)  # slabs of a non-contiguous input can be longer
    k = n_bins + 2
    plan = _Plan(
        n_bins=n_bins, num_classes=num_classes, top=top, classwise=classwise, scores=scores,
        offsets=(torch.arange(num_classes, dtype=torch.float64, device=dev) * k + (n_bins + 1)).view(-1, 1),
        top_offset=torch.full((1,), float(n_bins + 1), dtype=torch.float64, device=dev),
        lane_cw=_lanes(num_classes * n_max if classwise else 0, num_classes * k + 1, dev),
        lane_top=_lanes(n_max, 2 * k + 1, dev),
    )
    workers = max(1, min(budget, len(chunks) // 2)) if len(chunks) >= 4 else 1
    if workers == 1:
        parts = [_bin_chunks(plan, chunks, dev)]
    else:
        futures = [_pool().submit(_bin_chunks, plan, chunks[w::workers], dev) for w in range(workers)]
        parts = [f.result() for f in futures]
    acc = parts[0]
    for part in parts[1:]:
        for name in acc:
            acc[name] += part[name]
    out = SlotStats(n_bins=n_bins, num_classes=num_classes, n_kept=acc["n_kept"])
    if top:
        count = acc["top_count"].view(LANES, -1).sum(0)
        conf = acc["top_conf"].view(LANES, -1).sum(0)
        out.top_count = count[:k] + count[k : 2 * k]
        out.top_hit = count[k : 2 * k].clone()
        out.top_conf = conf[:k] + conf[k : 2 * k]
    if classwise:
        out.cw_count = acc["cw_count"].view(LANES, -1).sum(0)[:-1].view(num_classes, k)
        out.cw_prob = acc["cw_prob"].view(LANES, -1).sum(0)[:-1].view(num_classes, k)
        out.cw_hit = acc["cw_hit"].view(LANES, -1).sum(0)[:-1].view(num_classes, k)
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

    A valid probability always lands in its own class block, so the checks are free: every class (without
    per-class masks) and the top label count exactly the voxels kept; the top-label confidence is >= 1/C, so
    its p = 0 slot stays empty; all sums are finite.
    """
    checks = []
    if stats.top_conf is not None:
        checks += [
            torch.isfinite(stats.top_conf).all(),
            stats.top_count.sum() == stats.n_kept,
            stats.top_count[stats.n_bins + 1] == 0,
        ]
    if stats.cw_prob is not None:
        checks.append(torch.isfinite(stats.cw_prob).all())
        if not class_mask_used:
            checks.append((stats.cw_count.sum(dim=1) == stats.n_kept).all())
    if checks and not bool(torch.stack(checks).all()):  # one device->host sync
        raise InputError(RANGE_MESSAGE)
