"""Config-driven training: ``lenssegcalib train --config FILE`` / ``python -m LensSegCalibLib.training --config``.

One JSON config (``training/configs/*.json``) holds everything: the catalog fields of the model (classes,
input spacing/normalisation/patch, network, loss), the phantom data (generator, seeds, variations), the
optimisation recipe, and the output folder. :func:`train_from_config` then

1. generates (or reads from ``runs/cache``) the training and validation phantoms (seeds < 10000),
2. trains the MONAI network on random patches (2D B-scan patches for AS-OCT, 3D patches for CT) with the
   loss from :func:`LensSegCalibLib.losses.build_loss`, AdamW + warm-up/cosine, AMP on CUDA, DDP under
   torchrun, a tqdm bar with ETA,
3. validates every epoch on whole validation B-scans / volumes (Dice per class, ECE, BECE) -> ``metrics.csv``
   + ``log.jsonl`` + TensorBoard event files in ``tb/`` (tensorboardX, from the ``train`` extra),
4. checkpoints every epoch (``checkpoint.pt``; resumed automatically),
5. fits the post-hoc temperature on the validation phantoms (LBFGS on NLL) and writes
   ``<output>/<model_id>.safetensors`` and ``<output>/catalog_entry.json``; with ``--register`` (or
   ``output.register: true``) the weights are copied to ``Resources/Models`` and the catalog entry is updated.

Reproducible on CPU: all randomness comes from ``numpy.random.default_rng([seed, epoch, rank])`` and
``torch.manual_seed``; a resumed run draws the same patches as an uninterrupted one.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import InputError
from ..models import MODELS_DIR, build_network, save_weights, spec_from_dict, update_catalog_entry
from . import ddp
from .data import CachedVolume, PatchSampler, prepare_volume
from .temperature import fit_temperature, temperature_nll

__all__ = ["load_config", "train_from_config", "build_training_loss", "hidden_confidence_penalty",
           "predict_volume_logits", "validation_metrics", "DEFAULTS"]

#: Defaults merged under every config (a config only states what differs).
DEFAULTS: dict[str, Any] = {
    "version": "1.0.0",
    "description": "",
    "seed": 0,
    "data": {"shape": None, "variation": {}, "val_variation": {}, "cache_dir": "runs/cache", "fg_fraction": 0.7,
             "flip_axes": [], "augment": {"p": 0.8, "gamma": [0.7, 1.5], "contrast": [0.75, 1.25],
                                          "brightness": 0.1, "noise_sd": 0.05},
             "val_slices": 4},
    "optim": {"epochs": 10, "steps_per_epoch": 100, "batch_size": 8, "lr": 2e-3, "weight_decay": 1e-4,
              "warmup_steps": 50, "grad_clip": 5.0, "amp": True, "threads": None},
    "temperature_scaling": True,
    "output": {"dir": None, "register": False},
}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a training config (JSON file or dict), merge defaults and ``overrides``, check required keys."""
    if isinstance(path, Mapping):
        cfg, src = dict(path), "<dict>"
    else:
        p = Path(path)
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise InputError(f"Training config {p} does not exist; see LensSegCalibLib/training/configs/.") from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"Training config {p} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
        src = str(p)
    cfg = _merge(DEFAULTS, cfg)
    if overrides:
        cfg = _merge(cfg, overrides)
    for key in ("model_id", "title", "task", "modality", "classes", "input", "network", "loss", "data"):
        if key not in cfg:
            raise InputError(f"Training config {src} lacks '{key}'; copy a shipped config and edit it.")
    for key in ("generator", "train_seeds", "val_seeds"):
        if key not in cfg["data"]:
            raise InputError(f"Training config {src}: data.{key} is missing.")
    seeds = _seed_list(cfg["data"]["train_seeds"]) + _seed_list(cfg["data"]["val_seeds"])
    bad = [s for s in seeds if s >= 10000]
    if bad:
        raise InputError(f"Training config {src} uses held-out seeds {bad[:5]} (>= 10000) for training/validation; "
                         "seeds >= 10000 are reserved for evaluation.")
    if set(_seed_list(cfg["data"]["train_seeds"])) & set(_seed_list(cfg["data"]["val_seeds"])):
        raise InputError(f"Training config {src}: train_seeds and val_seeds overlap; keep them disjoint.")
    if cfg["output"]["dir"] is None:
        cfg["output"]["dir"] = f"runs/{cfg['model_id']}"
    cfg["_source"] = src
    return cfg


