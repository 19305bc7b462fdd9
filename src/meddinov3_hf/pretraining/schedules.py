"""Per-iteration schedules and AdamW parameter groups for pretraining (docs/method.md §5)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import OptimConfig, PretrainConfig

__all__ = [
    "PretrainSchedules",
    "cosine_schedule",
    "linear_warmup_then_constant",
    "param_groups",
    "scaled_lr",
]


def scaled_lr(base_lr: float, global_batch: int | None) -> float:
    """Peak lr under DINOv3's `sqrt_wrt_1024` rule: base_lr · 4 · sqrt(global_batch / 1024) (the factor 4 is in
    dinov3/configs/config.py `apply_scaling_rules_to_cfg` and dinov3/train/train.py `build_schedulers_v2`, not
    in the rule's name). `global_batch` None: no scaling."""
    if global_batch is None:
        return float(base_lr)
    return float(base_lr) * 4.0 * math.sqrt(float(global_batch) / 1024.0)


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
    freeze_steps: int = 0,
) -> np.ndarray:
    """DINO-style per-iteration array of length `total_steps`: zeros for `freeze_steps`, a linear warm-up
    from `start_warmup_value` to `base` over `warmup_steps`, then a cosine from `base` (first step) down to
    `final` (last step)."""
    if freeze_steps + warmup_steps > total_steps:
        raise ValueError("freeze_steps + warmup_steps exceed total_steps")
    freeze = np.zeros(freeze_steps)
    warmup = np.linspace(start_warmup_value, base, warmup_steps, endpoint=False)
    n_cos = total_steps - freeze_steps - warmup_steps
    phase = np.arange(n_cos) / max(n_cos - 1, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * phase))
    return np.concatenate([freeze, warmup, cosine]).astype(np.float64)


def linear_warmup_then_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """`start` → `end` linearly over `warmup_steps` (reaching `end` at step `warmup_steps`), then constant."""
    warmup = np.linspace(start, end, warmup_steps, endpoint=False)
    return np.concatenate([warmup, np.full(max(total_steps - warmup_steps, 0), end)])[:total_steps]


@dataclass
class PretrainSchedules:
    """Per-iteration arrays for everything the trainer updates each step."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PretrainSchedules:
        """Build from plain config values; a key left out takes `PretrainConfig`'s default (the stage-1 recipe,
        docs/method.md §5; `PretrainConfig.schedule_settings` gives every key of a config).

        Keys: epochs, iters_per_epoch, base_lr, min_lr, warmup_epochs, wd, wd_end, momentum_teacher,
        final_momentum_teacher, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs,
        freeze_last_layer_epochs, batch_size (global; base_lr is scaled by 4·sqrt(batch_size / 1024) when
        given, see `scaled_lr` — min_lr is not scaled, as in DINOv3's v1 `CosineScheduler`), lr_schedule
        ("cosine" or "constant": linear warm-up from 0, then the scaled base_lr throughout), total_steps (the
        schedules span this many steps; every epoch count is rescaled by total_steps / (epochs ·
        iters_per_epoch), as transformers' Trainer `max_steps` sets the schedule length). Epoch counts may be
        fractional.
        """
        c = {**PretrainConfig().schedule_settings(), **cfg}
        ipe = float(c["iters_per_epoch"])
        if c["total_steps"] is not None:
            ipe = int(c["total_steps"]) / float(c["epochs"])  # all schedules compressed/stretched to span it

        def steps(epochs: float) -> int:
            return int(round(float(epochs) * ipe))

        total = steps(c["epochs"]) if c["total_steps"] is None else int(c["total_steps"])
        if total < 1:
            raise ValueError(f"the schedules would span {total} steps (epochs × iters_per_epoch)")
        base_lr = scaled_lr(c["base_lr"], c["batch_size"])
        warmup = min(steps(c["warmup_epochs"]), total)
        if c["lr_schedule"] == "constant":
            lr = linear_warmup_then_constant(0.0, base_lr, warmup, total)
        elif c["lr_schedule"] == "cosine":
            lr = cosine_schedule(base_lr, c["min_lr"], total, warmup_steps=warmup)
        else:
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {c['lr_schedule']!r}")
        last_layer_lr = lr.copy()
        last_layer_lr[: steps(c["freeze_last_layer_epochs"])] = 0.0  # prototypes frozen early for stability
        return cls(
            lr=lr,
            wd=cosine_schedule(c["wd"], c["wd_end"], total),
            momentum=cosine_schedule(c["momentum_teacher"], c["final_momentum_teacher"], total),
            teacher_temp=linear_warmup_then_constant(
                c["warmup_teacher_temp"], c["teacher_temp"], steps(c["warmup_teacher_temp_epochs"]), total
            ),
            last_layer_lr=last_layer_lr,
        )

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        """Values at `step` (clamped to the last step, so resuming past the end keeps the final values)."""
        i = min(max(step, 0), len(self) - 1)
        return {
            "lr": float(self.lr[i]),
            "wd": float(self.wd[i]),
            "momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
            "last_layer_lr": float(self.last_layer_lr[i]),
        }


_BLOCK_RE = re.compile(r"(?:^|\.)(?:layer|blocks)\.(\d+)\.")
_TOKEN_NAMES = ("cls_token", "register_tokens", "mask_token", "storage_tokens")


def _segment_in(name: str, key: str) -> bool:
    """`key` ("a." style prefix or bare word) starts a dotted segment of `name`."""
    return name.startswith(key) or f".{key}" in name


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    layer_decay: float = OptimConfig.layer_decay,
    patch_embed_lr_mult: float = OptimConfig.patch_embed_lr_mult,
    num_layers: int = 12,
    head_prefixes: tuple[str, ...] = ("dino_head.", "ibot_head."),
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay and no weight decay on 1-D/bias/norm/token params.

    Layer id: 0 for embeddings, i + 1 for block i (`...layer.{i}.` or `...blocks.{i}.`), num_layers + 1 for
    the final norm, the heads and anything else; lr multiplier = layer_decay ** (num_layers + 1 − layer_id),
    times patch_embed_lr_mult for the patch embedding. Any name prefix is allowed (`backbone.model.layer.3.`).
    Each group holds "params", "lr_multiplier", "wd_multiplier" (0 or 1), "is_last_layer" (the heads'
    prototype layers, frozen early); the trainer sets lr = lr · lr_multiplier (last_layer_lr for last-layer
    groups) and weight_decay = wd · wd_multiplier. Parameters with requires_grad=False are skipped.
    """
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        is_head = any(_segment_in(name, p) for p in head_prefixes)
        block = _BLOCK_RE.search(name)
        if is_head:
            layer_id = num_layers + 1
        elif block is not None:
            layer_id = int(block.group(1)) + 1
        elif _segment_in(name, "embeddings.") or any(t in name for t in _TOKEN_NAMES):
            layer_id = 0
        else:
            layer_id = num_layers + 1
        lr_mult = layer_decay ** (num_layers + 1 - layer_id)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = (
            param.ndim <= 1
            or name.endswith(".bias")
            or "norm" in (name.split(".")[-2] if "." in name else "")  # norm1 / norm2 / norm / layernorm
            or any(t in name for t in _TOKEN_NAMES)
        )
        is_last = is_head and "last_layer" in name
        key = (round(lr_mult, 12), 0.0 if no_wd else 1.0, is_last)
        group = groups.setdefault(
            key, {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": is_last}
        )
        group["params"].append(param)
    return list(groups.values())
