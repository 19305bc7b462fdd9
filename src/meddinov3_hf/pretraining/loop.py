"""The accelerate pretraining loop: build (models, optimiser, schedules, data), then step, log, save, per step.
Run it with `accelerate launch training/pretrain.py --config ...` (`command`).

Distribution is accelerate's (`accelerate config`/`launch`); only the student is prepared (and only it is in
the optimiser). With DDP the EMA teacher and the Gram teacher are plain replicas updated/used identically on
every process. With FSDP2 (`fsdp_version: 2`, e.g. training/configs/accelerate_fsdp.yaml) they are sharded
exactly like the student, the EMA update is a local lerp of matching shards, checkpoints store their full
state dicts (same files as with DDP), and exports/health probes gather the full teacher. FSDP1 and DeepSpeed
are refused with a clear error.

Exact resume: everything random is a function of (seed, step, rank[, example position]): per-step torch
seeding (drop path, RoPE augmentation) and iBOT masks here, stage-3 crop sizes and per-example crop generators
in `stream` (which also keeps the data order independent of the number of loader workers); a checkpoint
(`checkpoints.save_checkpoint`) stores the stream position (epoch, offset) of every process.

Modules: `stream` (crop sizes, batches), `weights` (--init, models, teacher export), `checkpoints` (save,
resume, safe loading), `command` (command line); this one runs the steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import (
    HEAD_NAMES,
    STATE_FILE,
    FullStateDict,
    TrainState,
    load_resume_state,
    resume_folder,
    save_checkpoint,
)
from .command import add_pretrain_arguments, config_from_args, run_pretrain
from .config import PretrainConfig, config_to_dict, flat_config
from .health import HealthProbe
from .masking import sample_masks
from .meta_arch import SelfDistillationMetaArch, StepInputs
from .schedules import PretrainSchedules, param_groups, scaled_lr
from .stream import (
    CropBatchStream,
    CropSizePlan,
    build_augmentation,
    crop_batch_loader,
    mix_seed,
    open_slice_stream,
)
from .stream import health_slices as _health_slices
from .weights import (
    SCRATCH_LAYERSCALE,
    build_backbone,
    build_models,
    export_teacher,
    gather_teacher,
    heads_config_from_init,
    load_heads,
    save_export,
)

__all__ = [
    # Re-exported from `stream`, `weights`, `checkpoints` and `command`, where they live (they were defined
    # here before the loop was split).
    "SCRATCH_LAYERSCALE",
    "CropBatchStream",
    "CropSizePlan",
    "FullStateDict",
    "TrainState",
    "add_pretrain_arguments",
    "build_augmentation",
    "build_backbone",
    "config_from_args",
    "export_teacher",
    "gather_teacher",
    "heads_config_from_init",
    "load_heads",
    "mix_seed",
    "open_slice_stream",
    "run_pretrain",
    "save_checkpoint",
    # The loop.
    "clip_gradients_per_module",
    "train",
]

logger = logging.getLogger(__name__)

N_GLOBAL_CROPS = 2


@dataclass
class _Plan:
    """How long a stage trains and with which per-step values."""

    schedules: PretrainSchedules
    total_steps: int  # the schedules' length, or train.stop_at_step when sooner
    peak_lr: float
    global_batch: int


@dataclass
class _Run:
    """What one stage's loop reads and updates, built once by `_build_run`."""

    cfg: PretrainConfig
    accelerator: Any
    fsdp: bool
    meta: SelfDistillationMetaArch
    student: torch.nn.Module  # the prepared (wrapped/sharded) student
    optimizer: torch.optim.Optimizer
    plan: _Plan
    state: TrainState
    batches: Iterator[dict[str, Any]]
    probe: HealthProbe | None
    start_step: int = field(init=False)
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start_step = self.state.step

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / "metrics.jsonl"


@dataclass
class _StepResult:
    """What a step leaves for logging: its number, schedule values, mean loss terms and gradient norms."""

    step: int
    values: dict[str, float]
    sums: dict[str, torch.Tensor]
    grad_norms: dict[str, float]
    global_crop_size: int


