"""Convert checkpoints to MedDINOv3 folders that `from_pretrained` loads.

Formats (detected automatically):

- `meddinov3`: the MedDINOv3 release, a torch file whose `teacher` holds the EMA teacher (`backbone.*` keys;
  `dino_head.*` / `ibot_head.*` are the pretraining heads, kept with their keys in `pretraining_heads.safetensors`).
- `dinov3`: Meta's plain DINOv3 `.pth` (reference names without prefix; q/k/v bias with a `bias_mask`).
- `transformers`: a folder with a transformers `DINOv3ViTModel` (config.json `model_type: dinov3_vit`).
- `nnunet`: a checkpoint of the reference nnU-Net fine-tuning (`network_weights` with `dino_encoder.*` and
  `up_projection.decode.*`, maybe under `_orig_mod.`; labels from `init_args.dataset_json`).

Every source key is accounted for: unknown or missing keys raise `CheckpointError`, and the written folder is
reloaded and compared tensor by tensor, because `from_pretrained` would only warn and leave weights random.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_formats import (
    FORMATS,
    CheckpointError,
    _check_periods,
    _decoder_from_reference,
    _detect_loaded_format,
    _labels_from_nnunet,
    _load_torch_file,
    _strip_prefix,
    detect_format,
    nnunet_working_geometry,
    reference_to_hf,
)
from .configuration_meddinov3 import MedDINOv3Config
from .files import atomic_dir, check_output_path
from .image_processing_meddinov3 import MedDINOv3ImageProcessor, as_target_spacing
from .model_card import write_model_card
from .modeling_meddinov3 import MedDINOv3ForSemanticSegmentation, MedDINOv3Model

# The reference code builds RoPE in bfloat16, so checkpoints trained with it default to the "bf16" mode.
DEFAULT_ROPE_PRECISION = {"meddinov3": "bf16", "dinov3": "bf16", "nnunet": "bf16", "transformers": "fp32"}


@dataclass
class ConversionResult:
    output_dir: Path
    source_format: str
    config: MedDINOv3Config
    dropped_keys: list[str] = field(default_factory=list)
    pretraining_head_keys: list[str] = field(default_factory=list)


@dataclass
class _ReadSource:
    """What a source checkpoint gives the conversion, whatever its format."""

    backbone_state: dict[str, torch.Tensor]
    architecture: dict[str, object]
    periods: torch.Tensor | None = None
    checkpoint: Mapping = field(default_factory=dict)
    decoder_state: dict[str, torch.Tensor] = field(default_factory=dict)
    config_extra: dict[str, object] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    id2label: Mapping[int, str] | None = None
    reference: torch.nn.Module | None = None  # transformers' DINOv3ViTModel, when that is the source


def _read_transformers(source: Path) -> _ReadSource:
    """A transformers DINOv3 folder: its weights and architecture, and the model itself (the parity reference)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    src_config = DINOv3ViTConfig.from_pretrained(source)
    reference, info = DINOv3ViTModel.from_pretrained(source, output_loading_info=True)
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise CheckpointError(f"{source}: loading the DINOv3 checkpoint was incomplete: {info}")
    architecture = MedDINOv3Config.architecture_from_dinov3_vit(src_config)
    return _ReadSource(reference.state_dict(), architecture, reference=reference)


def _read_torch(source: Path, fmt: str, id2label: Mapping[int, str] | None) -> _ReadSource:
    """A reference-format .pth (MedDINOv3 training checkpoint, DINOv3 backbone or nnU-Net fine-tune)."""
    checkpoint = _load_torch_file(source)
    detected = _detect_loaded_format(checkpoint, source)
    if detected != fmt:
        raise CheckpointError(f"{source}: looks like a {detected!r} checkpoint, not {fmt!r}")
    read = _ReadSource({}, {}, checkpoint=checkpoint)
    if fmt == "meddinov3":
        teacher = checkpoint["teacher"]
        read.heads = {
            k: v.detach().clone().contiguous()
            for k, v in teacher.items()
            if k.startswith(PRETRAINING_HEAD_PREFIXES)
        }
        unknown = sorted(k for k in teacher if not k.startswith(("backbone.", "dino_head.", "ibot_head.")))
        if unknown:
            raise CheckpointError(f"{source}: unexpected keys in 'teacher': {unknown[:12]}")
        raw = _strip_prefix(teacher, "backbone.")
    elif fmt == "dinov3":
        raw = dict(checkpoint)
    else:  # nnunet
        raw = _read_nnunet_weights(read, source, id2label)
    read.backbone_state, read.architecture = reference_to_hf(raw, str(source))
    read.periods = read.architecture.pop("_periods")
    read.architecture["layer_norm_eps"] = 1e-6 if fmt in ("meddinov3", "nnunet") else 1e-5
    return read


