"""MedDINOv3 configuration."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import DINOv3ViTConfig

ROPE_PRECISIONS = ("fp32", "bf16")


@strict
class MedDINOv3Config(DINOv3ViTConfig):
    r"""
    Configuration of a MedDINOv3 model. `MedDINOv3Config()` is the paper's backbone: a DINOv3 ViT-B/16 with
    4 register tokens, no q/k/v bias, LayerNorm eps 1e-6, LayerScale (init 1e-5) and 2-D RoPE (base 100) without
    coordinate augmentation, plus the fields of the multi-scale token aggregation segmentation network.

    It extends [`DINOv3ViTConfig`] (every field of it keeps its meaning) with:

    aggregation_layers (`list[int]`, defaults to `[2, 5, 8, 11]`):
        0-based indices of the transformer blocks whose final-normed patch tokens are concatenated and decoded.
    decoder_hidden_sizes (`list[int]`, defaults to `[1536, 768, 384, 192]`):
        Output widths of the transposed-convolution decoder stages; each stage upsamples by 2, so there must
        be log2(patch_size) of them.
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

    aggregation_layers: list[int] | tuple[int, ...] = (2, 5, 8, 11)
    decoder_hidden_sizes: list[int] | tuple[int, ...] = (1536, 768, 384, 192)
    decoder_layer_norm_eps: float = 1e-6
    dice_loss_weight: float = 1.0
    ce_loss_weight: float = 1.0
    dice_smooth: float = 1e-5
    semantic_loss_ignore_index: int = 255
    rope_precision: str = "fp32"

    def __post_init__(self, **kwargs):
        self.aggregation_layers = [int(i) for i in self.aggregation_layers]
        self.decoder_hidden_sizes = [int(c) for c in self.decoder_hidden_sizes]
        bad = [i for i in self.aggregation_layers if not 0 <= i < self.num_hidden_layers]
        if bad or not self.aggregation_layers:
            raise ValueError(
                f"aggregation_layers {self.aggregation_layers} must be non-empty 0-based block indices in "
                f"[0, {self.num_hidden_layers - 1}] for a model with {self.num_hidden_layers} blocks"
            )
        # AutoBackbone defaults to the aggregated blocks (stage i + 1 is the output of block i).
        if kwargs.get("out_indices") is None and kwargs.get("out_features") is None:
            kwargs["out_indices"] = [i + 1 for i in self.aggregation_layers]
        super().__post_init__(**kwargs)

    def to_dinov3_vit_config(self, **overrides) -> DINOv3ViTConfig:
        """transformers' `DINOv3ViTConfig` of the same transformer (no RoPE augmentation), e.g. to build the
        `DINOv3ViTModel`/`DINOv3ViTBackbone` that MedDINOv3 must match numerically."""
        keys = (
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
        kwargs = {k: getattr(self, k) for k in keys} | {"pos_embed_rescale": None}
        return DINOv3ViTConfig(**(kwargs | overrides))

    def validate_architecture(self):
        super().validate_architecture()
        if self.rope_precision not in ROPE_PRECISIONS:
            raise ValueError(f"rope_precision must be one of {ROPE_PRECISIONS}, got {self.rope_precision!r}")
        patch = self.patch_size if isinstance(self.patch_size, int) else self.patch_size[0]
        if 2 ** len(self.decoder_hidden_sizes) != patch:
            raise ValueError(
                f"decoder_hidden_sizes has {len(self.decoder_hidden_sizes)} stages, each upsampling ×2; "
                f"patch_size {patch} needs log2({patch}) stages"
            )


__all__ = ["MedDINOv3Config"]
