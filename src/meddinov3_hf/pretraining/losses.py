"""Self-distillation losses of MedDINOv3 pretraining, written from docs/method.md §7.

All arithmetic is fp32 (bf16 inputs are upcast). Notation: G global crops, L local crops, B images per
crop, K prototypes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DINOLoss",
    "GramLoss",
    "KoLeoLoss",
    "iBOTPatchLoss",
    "resize_patch_features",
    "sinkhorn_knopp",
]


_F = TypeVar("_F", bound=Callable[..., Any])


def _fp32(fn: _F) -> _F:
    """Run `fn` with autocast off: under mixed precision its matmuls would otherwise drop to bf16/fp16."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flat = [
            a for arg in (*args, *kwargs.values()) for a in (arg if isinstance(arg, (list, tuple)) else [arg])
        ]
        device_type = next((a.device.type for a in flat if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=op)
    return t


def _logsumexp_over_samples(log_q: torch.Tensor) -> torch.Tensor:
    """log Σ_samples exp(log_q) per prototype, over the samples of all processes: `(M, K)` → `(K,)`."""
    k = log_q.shape[1]
    peak = log_q.amax(dim=0) if log_q.shape[0] > 0 else log_q.new_full((k,), -math.inf)
    _all_reduce(peak, dist.ReduceOp.MAX)  # an empty shard (no masked patches here) contributes -inf
    total = _all_reduce(torch.exp(log_q - peak).sum(dim=0))
    return peak + torch.log(total)


@torch.no_grad()
@_fp32
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (docs/method.md §7), world-size aware.

    `teacher_logits (M, K)` are this process's samples (CLS logits of the teacher's global crops for DINO,
    masked-patch logits for iBOT). Returns fp32 targets `(M, K)` whose rows sum to 1 and whose prototype
    columns, summed over the samples of all processes, approach N/K (N = total sample count).

    Spec form, with Q = exp(T/τ)ᵀ of shape (K, N):
        Q /= sum(Q); repeat: { Q /= row sums (per prototype, over samples); Q /= K; Q /= col sums; Q /= N };
        targets = (N·Q)ᵀ.
    We run the same iterations in the log domain. Subtracting a row's max before exp is the first step of a
    log-sum-exp, and the global factors (1/sum(Q), 1/K, 1/N, ×N) are each undone by the next
    normalisation, so they drop out: what remains is "normalise every prototype over all samples of all
    processes, then every sample over prototypes". Unlike exp-then-divide, this neither overflows nor
    underflows to empty rows/columns (logits 50 at τ 0.04 span e^2500).
    """
    log_q = teacher_logits.float() / temperature  # (M, K)
    for _ in range(n_iterations):
        log_q = log_q - _logsumexp_over_samples(log_q)  # Q /= per-prototype sums (all-reduced)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # Q /= per-sample sums
    return torch.exp(log_q)


class _PrototypeCrossEntropy(nn.Module):
    """Base of the DINO and iBOT losses: student scores over `out_dim` prototypes, sharpened by `student_temp`,
    against the teacher's target probabilities."""

    def __init__(self, out_dim: int, student_temp: float = 0.1) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax of `logits / student_temp` over the prototypes (last dim)."""
        return F.log_softmax(logits.float() / self.student_temp, dim=-1)


class DINOLoss(_PrototypeCrossEntropy):
    """Cross-entropy between student crops and Sinkhorn'ed teacher global crops on CLS tokens.

    forward(student_logits, teacher_targets):
        student_logits: list of per-crop `(B, K)` tensors or a stacked `(G + L, B, K)` tensor, the G global
            crops first, in the same order as the teacher's crops, then the L local crops.
        teacher_targets: `(G, B, K)` probabilities (already Sinkhorn-Knopp'ed).
    Returns {"loss", "local", "global"}: "local" is the mean CE over the G·L (local, global) pairs,
    "global" over the G(G−1) (global, other global) pairs, and "loss" their weighted sum with weights
    G·L / P and G(G−1) / P, P = G(G−1) + G·L, i.e. the mean over all valid crop pairs.
    """

    @_fp32
    def forward(
        self, student_logits: torch.Tensor | list[torch.Tensor], teacher_targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if not torch.is_tensor(student_logits):
            student_logits = torch.stack(list(student_logits))
        n_g, batch, _ = teacher_targets.shape
        n_l = student_logits.shape[0] - n_g
        if n_l < 0:
            raise ValueError("student_logits must hold at least the G global crops")

        log_p = self.log_probs(student_logits)  # (G+L, B, K)
        targets = teacher_targets.float()
        # ce[s, t] = mean over images of −Σ_k P_t log p_s: every student crop vs every teacher crop.
        ce = -torch.einsum("tbk,sbk->st", targets, log_p) / batch  # (G+L, G)

        zero = log_p.sum() * 0.0  # keeps the graph (and device/dtype) when a term has no pairs
        local = ce[n_g:].mean() if n_l > 0 else zero
        if n_g > 1:
            off_diag = ~torch.eye(n_g, dtype=torch.bool, device=ce.device)
            global_ = ce[:n_g][off_diag].mean()
        else:
            global_ = zero
        n_pairs_local, n_pairs_global = n_g * n_l, n_g * (n_g - 1)
        n_pairs = n_pairs_local + n_pairs_global
        if n_pairs == 0:
            return {"loss": zero, "local": zero, "global": zero}
        loss = (n_pairs_local / n_pairs) * local + (n_pairs_global / n_pairs) * global_
        return {"loss": loss, "local": local, "global": global_}


class iBOTPatchLoss(_PrototypeCrossEntropy):
    """Cross-entropy on masked patch tokens with per-image normalisation.

    forward(student_patch_logits (n_masked, K), teacher_targets (n_masked, K), masks (G·B, N) bool) → scalar.
    Rows of the logits/targets follow `masks.nonzero()` order (image-major, as `x[masks]` yields). Each masked
    patch weighs 1/(masked patches in its image); the sum is divided by G·B, so images without masks count as
    zero and an image with 1 masked patch weighs as much as an image with 10.
    """

    @_fp32
    def forward(
        self, student_patch_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        masks = masks.bool()
        log_p = self.log_probs(student_patch_logits)
        ce = -(teacher_targets.float() * log_p).sum(dim=-1)  # (n_masked,)
        per_image = 1.0 / masks.sum(dim=-1, keepdim=True).clamp_min(1).float()  # (G·B, 1)
        weights = per_image.expand_as(masks)[masks]  # (n_masked,)
        return (ce * weights).sum() / masks.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko–Leonenko entropy regulariser: −mean log(nearest-neighbour distance) on the unit sphere.

    forward(x (B, D)) → scalar, over this process's batch (as in DINOv2); B ≥ 2. The distance is
    `nn.PairwiseDistance(2, eps=1e-8)`'s, ‖z_i − z_j + eps‖ (eps inside the norm, dinov3/loss/koleo_loss.py),
    so two identical rows give −log(sqrt(D)·eps + eps) exactly as the reference does.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @_fp32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            raise ValueError("KoLeo needs at least 2 samples")
        z = F.normalize(x.float(), dim=-1, p=2, eps=self.eps)
        with torch.no_grad():  # the neighbour choice is discrete; gradients flow through the distance
            sim = z @ z.t()
            sim.fill_diagonal_(-math.inf)
            nn_idx = sim.argmax(dim=1)
        dist_nn = F.pairwise_distance(z, z[nn_idx], p=2.0, eps=self.eps)
        return -torch.log(dist_nn + self.eps).mean()


class GramLoss(nn.Module):
    """Gram anchoring: match the patch-to-patch cosine similarity matrices of student and Gram teacher.

    forward(student_patches (B, N, D), teacher_patches (B, N, D)) → mean((G_s − G_t)²), with per-token
    L2-normalisation and G = F Fᵀ per image `(B, N, N)` (per_image=True) or over the whole local batch
    `(B·N, B·N)`. remove_negatives=True zeroes negative similarities of both matrices first. The teacher is
    a frozen target and is detached.
    """

    def __init__(self, remove_negatives: bool = False, per_image: bool = True) -> None:
        super().__init__()
        self.remove_negatives = remove_negatives
        self.per_image = per_image

    def _gram(self, feats: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(feats.float(), dim=-1, p=2)
        if not self.per_image:
            feats = feats.reshape(1, -1, feats.shape[-1])
        gram = feats @ feats.transpose(-1, -2)
        return gram.clamp_min(0.0) if self.remove_negatives else gram

    @_fp32
    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        if student_patches.shape != teacher_patches.shape:
            raise ValueError(
                f"shape mismatch: {tuple(student_patches.shape)} vs {tuple(teacher_patches.shape)}"
            )
        return (self._gram(student_patches) - self._gram(teacher_patches.detach())).square().mean()


def resize_patch_features(
    features: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """Bicubic resize of a patch grid: `(B, h1·w1, D)` → `(B, h2·w2, D)` (row-major tokens).

    Used for a Gram teacher run at higher resolution. No antialiasing by default, as DINOv3 resizes it
    (dinov3/train/ssl_meta_arch.py with gram.global_teacher_resize_antialias: false in its configs).
    """
    b, n, d = features.shape
    if n != from_hw[0] * from_hw[1]:
        raise ValueError(f"{n} tokens do not form a {from_hw} grid")
    if tuple(from_hw) == tuple(to_hw):
        return features
    grid = features.float().transpose(1, 2).reshape(b, d, *from_hw)
    grid = F.interpolate(grid, size=tuple(to_hw), mode="bicubic", align_corners=False, antialias=antialias)
    return grid.reshape(b, d, -1).transpose(1, 2).to(features.dtype)
