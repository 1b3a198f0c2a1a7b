"""Training: ``lenssegcalib train --config FILE``, post-hoc temperature scaling, DDP (torchrun).

Public API:
    train_from_config(path, *, resume=True, progress=True, overrides=None, register=None, device=None) -> Path
    add_train_subcommand(subparsers) / run_train_command(args)  (the CLI wiring)
    fit_temperature(logits, labels, ...) -> float, apply_temperature(logits, T)
    evaluate_model(...) (held-out evaluation, in ``.evaluate``)
Configs of the shipped models: ``LensSegCalibLib/training/configs/*.json`` (``CONFIGS_DIR``).
"""
from __future__ import annotations

from pathlib import Path

from .cli import add_train_subcommand, main, run_train_command
from .temperature import apply_temperature, fit_temperature
from .trainer import load_config, train_from_config

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

__all__ = ["train_from_config", "load_config", "add_train_subcommand", "run_train_command", "main",
           "fit_temperature", "apply_temperature", "CONFIGS_DIR"]
