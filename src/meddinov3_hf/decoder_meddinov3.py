"""The MedDINOv3 segmentation decoder and its loss, used by `MedDINOv3ForSemanticSegmentation`
(`modeling_meddinov3.py`, which re-exports them; `save_pretrained` copies this file beside the weights too).

Primus-style patch decoder: transposed-convolution stages that double the resolution of the aggregated patch
tokens until the input size, then a 1×1 classifier; loss = soft Dice over the foreground classes +
cross-entropy (nnU-Net's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_meddinov3 import MedDINOv3Config

__all__ = ["MedDINOv3Decoder", "MedDINOv3DecoderStage", "channel_layer_norm", "segmentation_loss"]


def _patch_size(config: MedDINOv3Config) -> int:
    return config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]


def channel_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last (channel) dim in the activation's own dtype: autocast would upcast it to fp32,
    doubling the memory of the decoder's largest maps; the CUDA kernel keeps fp32 statistics anyway."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        weight, bias = norm.weight.to(x.dtype), norm.bias.to(x.dtype)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


class MedDINOv3DecoderStage(GradientCheckpointingLayer):
    """ConvTranspose2d(k=2, s=2) → channel LayerNorm → GELU, computed on channels-last tokens.

    A stride-2 kernel-2 transposed convolution has no overlap: each input pixel produces its own 2×2 block,
    i.e. one matmul to 4·C_out channels. The decoder therefore keeps every map as a flat (pixels, channels)
    matrix with the 2×2 sub-positions folded into the pixel axis and rearranges only the final logits."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.upsample._he_init = True
        self.norm = nn.LayerNorm(out_channels, eps=eps)
        self.activation = nn.GELU()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(P, C_in) → (4·P, C_out); sub-position (i, j) of each pixel is the fastest-varying pixel index."""
        weight = self.upsample.weight  # (C_in, C_out, 2, 2)
        c_out = weight.shape[1]
        weight = weight.permute(2, 3, 1, 0).reshape(4 * c_out, weight.shape[0])
        bias = self.upsample.bias.repeat(4)
        tokens = F.linear(tokens, weight.to(tokens.dtype), bias.to(tokens.dtype)).view(-1, c_out)
        return self.activation(channel_layer_norm(tokens, self.norm))


class MedDINOv3Decoder(nn.Module):
    """Primus-style patch decoder: (B, C·L, h, w) aggregated tokens → (B, num_labels, p·h, p·w) logits."""

    def __init__(self, config: MedDINOv3Config):
        super().__init__()
        widths = [config.hidden_size * len(config.aggregation_layers), *config.decoder_hidden_sizes]
        self.stages = nn.ModuleList(
            MedDINOv3DecoderStage(c_in, c_out, config.decoder_layer_norm_eps)
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.classifier = nn.Conv2d(widths[-1], config.num_labels, kernel_size=1)
        self.classifier._he_init = True
        self.patch_size = _patch_size(config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        tokens = features.permute(0, 2, 3, 1).reshape(-1, channels)
        for stage in self.stages:
            tokens = stage(tokens)
        weight = self.classifier.weight.flatten(1)
        logits = F.linear(tokens, weight.to(tokens.dtype), self.classifier.bias.to(tokens.dtype))
        # Unfold the sub-positions: (B, h, w, i1, j1, ..., in, jn, K) → (B, K, h·2^n, w·2^n).
        n = len(self.stages)
        logits = logits.view(batch, height, width, *([2] * (2 * n)), -1)
        rows = [1] + [3 + 2 * s for s in range(n)]
        cols = [2] + [4 + 2 * s for s in range(n)]
        logits = logits.permute(0, 3 + 2 * n, *rows, *cols)
        logits = logits.reshape(batch, -1, height * 2**n, width * 2**n)
        if 2**n != self.patch_size:
            # Patch size not a power of two (e.g. 14): the ×2 stages overshoot; interpolate to the input size.
            size = (height * self.patch_size, width * self.patch_size)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice over the foreground classes (batch Dice, as nnU-Net's 2-D setting) + cross-entropy.

    logits (B, K, H, W), labels (B, H, W) integers in [0, K) or `ignore_index`. Pixels equal to `ignore_index`
    count in neither term."""
    num_labels = logits.shape[1]
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    labels = labels.long()
    valid = labels != ignore_index
    invalid = valid & ((labels < 0) | (labels >= num_labels))
    if invalid.any():
        found = sorted(set(labels[invalid].unique().tolist()))[:10]
        raise ValueError(
            f"labels contain values {found} outside [0, {num_labels}) (ignore_index={ignore_index})"
        )
    logits = logits.float()
    if not valid.any():
        return logits.sum() * 0
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    # Per-class soft counts without a (B, K, H, W) one-hot: gather the true-class probability and bincount.
    probs = logits.softmax(dim=1)
    targets = labels.where(valid, 0)
    weight = valid.to(probs.dtype)
    true_prob = probs.gather(1, targets.unsqueeze(1)).squeeze(1) * weight
    intersection = torch.zeros(num_labels, device=logits.device).index_add_(
        0, targets.flatten(), true_prob.flatten()
    )
    reference = torch.bincount(targets[valid], minlength=num_labels).to(probs.dtype)
    predicted = probs.sum(dim=(0, 2, 3))
    if not valid.all():
        predicted = predicted - (probs * (1 - weight).unsqueeze(1)).sum(dim=(0, 2, 3))
    dice = (2 * intersection[1:] + smooth) / (predicted[1:] + reference[1:] + smooth)
    dice_loss = 1 - dice.mean() if num_labels > 1 else logits.sum() * 0
    return ce_weight * ce + dice_weight * dice_loss
