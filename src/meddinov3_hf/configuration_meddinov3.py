"""MedDINOv3 configuration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import DINOv3ViTConfig

ROPE_PRECISIONS = ("fp32", "bf16")
# The transformer's fields shared with transformers' `DINOv3ViTConfig` (everything but RoPE augmentation and
# the position-embedding rescale, which MedDINOv3 does not use at inference).
DINOV3_VIT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "rope_theta",
    "num_channels",
    "query_bias",
    "key_bias",
    "value_bias",
    "proj_bias",
    "mlp_bias",
    "layerscale_value",
    "use_gated_mlp",
    "num_register_tokens",
    "patch_size",
)


@strict
class MedDINOv3Config(DINOv3ViTConfig):
    r"""
    Configuration of a MedDINOv3 model. `MedDINOv3Config()` is the paper's backbone: a DINOv3 ViT-B/16 with
    4 register tokens, no q/k/v bias, LayerNorm eps 1e-6, LayerScale (init 1e-5) and 2-D RoPE (base 100) without
    coordinate augmentation, plus the fields of the multi-scale token aggregation segmentation network.

    It extends [`DINOv3ViTConfig`] (every field of it keeps its meaning) with:

    aggregation_layers (`list[int]`, *optional*):
        0-based indices of the transformer blocks whose final-normed patch tokens are concatenated and decoded.
        Derived from the depth when not given: four blocks evenly spaced over the depth, ending at the last
        (the paper's blocks 2, 5, 8, 11 of a 12-block ViT-B; 5, 11, 17, 23 for 24 blocks).
    decoder_hidden_sizes (`list[int]`, *optional*):
        Output widths of the transposed-convolution decoder stages, each upsampling ×2. Derived when not given:
        ceil(log2(patch_size)) stages, halving the aggregated width at each stage ([1536, 768, 384, 192] for
        the paper's ViT-B/16). For a patch size that is not a power of two the decoder output is interpolated
        (bilinear) to the input size.
    decoder_layer_norm_eps (`float`, defaults to 1e-6):
        Epsilon of the decoder's channel LayerNorms.
    dice_loss_weight / ce_loss_weight (`float`, default 1.0 each):
        Weights of the soft Dice (foreground classes) and cross-entropy terms of the segmentation loss.
    dice_smooth (`float`, defaults to 1e-5):
        Smoothing term of the soft Dice.
    semantic_loss_ignore_index (`int`, defaults to 255):
        Label value excluded from both loss terms.
    rope_precision (`str`, `"fp32"` or `"bf16"`, defaults to `"fp32"`):
        `"fp32"` builds the RoPE tables in float32 (identical to transformers' DINOv3). `"bf16"` reproduces the
        reference implementation's numerics: periods, coordinates, angles and sin/cos in bfloat16, and q/k
        rounded to bfloat16 around the rotation. Checkpoints converted from the MedDINOv3 release use `"bf16"`.
    """

    model_type = "meddinov3"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-6
    query_bias: bool = False
    key_bias: bool = False
    value_bias: bool = False
    layerscale_value: float = 1e-5
    num_register_tokens: int = 4
    pos_embed_rescale: float | None = None
    image_size: int | list[int] | tuple[int, int] = 896

    aggregation_layers: list[int] | tuple[int, ...] | None = None
    decoder_hidden_sizes: list[int] | tuple[int, ...] | None = None
    decoder_layer_norm_eps: float = 1e-6
    dice_loss_weight: float = 1.0
    ce_loss_weight: float = 1.0
    dice_smooth: float = 1e-5
    semantic_loss_ignore_index: int = 255
    rope_precision: str = "fp32"

    def __post_init__(self, **kwargs):
        # A config read from a DINOv3 folder carries `model_type: dinov3_vit`; the instance must say `meddinov3`
        # (transformers looks up key conversions by it).
        kwargs.pop("model_type", None)
        # Head fields follow the backbone when not given; they are validated only where a head is built
        # (`check_head_fields`), so that every DINOv3 ViT configuration builds MedDINOv3Model/MedDINOv3Backbone.
        if self.aggregation_layers is None:
            self.aggregation_layers = default_aggregation_layers(self.num_hidden_layers)
        self.aggregation_layers = [int(i) for i in self.aggregation_layers]
        if self.decoder_hidden_sizes is None:
            self.decoder_hidden_sizes = default_decoder_hidden_sizes(
                self.hidden_size * len(self.aggregation_layers), _patch(self.patch_size)
            )
        self.decoder_hidden_sizes = [int(c) for c in self.decoder_hidden_sizes]
        # AutoBackbone defaults to the aggregated blocks (stage i + 1 is the output of block i).
        if kwargs.get("out_indices") is None and kwargs.get("out_features") is None:
            if self.aggregation_layers and all(
                0 <= i < self.num_hidden_layers for i in self.aggregation_layers
            ):
                kwargs["out_indices"] = [i + 1 for i in self.aggregation_layers]
        super().__post_init__(**kwargs)

    def to_dinov3_vit_config(self, **overrides) -> DINOv3ViTConfig:
        """transformers' `DINOv3ViTConfig` of the same transformer (no RoPE augmentation), e.g. to build the
        `DINOv3ViTModel`/`DINOv3ViTBackbone` that MedDINOv3 must match numerically."""
        kwargs = {k: getattr(self, k) for k in DINOV3_VIT_FIELDS} | {"pos_embed_rescale": None}
        return DINOv3ViTConfig(**(kwargs | overrides))

    @staticmethod
    def architecture_from_dinov3_vit(config: DINOv3ViTConfig) -> dict[str, Any]:
        """The transformer fields of a `DINOv3ViTConfig`, as `MedDINOv3Config` keyword arguments (the inverse
        of `to_dinov3_vit_config`)."""
        return {k: getattr(config, k) for k in DINOV3_VIT_FIELDS}

    def validate_architecture(self):
        super().validate_architecture()
        if self.rope_precision not in ROPE_PRECISIONS:
            raise ValueError(f"rope_precision must be one of {ROPE_PRECISIONS}, got {self.rope_precision!r}")

    def check_head_fields(self) -> None:
        """Check the segmentation-head fields against the backbone (called when a head is built)."""
        bad = [i for i in self.aggregation_layers if not 0 <= i < self.num_hidden_layers]
        if bad or not self.aggregation_layers:
            raise ValueError(
                f"aggregation_layers {self.aggregation_layers} must be non-empty 0-based block indices in "
                f"[0, {self.num_hidden_layers - 1}] for a model with {self.num_hidden_layers} blocks"
            )
        patch = _patch(self.patch_size)
        stages = num_decoder_stages(patch)
        if len(self.decoder_hidden_sizes) != stages or min(self.decoder_hidden_sizes, default=1) < 1:
            raise ValueError(
                f"decoder_hidden_sizes {self.decoder_hidden_sizes} has {len(self.decoder_hidden_sizes)} stages, "
                f"each upsampling ×2; patch_size {patch} needs ceil(log2({patch})) = {stages} positive widths"
            )


def _patch(patch_size: int | Sequence[int]) -> int:
    return patch_size if isinstance(patch_size, int) else int(patch_size[0])


def default_aggregation_layers(num_hidden_layers: int, count: int = 4) -> list[int]:
    """`count` blocks evenly spaced over the depth, ending at the last: the paper's multi-scale token
    aggregation (arXiv 2509.02379) uses blocks 2, 5, 8, 11 of the 12-block ViT-B, i.e. the last block of each
    quarter; the same rule gives 5, 11, 17, 23 for 24 blocks. Fewer blocks than `count` use every block."""
    return sorted({max(0, (k + 1) * num_hidden_layers // count - 1) for k in range(count)})


def num_decoder_stages(patch_size: int) -> int:
    """×2 upsampling stages to get from patch tokens back to (at least) pixel resolution: ceil(log2(patch))."""
    return max(0, math.ceil(math.log2(patch_size))) if patch_size > 0 else 0


def default_decoder_hidden_sizes(in_channels: int, patch_size: int) -> list[int]:
    """Stage widths halving from the aggregated width: [1536, 768, 384, 192] for 4 × 768 channels, patch 16."""
    return [max(1, in_channels // 2 ** (s + 1)) for s in range(num_decoder_stages(patch_size))]


# `save_pretrained` copies this file next to the weights and writes `auto_map`, so that a saved or pushed folder
# loads with `trust_remote_code=True` where this package is not installed.
MedDINOv3Config.register_for_auto_class()

__all__ = ["MedDINOv3Config"]
