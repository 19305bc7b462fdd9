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

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling, SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
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
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_meddinov3 import MedDINOv3Config
from .decoder_meddinov3 import MedDINOv3Decoder, _patch_size, segmentation_loss
from .progress import quiet_weight_bars

logger = logging.getLogger(__name__)

# Folders saved by transformers' DINOv3ViTModel / DINOv3ViTBackbone (the layout of every `facebook/dinov3-*`
# repo) name the encoder blocks `layer.N.*`, ours `model.layer.N.*`. transformers renames these at load time for
# `dinov3_vit` only (conversion_mapping.py); custom classes get a conversion only when it is registered under
# their class name or model type. Class names, not the `meddinov3` type: a type mapping would also be applied,
# scoped, to the nested encoder and prefix its keys twice. The escaped dot leaves `layer_scale1/2` untouched.
DINOV3_LAYER_RENAMING = (r"(?<!model\.)layer\.", "model.layer.")
CONVERTED_CLASS_NAMES = ("MedDINOv3Model", "MedDINOv3Backbone", "MedDINOv3ForSemanticSegmentation")


def register_dinov3_key_conversion() -> None:
    """Register the DINOv3 → MedDINOv3 key renaming for our classes (idempotent; runs on import)."""
    for name in CONVERTED_CLASS_NAMES:
        register_checkpoint_conversion_mapping(name, [WeightRenaming(*DINOV3_LAYER_RENAMING)], overwrite=True)


REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_meddinov3.MedDINOv3Config",
    "AutoModel": "modeling_meddinov3.MedDINOv3Model",
    "AutoBackbone": "modeling_meddinov3.MedDINOv3Backbone",
    "AutoModelForSemanticSegmentation": "modeling_meddinov3.MedDINOv3ForSemanticSegmentation",
}


class WeightLoadingError(ValueError):
    """A checkpoint that does not provide exactly the backbone weights a MedDINOv3 class needs."""


# What `forward(**kwargs)` accepts: transformers' typed kwargs, plus `return_dict` (handled by the parent).
ACCEPTED_FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__) | {"return_dict"}


def check_forward_kwargs(model: nn.Module, kwargs: dict) -> None:
    """Reject keyword arguments a forward would otherwise swallow silently."""
    unknown = sorted(set(kwargs) - ACCEPTED_FORWARD_KWARGS)
    if unknown:
        raise TypeError(f"{type(model).__name__}.forward() got unexpected keyword arguments {unknown}")


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

    # Quiet in notebooks: transformers' per-tensor loading/saving bars only when asked for
    # (`meddinov3_hf.set_loading_progress(True)`); Hub download bars are unaffected.
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        with quiet_weight_bars():
            return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, *args, save_original_format: bool = False, **kwargs):
        # save_original_format=False: the load-time DINOv3 key renaming is not reversed, so folders keep this
        # package's layout (`model.layer.N.*`) whatever was loaded.
        if type(self)._auto_class is not None:
            # Every Auto class of the package in `auto_map`, whichever class saves (a segmentation folder also
            # loads with AutoModel / AutoBackbone).
            self.config.auto_map = dict(getattr(self.config, "auto_map", None) or {}) | REMOTE_CODE_AUTO_MAP
        with quiet_weight_bars():
            return super().save_pretrained(*args, save_original_format=save_original_format, **kwargs)

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        """transformers only warns (a table) when weights are missing or unexpected; here any backbone weight
        missing, unexpected or of the wrong shape raises `WeightLoadingError` with the key names. A freshly
        initialised decoder (a fine-tune starting from a backbone) is the one expected case: one log line."""
        source = getattr(load_config, "pretrained_model_name_or_path", None)
        ignore_mismatched = bool(getattr(load_config, "ignore_mismatched_sizes", False))
        handled = not loading_info.error_msgs and not loading_info.conversion_errors
        handled = handled and (ignore_mismatched or not loading_info.mismatched_keys)
        report_filter = _DropLoadReport() if handled else None
        transformers_logger = logging.getLogger("transformers.modeling_utils")
        if report_filter is not None:
            transformers_logger.addFilter(report_filter)
        try:
            loading_info = PreTrainedModel._finalize_model_loading(model, load_config, loading_info)
        finally:
            if report_filter is not None:
                transformers_logger.removeFilter(report_filter)
        check_loading_info(model, loading_info, source)
        return loading_info

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


