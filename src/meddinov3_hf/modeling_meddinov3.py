"""MedDINOv3 models: the ViT backbone, an AutoBackbone wrapper and the multi-scale segmentation network.

The transformer itself is transformers' DINOv3 ViT; MedDINOv3 only adds

- a reference-exact bfloat16 RoPE mode (`config.rope_precision == "bf16"`), in which the released checkpoint
  was trained,
- single-channel CT input: a 1-channel `pixel_values` is fed through the patch embedding with its three input
  kernels summed, which equals repeating the channel three times,
- the multi-scale token aggregation head (final-normed patch tokens of blocks 2, 5, 8, 11 → transposed-conv
  decoder) with a Dice + cross-entropy loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTAttention,
    DINOv3ViTBackbone,
    DINOv3ViTEmbeddings,
    DINOv3ViTEncoder,
    DINOv3ViTLayer,
    DINOv3ViTModel,
    DINOv3ViTPreTrainedModel,
    DINOv3ViTRopePositionEmbedding,
    eager_attention_forward,
    rotate_half,
)

from .configuration_meddinov3 import MedDINOv3Config


class MedDINOv3Embeddings(DINOv3ViTEmbeddings):
    """CLS + register + patch tokens. Accepts `num_channels` or 1 input channel (CT): for one channel the
    patch kernel is summed over its input channels, exactly what repeating the channel would compute."""

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        conv = self.patch_embeddings
        if pixel_values.shape[1] == 1 and conv.in_channels != 1:
            weight = conv.weight.sum(dim=1, keepdim=True)
            patches = F.conv2d(pixel_values.to(weight.dtype), weight, conv.bias, stride=conv.stride)
            return self._assemble(patches, bool_masked_pos)
        if pixel_values.shape[1] != conv.in_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels; this model takes {conv.in_channels} or 1"
            )
        return super().forward(pixel_values, bool_masked_pos)

    def _assemble(self, patches: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor:
        # Same token assembly as the parent, from a precomputed (B, D, h, w) patch embedding.
        batch_size = patches.shape[0]
        patches = patches.flatten(2).transpose(1, 2)
        if bool_masked_pos is not None:
            patches = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        cls_token = self.cls_token.expand(batch_size, -1, -1)
        register_tokens = self.register_tokens.expand(batch_size, -1, -1)
        return torch.cat([cls_token, register_tokens, patches], dim=1)


class MedDINOv3RopePositionEmbedding(DINOv3ViTRopePositionEmbedding):
    """2-D RoPE tables. In `"fp32"` mode identical to DINOv3's; in `"bf16"` mode the reference computation:
    periods = base ** (2k / (D/2)), coordinates, angles and sin/cos all in bfloat16."""

    def __init__(self, config: MedDINOv3Config):
        super().__init__(config)
        self.precision = config.rope_precision
        quarter = self.head_dim // 4
        periods = self.base ** (2 * torch.arange(quarter, dtype=torch.bfloat16) / (self.head_dim // 2))
        self.periods = nn.Buffer(periods, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precision == "fp32":
            cos, sin = super().forward(pixel_values)
            return cos.float(), sin.float()
        patch = (
            self.config.patch_size if isinstance(self.config.patch_size, int) else self.config.patch_size[0]
        )
        height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        bf16 = {"dtype": torch.bfloat16, "device": pixel_values.device}
        # Same op order as the reference so that every intermediate is rounded identically.
        coords_h = torch.arange(0.5, height, **bf16) / height
        coords_w = torch.arange(0.5, width, **bf16) / width
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        periods = self.periods.to(device=pixel_values.device, dtype=torch.bfloat16)
        angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.cos(angles), torch.sin(angles)


def apply_rope_in_table_dtype(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the patch tokens of q and k (B, heads, N, head_dim) by tables (n_patches, head_dim), computing in
    the tables' dtype and casting back, as the reference does (all tokens pass through that dtype)."""
    out_dtype = query.dtype
    query, key = query.to(cos.dtype), key.to(cos.dtype)
    num_prefix = query.shape[-2] - cos.shape[-2]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        prefix, patches = x.split((num_prefix, cos.shape[-2]), dim=-2)
        return torch.cat((prefix, patches * cos + rotate_half(patches) * sin), dim=-2)

    return rotate(query).to(out_dtype), rotate(key).to(out_dtype)


