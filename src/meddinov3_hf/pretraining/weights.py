"""Weights in and out of a pretraining run: the student backbone from `--init` (or from scratch), the DINO/iBOT
head weights stored with it, the self-distillation model built from them, and the export of the EMA teacher.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from meddinov3_hf.configuration_meddinov3 import MedDINOv3Config
from meddinov3_hf.image_processing_meddinov3 import MedDINOv3ImageProcessor
from meddinov3_hf.modeling_meddinov3 import MedDINOv3Model

from .checkpoints import HEAD_NAMES, HEADS_FILE, CheckpointLoadError, FullStateDict, head_sizes, load_init
from .config import PretrainConfig
from .meta_arch import SelfDistillationMetaArch

__all__ = [
    "SCRATCH_LAYERSCALE",
    "build_backbone",
    "build_models",
    "export_teacher",
    "gather_teacher",
    "heads_config_from_init",
    "load_heads",
    "save_export",
]


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


def build_models(cfg: PretrainConfig, accelerator: Any) -> SelfDistillationMetaArch:
    """Student, EMA teacher (and Gram teacher) with their heads, on the accelerator's device. Seeded with
    `train.seed` so that every process builds identical fresh heads (DDP also broadcasts the student)."""
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
    return meta


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


def save_export(accelerator: Any, meta: SelfDistillationMetaArch, fsdp: bool, folder: Path) -> None:
    """Export the teacher to `folder` (every process calls this: with FSDP they all gather it)."""
    gathered = gather_teacher(meta) if fsdp else None
    if accelerator.is_main_process:
        export_teacher(meta, folder, gathered)
    accelerator.wait_for_everyone()
