"""`meddinov3 export --format onnx`: a segmentation folder → one ONNX graph (`pixel_values` → `logits`).

The graph is traced with `torch.onnx.export(dynamo=True)` (torch.export + onnxscript) at a fixed size or with
dynamic batch, height and width (multiples of the patch size), then checked with onnxruntime against PyTorch on
random inputs before it is moved into place: a graph whose fp32 logits differ by more than `tolerance` is never
written. The processor's normalisation, working spacing and the label names travel in the graph's metadata, so
a deployment needs only the `.onnx` file and HU slices. `onnx`/`onnxruntime` come with the `[onnx]` extra.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .heads import patch_size

ONNX_OPSET = 18


@dataclass
class ExportResult:
    """Where the graph went, its input layout, and the onnxruntime-vs-PyTorch check (max abs logits)."""

    path: Path
    input_shape: tuple[int | str, ...]
    max_abs_diff: float
    checked_shapes: list[tuple[int, ...]] = field(default_factory=list)


class _LogitsOnly(torch.nn.Module):
    """`pixel_values` (B, 1, H, W) → `logits` (B, K, H, W): the plain tensor interface an ONNX graph needs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


class _EmulatedBf16Rope(torch.nn.Module):
    """The reference's bfloat16 RoPE tables (`MedDINOv3RopePositionEmbedding` in `"bf16"` mode, the op order of
    DINOv3's `dinov3/layers/rope_position_encoding.py`), computed in float32 with every intermediate rounded
    to bfloat16. torch's CPU bfloat16 kernels compute in float32 and round each result the same way, so the
    values are identical; onnxruntime has Cast to/from bfloat16 but no bfloat16 arithmetic kernels on CPU."""

    def __init__(self, rope: torch.nn.Module):
        super().__init__()
        self.rope = rope

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch = patch_size(self.rope.config)
        height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        f32 = {"dtype": torch.float32, "device": pixel_values.device}
        coords_h = _round_bf16(_round_bf16(torch.arange(0.5, height, **f32)) / height)
        coords_w = _round_bf16(_round_bf16(torch.arange(0.5, width, **f32)) / width)
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = _round_bf16(_round_bf16(2.0 * coords) - 1.0)
        periods = self.rope.periods.to(device=pixel_values.device, dtype=torch.bfloat16).float()
        angles = _round_bf16(_round_bf16(2 * math.pi * coords[:, :, None]) / periods[None, None, :])
        angles = angles.flatten(1, 2).tile(2)
        return _round_bf16(torch.cos(angles)), _round_bf16(torch.sin(angles))


def _apply_rope_emulated_bf16(query, key, cos, sin):
    """`modeling_meddinov3.apply_rope_in_table_dtype` for bfloat16 tables, emulated in float32 (as above)."""
    from .modeling_meddinov3 import rotate_half

    out_dtype = query.dtype
    num_prefix = query.shape[-2] - cos.shape[-2]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        prefix, patches = _round_bf16(x).split((num_prefix, cos.shape[-2]), dim=-2)
        rotated = _round_bf16(_round_bf16(patches * cos) + _round_bf16(rotate_half(patches) * sin))
        return torch.cat((prefix, rotated), dim=-2)

    return rotate(query).to(out_dtype), rotate(key).to(out_dtype)


@contextlib.contextmanager
def _onnx_runnable_rope(model: torch.nn.Module) -> Iterator[None]:
    """For `rope_precision="bf16"` models, swap in the float32 emulation of the bfloat16 RoPE while tracing."""
    if getattr(model.config, "rope_precision", "fp32") != "bf16":
        yield
        return
    from . import modeling_meddinov3 as modeling

    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, modeling.MedDINOv3RopePositionEmbedding):
                setattr(parent, name, _EmulatedBf16Rope(child))
                swapped.append((parent, name, child))
    original = modeling.apply_rope_in_table_dtype
    modeling.apply_rope_in_table_dtype = _apply_rope_emulated_bf16
    try:
        yield
    finally:
        modeling.apply_rope_in_table_dtype = original
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _default_size(model, processor) -> tuple[int, int]:
    if processor.size is not None:
        return int(processor.size["height"]), int(processor.size["width"])
    size = getattr(model.config, "image_size", 896)
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _metadata(model, processor, model_dir: Path, dynamic: bool) -> dict[str, str]:
    config = model.config
    spacing = processor.target_spacing
    return {
        "meddinov3.source": str(model_dir),
        "meddinov3.id2label": json.dumps({int(k): v for k, v in config.id2label.items()}),
        "meddinov3.patch_size": str(patch_size(config)),
        "meddinov3.dynamic": json.dumps(dynamic),
        "meddinov3.target_spacing": json.dumps(list(spacing) if spacing is not None else None),
        "meddinov3.processor": processor.to_json_string(),
        "meddinov3.rope_precision": str(config.rope_precision),
    }