def train(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) one pretraining stage; returns {"step", "export", "history"} on every process."""
    from tqdm.auto import tqdm

    run = _build_run(cfg)
    progress = tqdm(
        total=run.plan.total_steps,
        initial=run.start_step,
        disable=not run.accelerator.is_local_main_process,
        desc=cfg.stage,
    )
    run.meta.train()
    while run.state.step < run.plan.total_steps:
        result = _train_step(run)
        progress.update(1)
        _log_step(run, result, progress)
        _check_health(run)
        _save_due(run)
    progress.close()
    return _finish(run)


# ---------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------


def _build_run(cfg: PretrainConfig) -> _Run:
    """Accelerator, models, optimiser and schedules, resume state, data and logs of a stage, in this order."""
    from ..files import check_output_path  # never write into (or over) the dataset or the --init weights

    out_dir = Path(cfg.output_dir)
    check_output_path(out_dir, [cfg.dataset, cfg.init], kind="into", option="--output_dir")
    accelerator, fsdp = _make_accelerator(cfg, out_dir)
    resume_dir = resume_folder(cfg.resume, out_dir / "checkpoints")
    meta = build_models(cfg, accelerator)
    optimizer = _make_optimizer(cfg, meta, accelerator.device)
    plan = _make_plan(cfg, accelerator)
    student, optimizer = accelerator.prepare(meta.student, optimizer)
    state = _register_and_resume(accelerator, meta, fsdp, student, optimizer, resume_dir)
    rank = accelerator.process_index
    state.current_position = tuple(state.positions[rank]) if state.positions else (0, 0)
    batches = crop_batch_loader(
        cfg,
        rank,
        accelerator.num_processes,
        state.step,
        state.current_position,
        pin_memory=accelerator.device.type == "cuda",
    )
    probe = None
    if cfg.health.every > 0 and accelerator.is_main_process:
        probe = HealthProbe(_health_slices(cfg), image_size=cfg.health.image_size)
    run = _Run(cfg, accelerator, fsdp, meta, student, optimizer, plan, state, batches, probe)
    _start_logs(run)
    return run


def _make_accelerator(cfg: PretrainConfig, out_dir: Path) -> tuple[Any, bool]:
    """The Accelerator of the run and whether it shards with FSDP2; DeepSpeed and FSDP1 are refused."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

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
    return accelerator, fsdp


def _make_optimizer(
    cfg: PretrainConfig, meta: SelfDistillationMetaArch, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over the student's parameter groups (layer-wise lr decay, no decay on norms/biases/tokens)."""
    num_layers = meta.student.backbone.config.num_hidden_layers
    groups = param_groups(
        meta.student.named_parameters(), cfg.optim.layer_decay, cfg.optim.patch_embed_lr_mult, num_layers
    )
    fused = cfg.optim.fused if cfg.optim.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), fused=fused or None)


def _make_plan(cfg: PretrainConfig, accelerator: Any) -> _Plan:
    """The schedules and the steps to train: these stop early at `train.stop_at_step`, the schedules keep their
    full length."""
    global_batch = cfg.train.batch_size * accelerator.num_processes * cfg.train.gradient_accumulation_steps
    scaling_batch = global_batch if cfg.optim.scale_lr_with_batch else None
    schedules = PretrainSchedules.from_config(cfg.schedule_settings(scaling_batch))
    total_steps = len(schedules)
    if cfg.train.stop_at_step is not None:
        total_steps = min(cfg.train.stop_at_step, total_steps)
    peak_lr = scaled_lr(cfg.optim.base_lr, scaling_batch)
    message = (
        f"{cfg.stage}: peak lr {peak_lr:.3e} (base_lr {cfg.optim.base_lr:g}"
        + (f" x 4*sqrt({global_batch}/1024)" if cfg.optim.scale_lr_with_batch else ", unscaled")
        + f", {cfg.schedule.lr_schedule} schedule), schedules span {len(schedules)} steps, "
        f"training {total_steps} steps"
    )
    logger.info(message)
    accelerator.print(message)
    return _Plan(schedules, total_steps, peak_lr, global_batch)


