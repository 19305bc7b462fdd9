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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..heads import backbone_config, check_logits, patch_size
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
    """Segments `CTVolume`s with any segmentation model of the package (`heads.is_segmentation_model`: logits
    (B, K, H, W) for pixel_values (B, 1, H, W)), e.g. `MedDINOv3ForSemanticSegmentation` or UperNet on
    `MedDINOv3Backbone`.

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
                tile_size = getattr(backbone_config(model.config), "image_size", 896)
        self.tile = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(int(t) for t in tile_size)
        patch = patch_size(model.config)
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
        return self.processor.resampled_shape(shape_yx, spacing_yx)

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
                logits = self.model(pixel_values=x).logits
                check_logits(logits, x, self.num_labels, self.model)
                logits = logits.float()
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
        if progress:  # tqdm.auto: a widget in Jupyter (nothing without ipywidgets), text in a terminal
            from ..progress import progress_bar

            chunks = progress_bar(chunks, desc=Path(volume.source).name or "volume", unit="chunk")
        for chunk in chunks:
            hu = torch.from_numpy(np.ascontiguousarray(volume.hu[chunk]))
            logits = self.predict_slices(hu, spacing_yx)
            labels[chunk] = (
                logits.argmax(dim=1).to(torch.int16 if label_dtype == np.int16 else torch.uint8).cpu()
            )
            if probabilities is not None:
                probabilities[:, chunk] = logits.softmax(dim=1).transpose(0, 1).half().cpu().numpy()
        return SegmentationResult(labels=labels, probabilities=probabilities)


def from_pretrained_or_explain(loader, model_dir: str | Path, **kwargs):
    """`loader.from_pretrained(model_dir)` with any failure (missing folder, corrupt or garbage
    model.safetensors, unreadable config) turned into one `ValueError` line naming the folder or file."""
    folder, text = Path(model_dir), str(model_dir)
    if not folder.exists():
        # Only `org/name` (whose `org` is not a local folder) may be a Hub repo id; anything else is a path.
        hub_like = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/")
        if not hub_like or Path(text.split("/")[0]).is_dir():
            raise ValueError(f"{model_dir}: no such model folder")
    elif not (folder / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model folder (no config.json in it)")
    try:
        return loader.from_pretrained(model_dir, **kwargs)
    except Exception as err:  # safetensors' SafetensorError, OSError, JSON errors, HFValidationError, ...
        names = ("model.safetensors", "model.safetensors.index.json", "config.json")
        weights = next((f for f in names if (folder / f).is_file()), None)
        where = folder / weights if folder.is_dir() and weights else model_dir
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where}: cannot load the model ({type(err).__name__}: {first})") from err


def load_segmentation_model(
    model_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, MedDINOv3ImageProcessor]:
    """Load a segmentation folder (model + processor); a clear error if it has no segmentation head."""
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    from ..heads import is_segmentation_config, is_segmentation_model

    config = from_pretrained_or_explain(AutoConfig, model_dir)
    architectures = getattr(config, "architectures", None) or []
    if not is_segmentation_config(config):
        raise ValueError(
            f"{model_dir}: this model has no segmentation head (architectures {architectures}); "
            "fine-tune it first (training/finetune.py) or pass a segmentation model folder"
        )
    model, info = from_pretrained_or_explain(
        AutoModelForSemanticSegmentation, model_dir, output_loading_info=True
    )
    if info.get("missing_keys"):
        raise ValueError(f"{model_dir}: weights missing for {sorted(info['missing_keys'])[:8]}")
    assert is_segmentation_model(model)
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
    series: str | None = None  # SeriesInstanceUID to read from a DICOM folder holding several
    outputs: Any = None  # volumes.outputs.OutputOptions: DICOM-SEG/RTSTRUCT, statistics, clean-up, names


def plan_jobs(
    source: str | Path, output: str | Path, save_probabilities: bool = False, series: str | None = None
) -> list[SegmentJob]:
    """One job per case: a NIfTI file or DICOM folder → `output` file; a folder of NIfTI files → `output`
    folder with one `CASE.nii.gz` per input (nnU-Net `_0000` channel suffixes dropped).

    Refused before anything is written: outputs equal to or inside the input (folder), two inputs that map
    to one output name, a folder holding both DICOM and NIfTI files. Stale temporaries of the package's own
    pattern left next to the planned outputs by an interrupted run are removed."""
    from ..files import check_output_path, remove_stale_temporaries
    from .io import case_name, check_not_mixed_folder, list_volumes

    source, output = Path(source), Path(output)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.is_dir():
        check_not_mixed_folder(source)
    nifti = list_volumes(source) if source.is_dir() else []
    if source.is_dir() and nifti:
        if series is not None:
            raise ValueError(f"{source}: --series applies to a DICOM folder, this is a folder of NIfTI files")
        check_output_path(output, [source], kind="into", option="-o")
        names: dict[str, Path] = {}
        for path in nifti:
            if case_name(path) in names:
                raise ValueError(
                    f"{source}: {names[case_name(path)].name} and {path.name} would both be written to "
                    f"{output / (case_name(path) + '.nii.gz')}; rename or move one of them"
                )
            names[case_name(path)] = path
        jobs = [SegmentJob(str(p), str(output / f"{name}.nii.gz")) for name, p in names.items()]
    else:  # a single NIfTI file, or a DICOM series folder
        if output.suffix not in (".nii", ".gz"):
            raise ValueError(f"{output}: the output for one volume must be a .nii or .nii.gz file")
        jobs = [SegmentJob(str(source), str(output), series=series)]
    for job in jobs:
        if save_probabilities:
            stem = job.output[: -len(".nii.gz")] if job.output.endswith(".nii.gz") else job.output[:-4]
            job.probabilities = f"{stem}_probabilities.nii.gz"
        for path in (job.output, job.probabilities):
            if path is not None:
                check_output_path(path, [source], suffixes=(".nii.gz", ".nii"), overwrite=True, option="-o")
    if source.is_dir() and nifti:
        output.mkdir(parents=True, exist_ok=True)
    for folder in {Path(job.output).parent for job in jobs}:
        finals = [Path(p).name for job in jobs for p in (job.output, job.probabilities) if p is not None]
        remove_stale_temporaries(folder, finals)
    return jobs


def run_jobs(
    jobs: list[SegmentJob],
    model_dir: str | Path | list[str],
    device: str = "cpu",
    batch_size: int = 8,
    tta: bool = False,
    progress: bool = True,
    options: Any = None,
) -> list[str]:
    """Segment `jobs` on one device; returns the error messages of cases that failed (others still run).
    `model_dir` may be a list (an ensemble); `options` is a `volumes.predictor.PredictOptions`."""
    from .io import load_volume, save_labels, save_volume
    from .predictor import apply_roi_subset, build_predictor, roi_subset_labels, save_probabilities_npz

    segmenter, id2label = build_predictor(model_dir, device, batch_size, tta, options)
    keep = roi_subset_labels(options.roi_subset if options is not None else None, id2label)
    if keep is not None:  # --roi-subset: only these structures in the outputs and statistics
        id2label = {0: id2label.get(0, "background"), **keep}
    errors = []
    for job in jobs:
        try:
            volume = load_volume(job.source, series=job.series)
            result = segmenter.segment(
                volume, return_probabilities=job.probabilities is not None, progress=progress
            )
            result.labels = apply_roi_subset(result.labels, keep)
            # Probabilities first, labels last: a labels file on disk means its probabilities are complete.
            if job.probabilities is not None and job.probabilities.endswith(".npz"):
                save_probabilities_npz(result.probabilities, volume, job.probabilities)
            elif job.probabilities is not None:
                save_volume(result.probabilities, volume, job.probabilities, channel_axis=0)
            if job.outputs is None:
                save_labels(result.labels, volume, job.output)
            else:
                from .outputs import write_case_outputs

                write_case_outputs(result.labels, volume, job.output, job.outputs, id2label, job.series)
        except (ValueError, OSError, MemoryError) as err:
            errors.append(f"{job.source}: {err}" if job.source not in str(err) else str(err))
    return errors


def _worker(args: tuple) -> list[str]:
    jobs, model_dir, device, batch_size, tta, options = args
    return run_jobs(jobs, model_dir, device, batch_size, tta, progress=False, options=options)


def run_jobs_on_devices(
    jobs: list[SegmentJob],
    model_dir: str | Path | list[str],
    devices: list[str],
    batch_size: int = 8,
    tta: bool = False,
    progress: bool = True,
    options: Any = None,
) -> list[str]:
    """One case per device at a time: cases are dealt round-robin to one process per device."""
    if len(devices) <= 1 or len(jobs) <= 1:
        device = devices[0] if devices else "cpu"
        return run_jobs(jobs, model_dir, device, batch_size, tta, progress, options=options)
    import multiprocessing as mp

    shards = [
        (
            jobs[i :: len(devices)],
            model_dir if isinstance(model_dir, list) else str(model_dir),
            dev,
            batch_size,
            tta,
            options,
        )
        for i, dev in enumerate(devices)
    ]
    with mp.get_context("spawn").Pool(len(devices)) as pool:
        return [err for errs in pool.map(_worker, shards) for err in errs]
