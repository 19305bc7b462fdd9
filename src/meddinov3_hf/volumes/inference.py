"""Whole-volume CT segmentation: slice-wise, batched, sliding-window, with optional mirroring TTA.

Per chunk of axial slices: resample in-plane to the model's working spacing, normalise, pad to at least the
tile, predict tiles (half-tile step, Gaussian weighting, batched across slices), optionally average the
mirrored predictions, crop, resample the logits back to the native grid and take the argmax. Only one chunk
of logits is alive at a time, so memory does not grow with the number of slices or classes; probabilities
are kept only on request (float16, memory-mapped on disk for large volumes).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..image_processing_meddinov3 import MedDINOv3ImageProcessor
from .io import CTVolume

# Above this many probability values, keep them in a disk-backed array instead of RAM.
_MEMMAP_THRESHOLD = 256 * 1024 * 1024


@dataclass
class SegmentationResult:
    """labels (Z, Y, X) uint8/int16 in canonical order; probabilities (K, Z, Y, X) float16 or None."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None


def gaussian_weights(tile: tuple[int, int], sigma_scale: float = 1 / 8, device=None) -> torch.Tensor:
    """(h, w) importance map for blending tiles: a Gaussian centred on the tile with sigma = size/8,
    normalised to max 1 and floored so that tile borders never get zero weight."""
    axes = []
    for size in tile:
        coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
        axes.append(torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2))
    weights = axes[0][:, None] * axes[1][None, :]
    weights = weights / weights.max()
    return weights.clamp_min(1e-3)


