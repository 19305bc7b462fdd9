"""A quick, label-free health metric for self-distillation runs, on a fixed held-out slice set.

CT-3M has no labels, so instead of a k-NN accuracy we report what goes wrong first in DINO-style training:

- `retrieval_top1`: two fixed augmented views of every held-out slice are embedded by the teacher; the share
  of view-1 features whose nearest view-2 neighbour (cosine) is the same slice. Random features score
  ~1/N, good features approach 1. It is an instance-level k-NN accuracy that needs no labels.
- `effective_rank`: exp(entropy of the normalised singular values) of the centred CLS features
  (Roy & Vetterli 2007); it drops towards 1 on dimensional collapse.
- `feature_std`: mean per-dimension std of the L2-normalised features (≈ 1/sqrt(D) when spread out, 0 on
  complete collapse), and `mean_cosine`: mean pairwise cosine similarity (→ 1 on collapse).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .crops import MultiCropAugmentation

__all__ = ["HealthProbe", "feature_statistics", "retrieval_top1"]


@torch.no_grad()
def feature_statistics(features: torch.Tensor) -> dict[str, float]:
    """Collapse statistics of (N, D) features."""
    x = features.float()
    z = F.normalize(x, dim=-1)
    centred = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    p = s / s.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    n = z.shape[0]
    cos = z @ z.t()
    mean_cos = (cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1)
    return {
        "effective_rank": float(torch.exp(entropy)),
        "feature_std": float(z.std(dim=0).mean()),
        "mean_cosine": float(mean_cos),
    }


@torch.no_grad()
def retrieval_top1(view1: torch.Tensor, view2: torch.Tensor) -> float:
    """Share of rows i of view1 whose most similar row of view2 is row i."""
    sim = F.normalize(view1.float(), dim=-1) @ F.normalize(view2.float(), dim=-1).t()
    return float((sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).float().mean())


class HealthProbe:
    """Renders two fixed views of each held-out HU slice once, then scores any backbone on them."""

    def __init__(self, slices: Iterable[torch.Tensor], image_size: int = 224, seed: int = 1234):
        aug = MultiCropAugmentation(global_size=image_size, n_local=0)
        g = torch.Generator().manual_seed(seed)
        views = [aug(torch.as_tensor(s), generator=g)["global"] for s in slices]  # each (2, 1, s, s)
        if len(views) < 2:
            raise ValueError("the health probe needs at least 2 held-out slices")
        stacked = torch.stack(views)  # (N, 2, 1, s, s)
        self.view1, self.view2 = stacked[:, 0].contiguous(), stacked[:, 1].contiguous()

    def __len__(self) -> int:
        return len(self.view1)

    @torch.no_grad()
    def evaluate(self, backbone: torch.nn.Module, batch_size: int = 64, autocast=None) -> dict[str, float]:
        """Metrics of `backbone` (a MedDINOv3Model; put in eval mode for the call, mode restored)."""
        device = next(backbone.parameters()).device
        was_training = backbone.training
        backbone.eval()
        feats = []
        try:
            for views in (self.view1, self.view2):
                out = []
                for i in range(0, len(views), batch_size):
                    x = views[i : i + batch_size].to(device)
                    ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
                    with ctx:
                        out.append(backbone(x).pooler_output.float())
                feats.append(torch.cat(out))
        finally:
            backbone.train(was_training)
        stats = feature_statistics(feats[0])
        stats["retrieval_top1"] = retrieval_top1(feats[0], feats[1])
        stats["chance_top1"] = 1.0 / len(self)
        return {k: (v if math.isfinite(v) else float("nan")) for k, v in stats.items()}