def _seed_list(spec: Any) -> list[int]:
    """``[a, b]`` as a range a..b-1 when given as {"start": a, "stop": b}; else the explicit list."""
    if isinstance(spec, Mapping):
        return list(range(int(spec["start"]), int(spec["stop"])))
    return [int(s) for s in spec]


def build_training_loss(loss_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The loss module by name via ``LensSegCalibLib.losses.build_loss`` (``"ce"`` falls back to torch)."""
    name = str(loss_cfg["name"])
    params = dict(loss_cfg.get("params", {}))
    try:
        from ..losses import build_loss
    except ImportError:
        if name != "ce":
            raise
        return torch.nn.CrossEntropyLoss()
    return build_loss(name, **params)


def hidden_confidence_penalty(logits: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor, *,
                              margin_px: int = 8) -> torch.Tensor:
    """Confidence penalty on the voxels the scanner cannot see: KL(uniform || softmax), near the lens only.

    Behind the iris (and where a dense lens swallows the beam) the image says little, so a label there is a
    guess from shape; a loss that rewards matching the phantom's exact labels teaches the network to claim
    certainty it cannot have (held-out: right 57 % of the time while claiming 78 %). This term pulls those
    voxels towards the uniform distribution; with plain CE the per-voxel optimum is
    ``p_true = (1 + w / C) / (1 + w)`` (w = 1, C = 4: 0.625), and the argmax is unchanged.
    The region is the hidden voxels within ``margin_px`` of the reference lens (dilated by a max-pool), so
    the shadow of the iris over the empty anterior chamber or vitreous keeps its confident background.

    Args:
        logits: ``(B, C, *S)`` float32.
        labels: ``(B, *S)`` integer reference (0 = background).
        hidden: ``(B, *S)`` bool, true where the voxel is not ``visible``.
        margin_px: dilation of the lens mask (voxels of the model grid).

    Returns:
        scalar: the penalty summed over the region and divided by the number of voxels in the batch, so
        weight 1 gives a region voxel the same weight as one voxel of a mean-reduced CE.
    """
    import torch.nn.functional as F

    c = logits.shape[1]
    lens = (labels > 0).unsqueeze(1).float()
    k = 2 * int(margin_px) + 1
    pool = F.max_pool2d if labels.dim() == 3 else F.max_pool3d
    near = pool(lens, kernel_size=k, stride=1, padding=int(margin_px)).squeeze(1) > 0
    region = hidden & near
    kl = -torch.log_softmax(logits, dim=1).mean(dim=1) - math.log(c)  # >= 0, 0 at the uniform distribution
    return (kl * region).sum() / region.numel()


def _hidden_penalty_config(cfg: Mapping[str, Any]) -> dict | None:
    """``loss.hidden_penalty`` (``{"weight": 1.0, "margin_px": 8}``) checked, or None when absent/weight 0."""
    hp = cfg["loss"].get("hidden_penalty")
    if not hp:
        return None
    if not isinstance(hp, Mapping) or "weight" not in hp:
        raise InputError('loss.hidden_penalty must be an object like {"weight": 1.0, "margin_px": 8}.')
    w, m = float(hp["weight"]), int(hp.get("margin_px", 8))
    if w < 0 or m < 0:
        raise InputError(f"loss.hidden_penalty: weight and margin_px must be >= 0, got {w} and {m}.")
    return {"weight": w, "margin_px": m} if w > 0 else None


def _loss_needs_targets(loss_cfg: Mapping[str, Any]) -> bool:
    """SDC takes precomputed signed-distance targets (``sdf=``) from the data pipeline."""
    return str(loss_cfg["name"]) == "sdc"


# ----------------------------------------------------------------------------------------------------------
# inference on whole slices / volumes (validation)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_volume_logits(net: torch.nn.Module, image: np.ndarray, *, mode: str, patch_size: tuple[int, ...],
                          device: torch.device, overlap: float = 0.25, sw_batch_size: int = 4) -> torch.Tensor:
    """Logits ``(C, Z, Y, X)`` float32 on the CPU for a normalised volume at the model spacing.

    ``slicewise2d``: every B-scan (axis 0) is one 2D image; ``sliding3d``: one 3D sliding window. Gaussian
    blending and padding with -1 (the normalised "nothing"), as the shipped inference does.
    """
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device)
    amp = device.type == "cuda"

    def predictor(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            return net(t).float()

    if mode == "slicewise2d":
        out = sliding_window_inference(x[:, None], roi_size=list(patch_size[-2:]), sw_batch_size=sw_batch_size,
                                       predictor=predictor, overlap=overlap, mode="gaussian", cval=-1.0)
        return out.transpose(0, 1).float().cpu()
    out = sliding_window_inference(x[None, None], roi_size=list(patch_size), sw_batch_size=sw_batch_size,
                                   predictor=predictor, overlap=overlap, mode="gaussian", cval=-1.0)
    return out[0].float().cpu()


def _dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> list[float]:
    out = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum() + r.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def _ece(conf: torch.Tensor, hit: torch.Tensor, n_bins: int = 15) -> float:
    if conf.numel() == 0:
        return float("nan")
    idx = (torch.ceil(conf.double() * n_bins) - 1).clamp(0, n_bins - 1).long()
    cnt = torch.bincount(idx, minlength=n_bins).double()
    sc = torch.bincount(idx, weights=conf.double(), minlength=n_bins)
    sh = torch.bincount(idx, weights=hit.double(), minlength=n_bins)
    return float((sc - sh).abs().sum() / cnt.sum())


def validation_metrics(probs: torch.Tensor, labels: torch.Tensor, spacing: tuple[float, ...],
                       visible: torch.Tensor | None = None) -> dict[str, Any]:
    """Dice per class, top-label ECE and BECE of one case (``probs (C, *S)``, ``labels (*S)``).

    Uses ``LensSegCalibLib.metrics`` when it is installed (BECE needs it; else BECE is NaN); ECE/Dice are
    the METHODS.md definitions. With ``visible`` only the visible voxels count for Dice/ECE.
    """
    c = probs.shape[0]
    conf, pred = probs.max(0)
    if visible is not None:
        m = visible.bool()
        dice = _dice_per_class(pred[m], labels[m], c)
        ece = _ece(conf[m], (pred[m] == labels[m]).float())
    else:
        dice = _dice_per_class(pred, labels, c)
        ece = _ece(conf.reshape(-1), (pred == labels).float().reshape(-1))
    bece = float("nan")
    try:
        from ..metrics import bece as _bece
    except ImportError:
        _bece = None
    if _bece is not None:
        val = _bece(probs[None].float(), labels[None].long(), spacing=spacing)
        bece = float(val.mean() if hasattr(val, "mean") else val)
    return {"dice": dice, "ece": ece, "bece": bece}


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------
def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _volumes(cfg: dict, which: str, *, rank: int) -> list[CachedVolume]:
    d = cfg["data"]
    inp = cfg["input"]
    seeds = _seed_list(d["train_seeds" if which == "train" else "val_seeds"])
    var = d["variation"] if which == "train" else _merge(d["variation"], d.get("val_variation", {}))
    # per-seed variations: {"seed": {...}} overrides (e.g. a share of harder cataracts) live in data.per_seed;
    # a "shape" there renders that phantom on another grid (a coarser acquisition, resampled to the model grid)
    per_seed = d.get("per_seed", {})
    out = []
    for s in seeds:
        v = _merge(var, per_seed.get(str(s), {}))
        shape = v.pop("shape", d.get("shape"))
        out.append(prepare_volume(d["generator"], s, shape=shape, variation=v,
                                  spacing_mm=inp["spacing_mm"], normalization=inp["normalization"],
                                  cache_dir=d.get("cache_dir"), resample_axis0=inp["mode"] != "slicewise2d"))
    return out


def _val_cases(vols: list[CachedVolume], cfg: dict) -> list[dict]:
    """Validation cases: for 2D models ``val_slices`` B-scans per volume, cropped to the lens + margin."""
    cases = []
    mode = cfg["input"]["mode"]
    patch = cfg["input"]["patch_size"]
    for v in vols:
        lab = np.asarray(v.labels)
        if mode == "slicewise2d":
            zs = np.linspace(0, lab.shape[0] - 1, min(int(cfg["data"]["val_slices"]), lab.shape[0])).round().astype(int)
            sub = lab[zs]
            fg = np.argwhere(sub > 0)
            if fg.size:
                lo = np.maximum(fg.min(0)[1:] - np.array(patch[-2:]) // 2, 0)
                hi = np.minimum(fg.max(0)[1:] + 1 + np.array(patch[-2:]) // 2, lab.shape[1:])
            else:
                lo, hi = np.zeros(2, int), np.array(lab.shape[1:])
            sl = (zs, slice(lo[0], hi[0]), slice(lo[1], hi[1]))
            cases.append({"image": np.asarray(v.image)[sl], "labels": lab[sl], "visible": np.asarray(v.visible)[sl],
                          "spacing": tuple(v.spacing[1:])})
        else:
            fg = np.argwhere(lab > 0)
            lo = np.maximum(fg.min(0) - np.array(patch), 0) if fg.size else np.zeros(3, int)
            hi = np.minimum(fg.max(0) + 1 + np.array(patch), lab.shape) if fg.size else np.array(lab.shape)
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            cases.append({"image": np.asarray(v.image)[sl], "labels": lab[sl], "visible": np.asarray(v.visible)[sl],
                          "spacing": tuple(v.spacing)})
    return cases


def _validate(net: torch.nn.Module, cases: list[dict], cfg: dict, device: torch.device,
              keep_logits: bool = False) -> tuple[dict, list]:
    net.eval()
    mode = cfg["input"]["mode"]
    patch = tuple(cfg["input"]["patch_size"])
    rows, kept = [], []
    for case in cases:
        logits = predict_volume_logits(net, case["image"], mode=mode, patch_size=patch, device=device)
        lab = torch.from_numpy(np.asarray(case["labels"]).astype(np.int64))
        vis = torch.from_numpy(np.asarray(case["visible"]).astype(bool))
        probs = torch.softmax(logits, 0)
        if mode == "slicewise2d":  # metrics per B-scan (2D cases), averaged below
            for z in range(probs.shape[1]):
                rows.append(validation_metrics(probs[:, z], lab[z], case["spacing"], vis[z]))
        else:
            rows.append(validation_metrics(probs, lab, case["spacing"], vis))
        if keep_logits:
            kept.append((logits, lab))
    dice = np.nanmean(np.array([r["dice"] for r in rows], dtype=float), axis=0)
    res = {"dice": [float(d) for d in dice], "mean_dice": float(np.mean(dice)),
           "ece": float(np.nanmean([r["ece"] for r in rows])),
           "bece": float(np.nanmean([r["bece"] for r in rows])) if any(np.isfinite(r["bece"]) for r in rows)
           else float("nan")}
    net.train()
    return res, kept


def _tensorboard_writer(folder: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` writing event files into ``folder``, or None when none is installed.

    tensorboardX comes with the ``train`` extra (``pip install -e .[train]``; ``make`` installs it) and writes
    the event files without the TensorBoard server package; ``torch.utils.tensorboard`` is used when only
    ``tensorboard`` is installed. Without either, the run logs to CSV and JSON only (and says so).
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("No TensorBoard writer installed (pip install -e .[train]): logging to CSV and JSON only.")
            return None
    return SummaryWriter(str(folder))


def train_from_config(path: str | os.PathLike | Mapping[str, Any], *, resume: bool = True, progress: bool = True,
                      overrides: Mapping[str, Any] | None = None, register: bool | None = None,
                      device: str | None = None) -> Path:
    """Train the model described by a config; returns the path of the written ``.safetensors``.

    (With ``optim.stop_after_epoch`` set below ``optim.epochs`` it stops after that epoch and returns the
    checkpoint path instead; running again resumes and gives bit-identical weights on CPU.)

    Args:
        path: JSON config file (or an already-parsed dict).
        resume: continue from ``<output>/checkpoint.pt`` when it exists (same config), else start fresh.
        progress: show a tqdm bar with ETA (main process only).
        overrides: nested dict merged over the config (tests shrink epochs/steps with it).
        register: copy the weights into ``Resources/Models`` and update catalog.json (default: the config's
            ``output.register``).
        device: "cpu", "cuda" or None (CUDA when available). Under torchrun each rank uses its local GPU.
    """
    cfg = load_config(path, overrides)
    dist = ddp.setup_distributed(device)
    try:
        return _train(cfg, dist, resume=resume, progress=progress,
                      register=cfg["output"]["register"] if register is None else register)
    finally:
        ddp.cleanup_distributed()


def _train(cfg: dict, dist: ddp.DistInfo, *, resume: bool, progress: bool, register: bool) -> Path:
    from tqdm.auto import tqdm

    opt_cfg = cfg["optim"]
    if opt_cfg.get("threads"):
        torch.set_num_threads(int(opt_cfg["threads"]))
    out_dir = Path(cfg["output"]["dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    device = dist.device
    seed = int(cfg["seed"])
    torch.manual_seed(seed + dist.rank)
    if dist.is_main:
        (out_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "_source"}, indent=2))

    t_data = time.perf_counter()
    train_vols = _volumes(cfg, "train", rank=dist.rank)
    val_vols = _volumes(cfg, "val", rank=dist.rank)
    data_seconds = time.perf_counter() - t_data
    inp = cfg["input"]
    sampler = PatchSampler(train_vols, inp["patch_size"], fg_fraction=cfg["data"]["fg_fraction"],
                           flip_axes=cfg["data"]["flip_axes"], augment=cfg["data"]["augment"],
                           sdf_classes=len(cfg["classes"]) if _loss_needs_targets(cfg["loss"]) else None,
                           class_balanced=bool(cfg["data"].get("class_balanced", False)),
                           jitter=float(cfg["data"].get("jitter", 0.5)),
                           lowres=cfg["data"].get("lowres"), spatial=cfg["data"].get("spatial"))
    val_cases = _val_cases(val_vols, cfg) if dist.is_main else []

    torch.manual_seed(seed)  # identical initial weights on every rank
    net = build_network(cfg["network"]).to(device)
    if cfg.get("init_from"):
        # two-stage recipes (e.g. CT: per-class ACW to find the tiny lenses, then the pooled rule to tighten
        # their boundaries) start from the first stage's safetensors; resuming overrides it below
        from safetensors.torch import load_file

        init = Path(cfg["init_from"])
        if not init.is_file():
            raise InputError(f"init_from weights {init} not found: run the first-stage config first "
                             "(see docs/TRAINING.md).")
        net.load_state_dict(load_file(str(init), device=str(device)))
    model: torch.nn.Module = net
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = build_training_loss(cfg["loss"]).to(device)
    needs_targets = _loss_needs_targets(cfg["loss"])
    hidden_cfg = _hidden_penalty_config(cfg)
    q_sched = _acw_scheduler(cfg, loss_fn)
    optimizer = torch.optim.AdamW(net.parameters(), lr=float(opt_cfg["lr"]), weight_decay=float(opt_cfg["weight_decay"]))
    use_amp = bool(opt_cfg["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    epochs, spe, bs = int(opt_cfg["epochs"]), int(opt_cfg["steps_per_epoch"]), int(opt_cfg["batch_size"])
    # the global batch stays the config's batch under DDP: each rank draws batch / world patches
    local_bs = max(1, bs // dist.world_size)
    total = epochs * spe

    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch, history, train_seconds = 0, [], 0.0
    if resume and ckpt_path.exists():
        # our own file in runs/ (not a shipped artefact): it holds optimizer state, so torch.load is needed;
        # weights_only=True: tensors, numbers and strings only, so a planted checkpoint cannot run code
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck.get("config_key") == _config_key(cfg):
            net.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            start_epoch, history, train_seconds = int(ck["epoch"]), ck["history"], float(ck["train_seconds"])
            if q_sched is not None:
                q_sched.load_state_dict(ck["acw_scheduler"])
        elif dist.is_main:
            print(f"[train] {ckpt_path} belongs to another config; starting fresh.")

    csv_path = out_dir / "metrics.csv"
    nfg = len(cfg["classes"]) - 1
    fg_keys = [c["key"] for c in sorted(cfg["classes"], key=lambda c: c["value"])][1:]
    tb = None
    if dist.is_main:
        tb = _tensorboard_writer(out_dir / "tb")
        if start_epoch == 0 or not csv_path.exists():
            with open(csv_path, "w", newline="") as fh:
                csv.writer(fh).writerow(["epoch", "step", "lr", "train_loss", "seconds"]
                                        + [f"dice_{k}" for k in fg_keys] + ["mean_dice", "ece", "bece"])

    bar = tqdm(total=total, initial=start_epoch * spe, disable=not (progress and dist.is_main),
               desc=cfg["model_id"], unit="step", dynamic_ncols=True)
    net.train()
    for epoch in range(start_epoch, epochs):
        rng = np.random.default_rng([seed, epoch, dist.rank])
        t0 = time.perf_counter()
        losses = []
        for it in range(spe):
            step = epoch * spe + it
            lr = _lr_at(step, total, float(opt_cfg["lr"]), int(opt_cfg["warmup_steps"]))
            for g in optimizer.param_groups:
                g["lr"] = lr
            if hidden_cfg:
                x_np, y_np, sdf, hid_np = sampler.sample(rng, local_bs, with_hidden=True)
            else:
                x_np, y_np, sdf = sampler.sample(rng, local_bs)
            x = torch.from_numpy(x_np).to(device, non_blocking=True)
            y = torch.from_numpy(y_np).to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(x)
            # losses compute in float32 (ACW's log(p + 1e-7) is meaningless in fp16)
            logits = logits.float()
            if needs_targets:
                loss = loss_fn(logits, y, sdf=sdf.to(device))
            else:
                loss = loss_fn(logits, y)
            if hidden_cfg:
                hid = torch.from_numpy(hid_np).to(device, non_blocking=True)
                loss = loss + hidden_cfg["weight"] * hidden_confidence_penalty(
                    logits, y, hid, margin_px=hidden_cfg["margin_px"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Non-finite loss at step {step}: lower optim.lr or check the data.")
            scaler.scale(loss).backward()
            if opt_cfg.get("grad_clip"):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), float(opt_cfg["grad_clip"]))
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.4f}")
        train_seconds += time.perf_counter() - t0
        mean_loss = float(ddp.all_reduce_sum(torch.tensor([np.mean(losses)], dtype=torch.float64))[0]) / dist.world_size
        if dist.is_main:
            val, _ = _validate(net, val_cases, cfg, device)
            row = {"epoch": epoch + 1, "step": (epoch + 1) * spe, "lr": lr, "train_loss": mean_loss,
                   "seconds": round(train_seconds, 1), **{f"dice_{k}": d for k, d in zip(fg_keys, val["dice"])},
                   "mean_dice": val["mean_dice"], "ece": val["ece"], "bece": val["bece"]}
            if q_sched is not None:
                # adaptive q (METHODS.md 1.2): hill climb on the mean foreground IoU of this validation
                row["acw_q"] = q_sched.q  # the q this epoch trained with
                q_sched.step(float(np.mean([d / (2.0 - d) for d in val["dice"]])))  # IoU = D / (2 - D)
            history.append(row)
            with open(csv_path, "a", newline="") as fh:
                csv.writer(fh).writerow([row[k] for k in ["epoch", "step", "lr", "train_loss", "seconds"]]
                                        + val["dice"] + [val["mean_dice"], val["ece"], val["bece"]])
            with open(out_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if tb is not None:
                for k, v in row.items():
                    if k not in ("epoch", "step"):
                        tb.add_scalar(k, v, row["step"])
            bar.write(f"[{cfg['model_id']}] epoch {epoch + 1}/{epochs} loss {mean_loss:.4f} "
                      f"dice {[round(d, 4) for d in val['dice']]} ece {val['ece']:.4f} bece {val['bece']:.4f}")
            _atomic_torch_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": history,
                                "train_seconds": train_seconds, "config_key": _config_key(cfg),
                                **({"acw_scheduler": q_sched.state_dict()} if q_sched is not None else {})},
                               ckpt_path)
        if q_sched is not None and dist.distributed:
            # only rank 0 validates: every rank takes its q (and state) so all train the same loss
            q = ddp.all_reduce_sum(torch.tensor([q_sched.q if dist.is_main else 0.0], dtype=torch.float64))
            q_sched.q = loss_fn.q = float(q[0])
        ddp.barrier()
        stop = opt_cfg.get("stop_after_epoch")
        if stop and epoch + 1 >= int(stop) and epoch + 1 < epochs:
            # deliberate interruption (tests, time-sliced machines): rerun the same command to resume
            bar.close()
            return ckpt_path
    bar.close()
    if tb is not None:
        tb.close()

    weights_path = out_dir / f"{cfg['model_id']}.safetensors"
    if dist.is_main:
        temperature, t_info = 1.0, {}
        if cfg.get("temperature_scaling", True) and val_cases:
            _, kept = _validate(net, val_cases, cfg, device, keep_logits=True)
            z = torch.cat([k[0].reshape(k[0].shape[0], -1).T for k in kept])
            y = torch.cat([k[1].reshape(-1) for k in kept])
            temperature = fit_temperature(z, y)
            t_info = {"nll_before": temperature_nll(z, y, 1.0), "nll_after": temperature_nll(z, y, temperature),
                      "voxels": int(y.numel())}
        sha, nbytes = save_weights(net, weights_path, metadata={"model_id": cfg["model_id"]})
        entry = catalog_entry(cfg, sha=sha, nbytes=nbytes, temperature=temperature, history=history,
                              seconds=train_seconds, data_seconds=data_seconds, device=str(device),
                              world_size=dist.world_size, temperature_info=t_info,
                              acw_scheduler=q_sched.state_dict() if q_sched is not None else None)
        (out_dir / "catalog_entry.json").write_text(json.dumps(entry, indent=2))
        if register:
            register_model(weights_path, entry)
    ddp.barrier()
    return weights_path


def _acw_scheduler(cfg: Mapping[str, Any], loss_fn: torch.nn.Module) -> Any:
    """The opt-in adaptive-q scheduler (config key ``acw_scheduler``), attached to the ACW loss; else None.

    ``"acw_scheduler": {"delta": 0.1, "bounds": [0.1, 0.9], "min_delta": 0.0125, "direction": 1}`` (any
    subset; ``true`` = these defaults). It starts from ``loss.params.q`` and, after every validation epoch,
    moves ``q`` by a hill climb on the validation mean foreground IoU (:class:`losses.ACWThresholdScheduler`).
    """
    opts = cfg.get("acw_scheduler")
    if not opts:
        return None
    if str(cfg["loss"]["name"]) != "acw":
        raise InputError(f"acw_scheduler drives the ACW loss's q, but this config's loss is "
                         f"{cfg['loss']['name']!r}; remove acw_scheduler or use loss.name 'acw'.")
    from ..losses.acw import ACWThresholdScheduler

    opts = {} if opts is True else dict(opts)
    unknown = set(opts) - {"delta", "bounds", "min_delta", "direction"}
    if unknown:
        raise InputError(f"acw_scheduler: unknown key(s) {sorted(unknown)}; use delta, bounds, min_delta, direction.")
    if "bounds" in opts:
        opts["bounds"] = tuple(float(b) for b in opts["bounds"])
    return ACWThresholdScheduler(loss=loss_fn, q=float(cfg["loss"].get("params", {}).get("q", 0.5)), **opts)


def _config_key(cfg: Mapping[str, Any]) -> str:
    import hashlib

    keep = {k: cfg[k] for k in ("model_id", "input", "network", "loss", "data", "optim", "seed", "init_from",
                                "acw_scheduler") if k in cfg}
    keep = copy.deepcopy(keep)
    for k in ("threads", "stop_after_epoch"):  # do not change the result
        keep["optim"].pop(k, None)
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def catalog_entry(cfg: Mapping[str, Any], *, sha: str, nbytes: int, temperature: float, history: list,
                  seconds: float, data_seconds: float, device: str, world_size: int,
                  temperature_info: Mapping[str, Any] | None = None,
                  heldout_metrics: Mapping[str, Any] | None = None,
                  acw_scheduler: Mapping[str, Any] | None = None) -> dict:
    """The catalog.json entry of a trained model (validated against the schema).

    ``acw_scheduler``: the adaptive-q state at the end of training (final ``q`` and its per-epoch history),
    kept under ``training.acw_scheduler``; the entry's ``loss.params.q`` stays the starting value.
    """
    src = cfg.get("_source", "")
    rel = src
    if src and src != "<dict>":
        p = Path(src).resolve()
        parts = p.parts
        rel = str(Path(*parts[parts.index("LensSegCalib"):])) if "LensSegCalib" in parts else str(p)
    entry = {
        "id": cfg["model_id"], "title": cfg["title"], "version": cfg["version"], "task": cfg["task"],
        "modality": cfg["modality"], "description": cfg.get("description", ""),
        "classes": copy.deepcopy(cfg["classes"]), "input": copy.deepcopy(cfg["input"]),
        "network": copy.deepcopy(cfg["network"]), "loss": copy.deepcopy(cfg["loss"]),
        "temperature": float(temperature),
        "training": {"command": f"lenssegcalib train --config {rel} --register", "config": rel,
                     "seconds": round(float(seconds), 1), "data_seconds": round(float(data_seconds), 1),
                     "device": device, "processes": int(world_size),
                     "epochs": int(cfg["optim"]["epochs"]), "steps_per_epoch": int(cfg["optim"]["steps_per_epoch"]),
                     "batch_size": int(cfg["optim"]["batch_size"]),
                     "train_seeds": cfg["data"]["train_seeds"], "val_seeds": cfg["data"]["val_seeds"],
                     "final_validation": history[-1] if history else {},
                     "temperature_fit": dict(temperature_info or {})},
        "heldout_metrics": dict(heldout_metrics or {}),
        "weights": {"file": f"{cfg['model_id']}.safetensors", "sha256": sha, "bytes": int(nbytes)},
    }
    if acw_scheduler:
        entry["training"]["acw_scheduler"] = dict(acw_scheduler)
    spec_from_dict(entry)  # schema check now, not when a user loads it
    return entry


def register_model(weights_path: Path, entry: Mapping[str, Any], models_dir: Path | None = None) -> Path:
    """Copy weights into the models folder and insert/replace the catalog entry; returns the copied file."""
    mdir = Path(models_dir) if models_dir is not None else MODELS_DIR
    dst = mdir / entry["weights"]["file"]
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(weights_path, tmp)
    os.replace(tmp, dst)
    update_catalog_entry(entry, mdir / "catalog.json")
    return dst