def _register_and_resume(
    accelerator: Any,
    meta: SelfDistillationMetaArch,
    fsdp: bool,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    resume_dir: Path | None,
) -> TrainState:
    """Register the train state and the teachers for checkpointing, and restore them (with the student and the
    optimiser) from `resume_dir`."""
    state = TrainState()
    teachers = [meta.teacher] + ([meta.gram_teacher] if meta.gram_teacher is not None else [])
    if fsdp:
        meta.shard_teachers()  # fully_shard in place: meta.student is the sharded student
        teachers = [FullStateDict(t) for t in teachers]  # same checkpoint files as with DDP
    accelerator.register_for_checkpointing(state, *teachers)  # teacher_index = 1 (see save_checkpoint)
    if resume_dir is None:
        return state
    # Not accelerator.load_state: it unpickles custom_checkpoint_*.pkl and RNG files with weights_only=False.
    load_resume_state(accelerator, resume_dir, student, optimizer, [state, *teachers])
    info = json.loads((resume_dir / STATE_FILE).read_text())
    if info["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"checkpoint written by {info['world_size']} processes; resuming with {accelerator.num_processes} "
            "would change the data order (not an exact resume)"
        )
    accelerator.print(f"resumed from {resume_dir} at step {state.step}")
    return state


def _start_logs(run: _Run) -> None:
    """The run's config file and metrics file (cut back to the resumed step), and the trackers."""
    cfg, accelerator = run.cfg, run.accelerator
    if accelerator.is_main_process:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "pretrain_config.yaml").write_text(_yaml_dump(config_to_dict(cfg)))
        _truncate_metrics(run.metrics_file, run.start_step)
        if run.start_step == 0:
            plan = run.plan
            start = {
                "peak_lr": plan.peak_lr,
                "global_batch": plan.global_batch,
                "total_steps": plan.total_steps,
                "schedule_steps": len(plan.schedules),
            }
            _append_metrics(run.metrics_file, {"step": 0, "start": start})
    if accelerator.log_with:
        accelerator.init_trackers(cfg.train.project_name, config=flat_config(cfg))


# ---------------------------------------------------------------------------------------------------------
# Step
# ---------------------------------------------------------------------------------------------------------


def _set_lr_wd(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    for group in optimizer.param_groups:
        lr = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values["wd"] * group["wd_multiplier"]


def _train_step(run: _Run) -> _StepResult:
    """One optimizer step: schedules, `gradient_accumulation_steps` micro-batches, per-module clipping, AdamW,
    EMA update of the teacher."""
    cfg, meta, state, optimizer = run.cfg, run.meta, run.state, run.optimizer
    step = state.step
    torch.manual_seed(mix_seed(cfg.train.seed, step, run.accelerator.process_index))  # drop path, RoPE aug.
    values = run.plan.schedules.at(step)
    _set_lr_wd(optimizer, values)
    gram = cfg.gram
    if gram.enabled and gram.refresh_every > 0 and step > 0 and step % gram.refresh_every == 0:
        meta.refresh_gram_teacher()
    accumulation = cfg.train.gradient_accumulation_steps
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accumulation):
        terms, global_size = _micro_step(run, step, micro, values["teacher_temp"])
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() / accumulation
    grad_norms = clip_gradients_per_module(run.accelerator, meta.student, cfg.optim.clip_grad)
    if values["last_layer_lr"] == 0.0:  # prototypes frozen: also keep their Adam moments untouched
        for head in (meta.student.dino_head, meta.student.ibot_head):
            for p in head.last_layer_parameters():
                p.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    meta.update_teacher(values["momentum"])
    state.step += 1
    return _StepResult(step, values, sums, grad_norms, global_size)