def check_onnx_against_torch(
    onnx_path: str | os.PathLike, module: torch.nn.Module, shapes: list[tuple[int, ...]], seed: int = 0
) -> float:
    """Max abs difference of fp32 logits between onnxruntime and PyTorch over random inputs of `shapes`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.inference_mode():
            expected = module(x).float().numpy()
        (got,) = session.run(["logits"], {"pixel_values": x.numpy()})
        if got.shape != expected.shape:
            raise ValueError(
                f"{onnx_path}: ONNX logits {got.shape} for input {shape}, PyTorch {expected.shape}"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_onnx(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    dynamic: bool = False,
    opset: int = ONNX_OPSET,
    tolerance: float = 1e-4,
    overwrite: bool = False,
) -> ExportResult:
    """Export a segmentation folder to ONNX and verify it with onnxruntime before writing `output`.

    Args:
        model_dir: a segmentation model folder (model + processor).
        output: the `.onnx` file to write (atomically: a temporary name beside it, renamed after the check).
        height, width: the traced input size (default: the processor's `size`, else the config's `image_size`);
            multiples of the patch size.
        batch_size: the traced batch size (fixed graphs only).
        dynamic: dynamic batch, height and width (any multiple of the patch size) instead of a fixed shape.
        tolerance: largest accepted max abs difference of fp32 logits between onnxruntime and PyTorch.
        overwrite: replace an existing `output`.
    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError("ONNX export needs the [onnx] extra: pip install 'meddinov3-hf[onnx]'") from err

    from .files import atomic_path, check_output_path
    from .volumes.inference import load_segmentation_model

    model_dir = Path(model_dir)
    output = check_output_path(output, [model_dir], overwrite=overwrite, suffixes=(".onnx",), option="OUT")
    model, processor = load_segmentation_model(model_dir, "cpu")
    model = model.float().eval()
    patch = patch_size(model.config)
    height, width = _traced_size(model, processor, height, width, batch_size)
    module = _LogitsOnly(model).eval()
    example = torch.zeros(1 if dynamic else batch_size, 1, height, width)
    if dynamic:  # the traced size, another size and another batch
        shapes = [(1, 1, height, width), (2, 1, height + patch, max(patch, width - patch))]
    else:
        shapes = [tuple(example.shape)]
    with atomic_path(output) as temporary:
        _trace(model, module, example, _dynamic_shapes(patch) if dynamic else None, opset, temporary)
        proto = onnx.load(str(temporary))
        onnx.checker.check_model(proto)
        for key, value in _metadata(model, processor, model_dir, dynamic).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(temporary))
        worst = check_onnx_against_torch(temporary, module, shapes)
        if not worst <= tolerance:
            raise ValueError(
                f"{output}: onnxruntime logits differ from PyTorch by {worst:.3g} (> {tolerance:g}); not written"
            )
    input_shape = ("batch", 1, "height", "width") if dynamic else tuple(example.shape)
    return ExportResult(path=output, input_shape=input_shape, max_abs_diff=worst, checked_shapes=shapes)


def _traced_size(model, processor, height: int | None, width: int | None, batch_size: int) -> tuple[int, int]:
    """The traced (height, width): the requested size, else the processor's or the config's; both multiples
    of the patch size."""
    patch = patch_size(model.config)
    default_h, default_w = _default_size(model, processor)
    height, width = int(height or default_h), int(width or default_w)
    if height % patch or width % patch or height <= 0 or width <= 0:
        raise ValueError(
            f"--height/--width {height}×{width} must be positive multiples of the patch size {patch}"
        )
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    return height, width


def _dynamic_shapes(patch: int) -> dict[str, dict[int, Any]]:
    """Dynamic batch, and height and width in whole patches (up to 4096 pixels)."""
    Dim = torch.export.Dim
    return {
        "pixel_values": {
            0: Dim("batch", min=1, max=1024),
            2: patch * Dim("height_patches", min=1, max=4096 // patch),
            3: patch * Dim("width_patches", min=1, max=4096 // patch),
        }
    }


def _trace(
    model, module: torch.nn.Module, example: torch.Tensor, dynamic_shapes, opset: int, path: Path
) -> None:
    """`torch.onnx.export(dynamo=True)` of `module` at `example` (RoPE made onnxruntime-runnable) → `path`."""
    with torch.inference_mode(False), torch.no_grad(), _onnx_runnable_rope(model):
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=["pixel_values"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )
    program.save(str(path))
