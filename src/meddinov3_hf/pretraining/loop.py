"""The accelerate pretraining loop: data, optimiser, schedules, checkpoint/resume, logging, export, health.

    accelerate launch training/pretrain.py --config training/configs/stage1.yaml \
        --dataset /data/ct3m --init /models/dinov3-vitb16 --output_dir runs/stage1 [key.sub=value ...]

Distribution is accelerate's (`accelerate config`/`launch`); only the student is prepared (and only it is in
the optimiser). With DDP the EMA teacher and the Gram teacher are plain replicas updated/used identically on
every process. With FSDP2 (`fsdp_version: 2`, e.g. training/configs/accelerate_fsdp.yaml) they are sharded
exactly like the student, the EMA update is a local lerp of matching shards, checkpoints store their full
state dicts (same files as with DDP), and exports/health probes gather the full teacher. FSDP1 and DeepSpeed
are refused with a clear error.

Exact resume: everything random is a function of (seed, step, rank[, example position]): per-step torch
seeding (drop path, RoPE augmentation), per-step iBOT masks and stage-3 crop sizes, per-example crop
generators. The data order of a process is its `split_dataset_by_node` stream, epochs chained with
`set_epoch(epoch)`; each DataLoader worker reads that whole stream and renders every n-th batch, so the
content of batch t does not depend on the number of workers, and a checkpoint stores the stream position
(epoch, offset) of every process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from meddinov3_hf.configuration_meddinov3 import MedDINOv3Config
from meddinov3_hf.image_processing_meddinov3 import MedDINOv3ImageProcessor
from meddinov3_hf.modeling_meddinov3 import MedDINOv3Model

from .checkpoints import (
    HEAD_NAMES,
    HEADS_FILE,
    STATE_FILE,
    CheckpointLoadError,
    head_sizes,
    latest_checkpoint,
    load_init,
    load_resume_state,
)
from .config import PretrainConfig, config_to_dict, flat_config, load_config
from .crops import MultiCropAugmentation, collate_multicrop
from .health import HealthProbe
from .masking import sample_masks
from .meta_arch import SelfDistillationMetaArch, StepInputs
from .schedules import PretrainSchedules, param_groups, scaled_lr

__all__ = [
    "CropBatchStream",
    "CropSizePlan",
    "add_pretrain_arguments",
    "build_backbone",
    "export_teacher",
    "run_pretrain",
    "train",
]

logger = logging.getLogger(__name__)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (order matters)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


class CropSizePlan:
    """(global, local, gram) crop sizes of a step; stage 3 samples them from `size_choices` with a generator
    seeded by (seed, step), so every process (and every loader worker) agrees."""

    def __init__(self, crops: Any, gram_enabled: bool, seed: int):
        self.crops, self.gram_enabled, self.seed = crops, gram_enabled, seed
        choices = crops.size_choices or []
        self.choices = [(int(c["global"]), int(c["local"]), c.get("gram")) for c in choices]
        p = np.array([float(c["p"]) for c in choices], dtype=np.float64)
        self.p = p / p.sum() if len(p) else p

    def at(self, step: int) -> tuple[int, int, int | None]:
        if not self.choices:
            g, loc, gram = self.crops.global_size, self.crops.local_size, self.crops.gram_size
        else:
            rng = np.random.default_rng(mix_seed(self.seed, 0x5A7E5, step))
            g, loc, gram = self.choices[int(rng.choice(len(self.choices), p=self.p))]
        if not self.gram_enabled:
            gram = None
        return int(g), int(loc), (int(gram) if gram is not None and int(gram) != int(g) else None)

    def max_sizes(self) -> tuple[int, int, int | None]:
        sizes = [self.at(0)] if not self.choices else [(g, lc, gr) for g, lc, gr in self.choices]
        grams = [s[2] for s in sizes if s[2] is not None]
        return max(s[0] for s in sizes), max(s[1] for s in sizes), (max(grams) if grams else None)


class CropBatchStream(torch.utils.data.IterableDataset):
    """Collated multi-crop batches from one process's slice stream, infinitely (epochs chained).

    Batch t (0-based, counted on this process) holds examples [t·B, (t+1)·B) of the chained stream; loader
    worker w of n renders the batches with t ≡ w (mod n), so the DataLoader's round-robin order yields
    t = start_batch, start_batch + 1, ... Each batch also carries `position` = (epoch, offset) just past its
    last example, which a checkpoint stores."""

    def __init__(
        self,
        dataset: Any,
        augmentation: MultiCropAugmentation,
        sizes: CropSizePlan,
        batch_size: int,
        accumulation: int,
        seed: int,
        rank: int,
        start_batch: int = 0,
        start_position: tuple[int, int] = (0, 0),
    ):
        super().__init__()
        self.dataset, self.augmentation, self.sizes = dataset, augmentation, sizes
        self.batch_size, self.accumulation = batch_size, accumulation
        self.seed, self.rank = seed, rank
        self.start_batch, self.start_position = start_batch, start_position

    def _examples(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        epoch, offset = self.start_position
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            index = -1
            for index, example in enumerate(self.dataset):
                if index >= offset:
                    yield epoch, index, example
            if index < 0:
                raise RuntimeError(
                    f"process {self.rank} received no CT slices: fewer data rows than processes?"
                )
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # datasets splits its shards between loader workers when iterated inside one; we want every worker to
        # see the whole process stream (striding by batch instead), so hide the worker info from it.
        examples = _without_worker_info(self._examples) if info is not None else self._examples()
        t = self.start_batch
        while True:
            batch_examples = [next(examples) for _ in range(self.batch_size)]
            if (t - self.start_batch) % n_workers == worker:
                yield self._render(t, batch_examples)
            t += 1

    def _render(self, t: int, batch_examples: list[tuple[int, int, dict[str, Any]]]) -> dict[str, Any]:
        g_size, l_size, gram_size = self.sizes.at(t // self.accumulation)
        samples = []
        for epoch, index, example in batch_examples:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, epoch, index))
            image = torch.as_tensor(example["image"]).to(torch.float32)
            samples.append(
                self.augmentation(
                    image, generator=gen, global_size=g_size, local_size=l_size, gram_size=gram_size
                )
            )
        batch = collate_multicrop(samples)
        last_epoch, last_index, _ = batch_examples[-1]
        batch["position"] = torch.tensor([last_epoch, last_index + 1])
        batch["batch_index"] = torch.tensor(t)
        return batch


def _without_worker_info(factory) -> Iterator[Any]:
    """Run a generator with torch's worker info hidden (datasets would otherwise shard per worker)."""
    import torch.utils.data._utils.worker as worker_mod

    gen = factory()
    while True:
        saved = worker_mod._worker_info
        worker_mod._worker_info = None
        try:
            item = next(gen)
        finally:
            worker_mod._worker_info = saved
        yield item