def _read_nnunet_weights(
    read: _ReadSource, source: Path, id2label: Mapping[int, str] | None
) -> dict[str, torch.Tensor]:
    """An nnU-Net fine-tune: its decoder, decoder widths and labels go into `read`; returns the encoder weights
    (reference names)."""
    weights = {k.replace("_orig_mod.", "", 1): v for k, v in read.checkpoint["network_weights"].items()}
    unknown = sorted(k for k in weights if not k.startswith(("dino_encoder.", "up_projection.decode.")))
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys in network_weights: {unknown[:12]}")
    decoder_state, num_labels = _decoder_from_reference(
        _strip_prefix(weights, "up_projection.decode."), source
    )
    widths = [
        decoder_state[f"decoder.stages.{s}.upsample.weight"].shape[1]
        for s in range(len([k for k in decoder_state if k.endswith("upsample.weight")]))
    ]
    labels = id2label or _labels_from_nnunet(read.checkpoint) or {i: f"class_{i}" for i in range(num_labels)}
    if len(labels) != num_labels or sorted(labels) != list(range(num_labels)):
        raise CheckpointError(
            f"{source}: the decoder predicts {num_labels} classes but the labels are {dict(labels)}"
        )
    read.decoder_state, read.config_extra["decoder_hidden_sizes"], read.id2label = (
        decoder_state,
        widths,
        labels,
    )
    return _strip_prefix(weights, "dino_encoder.")


