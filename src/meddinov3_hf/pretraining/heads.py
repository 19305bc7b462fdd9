"""Projection heads for DINO (CLS token) and iBOT (patch tokens) self-distillation (SPEC §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP → bottleneck → L2-normalise → weight-normalised prototype layer.

    `x (..., in_dim)` → logits `(..., out_dim)`. The prototype layer's weight rows are unit-norm (weight-norm
    magnitude fixed to 1 and not trained, as in DINO), so with the L2-normalised bottleneck every logit is a
    cosine similarity in [-1, 1] before temperature scaling.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.norm_eps = norm_eps
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)

        # Init the direction before parametrising: weight_norm then stores v = W and g = ||W_row||.
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self._init_weights(last)
        self.last_layer = weight_norm(last, name="weight", dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)  # fixed magnitude: prototypes stay unit vectors

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the prototype layer (frozen by the trainer during the first epoch)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., in_dim)` → L2-normalised bottleneck features `(..., bottleneck_dim)`."""
        return F.normalize(self.mlp(x), dim=-1, p=2, eps=self.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., in_dim)` → prototype logits `(..., out_dim)`."""
        return self.last_layer(self.forward_bottleneck(x))