def open_slice_stream(cfg: PretrainConfig, rank: int, world_size: int) -> Any:
    from meddinov3_hf.data.ct3m import load_ct3m

    if cfg.dataset is None:
        raise ValueError("no dataset: pass --dataset DIR_OR_HUB_ID (or dataset=... in the config)")
    return load_ct3m(
        cfg.dataset,
        streaming=True,
        shuffle_buffer_size=cfg.train.shuffle_buffer_size,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
    )


def build_augmentation(cfg: PretrainConfig) -> MultiCropAugmentation:
    c = cfg.crops
    return MultiCropAugmentation(
        global_size=c.global_size,
        local_size=c.local_size,
        n_local=c.n_local,
        global_scale=tuple(c.global_scale),
        local_scale=tuple(c.local_scale),
        gram_size=None,  # per step, from CropSizePlan
    )


# ---------------------------------------------------------------------------------------------------------
# Models: init, export
# ---------------------------------------------------------------------------------------------------------


def _backbone_overrides(cfg: PretrainConfig) -> dict[str, Any]:
    m = cfg.model
    out: dict[str, Any] = {"drop_path_rate": m.drop_path_rate, "pos_embed_rescale": m.pos_embed_rescale}
    if m.rope_precision is not None:
        out["rope_precision"] = m.rope_precision
    return out


SCRATCH_LAYERSCALE = 1.0


