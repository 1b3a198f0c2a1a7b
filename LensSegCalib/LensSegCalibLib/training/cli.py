"""Command line of the training package: ``lenssegcalib train`` and ``python -m LensSegCalibLib.training``.

    python -m LensSegCalibLib.training --config LensSegCalib/LensSegCalibLib/training/configs/asoct-lens-acw.json
    torchrun --nproc_per_node=2 -m LensSegCalibLib.training --config cfg.json     # DDP (gloo on CPU)
    python -m LensSegCalibLib.training evaluate --model asoct-lens-acw            # held-out metrics
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["add_train_subcommand", "run_train_command", "main"]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (JSON), e.g. training/configs/asoct-lens-acw.json")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start fresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--register", action="store_true",
                   help="copy the weights to Resources/Models and update catalog.json when done")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<model_id>)")


def add_train_subcommand(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``train`` to a CLI's subparsers; dispatch with :func:`run_train_command` (set as ``func``)."""
    p = subparsers.add_parser("train", help="train a model from a JSON config (phantom data)",
                              description="Train a LensSegCalib model from a JSON config.")
    _add_train_args(p)
    p.set_defaults(func=run_train_command)
    return p


def run_train_command(args: argparse.Namespace) -> int:
    """Run ``train`` from parsed arguments; prints the weights path; returns the exit code."""
    from .trainer import train_from_config

    overrides: dict = {}
    if args.threads:
        overrides.setdefault("optim", {})["threads"] = int(args.threads)
    if args.out:
        overrides.setdefault("output", {})["dir"] = args.out
    path = train_from_config(args.config, resume=not args.no_resume, progress=not args.no_progress,
                             overrides=overrides or None, register=True if args.register else None,
                             device=args.device)
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":
        from .evaluate import main as eval_main

        return eval_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m LensSegCalibLib.training",
                                     description="Train a LensSegCalib model from a JSON config.")
    _add_train_args(parser)
    args = parser.parse_args(argv)
    try:
        code = run_train_command(args)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last epoch checkpoint", file=sys.stderr)
        return 130
    from . import ddp

    if ddp.launched_by_torchrun():  # weights and logs are written: leave without C++ teardown (see exit_worker)
        ddp.exit_worker(code)
    return code