def _load_converted(
    config: MedDINOv3Config, read: _ReadSource, source: Path
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The converted model (segmentation when the source has a decoder) with every tensor loaded, and its state;
    a wrong shape, a missing or an unexpected key raises `CheckpointError` naming them."""
    if read.decoder_state:
        expected_in = config.hidden_size * len(config.aggregation_layers)
        got_in = read.decoder_state["decoder.stages.0.upsample.weight"].shape[0]
        if got_in != expected_in:
            raise CheckpointError(
                f"{source}: the decoder takes {got_in} channels but {len(config.aggregation_layers)} aggregated "
                f"blocks of width {config.hidden_size} give {expected_in}; check --blocks"
            )
        model = MedDINOv3ForSemanticSegmentation(config)
        state = {f"meddinov3.{k}": v for k, v in read.backbone_state.items()} | read.decoder_state
    else:
        model = MedDINOv3Model(config)
        state = read.backbone_state
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k} {tuple(v.shape)} (expected {expected_shapes[k]})"
        for k, v in state.items()
        if k in expected_shapes and tuple(v.shape) != expected_shapes[k]
    ]
    if wrong:
        raise CheckpointError(
            f"{source}: tensors of the wrong shape for the implied architecture: {wrong[:6]}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: conversion left missing keys {missing} and unexpected keys {unexpected}"
        )
    return model, state


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    source_format: str | None = None,
    aggregation_layers: Sequence[int] | None = None,
    rope_precision: str | None = None,
    layer_norm_eps: float | None = None,
    id2label: Mapping[int, str] | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    plans: Mapping | str | os.PathLike | None = None,
    target_spacing: Sequence[float] | None = None,
    native_resolution: bool = False,
    source_note: str | None = None,
) -> ConversionResult:
    """Convert `source` (file or folder) into `output_dir`: model.safetensors, config.json,
    preprocessor_config.json and README.md. The folder is written under a temporary name and renamed.

    An existing non-empty `output_dir` is refused unless `overwrite` (then only the files above are replaced),
    and always when it is, or contains, the source or the current directory.

    A segmentation model (`nnunet`) needs the in-plane spacing it was trained at: `target_spacing` (row, col mm),
    else nnU-Net's `plans` (path or dict; its `2d` configuration, or the one named in the checkpoint), else the
    plans stored in the checkpoint's `init_args`. The plans' patch size becomes the inference tile. Without any
    of these the conversion is refused unless `native_resolution` (segment at each scan's own resolution).

    `aggregation_layers` defaults to four blocks evenly spaced over the depth (2, 5, 8, 11 for 12 blocks). The
    release's DINO/iBOT heads are written to `pretraining_heads.safetensors` with their original keys. The model
    card names the source (`source_note`, e.g. a Hub repo and commit) and the measured conversion check."""
    source = Path(source)
    output_dir = check_output_path(output_dir, [source], kind="folder", overwrite=overwrite, option="OUT")
    fmt = source_format or detect_format(source)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose from {FORMATS}")
    read = _read_transformers(source) if fmt == "transformers" else _read_torch(source, fmt, id2label)
    architecture = read.architecture
    if layer_norm_eps is not None:
        architecture["layer_norm_eps"] = layer_norm_eps
    id2label = read.id2label or id2label
    config = MedDINOv3Config(
        **architecture,
        **read.config_extra,
        aggregation_layers=list(aggregation_layers) if aggregation_layers is not None else None,
        rope_precision=rope_precision or DEFAULT_ROPE_PRECISION[fmt],
        **({"id2label": {int(k): v for k, v in id2label.items()}} if id2label else {}),
    )
    _check_periods(read.periods, config, str(source))
    model, state = _load_converted(config, read, source)
    backbone_state, heads, reference = read.backbone_state, read.heads, read.reference

    processor = MedDINOv3ImageProcessor()
    if read.decoder_state:
        _set_working_geometry(
            model.config, processor, source, read.checkpoint, plans, target_spacing, native_resolution
        )
    max_diff = dinov3_parity(model, backbone_state, reference)
    if max_diff > PARITY_TOLERANCE:
        raise CheckpointError(
            f"{source}: conversion check failed: the converted backbone differs from transformers' DINOv3ViTModel "
            f"by {max_diff:.2e} (> {PARITY_TOLERANCE:g})"
        )
    note = (
        source_note or f"Converted from a `{fmt}` checkpoint ({source.name}) with `meddinov3 convert`."
    ) + ("\n\n" + conversion_check_note(len(state), heads, max_diff, reference is not None, config))
    _write_folder(model, state, output_dir, fmt, source, model_name, processor, note, heads)
    return ConversionResult(
        output_dir=output_dir,
        source_format=fmt,
        config=config,
        dropped_keys=[],
        pretraining_head_keys=sorted(heads),
    )


PRETRAINING_HEADS_FILE = "pretraining_heads.safetensors"
PRETRAINING_HEAD_PREFIXES = ("dino_head.", "ibot_head.")
PARITY_TOLERANCE = 1e-4


def dinov3_parity(model, backbone_state: Mapping[str, torch.Tensor], reference=None) -> float:
    """Max |Δ| of `last_hidden_state` between the converted backbone (RoPE in fp32) and transformers'
    `DINOv3ViTModel`: `reference` (the source model) when given, else one built from the same weights.
    Input: a fixed random 2×3×(4p)×(4p) batch."""
    from transformers import DINOv3ViTModel

    backbone = getattr(model, "meddinov3", model)
    config = backbone.config
    if reference is None:
        reference = DINOv3ViTModel(config.to_dinov3_vit_config())
        reference.load_state_dict(backbone_state, strict=True)
    side = 4 * (config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0])
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    rope = backbone.rope_embeddings
    precision, rope.precision = rope.precision, "fp32"
    try:
        with torch.no_grad():
            ours = backbone.eval()(pixels).last_hidden_state
            theirs = reference.eval()(pixels).last_hidden_state
    finally:
        rope.precision = precision
    return float((ours - theirs).abs().max())


def conversion_check_note(
    num_tensors: int, heads: Mapping[str, torch.Tensor], max_diff: float, against_source: bool, config
) -> str:
    """The model card's account of the checks `convert_checkpoint` ran on this folder."""
    against = "the source checkpoint loaded as" if against_source else "the same weights loaded into"
    text = (
        f"Conversion check (run by `meddinov3 convert` when this folder was written): every source tensor was "
        f"placed ({num_tensors} tensors, 0 missing, 0 unexpected), the written folder reloads tensor-identical, "
        f"and the backbone with fp32 RoPE matches {against} transformers' `DINOv3ViTModel` to max |Δ| = "
        f"{max_diff:.1e} on a random 2×3×{4 * config.patch_size}×{4 * config.patch_size} batch."
    )
    if config.rope_precision == "bf16":
        text += (
            " The folder runs RoPE in `bf16`, the reference code's numerics (about 1e-3 relative from fp32); "
            'set `rope_precision="fp32"` for transformers\' DINOv3 numerics.'
        )
    if heads:
        text += (
            f" The pretraining heads ({len(heads)} tensors, `dino_head.*` and `ibot_head.*`) are kept unchanged in "
            f"`{PRETRAINING_HEADS_FILE}` for continued pretraining; the model classes do not load them."
        )
    return text


def _set_working_geometry(
    config: MedDINOv3Config,
    processor: MedDINOv3ImageProcessor,
    source: Path,
    checkpoint: Mapping,
    plans: Mapping | str | os.PathLike | None,
    target_spacing: Sequence[float] | None,
    native_resolution: bool,
) -> None:
    """Give a converted nnU-Net fine-tune the spacing and tile it was trained at (see `convert_checkpoint`)."""
    init_args = checkpoint.get("init_args") or {}
    configuration = str(init_args.get("configuration") or "2d")
    if plans is None and isinstance(init_args.get("plans"), Mapping):
        plans = init_args["plans"]
    if plans is not None:
        spacing, patch = nnunet_working_geometry(plans, configuration)
        config.image_size = patch
        processor.target_spacing = as_target_spacing(spacing)
    if target_spacing is not None:
        try:
            processor.target_spacing = as_target_spacing(target_spacing)
        except ValueError as err:
            raise CheckpointError(
                f"--target-spacing: expected one or two positive mm values, got {target_spacing}"
            ) from err
    if processor.target_spacing is None and not native_resolution:
        raise CheckpointError(
            f"{source}: no working spacing for this segmentation model (no nnU-Net plans in the checkpoint); pass "
            "--plans plans.json (nnU-Net's, next to dataset.json), --target-spacing MM, or --native-resolution"
        )


def _write_folder(
    model,
    state,
    output_dir: Path,
    fmt: str,
    source: Path,
    model_name: str | None,
    processor=None,
    source_note: str | None = None,
    heads: Mapping[str, torch.Tensor] | None = None,
) -> None:
    # Written and verified in a temporary folder next to `output_dir`, which then becomes `output_dir` (new) or
    # has its files replace those of the same names (--overwrite); nothing else in `output_dir` is touched.
    processor = processor or MedDINOv3ImageProcessor()
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_model_card(
            tmp,
            model_name=model_name or output_dir.name,
            config=model.config,
            processor=processor,
            source_note=source_note
            or f"Converted from a `{fmt}` checkpoint ({source.name}) with `meddinov3 convert`.",
        )
        verify_folder(tmp, state, type(model))
        if heads:
            from safetensors.torch import load_file, save_file

            save_file(dict(heads), str(tmp / PRETRAINING_HEADS_FILE), metadata={"format": "pt"})
            reloaded = load_file(str(tmp / PRETRAINING_HEADS_FILE))
            if set(reloaded) != set(heads) or not all(torch.equal(reloaded[k], heads[k]) for k in heads):
                raise CheckpointError(f"{tmp}: {PRETRAINING_HEADS_FILE} changed on save/reload")


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