def tile_starts(length: int, tile: int, step: float = 0.5) -> list[int]:
    """Start offsets covering [0, length) with tiles of size `tile` overlapping by (1 - step)."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile * step)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


class VolumeSegmenter:
    """Segments `CTVolume`s with a `MedDINOv3ForSemanticSegmentation` (or any model returning `.logits`).

    Args:
        model: the segmentation model (moved to `device`, put in eval mode).
        processor: its `MedDINOv3ImageProcessor` (normalisation and `target_spacing`).
        batch_size: tiles per forward pass.
        tta: average over the 4 in-plane mirrorings.
        tile_size: sliding-window tile (h, w); defaults to the processor's `size`, else the model config's
            `image_size`.
        step: tile step as a fraction of the tile (0.5 = half-tile overlap).
        device: defaults to the model's device.
        autocast_dtype: defaults to bfloat16 on CUDA and none (float32) on CPU.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: MedDINOv3ImageProcessor | None = None,
        batch_size: int = 8,
        tta: bool = False,
        tile_size: int | tuple[int, int] | None = None,
        step: float = 0.5,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.processor = processor or MedDINOv3ImageProcessor()
        self.batch_size = max(1, int(batch_size))
        self.tta = tta
        if tile_size is None:
            if self.processor.size is not None:
                tile_size = (self.processor.size["height"], self.processor.size["width"])
            else:
                tile_size = getattr(model.config, "image_size", 896)
        self.tile = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(int(t) for t in tile_size)
        patch = (
            model.config.patch_size
            if isinstance(model.config.patch_size, int)
            else model.config.patch_size[0]
        )
        if self.tile[0] % patch or self.tile[1] % patch:
            raise ValueError(f"tile size {self.tile} must be a multiple of the patch size {patch}")
        self.step = step
        self.num_labels = model.config.num_labels
        if autocast_dtype is None and self.device.type == "cuda":
            autocast_dtype = torch.bfloat16
        self.autocast_dtype = autocast_dtype
        self._weights = gaussian_weights(self.tile, device=self.device)

    # -- geometry ---------------------------------------------------------------------------------------------
    def working_shape(self, shape_yx: tuple[int, int], spacing_yx: tuple[float, float]) -> tuple[int, int]:
        """In-plane size after resampling to the processor's `target_spacing` (unchanged without one)."""
        target = self.processor.target_spacing
        if target is None:
            return tuple(shape_yx)
        return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape_yx, spacing_yx, target))

    # -- prediction -------------------------------------------------------------------------------------------
    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """(n, 1, h, w) → (n, K, h, w) float32 logits, averaged over mirrorings when `tta`."""
        flips = [(), (2,), (3,), (2, 3)] if self.tta else [()]
        total = None
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            for dims in flips:
                x = tiles.flip(dims) if dims else tiles
                logits = self.model(pixel_values=x).logits.float()
                logits = logits.flip(dims) if dims else logits
                total = logits if total is None else total + logits
        return total / len(flips)

    def _tiles(self, height: int, width: int) -> list[tuple[int, int]]:
        return [
            (y, x)
            for y in tile_starts(height, self.tile[0], self.step)
            for x in tile_starts(width, self.tile[1], self.step)
        ]

    def predict_slices(self, hu: torch.Tensor, spacing_yx: tuple[float, float]) -> torch.Tensor:
        """HU slices (b, Y, X) → logits (b, K, Y, X) float32 on the native grid."""
        b, height, width = hu.shape
        work_h, work_w = self.working_shape((height, width), spacing_yx)
        x = self.processor.resize_hu(hu.to(self.device, torch.float32), (work_h, work_w))
        x = self.processor.normalize(x)
        pad_h, pad_w = max(0, self.tile[0] - work_h), max(0, self.tile[1] - work_w)
        # Pad symmetrically with air so the scan sits in the middle of the tile, as nnU-Net does.
        pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        air = float(self.processor.normalize(torch.tensor(-1000.0)))
        x = F.pad(x[:, None], pad, value=air)
        full_h, full_w = x.shape[-2:]
        logits = torch.zeros(b, self.num_labels, full_h, full_w, device=self.device)
        weight_sum = torch.zeros(1, 1, full_h, full_w, device=self.device)
        positions = self._tiles(full_h, full_w)
        th, tw = self.tile
        for y, xx in positions:
            weight_sum[..., y : y + th, xx : xx + tw] += self._weights
        jobs = [(i, y, xx) for i in range(b) for y, xx in positions]
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            tiles = torch.stack([x[i, :, y : y + th, xx : xx + tw] for i, y, xx in batch])
            out = self._forward(tiles) * self._weights
            for (i, y, xx), tile_logits in zip(batch, out):
                logits[i, :, y : y + th, xx : xx + tw] += tile_logits
        logits = logits / weight_sum
        logits = logits[..., pad[2] : pad[2] + work_h, pad[0] : pad[0] + work_w]
        if (work_h, work_w) != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits

    def _chunks(self, depth: int, height: int, width: int) -> Iterator[slice]:
        # Enough slices per chunk to fill a forward batch, but never more than ~64 M logits at once.
        tiles_per_slice = len(self._tiles(max(height, self.tile[0]), max(width, self.tile[1])))
        per_chunk = max(1, math.ceil(self.batch_size / tiles_per_slice))
        per_chunk = max(1, min(per_chunk, (64 * 1024 * 1024) // max(1, self.num_labels * height * width)))
        for start in range(0, depth, per_chunk):
            yield slice(start, min(depth, start + per_chunk))

    @torch.inference_mode()
    def segment(
        self, volume: CTVolume, return_probabilities: bool = False, progress: bool = False
    ) -> SegmentationResult:
        """Segment a whole canonical volume; results stay in canonical (Z, Y, X) order."""
        depth, height, width = volume.hu.shape
        spacing_yx = (float(volume.spacing[1]), float(volume.spacing[2]))
        label_dtype = np.uint8 if self.num_labels <= 256 else np.int16
        labels = np.zeros((depth, height, width), dtype=label_dtype)
        probabilities = None
        if return_probabilities:
            shape = (self.num_labels, depth, height, width)
            if math.prod(shape) > _MEMMAP_THRESHOLD:
                handle = tempfile.NamedTemporaryFile(prefix="meddinov3_probs_", suffix=".npy", delete=False)
                handle.close()
                probabilities = np.lib.format.open_memmap(
                    handle.name, mode="w+", dtype=np.float16, shape=shape
                )
                Path(handle.name).unlink()  # the mapping stays valid; the file disappears with it (POSIX)
            else:
                probabilities = np.zeros(shape, dtype=np.float16)
        chunks = list(self._chunks(depth, height, width))
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=Path(volume.source).name or "volume", unit="chunk")
        for chunk in chunks:
            hu = torch.from_numpy(np.ascontiguousarray(volume.hu[chunk]))
            logits = self.predict_slices(hu, spacing_yx)
            labels[chunk] = (
                logits.argmax(dim=1).to(torch.int16 if label_dtype == np.int16 else torch.uint8).cpu()
            )
            if probabilities is not None:
                probabilities[:, chunk] = logits.softmax(dim=1).transpose(0, 1).half().cpu().numpy()
        return SegmentationResult(labels=labels, probabilities=probabilities)


def load_segmentation_model(
    model_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, MedDINOv3ImageProcessor]:
    """Load a segmentation folder (model + processor); a clear error if it has no segmentation head."""
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    from ..modeling_meddinov3 import MedDINOv3ForSemanticSegmentation

    config = AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    if "MedDINOv3ForSemanticSegmentation" not in architectures:
        raise ValueError(
            f"{model_dir}: this model has no segmentation head (architectures {architectures}); "
            "fine-tune it first (training/finetune.py) or pass a segmentation model folder"
        )
    model, info = AutoModelForSemanticSegmentation.from_pretrained(model_dir, output_loading_info=True)
    if info.get("missing_keys"):
        raise ValueError(f"{model_dir}: weights missing for {sorted(info['missing_keys'])[:8]}")
    assert isinstance(model, MedDINOv3ForSemanticSegmentation)
    try:
        processor = MedDINOv3ImageProcessor.from_pretrained(model_dir)
    except OSError:
        processor = MedDINOv3ImageProcessor()
    return model.to(device).eval(), processor


@dataclass
class SegmentJob:
    source: str
    output: str
    probabilities: str | None = None


def plan_jobs(source: str | Path, output: str | Path, save_probabilities: bool = False) -> list[SegmentJob]:
    """One job per case: a NIfTI file or DICOM folder → `output` file; a folder of NIfTI files → `output`
    folder with one `CASE.nii.gz` per input (nnU-Net `_0000` channel suffixes dropped)."""
    from .io import case_name, list_volumes

    source, output = Path(source), Path(output)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    nifti = list_volumes(source) if source.is_dir() else []
    if source.is_dir() and nifti:
        output.mkdir(parents=True, exist_ok=True)
        jobs = [SegmentJob(str(p), str(output / f"{case_name(p)}.nii.gz")) for p in nifti]
    else:  # a single NIfTI file, or a DICOM series folder
        if output.suffix not in (".nii", ".gz"):
            raise ValueError(f"{output}: the output for one volume must be a .nii or .nii.gz file")
        jobs = [SegmentJob(str(source), str(output))]
    if save_probabilities:
        for job in jobs:
            stem = job.output[: -len(".nii.gz")] if job.output.endswith(".nii.gz") else job.output[:-4]
            job.probabilities = f"{stem}_probabilities.nii.gz"
    return jobs


def run_jobs(
    jobs: list[SegmentJob],
    model_dir: str | Path,
    device: str = "cpu",
    batch_size: int = 8,
    tta: bool = False,
    progress: bool = True,
) -> list[str]:
    """Segment `jobs` on one device; returns the error messages of cases that failed (others still run)."""
    from .io import load_volume, save_labels, save_volume

    model, processor = load_segmentation_model(model_dir, device)
    segmenter = VolumeSegmenter(model, processor, batch_size=batch_size, tta=tta, device=device)
    errors = []
    for job in jobs:
        try:
            volume = load_volume(job.source)
            result = segmenter.segment(
                volume, return_probabilities=job.probabilities is not None, progress=progress
            )
            save_labels(result.labels, volume, job.output)
            if job.probabilities is not None:
                save_volume(result.probabilities, volume, job.probabilities, channel_axis=0)
        except (ValueError, OSError) as err:
            errors.append(f"{job.source}: {err}" if job.source not in str(err) else str(err))
    return errors


def _worker(args: tuple) -> list[str]:
    jobs, model_dir, device, batch_size, tta = args
    return run_jobs(jobs, model_dir, device, batch_size, tta, progress=False)


def run_jobs_on_devices(
    jobs: list[SegmentJob],
    model_dir: str | Path,
    devices: list[str],
    batch_size: int = 8,
    tta: bool = False,
    progress: bool = True,
) -> list[str]:
    """One case per device at a time: cases are dealt round-robin to one process per device."""
    if len(devices) <= 1 or len(jobs) <= 1:
        return run_jobs(jobs, model_dir, devices[0] if devices else "cpu", batch_size, tta, progress)
    import multiprocessing as mp

    shards = [
        (jobs[i :: len(devices)], str(model_dir), dev, batch_size, tta) for i, dev in enumerate(devices)
    ]
    with mp.get_context("spawn").Pool(len(devices)) as pool:
        return [err for errs in pool.map(_worker, shards) for err in errs]
