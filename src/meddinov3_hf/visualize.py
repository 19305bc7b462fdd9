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
    orientation: Sequence[str] | None = None,
    caption: str | None = None,
) -> Image.Image:
    """An RGB picture of a CT slice with its labels blended on top and a legend of the labels present.
    `spacing_yx` stretches the picture so anisotropic pixels look right. `orientation` = patient directions
    at the (top, bottom, left, right) edges, e.g. ("A", "P", "R", "L") for a canonical axial slice, drawn
    at the edge midpoints; `caption` (slice, position, window) is written in the top-left corner."""
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
    if orientation is not None or caption:
        _annotate(image, orientation, caption, font)
    row = 14
    canvas = Image.new("RGB", (image.width, image.height + row * max(1, len(legend)) + 6), (0, 0, 0))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (colour, name) in enumerate(legend or [((80, 80, 80), "no labels")]):
        y = image.height + 3 + i * row
        draw.rectangle([4, y + 2, 14, y + 12], fill=tuple(colour))
        draw.text((20, y), str(name), fill=(255, 255, 255), font=font)
    return canvas


def _annotate(image: Image.Image, orientation: Sequence[str] | None, caption: str | None, font) -> None:
    """Orientation letters at the edge midpoints and a caption at the top left, white on black boxes."""
    draw = ImageDraw.Draw(image)

    def put(x: float, y: float, text: str, anchor: str) -> None:
        box = draw.textbbox((x, y), text, font=font, anchor=anchor)
        draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor=anchor)

    w, h = image.size
    if orientation is not None:
        top, bottom, left, right = orientation
        put(w / 2, 3, top, "mt")
        put(w / 2, h - 3, bottom, "mb")
        put(3, h / 2, left, "lm")
        put(w - 3, h / 2, right, "rm")
    if caption:
        put(3, 3 if orientation is None else 16, caption, "lt")


def overlay_slice(
    result: Mapping,
    z: int | None = None,
    window: str | Sequence[float] = "abdomen",
    alpha: float = 0.45,
    label_names: Mapping[int, str] | None = None,
) -> Image.Image:
    """Axial slice `z` of a canonical `ct-segmentation` result (`return_canonical=True`) with its labels and
    legend, in radiological orientation, exactly as `meddinov3 overlay` draws it; a notebook shows the returned
    PIL image inline. `z` defaults to the slice with the most labelled voxels, as in the command."""
    missing = [key for key in ("hu", "labels", "spacing") if key not in result]
    if missing:
        raise ValueError(
            f"result has no {missing}: call the pipeline with return_canonical=True to get canonical arrays"
        )
    hu, labels = np.asarray(result["hu"]), np.asarray(result["labels"])
    if hu.shape != labels.shape or hu.ndim != 3:
        raise ValueError(
            f"canonical hu {hu.shape} and labels {labels.shape} must be the same (Z, Y, X) shape"
        )
    if z is None:
        z = int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))
    if not 0 <= z < labels.shape[0]:
        raise ValueError(f"slice {z} outside [0, {labels.shape[0] - 1}]")
    names = label_names if label_names is not None else result.get("label_names")
    return overlay_image(
        hu[z],
        labels[z],
        names,
        window=window,
        alpha=alpha,
        spacing_yx=result["spacing"][1:],
        orientation=("A", "P", "R", "L"),  # canonical axial slices are radiological
        caption=axial_caption(result["affine"], hu.shape, z, window) if "affine" in result else None,
    )


def axial_caption(
    canonical_affine: np.ndarray, shape: Sequence[int], z: int, window: str | Sequence[float]
) -> str:
    """The overlay's caption: slice index, its world z position (mm, at the slice centre) and the window."""
    depth, rows, cols = shape
    z_mm = float((np.asarray(canonical_affine) @ np.array([(cols - 1) / 2, (rows - 1) / 2, z, 1.0]))[2])
    low, high = resolve_window(window)
    return (
        f"slice {z}/{depth - 1}  z {z_mm:+.1f} mm  window {window} (L {(low + high) / 2:g} W {high - low:g})"
    )


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
