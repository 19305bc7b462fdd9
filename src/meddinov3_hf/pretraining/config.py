"""Pretraining stage configuration: nested dataclasses read from YAML, overridable by dotted CLI keys.

    cfg = load_config("training/configs/stage1.yaml", ["optim.base_lr=5e-4", "crops.n_local=6"])

Every YAML key must exist in the dataclasses below (typos fail loudly instead of being ignored). Values of
overrides are parsed as YAML scalars/lists (`1e-3`, `true`, `null`, `[0.1, 0.5]`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "PretrainConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
]


@dataclass
class ModelConfig:
    """`model:` the student backbone's training settings."""

    drop_path_rate: float = 0.3  # student only; the teacher runs in eval mode (no drop path)
    # DINOv3 RoPE coordinate rescale augmentation (student, training only; needs rope_precision fp32).
    # Off by default: MedDINOv3 continues from weights that did not see it in the CT stages (uncertain).
    pos_embed_rescale: float | None = None
    rope_precision: str | None = None  # None: keep the init checkpoint's setting
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    compile: bool = False
    # MedDINOv3Config kwargs for a from-scratch run (no --init); ignored when --init is given.
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadsConfig:
    """`heads:` separate DINO and iBOT heads, each with its own sizes (dinov3/configs/ssl_default_config.yaml
    `dino.head_*` and `ibot.head_*`, `ibot.separate_head: true`)."""

    out_dim: int = 65536  # DINO prototypes (dino.head_n_prototypes)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    ibot_out_dim: int | None = None  # iBOT prototypes (ibot.head_n_prototypes); None: out_dim
    ibot_hidden_dim: int | None = None  # None: hidden_dim
    ibot_bottleneck_dim: int | None = None  # None: bottleneck_dim
    # Heads stored with --init (a converted release folder, the release .pth, an export or a checkpoint) set
    # the head sizes and weights; false: fresh heads of the sizes above.
    from_init: bool = True
    # Fresh heads only: "dinov3" = trunc_normal(std 0.02) prototype rows (dinov3/layers/dino_head.py); "unit" =
    # the same rows scaled to unit norm (DINOv2's weight-norm start).
    last_layer_init: str = "dinov3"

    def sizes(self, head: str) -> dict[str, int]:
        """DINOHead kwargs of "dino_head" or "ibot_head"."""
        if head == "dino_head":
            return dict(
                out_dim=self.out_dim,
                hidden_dim=self.hidden_dim,
                bottleneck_dim=self.bottleneck_dim,
                nlayers=self.nlayers,
            )
        return dict(
            out_dim=self.ibot_out_dim or self.out_dim,
            hidden_dim=self.ibot_hidden_dim or self.hidden_dim,
            bottleneck_dim=self.ibot_bottleneck_dim or self.bottleneck_dim,
            nlayers=self.nlayers,
        )


@dataclass
class CropsConfig:
    """`crops:` the multi-crop of every slice (`crops.MultiCropAugmentation`)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    gram_size: int | None = None  # Gram-teacher resolution of the global crops (None: same as global)
    # Stage 3: per-step choice among {global, local, gram, p}; identical on all processes for a step.
    size_choices: list[dict[str, Any]] | None = None


@dataclass
class MaskingConfig:
    """`masking:` iBOT's masked patches (`masking.sample_masks`)."""

    probability: float = 0.5  # fraction of global crops that get an iBOT mask
    ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])


@dataclass
class LossConfig:
    """`loss:` the weights of the four losses, the Gram loss's options, and the targets' temperature and
    Sinkhorn-Knopp iterations (`losses`)."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    # Applied to the sum over global crops, i.e. 0.1·G·mean (dinov3/train/ssl_meta_arch.py `koleo_scale`);
    # the logged "koleo" is the mean over global crops, as DINOv3 logs `koleo_loss`.
    koleo_weight: float = 0.1
    gram_weight: float = 0.0
    gram_remove_negatives: bool = False
    gram_per_image: bool = True
    # Gram teacher at a higher resolution: its patch map is resized to the student's grid bicubically without
    # antialiasing (dinov3/configs/ssl_default_config.yaml gram.global_teacher_resize_{method,antialias}).
    gram_resize_antialias: bool = False
    student_temp: float = 0.1
    sinkhorn_iterations: int = 3


@dataclass
class GramConfig:
    """`gram:` Gram anchoring's teacher (its loss weight is `loss.gram_weight`)."""

    enabled: bool = False
    checkpoint: str | None = None  # export folder or training checkpoint; None: the --init weights
    refresh_every: int = 0  # >0: copy the EMA teacher into the Gram teacher every N steps


@dataclass
class OptimConfig:
    """`optim:` AdamW, its peak learning rate and parameter groups (`schedules.param_groups`)."""

    base_lr: float = 1e-3
    min_lr: float = 1e-6
    # DINOv3's `sqrt_wrt_1024` rule (dinov3/configs/config.py `apply_scaling_rules_to_cfg` and
    # dinov3/train/train.py `build_schedulers_v2`): lr ·= 4·sqrt(global_batch / 1024).
    scale_lr_with_batch: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    # Clipped per module (backbone, DINO head, iBOT head), one norm each (dinov3/train/train.py); 0: off.
    clip_grad: float = 3.0
    fused: bool | None = None  # None: fused AdamW on CUDA


