"""Student / EMA teacher / Gram teacher and the loss of one pretraining step (docs/method.md §5, §7).

Only `SelfDistillationMetaArch.student` (backbone + DINO head + iBOT head) is trained and handed to
`accelerator.prepare`; its single `forward` runs every student crop so that DDP sees one forward per
backward. The teacher is an EMA copy updated from the (unwrapped) student parameters; the Gram teacher is a
frozen backbone. Both run in eval mode (no drop path, no RoPE augmentation) under `torch.no_grad`.

Under FSDP2 (accelerate `fsdp_version: 2`) `shard_teachers` shards the teacher and the Gram teacher exactly like
the student (same module tree, same units, same mesh), so that the EMA update is a local lerp of matching
shards and the teacher forward all-gathers like the student's (through its root `forward`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from meddinov3_hf.modeling_meddinov3 import MedDINOv3Model

from .config import HeadsConfig, LossConfig
from .heads import DINOHead
from .losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss, resize_patch_features, sinkhorn_knopp

__all__ = ["SSLBranch", "SelfDistillationMetaArch", "StepInputs", "shard_like"]


def _num_prefix(backbone: MedDINOv3Model) -> int:
    return 1 + backbone.config.num_register_tokens


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    p = p.data
    return p.to_local() if isinstance(p, DTensor) else p


def shard_like(module: nn.Module, reference: nn.Module, prefix: str = "") -> None:
    """`fully_shard` every submodule of `module` whose counterpart (same name, under `prefix` in `reference`) is
    an FSDP2 unit, with that unit's mesh and mixed-precision policy, children first, and `module` itself.
    Parameters of equal shape then get equal local shards on every process."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not isinstance(reference, FSDPModule):
        raise TypeError("shard_like: the reference module is not sharded with FSDP2 (fully_shard)")
    units = {name: m for name, m in reference.named_modules() if isinstance(m, FSDPModule)}
    root_state = reference._get_fsdp_state()
    mesh = next(reference.parameters()).device_mesh
    mp_policy = root_state._mp_policy
    for name, sub in reversed(list(module.named_modules())):
        full = ".".join(x for x in (prefix, name) if x)
        if full in units or not name:
            # reshard_after_forward explicitly: a root resharding by default would keep the teacher gathered
            # after its forward (no backward follows), and the EMA update needs the shards.
            fully_shard(sub, mesh=mesh, reshard_after_forward=True, mp_policy=mp_policy)


