"""Reading the reference checkpoint formats for `convert`: format detection, the safe torch load, the
reference → transformers key renames (DINOv3's `dinov3/models/vision_transformer.py` names), and an nnU-Net
fine-tune's decoder, labels and working geometry. `convert.convert_checkpoint` builds the folder from these.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_meddinov3 import MedDINOv3Config

FORMATS = ("meddinov3", "dinov3", "transformers", "nnunet")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted faithfully (unknown format, missing or unexpected keys)."""


_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.up_proj.weight",
    "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight",
    "mlp.fc2.bias": "mlp.down_proj.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "storage_tokens": "embeddings.register_tokens",
    "mask_token": "embeddings.mask_token",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def _load_torch_file(path: Path) -> Mapping:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with arbitrary objects, not a torch file...
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint with weights_only=True ({err})"
        ) from err


def detect_format(source: str | os.PathLike) -> str:
    """Which of `FORMATS` a file or folder is; `CheckpointError` if none."""
    path = Path(source)
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            model_type = json.loads(config_file.read_text()).get("model_type")
            if model_type == "dinov3_vit":
                return "transformers"
            raise CheckpointError(f"{path}: config.json has model_type {model_type!r}, expected 'dinov3_vit'")
        raise CheckpointError(f"{path}: a folder without config.json is not a transformers checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    return _detect_loaded_format(_load_torch_file(path), path)


def _detect_loaded_format(checkpoint: Mapping, path: Path) -> str:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    if "teacher" in checkpoint:
        return "meddinov3"
    if "network_weights" in checkpoint:
        return "nnunet"
    if "cls_token" in checkpoint and any(str(k).startswith("blocks.") for k in checkpoint):
        return "dinov3"
    sample = ", ".join(list(map(str, checkpoint))[:6])
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (first keys: {sample})")


def reference_to_hf(
    state: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Reference DINOv3 ViT names (no prefix) → `MedDINOv3Model` names, plus the architecture they imply.
    Raises `CheckpointError` for any key it cannot place."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    for name, target in _TOP_RENAMES.items():
        if name not in state:
            raise CheckpointError(f"{source}: missing key {name!r}")
        out[target] = state.pop(name)
    out["embeddings.mask_token"] = out["embeddings.mask_token"].reshape(1, 1, -1)
    hidden = out["embeddings.cls_token"].shape[-1]
    periods = state.pop("rope_embed.periods", None)
    block_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if block_ids != list(range(len(block_ids))) or not block_ids:
        raise CheckpointError(f"{source}: transformer blocks {block_ids} are not numbered 0..N-1")
    bias = {"query_bias": False, "key_bias": False, "value_bias": False}
    for i in block_ids:
        prefix, target = f"blocks.{i}.", f"model.layer.{i}."
        for name, new in _BLOCK_RENAMES.items():
            if prefix + name not in state:
                raise CheckpointError(f"{source}: missing key {prefix + name!r}")
            out[target + new] = state.pop(prefix + name)
        qkv = state.pop(prefix + "attn.qkv.weight", None)
        if qkv is None or qkv.shape != (3 * hidden, hidden):
            raise CheckpointError(
                f"{source}: {prefix}attn.qkv.weight missing or not of shape (3·{hidden}, {hidden})"
            )
        for part, chunk in zip("qkv", qkv.chunk(3)):
            out[f"{target}attention.{part}_proj.weight"] = chunk.clone()
        qkv_bias = state.pop(prefix + "attn.qkv.bias", None)
        mask = state.pop(prefix + "attn.qkv.bias_mask", None)
        if qkv_bias is not None:
            if mask is not None:
                qkv_bias = qkv_bias * mask.to(qkv_bias.dtype)
            for part, chunk in zip("qkv", qkv_bias.chunk(3)):
                if part == "k" and not chunk.abs().max() == 0:
                    raise CheckpointError(
                        f"{source}: {prefix}attn.qkv.bias has a non-zero key bias (unsupported)"
                    )
                if part != "k":
                    out[f"{target}attention.{part}_proj.bias"] = chunk.clone()
            bias.update(query_bias=True, value_bias=True)
    if state:
        raise CheckpointError(f"{source}: unexpected keys {sorted(state)[:12]}")
    num_heads = (hidden // (4 * periods.numel())) if periods is not None else hidden // 64
    architecture = dict(
        hidden_size=hidden,
        num_hidden_layers=len(block_ids),
        num_attention_heads=num_heads,
        intermediate_size=out["model.layer.0.mlp.up_proj.weight"].shape[0],
        num_register_tokens=out["embeddings.register_tokens"].shape[1],
        patch_size=out["embeddings.patch_embeddings.weight"].shape[-1],
        num_channels=out["embeddings.patch_embeddings.weight"].shape[1],
        **bias,
    )
    architecture["_periods"] = periods
    return out, architecture


def _check_periods(periods: torch.Tensor | None, config: MedDINOv3Config, source: str) -> None:
    """The RoPE periods are a function of the config; a checkpoint whose periods differ cannot be reproduced."""
    if periods is None:
        return
    head_dim = config.hidden_size // config.num_attention_heads
    expected = config.rope_theta ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    if periods.shape != expected.shape or not torch.allclose(periods.float(), expected, rtol=1e-2):
        raise CheckpointError(f"{source}: rope_embed.periods do not match RoPE base {config.rope_theta}")


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _decoder_from_reference(
    state: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], int]:
    """`up_projection.decode.{0..3}.{0,1}.*` and `.4.*` → `decoder.stages.*` / `decoder.classifier.*`."""
    out = {}
    stage_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"(\d+)\.", k))})
    if len(stage_ids) < 2:
        raise CheckpointError(f"{source}: no decoder stages under up_projection.decode")
    last = stage_ids[-1]
    for s in stage_ids[:-1]:
        for param in ("weight", "bias"):
            for sub, new in (("0", "upsample"), ("1", "norm")):
                key = f"{s}.{sub}.{param}"
                if key not in state:
                    raise CheckpointError(f"{source}: missing key up_projection.decode.{key}")
                out[f"decoder.stages.{s}.{new}.{param}"] = state.pop(key)
    for param in ("weight", "bias"):
        key = f"{last}.{param}"
        if key not in state:
            raise CheckpointError(f"{source}: missing key up_projection.decode.{key}")
        out[f"decoder.classifier.{param}"] = state.pop(key)
    if state:
        raise CheckpointError(f"{source}: unexpected decoder keys {sorted(state)[:12]}")
    return out, out["decoder.classifier.weight"].shape[0]