def build_backbone(cfg: PretrainConfig, init: str | None) -> tuple[MedDINOv3Model, dict[str, torch.Tensor]]:
    """The student backbone (from `init` or from scratch) with the stage's training overrides, and any
    pretrained head weights found next to `init`."""
    if init is None:
        # LayerScale starts at SCRATCH_LAYERSCALE unless model.scratch sets layerscale_value: with DINOv3's 1e-5
        # (models/vision_transformer.py) a fresh ViT's blocks add ~1e-5 to the cls token, so every image gets
        # the same CLS feature to float precision (mean pairwise cosine 1.000000, retrieval 0) and the DINO loss
        # has nothing image-specific to distil at the start of a from-scratch run. Continued pretraining
        # (--init) keeps the checkpoint's trained LayerScale.
        scratch = {"layerscale_value": SCRATCH_LAYERSCALE, **cfg.model.scratch}
        config = MedDINOv3Config(**scratch, **_backbone_overrides(cfg))
        config._attn_implementation = cfg.model.attn_implementation
        return MedDINOv3Model(config), {}
    config, state, heads = load_init(init)
    config = MedDINOv3Config.from_dict({**config.to_dict(), **_backbone_overrides(cfg)})
    config._attn_implementation = cfg.model.attn_implementation
    model = MedDINOv3Model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "periods" not in k]  # non-persistent RoPE buffer
    if missing or unexpected:
        raise ValueError(f"--init {init}: missing {missing[:5]}, unexpected {unexpected[:5]} backbone keys")
    return model, heads


def heads_config_from_init(cfg: PretrainConfig, heads: dict[str, torch.Tensor]) -> bool:
    """Set `cfg.heads` sizes from head weights found with --init (`heads.from_init`); True if they will load.
    Both heads must be present; one without the other raises with the key names."""
    if not heads or not cfg.heads.from_init:
        return False
    present = {name for name in HEAD_NAMES if any(k.startswith(name + ".") for k in heads)}
    if present != set(HEAD_NAMES):
        raise CheckpointLoadError(
            f"--init {cfg.init}: head weights hold {sorted(present)} but not {sorted(set(HEAD_NAMES) - present)}"
        )
    dino, ibot = head_sizes(heads, "dino_head"), head_sizes(heads, "ibot_head")
    if dino["nlayers"] != ibot["nlayers"]:
        raise CheckpointLoadError(f"--init {cfg.init}: DINO and iBOT heads differ in depth ({dino}, {ibot})")
    h = cfg.heads
    h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers = (
        dino["out_dim"],
        dino["hidden_dim"],
        dino["bottleneck_dim"],
        dino["nlayers"],
    )
    h.ibot_out_dim, h.ibot_hidden_dim, h.ibot_bottleneck_dim = (
        ibot["out_dim"],
        ibot["hidden_dim"],
        ibot["bottleneck_dim"],
    )
    return True


def load_heads(meta: SelfDistillationMetaArch, heads: dict[str, torch.Tensor], source: str) -> None:
    """Load `dino_head.*`/`ibot_head.*` weights into student and teacher; every head key must match."""
    for branch in (meta.student, meta.teacher):
        for name in HEAD_NAMES:
            module = getattr(branch, name)
            part = {k[len(name) + 1 :]: v for k, v in heads.items() if k.startswith(name + ".")}
            missing, unexpected = module.load_state_dict(part, strict=False)
            if missing or unexpected:
                raise CheckpointLoadError(
                    f"{source}: {name} weights do not fit: missing {missing[:6]}, unexpected {unexpected[:6]}"
                )