def _micro_step(run: _Run, step: int, micro: int, teacher_temp: float) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward of one micro-batch (gradients synchronised on the last one); returns the loss
    terms and the global crop size."""
    cfg, accelerator = run.cfg, run.accelerator
    accumulation = cfg.train.gradient_accumulation_steps
    batch = next(run.batches)
    if int(batch["batch_index"]) != step * accumulation + micro:  # guards the exact-order invariant
        raise RuntimeError("data loader returned batches out of order")
    g_size = batch["global"].shape[-1]
    patch = run.meta.student.backbone.config.patch_size
    masks = sample_masks(
        N_GLOBAL_CROPS * batch["global"].shape[1],
        (g_size // patch, g_size // patch),
        cfg.masking.probability,
        tuple(cfg.masking.ratio),
        generator=torch.Generator().manual_seed(
            mix_seed(cfg.train.seed, step, micro, accelerator.process_index, 7)
        ),
    )
    device = accelerator.device
    inputs = StepInputs(
        global_crops=batch["global"].to(device, non_blocking=True),
        local_crops=batch["local"].to(device, non_blocking=True),
        masks=masks.to(device, non_blocking=True),
        gram_crops=batch["global_gram"].to(device, non_blocking=True) if "global_gram" in batch else None,
    )
    last = micro == accumulation - 1
    with contextlib.nullcontext() if last else accelerator.no_sync(run.student):
        terms = run.meta.forward_losses(run.student, inputs, teacher_temp, accelerator.autocast)
        accelerator.backward(terms["loss"] / accumulation)
    run.state.current_position = tuple(int(x) for x in batch["position"])
    return terms, int(inputs.global_crops.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# Log and save
# ---------------------------------------------------------------------------------------------------------


def _log_step(run: _Run, result: _StepResult, progress: Any) -> None:
    """Every `train.log_every` steps (and at the last): the loss terms averaged over processes, schedule values
    and gradient norms, to metrics.jsonl, the trackers and the progress bar. A non-finite loss stops the run."""
    cfg, accelerator, step = run.cfg, run.accelerator, run.state.step
    if step % cfg.train.log_every != 0 and step != run.plan.total_steps:
        return
    reduced = {k: float(accelerator.reduce(v.detach(), reduction="mean")) for k, v in result.sums.items()}
    if not all(math.isfinite(v) for v in reduced.values()):
        raise FloatingPointError(f"non-finite loss at step {result.step}: {reduced}")
    logs = {f"loss/{k}": v for k, v in reduced.items()}
    logs.update({f"schedule/{k}": v for k, v in result.values.items()})
    logs.update({f"train/{k}_grad_norm": v for k, v in result.grad_norms.items()})
    logs["train/peak_lr"] = run.plan.peak_lr
    logs["train/global_crop_size"] = float(result.global_crop_size)
    record = {"step": step, **logs}
    run.history.append(record)
    if accelerator.is_main_process:
        _append_metrics(run.metrics_file, record)
        progress.set_postfix(loss=f"{reduced['loss']:.4f}", lr=f"{result.values['lr']:.2e}")
    accelerator.log(logs, step=step)


def _check_health(run: _Run) -> None:
    """Every `health.every` steps: the health probe of the EMA teacher (`health.HealthProbe`)."""
    cfg, accelerator, step = run.cfg, run.accelerator, run.state.step
    if cfg.health.every <= 0 or step % cfg.health.every != 0:
        return
    # FSDP: every process takes part in gathering the teacher; the main process evaluates a replica.
    gathered = gather_teacher(run.meta) if run.fsdp else None
    evaluated = gathered[0].to(accelerator.device) if gathered else run.meta.teacher.backbone
    if run.probe is not None:
        health = run.probe.evaluate(evaluated, cfg.health.batch_size, accelerator.autocast)
        accelerator.log({f"health/{k}": v for k, v in health.items()}, step=step)
        _append_metrics(run.metrics_file, {"step": step, "health": health})
    del gathered, evaluated


def _save_due(run: _Run) -> None:
    """The checkpoint every `train.checkpoint_every` steps and the teacher export every `train.export_every`."""
    cfg, step = run.cfg, run.state.step
    if cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0:
        save_checkpoint(run.accelerator, run.state, cfg, run.meta, run.out_dir / "checkpoints")
    if cfg.train.export_every > 0 and step % cfg.train.export_every == 0:
        save_export(run.accelerator, run.meta, run.fsdp, run.out_dir / "export" / f"step_{step:08d}")


def _finish(run: _Run) -> dict[str, Any]:
    """The final checkpoint (for a later --resume, unless just written) and the final export."""
    cfg, step = run.cfg, run.state.step
    every = cfg.train.checkpoint_every
    if every > 0 and step > run.start_step and step % every:
        save_checkpoint(run.accelerator, run.state, cfg, run.meta, run.out_dir / "checkpoints")
    export = run.out_dir / "export" / "final"
    save_export(run.accelerator, run.meta, run.fsdp, export)
    run.accelerator.end_training()
    return {"step": step, "export": str(export), "history": run.history}


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
