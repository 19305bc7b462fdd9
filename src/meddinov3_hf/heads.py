"""The segmentation-head seam: what the package needs from a segmentation model, whichever head it has.

A segmentation model is an instance of the class transformers' `AutoModelForSemanticSegmentation` maps its
config to: `MedDINOv3ForSemanticSegmentation` (registered by the package) or a transformers head such as
`UperNetForSemanticSegmentation` on a `MedDINOv3Backbone`. Their forward takes `pixel_values` (B, C, H, W)
and returns `logits` (B, K, H, W), K = `config.num_labels`. Nothing here names a head class: fine-tuning,
whole-volume inference, the CLI and the model card ask these functions instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

__all__ = [
    "backbone_config",
    "backbone_module",
    "backbone_parameter_names",
    "backbone_prefix",
    "check_logits",
    "is_segmentation_config",
    "is_segmentation_model",
    "patch_size",
    "segmentation_class",
    "set_loss_ignore_index",
]

# Config attributes the heads read their loss's ignore label from (ours, then transformers' UperNet/DPT family).
_IGNORE_INDEX_FIELDS = ("semantic_loss_ignore_index", "loss_ignore_index")


def segmentation_class(config: PretrainedConfig | None) -> type[nn.Module] | None:
    """The semantic-segmentation class transformers' auto mapping gives `config`'s type, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING

    if config is None:
        return None
    try:
        return MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING[type(config)]
    except KeyError:
        return None


def is_segmentation_config(config: PretrainedConfig) -> bool:
    """True when the folder's `architectures` names the segmentation class of its config type (a backbone-only
    folder of the same config type is not a segmentation model)."""
    cls = segmentation_class(config)
    return cls is not None and cls.__name__ in (getattr(config, "architectures", None) or [])


def is_segmentation_model(model: object) -> bool:
    """True for an instance of the segmentation class of its own config type."""
    cls = segmentation_class(getattr(model, "config", None))
    return cls is not None and isinstance(model, cls)


def backbone_config(config: PretrainedConfig) -> PretrainedConfig:
    """The ViT's config: `config.backbone_config` for transformers' backbone-based heads, else `config`."""
    return getattr(config, "backbone_config", None) or config


def patch_size(config: PretrainedConfig) -> int:
    """The backbone's patch size (an int, also when the config stores a pair)."""
    patch = backbone_config(config).patch_size
    return int(patch if isinstance(patch, int) else patch[0])


def backbone_module(model: nn.Module) -> nn.Module:
    """The backbone inside a segmentation model: `model.backbone` (transformers' backbone-based heads) or the
    base model (`base_model_prefix`, e.g. `model.meddinov3`)."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return backbone
    base = getattr(model, "base_model", model)
    if isinstance(base, nn.Module) and base is not model:
        return base
    raise ValueError(f"{type(model).__name__}: cannot tell its backbone from its head")


def backbone_prefix(model: nn.Module) -> str:
    """The backbone's attribute path in `model` ("meddinov3", "backbone", ...), the prefix of its weights."""
    backbone = backbone_module(model)
    return next(name for name, module in model.named_modules() if module is backbone)


def backbone_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in `model.named_parameters()`) of the backbone's parameters."""
    prefix = backbone_prefix(model) + "."
    return {name for name, _ in model.named_parameters() if name.startswith(prefix)}


def set_loss_ignore_index(config: PretrainedConfig, ignore_index: int) -> None:
    """Set the label value the head's loss ignores, under whichever field name the head's config uses."""
    fields = [name for name in _IGNORE_INDEX_FIELDS if hasattr(config, name)]
    if not fields:
        raise ValueError(f"{type(config).__name__}: the head's loss has no ignore-label field")
    for name in fields:
        setattr(config, name, int(ignore_index))


def check_logits(logits: Any, pixel_values: torch.Tensor, num_labels: int, model: object = None) -> None:
    """Raise unless `logits` is (B, num_labels, H, W) for `pixel_values` (B, C, H, W)."""
    expected = (pixel_values.shape[0], num_labels, *pixel_values.shape[-2:])
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        name = type(model).__name__ if model is not None else "the model"
        raise ValueError(f"{name} returned logits of shape {shape}; expected (B, K, H, W) = {expected}")
