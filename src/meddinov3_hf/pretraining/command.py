"""The pretraining command line (`training/pretrain.py`, `meddinov3 pretrain`): options, config, run.

    accelerate launch training/pretrain.py --config training/configs/stage1.yaml \
        --dataset /data/ct3m --init /models/dinov3-vitb16 --output_dir runs/stage1 [key.sub=value ...]
"""

from __future__ import annotations

import argparse

from .config import PretrainConfig, load_config

__all__ = ["add_pretrain_arguments", "config_from_args", "run_pretrain"]


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `training/pretrain.py` / `meddinov3 pretrain`. Parse with `parse_intermixed_args` so that
    dotted overrides may sit between options."""
    parser.add_argument("--config", required=True, help="stage YAML (training/configs/stage{1,2,3}.yaml)")
    parser.add_argument("--dataset", help="CT-3M build folder, Parquet glob or Hub dataset id")
    parser.add_argument(
        "--init", help="backbone folder (MedDINOv3/DINOv3), export or checkpoint; omit: scratch"
    )
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir")
    parser.add_argument(
        "--max_steps",
        "--max-steps",
        dest="max_steps",
        type=int,
        help="train N steps with every schedule (warm-up, cosine, teacher momentum/temperature) spanning N, as "
        "finetune.py/the Trainer does",
    )
    parser.add_argument(
        "--stop_at_step",
        "--stop-at-step",
        dest="stop_at_step",
        type=int,
        help="stop early at step N but keep the full-length schedules (e.g. to try the start of a long run)",
    )
    # A flag, not nargs="?": an optional value would swallow the first dotted override after it.
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    parser.add_argument(
        "--resume_from", "--resume-from", dest="resume_from", help="continue from this checkpoint"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    overrides = list(args.overrides or [])
    for key in ("dataset", "init", "output_dir"):
        value = getattr(args, key, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "resume_from", None):
        overrides.append(f"resume={args.resume_from}")
    elif getattr(args, "resume", False):
        overrides.append("resume=latest")
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if getattr(args, "stop_at_step", None) is not None:
        overrides.append(f"train.stop_at_step={args.stop_at_step}")
    # Strings passed through YAML parsing could turn into numbers/bools; set paths verbatim instead.
    cfg = load_config(args.config, [o for o in overrides if o.split("=", 1)[0] not in _PATH_KEYS])
    for o in overrides:
        key, _, value = o.partition("=")
        if key in _PATH_KEYS:
            setattr(cfg, key, value)
    cfg.validate()
    return cfg


_PATH_KEYS = ("dataset", "init", "output_dir", "resume")


def run_pretrain(args: argparse.Namespace) -> int:
    """Train; a bad input (file, option, checkpoint) is one line on stderr and exit code 2, as the CLI does."""
    import sys

    from .loop import train  # the loop module re-exports this one's functions

    try:
        cfg = config_from_args(args)
        train(cfg)
    except (ValueError, OSError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
