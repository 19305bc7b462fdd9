"""Convert checkpoints to MedDINOv3 folders that `from_pretrained` loads.

Formats (detected automatically):

- `meddinov3`: the MedDINOv3 release, a torch file whose `teacher` holds the EMA teacher (`backbone.*` keys;
  `dino_head.*` / `ibot_head.*` are pretraining heads and are dropped).
- `dinov3`: Meta's plain DINOv3 `.pth` (reference names without prefix; q/k/v bias with a `bias_mask`).
- `transformers`: a folder with a transformers `DINOv3ViTModel` (config.json `model_type: dinov3_vit`).
- `nnunet`: a checkpoint of the reference nnU-Net fine-tuning (`network_weights` with `dino_encoder.*` and
  `up_projection.decode.*`, maybe under `_orig_mod.`; labels from `init_args.dataset_json`).

Every source key is accounted for: unknown or missing keys raise `CheckpointError`, and the written folder is
reloaded and compared tensor by tensor, because `from_pretrained` would only warn and leave weights random.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_meddinov3 import MedDINOv3Config
from .image_processing_meddinov3 import MedDINOv3ImageProcessor
from .model_card import write_model_card
from .modeling_meddinov3 import MedDINOv3ForSemanticSegmentation, MedDINOv3Model

FORMATS = ("meddinov3", "dinov3", "transformers", "nnunet")
# The reference code builds RoPE in bfloat16, so checkpoints trained with it default to the "bf16" mode.
DEFAULT_ROPE_PRECISION = {"meddinov3": "bf16", "dinov3": "bf16", "nnunet": "bf16", "transformers": "fp32"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted faithfully (unknown format, missing or unexpected keys)."""


@dataclass
class ConversionResult:
    output_dir: Path
    source_format: str
    config: MedDINOv3Config
    dropped_keys: list[str] = field(default_factory=list)


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


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    source_format: str | None = None,
    aggregation_layers: Sequence[int] = (2, 5, 8, 11),
    rope_precision: str | None = None,
    layer_norm_eps: float | None = None,
    id2label: Mapping[int, str] | None = None,
    model_name: str | None = None,
) -> ConversionResult:
    """Convert `source` (file or folder) into `output_dir`: model.safetensors, config.json,
    preprocessor_config.json and README.md. The folder is written under a temporary name and renamed."""
    source = Path(source)
    output_dir = Path(output_dir)
    fmt = source_format or detect_format(source)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose from {FORMATS}")
    rope_precision = rope_precision or DEFAULT_ROPE_PRECISION[fmt]
    dropped: list[str] = []
    decoder_state: dict[str, torch.Tensor] = {}
    config_extra: dict[str, object] = {}

    if fmt == "transformers":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        src_config = DINOv3ViTConfig.from_pretrained(source)
        reference, info = DINOv3ViTModel.from_pretrained(source, output_loading_info=True)
        if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
            raise CheckpointError(f"{source}: loading the DINOv3 checkpoint was incomplete: {info}")
        backbone_state = reference.state_dict()
        keep = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
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
        architecture = {k: getattr(src_config, k) for k in keep}
        periods = None
    else:
        checkpoint = _load_torch_file(source)
        detected = _detect_loaded_format(checkpoint, source)
        if detected != fmt:
            raise CheckpointError(f"{source}: looks like a {detected!r} checkpoint, not {fmt!r}")
        if fmt == "meddinov3":
            teacher = checkpoint["teacher"]
            dropped = sorted(k for k in teacher if k.startswith(("dino_head.", "ibot_head.")))
            unknown = sorted(
                k for k in teacher if not k.startswith(("backbone.", "dino_head.", "ibot_head."))
            )
            if unknown:
                raise CheckpointError(f"{source}: unexpected keys in 'teacher': {unknown[:12]}")
            raw = _strip_prefix(teacher, "backbone.")
        elif fmt == "dinov3":
            raw = dict(checkpoint)
        else:  # nnunet
            weights = {k.replace("_orig_mod.", "", 1): v for k, v in checkpoint["network_weights"].items()}
            unknown = sorted(
                k for k in weights if not k.startswith(("dino_encoder.", "up_projection.decode."))
            )
            if unknown:
                raise CheckpointError(f"{source}: unexpected keys in network_weights: {unknown[:12]}")
            raw = _strip_prefix(weights, "dino_encoder.")
            decoder_state, num_labels = _decoder_from_reference(
                _strip_prefix(weights, "up_projection.decode."), source
            )
            config_extra["decoder_hidden_sizes"] = [
                decoder_state[f"decoder.stages.{s}.upsample.weight"].shape[1]
                for s in range(len([k for k in decoder_state if k.endswith("upsample.weight")]))
            ]
            labels = (
                id2label or _labels_from_nnunet(checkpoint) or {i: f"class_{i}" for i in range(num_labels)}
            )
            if len(labels) != num_labels or sorted(labels) != list(range(num_labels)):
                raise CheckpointError(
                    f"{source}: the decoder predicts {num_labels} classes but the labels are {dict(labels)}"
                )
            id2label = labels
        backbone_state, architecture = reference_to_hf(raw, str(source))
        periods = architecture.pop("_periods")
        architecture["layer_norm_eps"] = 1e-6 if fmt in ("meddinov3", "nnunet") else 1e-5

    if layer_norm_eps is not None:
        architecture["layer_norm_eps"] = layer_norm_eps
    config = MedDINOv3Config(
        **architecture,
        **config_extra,
        aggregation_layers=list(aggregation_layers),
        rope_precision=rope_precision,
        **({"id2label": {int(k): v for k, v in id2label.items()}} if id2label else {}),
    )
    _check_periods(periods, config, str(source))
    if decoder_state:
        expected_in = config.hidden_size * len(config.aggregation_layers)
        got_in = decoder_state["decoder.stages.0.upsample.weight"].shape[0]
        if got_in != expected_in:
            raise CheckpointError(
                f"{source}: the decoder takes {got_in} channels but {len(config.aggregation_layers)} aggregated "
                f"blocks of width {config.hidden_size} give {expected_in}; check --blocks"
            )
        model = MedDINOv3ForSemanticSegmentation(config)
        state = {f"meddinov3.{k}": v for k, v in backbone_state.items()} | decoder_state
    else:
        model = MedDINOv3Model(config)
        state = backbone_state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: conversion left missing keys {missing} and unexpected keys {unexpected}"
        )

    _write_folder(model, state, output_dir, fmt, source, model_name)
    return ConversionResult(output_dir=output_dir, source_format=fmt, config=config, dropped_keys=dropped)


def _write_folder(model, state, output_dir: Path, fmt: str, source: Path, model_name: str | None) -> None:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor = MedDINOv3ImageProcessor()
        processor.save_pretrained(tmp)
        write_model_card(
            tmp,
            model_name=model_name or output_dir.name,
            config=model.config,
            processor=processor,
            source_note=f"Converted from a `{fmt}` checkpoint ({source.name}) with `meddinov3 convert`.",
        )
        verify_folder(tmp, state, type(model))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def verify_folder(folder: Path, expected: Mapping[str, torch.Tensor], model_class) -> None:
    """Reload `folder` and require every tensor to equal `expected` (from_pretrained only warns)."""
    reloaded, info = model_class.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise CheckpointError(f"{folder}: the written model does not reload cleanly: {problems}")
    reloaded_state = reloaded.state_dict()
    for key, value in expected.items():
        if not torch.equal(reloaded_state[key], value.to(reloaded_state[key].dtype)):
            raise CheckpointError(f"{folder}: tensor {key} changed on save/reload")