@dataclass
class ScheduleConfig:
    """`schedule:` the per-step lr, weight decay, teacher momentum and temperature (`schedules`); every
    `*_epochs` value counts epochs of `iters_per_epoch` steps (rescaled when `train.max_steps` is set)."""

    # "cosine": linear warm-up to the peak lr, then cosine to min_lr (stage 1, dinov3/train/cosine_lr_scheduler.py
    # `CosineScheduler`). "constant": linear warm-up from 0 to the peak lr, then constant (DINOv3's v2 schedules
    # with peak == end, dinov3/configs/train/dinov3_vit7b16_gram_anchor.yaml); min_lr is not used.
    lr_schedule: str = "cosine"
    epochs: float = 100
    iters_per_epoch: int = 1250
    warmup_epochs: float = 10
    wd: float = 0.04
    wd_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    freeze_last_layer_epochs: float = 1


@dataclass
class TrainConfig:
    """`train:` data, length, precision, logging and saving of the run."""

    batch_size: int = 64  # per process and micro-step
    gradient_accumulation_steps: int = 1
    num_workers: int = 8  # DataLoader workers per process (capped by the shards each process gets)
    shuffle_buffer_size: int = 1000
    seed: int = 0
    # Length of the run: every schedule spans max_steps (warm-ups and freezes shrink in proportion), as
    # transformers' Trainer `max_steps` does. None: schedule.epochs × schedule.iters_per_epoch.
    max_steps: int | None = None
    stop_at_step: int | None = None  # stop early at this step; the schedules keep their full length
    mixed_precision: str = "bf16"
    log_every: int = 10
    log_with: str | None = "tensorboard"
    project_name: str = "meddinov3_pretrain"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    export_every: int = 0  # >0: also export the teacher backbone every N steps


@dataclass
class HealthConfig:
    """`health:` the periodic health probe of the EMA teacher (`health.HealthProbe`)."""

    every: int = 500  # 0 disables
    num_slices: int = 256
    image_size: int = 224
    batch_size: int = 64
    dataset: str | None = None  # held-out CT-3M folder/Hub id; None: the first slices of --dataset


@dataclass
class PretrainConfig:
    """One pretraining stage: the top-level keys of its YAML and one section per dataclass above."""

    stage: str = "stage1"
    dataset: str | None = None
    init: str | None = None
    output_dir: str = "outputs/pretrain"
    resume: str | None = None  # "latest" or a checkpoint folder
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def validate(self) -> None:
        if self.gram.enabled and self.loss.gram_weight <= 0:
            raise ValueError("gram.enabled needs loss.gram_weight > 0")
        if self.loss.gram_weight > 0 and not self.gram.enabled:
            raise ValueError("loss.gram_weight > 0 needs gram.enabled=true")
        if self.crops.size_choices:
            total = 0.0
            for choice in self.crops.size_choices:
                missing = {"global", "local", "p"} - set(choice)
                if missing:
                    raise ValueError(f"crops.size_choices entry {choice} lacks {sorted(missing)}")
                total += float(choice["p"])
            if total <= 0:
                raise ValueError("crops.size_choices probabilities must sum to > 0")
        if self.train.gradient_accumulation_steps < 1 or self.train.batch_size < 2:
            raise ValueError("train.batch_size must be >= 2 (KoLeo) and gradient_accumulation_steps >= 1")
        if self.schedule.lr_schedule not in ("cosine", "constant"):
            raise ValueError(
                f"schedule.lr_schedule must be 'cosine' or 'constant', got {self.schedule.lr_schedule!r}"
            )
        for key in ("max_steps", "stop_at_step"):
            value = getattr(self.train, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"train.{key} must be a positive integer, got {value!r}")
        if self.model.pos_embed_rescale is not None and self.model.rope_precision == "bf16":
            raise ValueError("model.pos_embed_rescale is only applied with rope_precision fp32")

    def schedule_settings(self, scaling_batch: int | None = None) -> dict[str, Any]:
        """The values `PretrainSchedules.from_config` reads: the `schedule` section, `optim.base_lr`/`min_lr`,
        `train.max_steps` as `total_steps`, and `batch_size`, the global batch the peak lr is scaled with
        (`scaled_lr`; None: unscaled)."""
        return {
            **dataclasses.asdict(self.schedule),
            "base_lr": self.optim.base_lr,
            "min_lr": self.optim.min_lr,
            "batch_size": scaling_batch,
            "total_steps": self.train.max_steps,
        }


def _merge(obj: Any, values: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            raise KeyError(f"unknown config key {where}{key!r}; valid: {sorted(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"config key {where}{key} is a section; got {value!r}")
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(current, value))


def _coerce(current: Any, value: Any) -> Any:
    # YAML reads "1" as int where a float is meant, and "1e-3" as a str in YAML 1.1.
    if isinstance(current, float) and not isinstance(current, bool):
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
    if isinstance(current, str) and isinstance(value, bool):
        return "yes" if value else "no"  # YAML 1.1 reads `mixed_precision: no` as False
    return value


def apply_overrides(cfg: PretrainConfig, overrides: list[str]) -> PretrainConfig:
    """Apply `section.key=value` strings (value parsed as YAML) in order."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        nested: Any = yaml.safe_load(raw) if raw != "" else None
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _merge(cfg, nested, "")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    cfg = PretrainConfig()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        _merge(cfg, data, "")
    apply_overrides(cfg, list(overrides or []))
    cfg.validate()
    return cfg


def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_config(cfg: PretrainConfig) -> dict[str, Any]:
    """Flat `section.key` → scalar dict for trackers (TensorBoard hparams take scalars only)."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                out[prefix + k] = v
            else:
                out[prefix + k] = str(v)

    walk(config_to_dict(cfg), "")
    return out
