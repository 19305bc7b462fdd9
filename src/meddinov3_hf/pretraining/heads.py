"""Projection heads for DINO (CLS token) and iBOT (patch tokens) self-distillation.

Built as DINOv3 builds them (`dinov3/layers/dino_head.py`): an MLP (Linear-GELU-...-Linear, hidden 2048,
bottleneck 256), L2-normalisation, then a plain bias-free linear layer to the prototypes (DINOv2's weight
norm is gone in DINOv3). Module names match the release checkpoints, so `dino_head.mlp.{0,2,4}.*` and
`dino_head.last_layer.weight` (and `ibot_head.*`) load directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP → bottleneck → L2-normalise → bias-free linear prototype layer.

    `x (..., in_dim)` → logits `(..., out_dim)`. As in DINOv3 the prototype layer is an ordinary
    `nn.Linear(bottleneck_dim, out_dim, bias=False)`: its rows are trained freely (no unit-norm constraint).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        last_layer_init: str = "dinov3",
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if last_layer_init not in ("dinov3", "unit"):
            raise ValueError(f"last_layer_init must be 'dinov3' or 'unit', got {last_layer_init!r}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        # nlayers == 1: a bare Linear (key `mlp.weight`), as dinov3/layers/dino_head.py `_build_mlp`.
        self.mlp = nn.Sequential(*layers) if nlayers > 1 else layers[0]
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.apply(self._init_weights)
        if last_layer_init == "unit":
            # Prototype rows start at unit norm, where DINOv2's weight-normed layer starts (g = 1), and are then
            # trained freely as in DINOv3 (whose std-0.02 rows make every fresh logit ~0: uniform predictions).
            # Not the default: in benchmarks/pretrain_learns.py it did not change where a short from-scratch run
            # ends (DINO loss back at log K within 100 steps either way).
            with torch.no_grad():
                self.last_layer.weight.copy_(F.normalize(self.last_layer.weight, dim=1))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # dinov3/layers/dino_head.py: trunc_normal_(std=0.02) on every Linear, zero biases.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the prototype layer (frozen by the trainer during the first epoch)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., in_dim)` → L2-normalised bottleneck features `(..., bottleneck_dim)`."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # as dinov3/layers/dino_head.py
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., in_dim)` → prototype logits `(..., out_dim)`."""
        return self.last_layer(self.forward_bottleneck(x))