class MedDINOv3Attention(DINOv3ViTAttention):
    """DINOv3 attention whose RoPE runs in the dtype of the RoPE tables (float32 or reference bfloat16)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, _ = hidden_states.shape
        shape = (batch_size, num_tokens, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rope_in_table_dtype(query, key, cos, sin)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(batch_size, num_tokens, -1)), weights


class MedDINOv3Layer(DINOv3ViTLayer):
    def __init__(self, config: MedDINOv3Config):
        super().__init__(config)
        self.attention = MedDINOv3Attention(config)


class MedDINOv3PreTrainedModel(DINOv3ViTPreTrainedModel):
    config: MedDINOv3Config
    config_class = MedDINOv3Config
    base_model_prefix = "meddinov3"
    # A backbone loaded from a segmentation folder leaves the decoder behind on purpose.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]
    _no_split_modules = ["MedDINOv3Embeddings", "MedDINOv3Layer"]

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "_he_init", False):
            # Decoder convolutions: He (Kaiming) normal with negative slope 1e-2 and zero bias, as the reference.
            init.kaiming_normal_(module.weight, a=1e-2)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, MedDINOv3RopePositionEmbedding):
            head_dim = module.head_dim
            periods = module.base ** (2 * torch.arange(head_dim // 4, dtype=torch.bfloat16) / (head_dim // 2))
            init.copy_(module.periods, periods)


class MedDINOv3Encoder(DINOv3ViTEncoder):
    config_class = MedDINOv3Config

    def __init__(self, config: MedDINOv3Config):
        # Skip DINOv3ViTEncoder.__init__ (it would build DINOv3 layers only to discard them).
        super(DINOv3ViTEncoder, self).__init__(config)
        self.layer = nn.ModuleList([MedDINOv3Layer(config) for _ in range(config.num_hidden_layers)])
        self.post_init()


def _build_vit(module: nn.Module, config: MedDINOv3Config) -> None:
    module.embeddings = MedDINOv3Embeddings(config)
    module.rope_embeddings = MedDINOv3RopePositionEmbedding(config)
    module.model = MedDINOv3Encoder(config)
    module.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MedDINOv3Model(MedDINOv3PreTrainedModel, DINOv3ViTModel):
    """The MedDINOv3 ViT. Outputs as [`DINOv3ViTModel`]: `last_hidden_state` (B, 1 + R + h·w, D) after the final
    norm (CLS, registers, patches), `pooler_output` (B, D) the CLS token; `hidden_states`/`attentions` on
    request. Input (B, 3 or 1, H, W) with H and W multiples of the patch size."""

    def __init__(self, config: MedDINOv3Config):
        # Skip DINOv3ViTModel.__init__ (it would build DINOv3 modules only to replace them).
        super(DINOv3ViTModel, self).__init__(config)
        _build_vit(self, config)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        check_pixel_values(pixel_values, self.config)
        return super().forward(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)

    def get_intermediate_layers(
        self, pixel_values: torch.Tensor, layers: Sequence[int], bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Final-normed patch tokens of the given 0-based blocks as maps (B, D, H/p, W/p). Runs only the blocks
        up to the deepest one requested and keeps only the requested outputs."""
        check_pixel_values(pixel_values, self.config)
        patch = _patch_size(self.config)
        height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        hidden = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        position_embeddings = self.rope_embeddings(pixel_values)
        wanted, outputs = set(layers), {}
        for index, layer in enumerate(self.model.layer[: max(layers) + 1]):
            hidden = layer(hidden, position_embeddings=position_embeddings)
            if index in wanted:
                outputs[index] = self.norm(hidden[:, -height * width :])
        return tuple(outputs[i].transpose(1, 2).reshape(hidden.shape[0], -1, height, width) for i in layers)


class MedDINOv3Backbone(MedDINOv3PreTrainedModel, DINOv3ViTBackbone):
    """AutoBackbone: final-normed feature maps (B, D, H/p, W/p) of `config.out_indices` (default: blocks
    2, 5, 8, 11), for transformers heads such as UperNet, DPT or Mask2Former."""

    def __init__(self, config: MedDINOv3Config):
        super(DINOv3ViTBackbone, self).__init__(config)  # BackboneMixin, then PreTrainedModel
        _build_vit(self, config)
        self.num_features = [config.hidden_size for _ in range(config.num_hidden_layers + 1)]
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        check_pixel_values(pixel_values, self.config)
        return super().forward(pixel_values, **kwargs)


def _patch_size(config: MedDINOv3Config) -> int:
    return config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]


def check_pixel_values(pixel_values: torch.Tensor, config: MedDINOv3Config) -> None:
    """Raise a clear error for input a ViT cannot take (wrong rank, size not a multiple of the patch)."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if hasattr(pixel_values, "shape") else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a 4-D tensor (batch, channels, height, width), got {shape}")
    patch = _patch_size(config)
    height, width = pixel_values.shape[-2:]
    if height % patch or width % patch:
        raise ValueError(
            f"pixel_values height and width must be multiples of the patch size {patch}, got {height}×{width}; "
            "resize or pad with MedDINOv3ImageProcessor"
        )


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
        return logits.reshape(batch, -1, height * 2**n, width * 2**n)


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


class MedDINOv3ForSemanticSegmentation(MedDINOv3PreTrainedModel):
    """MedDINOv3 with multi-scale token aggregation: the final-normed patch tokens of
    `config.aggregation_layers` are concatenated (B, D·L, H/p, W/p) and decoded to logits (B, num_labels, H, W).
    With `labels` (B, H, W), returns the Dice + cross-entropy loss."""

    # The loss is a per-batch mean computed here; the Trainer must not rescale it by the number of processes.
    accepts_loss_kwargs = False

    def __init__(self, config: MedDINOv3Config):
        super().__init__(config)
        self.meddinov3 = MedDINOv3Model(config)
        self.decoder = MedDINOv3Decoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        features = self.meddinov3.get_intermediate_layers(pixel_values, self.config.aggregation_layers)
        logits = self.decoder(torch.cat(features, dim=1))
        loss = None
        if labels is not None:
            loss = segmentation_loss(
                logits,
                labels,
                ignore_index=self.config.semantic_loss_ignore_index,
                dice_weight=self.config.dice_loss_weight,
                ce_weight=self.config.ce_loss_weight,
                smooth=self.config.dice_smooth,
            )
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return SemanticSegmenterOutput(loss=loss, logits=logits)


__all__ = [
    "MedDINOv3Backbone",
    "MedDINOv3ForSemanticSegmentation",
    "MedDINOv3Model",
    "MedDINOv3PreTrainedModel",
    "segmentation_loss",
]