class SSLBranch(nn.Module):
    """Backbone + DINO head (CLS) + iBOT head (patch tokens). The student's forward runs all its crops."""

    def __init__(self, backbone: MedDINOv3Model, heads: HeadsConfig):
        super().__init__()
        self.backbone = backbone
        dim = backbone.config.hidden_size
        # Separate heads with their own prototype counts (dinov3/train/ssl_meta_arch.py, ibot.separate_head).
        init = heads.last_layer_init  # fresh heads only; loaded heads replace these weights
        self.dino_head = DINOHead(dim, **heads.sizes("dino_head"), last_layer_init=init)
        self.ibot_head = DINOHead(dim, **heads.sizes("ibot_head"), last_layer_init=init)

    def encode(self, pixel_values: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed tokens (B, 1 + R + N, D)."""
        return self.backbone(pixel_values, bool_masked_pos=masks).last_hidden_state

    def forward(
        self,
        global_crops: torch.Tensor,
        masks: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        mask_inputs: bool = True,
    ) -> dict[str, torch.Tensor]:
        """global_crops (G·B, C, g, g) crop-major, masks (G·B, N) bool, local_crops (L·B, C, l, l) or None.

        Returns cls (G·B, D) of the global forward (masked unless `mask_inputs=False`: the teacher),
        patches (G·B, N, D), dino_logits ((G + L)·B, K) global crops first, ibot_logits (masked patches, K)
        in `masks.nonzero()` order."""
        prefix = _num_prefix(self.backbone)
        # The student always passes masks: keeps mask_token in the graph.
        tokens = self.encode(global_crops, masks if mask_inputs else None)
        cls, patches = tokens[:, 0], tokens[:, prefix:]
        cls_all = cls
        if local_crops is not None and local_crops.shape[0] > 0:
            # One forward for all local crops (same size): the batching the issue asks for.
            cls_all = torch.cat([cls, self.encode(local_crops)[:, 0]])
        return {
            "cls": cls,
            "patches": patches,
            "dino_logits": self.dino_head(cls_all),
            # An empty selection still links the head's weights to the graph (zero grads, DDP-safe).
            "ibot_logits": self.ibot_head(patches[masks]),
        }


@dataclass
class StepInputs:
    """One micro-batch on device. global_crops (G, B, C, g, g); local_crops (L, B, C, l, l);
    gram_crops (G, B, C, s, s) or None; masks (G·B, N) bool."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor
    gram_crops: torch.Tensor | None = None


class SelfDistillationMetaArch(nn.Module):
    """Holds student, teacher and Gram teacher; computes the four losses of docs/method.md §7 for one micro-batch."""

    def __init__(
        self,
        backbone: MedDINOv3Model,
        heads: HeadsConfig,
        loss: LossConfig,
        gram_backbone: MedDINOv3Model | None = None,
    ):
        super().__init__()
        self.student = SSLBranch(backbone, heads)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False).eval()
        self.gram_teacher = gram_backbone
        if gram_backbone is not None:
            gram_backbone.requires_grad_(False).eval()
        self.loss_cfg = loss
        self.dino_loss = DINOLoss(heads.sizes("dino_head")["out_dim"], student_temp=loss.student_temp)
        self.ibot_loss = iBOTPatchLoss(heads.sizes("ibot_head")["out_dim"], student_temp=loss.student_temp)
        self.koleo_loss = KoLeoLoss()
        self.gram_loss = GramLoss(remove_negatives=loss.gram_remove_negatives, per_image=loss.gram_per_image)

    def train(self, mode: bool = True) -> SelfDistillationMetaArch:
        # Teachers always stay in eval mode: no drop path, no RoPE augmentation.
        self.student.train(mode)
        return self

    @torch.no_grad()
    def teacher_targets(self, inputs: StepInputs, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinkhorn-Knopp targets: DINO (G, B, K) and iBOT (masked patches, K)."""
        n_g, batch = inputs.global_crops.shape[:2]
        # Through the root forward (unmasked inputs): an FSDP-sharded teacher gathers its parameters there.
        out = self.teacher(inputs.global_crops.flatten(0, 1), inputs.masks, None, mask_inputs=False)
        cls_logits, patch_logits = out["dino_logits"], out["ibot_logits"]
        it = self.loss_cfg.sinkhorn_iterations
        dino_t = sinkhorn_knopp(cls_logits, teacher_temp, it).view(n_g, batch, -1)
        # Every process calls this (also with 0 masked patches): the sums inside are all-reduced.
        ibot_t = sinkhorn_knopp(patch_logits, teacher_temp, it)
        return dino_t, ibot_t

    @torch.no_grad()
    def gram_targets(self, inputs: StepInputs, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Gram-teacher patch tokens of the global crops (G·B, h·w, D), resized to the student's grid."""
        crops = inputs.gram_crops if inputs.gram_crops is not None else inputs.global_crops
        crops = crops.flatten(0, 1)
        tokens = self.gram_teacher(crops).last_hidden_state[:, _num_prefix(self.gram_teacher) :]
        patch = self.gram_teacher.config.patch_size
        src_hw = (crops.shape[-2] // patch, crops.shape[-1] // patch)
        return resize_patch_features(tokens, src_hw, grid_hw, antialias=self.loss_cfg.gram_resize_antialias)

    def forward_losses(
        self,
        student: Callable[..., dict[str, torch.Tensor]],
        inputs: StepInputs,
        teacher_temp: float,
        autocast: Callable[[], object],
    ) -> dict[str, torch.Tensor]:
        """Total loss and its terms for one micro-batch. `student` is the (possibly DDP-wrapped) student;
        `autocast` a context factory (accelerator.autocast) for the teacher forwards."""
        n_g, batch = inputs.global_crops.shape[:2]
        with autocast():
            dino_t, ibot_t = self.teacher_targets(inputs, teacher_temp)
        local = inputs.local_crops.flatten(0, 1) if inputs.local_crops.shape[0] > 0 else None
        out = student(inputs.global_crops.flatten(0, 1), inputs.masks, local)

        cfg = self.loss_cfg
        dino_logits = out["dino_logits"].float().view(-1, batch, dino_t.shape[-1])
        dino = self.dino_loss(dino_logits, dino_t)
        ibot = self.ibot_loss(out["ibot_logits"], ibot_t, inputs.masks)
        # KoLeo on the pre-head CLS of each global crop; logged as the mean over global crops and weighted as
        # weight · G · mean (dinov3/train/ssl_meta_arch.py `koleo_scale = n_global_crops`).
        koleo = sum(self.koleo_loss(c) for c in out["cls"].view(n_g, batch, -1)) / n_g
        terms = {
            "dino_local": dino["local"].detach(),
            "dino_global": dino["global"].detach(),
            "dino": dino["loss"],
            "ibot": ibot,
            "koleo": koleo,
        }
        total = cfg.dino_weight * dino["loss"] + cfg.ibot_weight * ibot + cfg.koleo_weight * n_g * koleo
        if self.gram_teacher is not None and cfg.gram_weight > 0:
            patch = self.student.backbone.config.patch_size
            grid = (inputs.global_crops.shape[-2] // patch, inputs.global_crops.shape[-1] // patch)
            with autocast():
                target = self.gram_targets(inputs, grid)
            gram = self.gram_loss(out["patches"], target)
            terms["gram"] = gram
            total = total + cfg.gram_weight * gram
        terms["loss"] = total
        return terms

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher ← m·teacher + (1 − m)·student, over all parameters (same order: the teacher is a copy)."""
        t = [_local(p) for p in self.teacher.parameters()]
        s = [_local(p) for p in self.student.parameters()]
        # FSDP2: matching local shards (see shard_teachers); a shape mismatch raises here.
        torch._foreach_lerp_(t, s, 1.0 - momentum)

    def shard_teachers(self) -> None:
        """FSDP2: shard the teacher (and the Gram teacher) exactly like the already sharded student."""
        shard_like(self.teacher, self.student)
        if self.gram_teacher is not None:
            shard_like(self.gram_teacher, self.student, prefix="backbone")

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Gram teacher ← current EMA teacher backbone."""
        if self.gram_teacher is None:
            raise RuntimeError("no Gram teacher")
        self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