class _DropLoadReport(logging.Filter):
    """Hides transformers' loading table; `check_loading_info` reports instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def check_loading_info(model: nn.Module, loading_info, source: object = None) -> None:
    """Raise `WeightLoadingError` naming the keys if the backbone did not load exactly; log one line when the
    decoder of a segmentation model was initialised fresh (entirely missing, or mismatched classes with
    `ignore_mismatched_sizes=True`). A partially loaded decoder raises too."""
    missing = set(loading_info.missing_keys)
    unexpected = set(loading_info.unexpected_keys)
    mismatched = {key for key, *_ in loading_info.mismatched_keys}
    decoder_keys = {k for k in model.state_dict() if k.startswith("decoder.")}
    problems = []
    backbone_missing = sorted(k for k in missing if not k.startswith("decoder."))
    if backbone_missing:
        problems.append(f"missing backbone weights {_preview(backbone_missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_preview(sorted(unexpected))}")
    backbone_mismatched = sorted(k for k in mismatched if not k.startswith("decoder."))
    if backbone_mismatched:
        problems.append(f"backbone weights of the wrong shape {_preview(backbone_mismatched)}")
    decoder_missing = missing & decoder_keys
    if decoder_missing and decoder_missing != decoder_keys:
        problems.append(f"a partial decoder: missing {_preview(sorted(decoder_missing))}")
    if problems:
        raise WeightLoadingError(
            f"{source}: cannot load {type(model).__name__} exactly: " + "; ".join(problems)
        )
    if decoder_missing:
        logger.warning(
            "%s: no decoder weights in %s; the decoder is freshly initialised (expected when starting a fine-tune "
            "from a backbone)",
            type(model).__name__,
            source,
        )
    elif mismatched:
        logger.warning(
            "%s: decoder weights %s of %s have other shapes (e.g. another number of classes); they are freshly "
            "initialised (ignore_mismatched_sizes=True)",
            type(model).__name__,
            _preview(sorted(mismatched)),
            source,
        )


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', … ({len(keys)} in all)' if len(keys) > limit else ''}]"


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
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        check_forward_kwargs(self, kwargs)
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

    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]):
        check_forward_kwargs(self, kwargs)
        check_pixel_values(pixel_values, self.config)
        return super().forward(pixel_values, **kwargs)


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


class MedDINOv3ForSemanticSegmentation(MedDINOv3PreTrainedModel):
    """MedDINOv3 with multi-scale token aggregation: the final-normed patch tokens of
    `config.aggregation_layers` are concatenated (B, D·L, H/p, W/p) and decoded to logits (B, num_labels, H, W).
    With `labels` (B, H, W), returns the Dice + cross-entropy loss. With `output_hidden_states` /
    `output_attentions`, also every block's hidden states (embedding output first, as [`DINOv3ViTModel`]) and
    attention maps; only then are the blocks after the deepest aggregated one computed."""

    # The loss is a per-batch mean computed here; the Trainer must not rescale it by the number of processes.
    accepts_loss_kwargs = False

    def __init__(self, config: MedDINOv3Config):
        config.check_head_fields()
        super().__init__(config)
        self.meddinov3 = MedDINOv3Model(config)
        self.decoder = MedDINOv3Decoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput | tuple:
        check_forward_kwargs(self, kwargs)
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        output_attentions = kwargs.pop("output_attentions", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        hidden_states = attentions = None
        layers = self.config.aggregation_layers
        if output_hidden_states or output_attentions:
            check_pixel_values(pixel_values, self.config)
            outputs = self.meddinov3(
                pixel_values, output_hidden_states=True, output_attentions=bool(output_attentions), **kwargs
            )
            patch = _patch_size(self.config)
            height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
            # hidden_states[i + 1] is the output of block i (hidden_states[0] is the embedding output).
            features = [
                self.meddinov3.norm(outputs.hidden_states[i + 1][:, -height * width :])
                .transpose(1, 2)
                .reshape(pixel_values.shape[0], -1, height, width)
                for i in layers
            ]
            hidden_states = outputs.hidden_states if output_hidden_states else None
            attentions = outputs.attentions if output_attentions else None
        else:  # fast path: stop after the deepest aggregated block
            features = self.meddinov3.get_intermediate_layers(pixel_values, layers)
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
        output = SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions
        )
        return output.to_tuple() if return_dict is False else output


__all__ = [
    "MedDINOv3Backbone",
    "MedDINOv3ForSemanticSegmentation",
    "MedDINOv3Model",
    "MedDINOv3PreTrainedModel",
    "segmentation_loss",
]

register_dinov3_key_conversion()
# transformers' custom-model convention: `save_pretrained` copies the defining modules next to the weights and
# writes `auto_map` (completed in `MedDINOv3PreTrainedModel.save_pretrained`).
MedDINOv3Model.register_for_auto_class("AutoModel")
MedDINOv3Backbone.register_for_auto_class("AutoBackbone")
MedDINOv3ForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