def export_teacher(
    meta: SelfDistillationMetaArch,
    folder: Path,
    gathered: tuple[MedDINOv3Model, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the EMA teacher backbone as a MedDINOv3Model folder (+ processor config and the teacher heads in
    pretraining_heads.safetensors, the converter's name, for a later stage or `--init`), atomically (temporary folder, then rename). `gathered`: the full
    teacher from `gather_teacher` (FSDP), else `meta.teacher` is read directly."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp_{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    backbone = gathered[0] if gathered is not None else meta.teacher.backbone
    original = backbone.config
    config = copy.deepcopy(original)
    config.drop_path_rate = 0.0  # training-only settings must not leak into downstream models
    config.pos_embed_rescale = None
    backbone.config = config
    try:
        backbone.save_pretrained(tmp)
    finally:
        backbone.config = original
    MedDINOv3ImageProcessor().save_pretrained(tmp)
    heads = gathered[1] if gathered is not None else meta.teacher.state_dict()
    heads = {k: v.detach().cpu().contiguous() for k, v in heads.items() if "_head." in k}
    save_file(heads, str(tmp / HEADS_FILE))
    if folder.exists():
        old = folder.parent / f".old_{folder.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Step counter and per-process data positions; registered with accelerate for save/load_state."""

    step: int = 0
    positions: list[list[int]] | None = None  # per process: [epoch, offset], as of the last checkpoint
    current_position: tuple[int, int] = (0, 0)  # this process's live position (not saved directly)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "positions": self.positions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.positions = int(state["step"]), state["positions"]


def save_checkpoint(accelerator: Any, state: TrainState, cfg: PretrainConfig, meta: Any, root: Path) -> Path:
    """accelerator.save_state into a temporary folder, then rename to checkpoints/step_N (all processes
    call this; the folder is complete, or absent, at every instant). Needs a filesystem shared by all nodes."""
    from accelerate.utils import gather_object

    state.positions = gather_object([list(state.current_position)])
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp_step_{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {
            "step": state.step,
            "positions": state.positions,
            "world_size": accelerator.num_processes,
            "teacher_index": 1,  # order of register_for_checkpointing in train()
            "backbone_config": meta.teacher.backbone.config.to_dict(),
            "config": config_to_dict(cfg),
        }
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kept = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
        for old in kept[: max(len(kept) - max(cfg.train.keep_checkpoints, 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def _set_lr_wd(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    for group in optimizer.param_groups:
        lr = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values["wd"] * group["wd_multiplier"]


def _health_slices(cfg: PretrainConfig) -> list[torch.Tensor]:
    from meddinov3_hf.data.ct3m import load_ct3m

    ds = load_ct3m(cfg.health.dataset or cfg.dataset, streaming=True)
    slices = []
    for example in ds:
        slices.append(torch.as_tensor(example["image"]).float())
        if len(slices) >= cfg.health.num_slices:
            break
    return slices


def train(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) one pretraining stage; returns {"step", "export", "history"} on every process."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    from ..files import check_output_path  # never write into (or over) the dataset or the --init weights

    check_output_path(out_dir, [cfg.dataset, cfg.init], kind="into", option="--output_dir")
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.train.log_with if cfg.train.log_with not in (None, "none") else None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "DeepSpeed is not supported: its ZeRO engine owns the student's parameters, and the EMA teacher would "
            "need to be partitioned identically for its update. Use DDP or FSDP2 (`fsdp_version: 2`)."
        )
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP1 is not supported: the EMA teacher is sharded like the student with FSDP2 `fully_shard`. Set "
            "`fsdp_version: 2` in the accelerate config (see training/configs/accelerate_fsdp.yaml)."
        )
    rank, world = accelerator.process_index, accelerator.num_processes
    ckpt_root = out_dir / "checkpoints"
    resume_dir: Path | None = None
    if cfg.resume:
        resume_dir = latest_checkpoint(ckpt_root) if cfg.resume == "latest" else Path(cfg.resume)
        if resume_dir is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_root}")
    elif latest_checkpoint(ckpt_root) is not None:
        raise FileExistsError(
            f"{ckpt_root} has checkpoints: pass --resume to continue, or another --output_dir"
        )

    # Models. Seeded so that every process builds identical fresh heads (DDP also broadcasts the student).
    torch.manual_seed(cfg.train.seed)
    backbone, heads = build_backbone(cfg, cfg.init)
    gram_backbone = None
    if cfg.gram.enabled:
        if cfg.gram.checkpoint is not None:
            gram_backbone, _ = build_backbone(cfg, cfg.gram.checkpoint)
        else:
            gram_backbone = copy.deepcopy(backbone)
        gram_backbone.config.drop_path_rate = 0.0
    heads_from_init = heads_config_from_init(cfg, heads)
    meta = SelfDistillationMetaArch(backbone, cfg.heads, cfg.loss, gram_backbone)
    if heads_from_init:
        load_heads(meta, heads, f"--init {cfg.init}")
        accelerator.print(
            f"DINO/iBOT heads from --init {cfg.init}: dino {cfg.heads.sizes('dino_head')}, "
            f"ibot {cfg.heads.sizes('ibot_head')}"
        )
    if cfg.model.gradient_checkpointing:
        bb = meta.student.backbone  # transformers 5.x renamed the method; keep working on both names
        if hasattr(bb, "activation_checkpointing_enable"):
            bb.activation_checkpointing_enable({"use_reentrant": False})
        else:
            bb.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    meta.to(accelerator.device)
    if cfg.model.compile:
        for module in (meta.student.backbone, meta.teacher.backbone, meta.gram_teacher):
            if module is not None:
                module.compile()

    # Optimiser and schedules.
    num_layers = backbone.config.num_hidden_layers
    groups = param_groups(
        meta.student.named_parameters(), cfg.optim.layer_decay, cfg.optim.patch_embed_lr_mult, num_layers
    )
    fused = cfg.optim.fused if cfg.optim.fused is not None else accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), fused=fused or None)
    accumulation = cfg.train.gradient_accumulation_steps
    global_batch = cfg.train.batch_size * world * accumulation
    s = cfg.schedule
    schedules = PretrainSchedules.from_config(
        {
            "epochs": s.epochs,
            "iters_per_epoch": s.iters_per_epoch,
            "base_lr": cfg.optim.base_lr,
            "min_lr": cfg.optim.min_lr,
            "warmup_epochs": s.warmup_epochs,
            "wd": s.wd,
            "wd_end": s.wd_end,
            "momentum_teacher": s.momentum_teacher,
            "final_momentum_teacher": s.final_momentum_teacher,
            "teacher_temp": s.teacher_temp,
            "warmup_teacher_temp": s.warmup_teacher_temp,
            "warmup_teacher_temp_epochs": s.warmup_teacher_temp_epochs,
            "freeze_last_layer_epochs": s.freeze_last_layer_epochs,
            "batch_size": global_batch if cfg.optim.scale_lr_with_batch else None,
            "lr_schedule": s.lr_schedule,
            "total_steps": cfg.train.max_steps,  # --max_steps: every schedule spans it (as the Trainer's)
        }
    )
    total_steps = len(schedules)
    if cfg.train.stop_at_step is not None:  # stop early, schedules unchanged
        total_steps = min(cfg.train.stop_at_step, total_steps)
    peak_lr = scaled_lr(cfg.optim.base_lr, global_batch if cfg.optim.scale_lr_with_batch else None)
    start_message = (
        f"{cfg.stage}: peak lr {peak_lr:.3e} (base_lr {cfg.optim.base_lr:g}"
        + (f" x 4*sqrt({global_batch}/1024)" if cfg.optim.scale_lr_with_batch else ", unscaled")
        + f", {s.lr_schedule} schedule), schedules span {len(schedules)} steps, training {total_steps} steps"
    )
    logger.info(start_message)
    accelerator.print(start_message)

    student, optimizer = accelerator.prepare(meta.student, optimizer)
    state = TrainState()
    teachers = [meta.teacher] + ([meta.gram_teacher] if meta.gram_teacher is not None else [])
    if fsdp:
        meta.shard_teachers()  # fully_shard in place: meta.student is the sharded student
        teachers = [FullStateDict(t) for t in teachers]  # same checkpoint files as with DDP
    accelerator.register_for_checkpointing(state, *teachers)  # teacher_index = 1 (see save_checkpoint)
    if resume_dir is not None:
        # Not accelerator.load_state: it unpickles custom_checkpoint_*.pkl and RNG files with weights_only=False.
        load_resume_state(accelerator, resume_dir, student, optimizer, [state, *teachers])
        info = json.loads((resume_dir / STATE_FILE).read_text())
        if info["world_size"] != world:
            raise ValueError(
                f"checkpoint written by {info['world_size']} processes; resuming with {world} would "
                "change the data order (not an exact resume)"
            )
        accelerator.print(f"resumed from {resume_dir} at step {state.step}")
    start_step = state.step
    state.current_position = tuple(state.positions[rank]) if state.positions else (0, 0)

    # Data.
    sizes = CropSizePlan(cfg.crops, cfg.gram.enabled, cfg.train.seed)
    stream = CropBatchStream(
        open_slice_stream(cfg, rank, world),
        build_augmentation(cfg),
        sizes,
        cfg.train.batch_size,
        accumulation,
        cfg.train.seed,
        rank,
        start_batch=start_step * accumulation,
        start_position=state.current_position,
    )
    workers = cfg.train.num_workers
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    batches = iter(loader)

    probe = None
    if cfg.health.every > 0 and accelerator.is_main_process:
        probe = HealthProbe(_health_slices(cfg), image_size=cfg.health.image_size)
    health_due = cfg.health.every > 0

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "pretrain_config.yaml").write_text(_yaml_dump(config_to_dict(cfg)))
        _truncate_metrics(out_dir / "metrics.jsonl", start_step)
        if start_step == 0:
            _append_metrics(
                out_dir / "metrics.jsonl",
                {
                    "step": 0,
                    "start": {
                        "peak_lr": peak_lr,
                        "global_batch": global_batch,
                        "total_steps": total_steps,
                        "schedule_steps": len(schedules),
                    },
                },
            )
    if accelerator.log_with:
        accelerator.init_trackers(cfg.train.project_name, config=flat_config(cfg))

    patch = backbone.config.patch_size
    n_global = 2
    history: list[dict[str, float]] = []
    progress = tqdm(
        total=total_steps, initial=start_step, disable=not accelerator.is_local_main_process, desc=cfg.stage
    )
    meta.train()
    while state.step < total_steps:
        step = state.step
        torch.manual_seed(mix_seed(cfg.train.seed, step, rank))  # drop path, RoPE augmentation
        values = schedules.at(step)
        _set_lr_wd(optimizer, values)
        if (
            cfg.gram.enabled
            and cfg.gram.refresh_every > 0
            and step > 0
            and step % cfg.gram.refresh_every == 0
        ):
            meta.refresh_gram_teacher()
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accumulation):
            batch = next(batches)
            if int(batch["batch_index"]) != step * accumulation + micro:  # guards the exact-order invariant
                raise RuntimeError("data loader returned batches out of order")
            g_size = batch["global"].shape[-1]
            grid = (g_size // patch, g_size // patch)
            batch_size = batch["global"].shape[1]
            masks = sample_masks(
                n_global * batch_size,
                grid,
                cfg.masking.probability,
                tuple(cfg.masking.ratio),
                generator=torch.Generator().manual_seed(mix_seed(cfg.train.seed, step, micro, rank, 7)),
            )
            device = accelerator.device
            inputs = StepInputs(
                global_crops=batch["global"].to(device, non_blocking=True),
                local_crops=batch["local"].to(device, non_blocking=True),
                masks=masks.to(device, non_blocking=True),
                gram_crops=batch["global_gram"].to(device, non_blocking=True)
                if "global_gram" in batch
                else None,
            )
            sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(student)
            with sync:
                terms = meta.forward_losses(student, inputs, values["teacher_temp"], accelerator.autocast)
                accelerator.backward(terms["loss"] / accumulation)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accumulation
            state.current_position = tuple(int(x) for x in batch["position"])
        grad_norms = clip_gradients_per_module(accelerator, meta.student, cfg.optim.clip_grad)
        if values["last_layer_lr"] == 0.0:  # prototypes frozen: also keep their Adam moments untouched
            for head in (meta.student.dino_head, meta.student.ibot_head):
                for p in head.last_layer_parameters():
                    p.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meta.update_teacher(values["momentum"])
        state.step += 1
        progress.update(1)

        if state.step % cfg.train.log_every == 0 or state.step == total_steps:
            reduced = {k: float(accelerator.reduce(v.detach(), reduction="mean")) for k, v in sums.items()}
            if not all(math.isfinite(v) for v in reduced.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {reduced}")
            logs = {f"loss/{k}": v for k, v in reduced.items()}
            logs.update({f"schedule/{k}": v for k, v in values.items()})
            logs.update({f"train/{k}_grad_norm": v for k, v in grad_norms.items()})
            logs["train/peak_lr"] = peak_lr
            logs["train/global_crop_size"] = float(inputs.global_crops.shape[-1])
            record = {"step": state.step, **logs}
            history.append(record)
            if accelerator.is_main_process:
                _append_metrics(out_dir / "metrics.jsonl", record)
                progress.set_postfix(loss=f"{reduced['loss']:.4f}", lr=f"{values['lr']:.2e}")
            accelerator.log(logs, step=state.step)
        if health_due and state.step % cfg.health.every == 0:
            # FSDP: every process takes part in gathering the teacher; the main process evaluates a replica.
            gathered = gather_teacher(meta) if fsdp else None
            evaluated = gathered[0].to(accelerator.device) if gathered else meta.teacher.backbone
            if probe is not None:
                health = probe.evaluate(evaluated, cfg.health.batch_size, accelerator.autocast)
                accelerator.log({f"health/{k}": v for k, v in health.items()}, step=state.step)
                _append_metrics(out_dir / "metrics.jsonl", {"step": state.step, "health": health})
            del gathered, evaluated
        if cfg.train.checkpoint_every > 0 and state.step % cfg.train.checkpoint_every == 0:
            save_checkpoint(accelerator, state, cfg, meta, ckpt_root)
        if cfg.train.export_every > 0 and state.step % cfg.train.export_every == 0:
            _export(accelerator, meta, fsdp, out_dir / "export" / f"step_{state.step:08d}")
    progress.close()

    if cfg.train.checkpoint_every > 0 and state.step > start_step and state.step % cfg.train.checkpoint_every:
        save_checkpoint(accelerator, state, cfg, meta, ckpt_root)  # the final state, for a later --resume
    export = out_dir / "export" / "final"
    _export(accelerator, meta, fsdp, export)
    accelerator.end_training()
    return {"step": state.step, "export": str(export), "history": history}


def clip_gradients_per_module(
    accelerator: Any, student: torch.nn.Module, max_norm: float
) -> dict[str, float]:
    """Clip the backbone, the DINO head and the iBOT head separately, one norm each, as dinov3/train/train.py does
    (a spike in one head then does not shrink the whole step). Returns each module's norm before clipping
    (`max_norm` <= 0: norms only). `student` is the unwrapped branch (same parameters as the prepared one)."""
    accelerator.unscale_gradients()  # fp16 loss scaling: once per step, before any norm
    norms: dict[str, float] = {}
    for name in ("backbone", *HEAD_NAMES):
        params = [p for p in getattr(student, name).parameters() if p.grad is not None]
        if not params:
            continue
        limit = max_norm if max_norm and max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        norms[name] = float(norm)
    return norms


class FullStateDict:
    """Checkpointing view of an FSDP2-sharded module for `register_for_checkpointing`: every process takes part
    in gathering the full state dict (the main process writes it, as with DDP); loading scatters it back."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.module, options=options)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))


def gather_teacher(meta: SelfDistillationMetaArch) -> tuple[MedDINOv3Model, dict[str, torch.Tensor]] | None:
    """FSDP: the full EMA teacher as (plain MedDINOv3Model backbone on CPU, head tensors) on the main process,
    None on the others. Every process must call this (collective gather)."""
    state = FullStateDict(meta.teacher).state_dict()
    if not state:  # cpu_offload: only rank 0 receives the full tensors
        return None
    backbone = MedDINOv3Model(copy.deepcopy(meta.teacher.backbone.config))
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    )
    return backbone.eval(), {k: v for k, v in state.items() if not k.startswith("backbone.")}


def _export(accelerator: Any, meta: SelfDistillationMetaArch, fsdp: bool, folder: Path) -> None:
    gathered = gather_teacher(meta) if fsdp else None
    if accelerator.is_main_process:
        export_teacher(meta, folder, gathered)
    accelerator.wait_for_everyone()


def _yaml_dump(d: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint (they will be written again), atomically."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Command line (training/pretrain.py and a future `meddinov3 pretrain`)
# ---------------------------------------------------------------------------------------------------------


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

    try:
        cfg = config_from_args(args)
        train(cfg)
    except (ValueError, OSError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
