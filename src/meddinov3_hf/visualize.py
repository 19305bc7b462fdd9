"""Pictures: label overlays on CT slices, and the first three PCA components of dense features as RGB."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .image_processing_meddinov3 import resolve_window
from .volumes.io import atomic_path

# Distinct colours for labels 1..N (label 0 = background stays transparent).
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
]


def window_to_uint8(hu: np.ndarray, window: str | Sequence[float] = "abdomen") -> np.ndarray:
    """HU (H, W) → display grey levels 0..255 for a window preset or (level, width). Display only."""
    low, high = resolve_window(window)
    return (np.clip((hu.astype(np.float32) - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def overlay_image(
    hu_slice: np.ndarray,
    labels: np.ndarray,
    label_names: Mapping[int, str] | None = None,
    window: str | Sequence[float] = "abdomen",
    alpha: float = 0.45,
    spacing_yx: Sequence[float] | None = None,
) -> Image.Image:
    """An RGB picture of a CT slice with its labels blended on top and a legend of the labels present.
    `spacing_yx` stretches the picture so anisotropic pixels look right."""
    if hu_slice.shape != labels.shape:
        raise ValueError(f"slice shape {hu_slice.shape} and label shape {labels.shape} differ")
    grey = window_to_uint8(hu_slice, window)
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    present = [int(v) for v in np.unique(labels) if v != 0]
    for value in present:
        colour = np.array(PALETTE[(value - 1) % len(PALETTE)], dtype=np.float32)
        mask = labels == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    image = Image.fromarray(rgb.astype(np.uint8))
    if spacing_yx is not None and spacing_yx[0] != spacing_yx[1]:
        height = round(image.height * spacing_yx[0] / spacing_yx[1])
        image = image.resize((image.width, max(1, height)), Image.NEAREST)
    if image.width < 384:  # small slices: enlarge so that the legend stays readable
        scale = 384 / image.width
        image = image.resize((384, max(1, round(image.height * scale))), Image.NEAREST)
    names = label_names or {}
    legend = [(PALETTE[(v - 1) % len(PALETTE)], names.get(v, str(v))) for v in present]
    font = ImageFont.load_default()
    row = 14
    canvas = Image.new("RGB", (image.width, image.height + row * max(1, len(legend)) + 6), (0, 0, 0))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (colour, name) in enumerate(legend or [((80, 80, 80), "no labels")]):
        y = image.height + 3 + i * row
        draw.rectangle([4, y + 2, 14, y + 12], fill=tuple(colour))
        draw.text((20, y), str(name), fill=(255, 255, 255), font=font)
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def pca_rgb(features: torch.Tensor) -> np.ndarray:
    """Dense features (D, h, w) → (h, w, 3) uint8: the first three principal components, each scaled to
    its 1st–99th percentile range."""
    dim, height, width = features.shape
    flat = features.reshape(dim, -1).T.float()
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    components = flat @ v[:3].T  # (h·w, 3)
    low = torch.quantile(components, 0.01, dim=0)
    high = torch.quantile(components, 0.99, dim=0)
    scaled = ((components - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    return (scaled.reshape(height, width, 3).numpy() * 255).astype(np.uint8)


@torch.inference_mode()
def feature_pca_image(
    model: torch.nn.Module,
    processor,
    hu_slice: np.ndarray,
    size: int | None = 896,
    layer: int | None = None,
    window: str | Sequence[float] = "abdomen",
) -> Image.Image:
    """The paper's dense-feature view: PCA of the patch features of one slice at high input resolution,
    upsampled and shown beside the windowed slice. `model` is a MedDINOv3Model (or has `.meddinov3`)."""
    backbone = getattr(model, "meddinov3", model)
    layer = backbone.config.num_hidden_layers - 1 if layer is None else layer
    hu = torch.from_numpy(np.ascontiguousarray(hu_slice, dtype=np.float32))
    target = (size, size) if size else tuple(max(16, round(n / 16) * 16) for n in hu.shape)
    device = next(backbone.parameters()).device
    pixels = processor.normalize(processor.resize_hu(hu, target))[None, None].to(device)
    (features,) = backbone.get_intermediate_layers(pixels, [layer])
    rgb = Image.fromarray(pca_rgb(features[0].cpu()))
    ct = (
        Image.fromarray(window_to_uint8(hu_slice, window)).convert("RGB").resize(target[::-1], Image.BILINEAR)
    )
    rgb = rgb.resize(ct.size, Image.NEAREST)
    canvas = Image.new("RGB", (ct.width * 2, ct.height))
    canvas.paste(ct, (0, 0))
    canvas.paste(rgb, (ct.width, 0))
    return canvas