def _labels_from_nnunet(checkpoint: Mapping) -> dict[int, str] | None:
    dataset_json = (checkpoint.get("init_args") or {}).get("dataset_json") or {}
    labels = dataset_json.get("labels")
    if not labels:
        return None
    id2label = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):  # nnU-Net region labels: not a plain class
            raise CheckpointError("region-based nnU-Net labels are not supported; pass --labels")
        id2label[int(value)] = str(name)
    return id2label


def nnunet_working_geometry(
    plans: Mapping | str | os.PathLike, configuration: str = "2d"
) -> tuple[list[float], list[int]]:
    """The in-plane working spacing (row, col) in mm and the patch size (h, w) of an nnU-Net configuration.

    `plans` is nnU-Net v2's `plans.json` (a path or its content): `configurations[configuration]` holds
    `spacing` and `patch_size` in nnU-Net's array order, whose last two axes are the slice's rows and columns."""
    name = str(plans) if not isinstance(plans, Mapping) else "plans"
    if not isinstance(plans, Mapping):
        try:
            plans = json.loads(Path(plans).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{name}: cannot read nnU-Net plans ({err})") from err
    configurations = plans.get("configurations") if isinstance(plans, Mapping) else None
    if not isinstance(configurations, Mapping) or configuration not in configurations:
        found = sorted(configurations) if isinstance(configurations, Mapping) else []
        raise CheckpointError(f"{name}: no nnU-Net configuration {configuration!r} (found {found})")
    entry = configurations[configuration]
    try:
        spacing = [float(v) for v in entry["spacing"]][-2:]
        patch = [int(v) for v in entry["patch_size"]][-2:]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{name}: configuration {configuration!r} has no usable spacing/patch_size"
        ) from err
    if len(spacing) != 2 or len(patch) != 2 or min(spacing) <= 0 or min(patch) <= 0:
        raise CheckpointError(
            f"{name}: configuration {configuration!r} spacing {spacing} / patch {patch} invalid"
        )
    return spacing, patch
