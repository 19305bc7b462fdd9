"""nnU-Net- and TotalSegmentator-style inference options for `meddinov3 segment`.

- **Fold ensembles**: several segmentation folders (e.g. the five folds) whose softmax probabilities are
  averaged before the argmax, as nnU-Net's predictor does with `-f 0 1 2 3 4`. Models whose label maps,
  processors or patch sizes differ are refused with what differs.
- **`--step-size`**: the sliding-window step as a fraction of the tile (nnU-Net's `tile_step_size`, 0.5).
- **`--spacing MM`**: segment at a coarser in-plane spacing than the model's working spacing; the tile shrinks
  to the resampled slice when that is smaller, so fewer pixels go through the network (TotalSegmentator's
  `--fast` idea).
- **`--body-crop`**: segment only the in-plane bounding box of the body (voxels above an HU threshold, largest
  connected region of their projection, plus a margin); outside it the label is background.
- **`--roi-subset NAME,...`**: only these structures in the outputs; an unknown name is refused.
- **`--continue`**: skip cases whose outputs exist and read back completely; a truncated one is redone.
- **`--save-probabilities npz`**: probabilities as nnU-Net writes them (`CASE.npz`, key `probabilities`,
  float32 (K, z, y, x) in the stored volume's voxel order reversed, as nnU-Net's SimpleITK reader gives).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .inference import SegmentationResult, VolumeSegmenter, gaussian_weights, load_segmentation_model
from .io import CTVolume

BODY_THRESHOLD_HU = -500.0
BODY_MARGIN_MM = 10.0


@dataclass
class PredictOptions:
    """Options beyond the plain single-model prediction (all default to `meddinov3 segment`'s behaviour)."""

    step: float = 0.5
    spacing_mm: float | None = None
    body_crop: bool = False
    roi_subset: list[str] | None = None
    probabilities_format: str = "nifti"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.step <= 1:
            raise ValueError(f"--step-size must be in (0, 1], got {self.step}")
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise ValueError(f"--spacing must be a positive number of mm, got {self.spacing_mm}")
        if self.probabilities_format not in ("nifti", "npz"):
            raise ValueError(f"--save-probabilities: nifti or npz, got {self.probabilities_format!r}")


def _patch(config) -> int:
    from ..heads import patch_size

    return patch_size(config)  # the backbone's, also under a transformers head (UperNet)


def _processor_fields(processor) -> dict[str, Any]:
    data = processor.to_dict()
    for key in ("processor_class", "_processor_class", "image_processor_type"):
        data.pop(key, None)
    return data


def check_ensemble(members: Sequence[tuple[str, torch.nn.Module, Any]]) -> None:
    """Refuse an ensemble whose models would not average meaningfully: the message names the two folders and
    what differs (label map, processor fields, patch size or tile size)."""
    first_dir, first_model, first_processor = members[0]
    reference_fields = _processor_fields(first_processor)
    for model_dir, model, processor in members[1:]:
        where = f"--model {model_dir} and {first_dir}"
        labels, reference_labels = dict(model.config.id2label), dict(first_model.config.id2label)
        if {int(k): v for k, v in labels.items()} != {int(k): v for k, v in reference_labels.items()}:
            raise ValueError(f"{where}: label maps differ ({labels} vs {reference_labels}); cannot ensemble")
        if _patch(model.config) != _patch(first_model.config):
            raise ValueError(
                f"{where}: patch sizes differ ({_patch(model.config)} vs {_patch(first_model.config)})"
            )
        fields = _processor_fields(processor)
        differing = sorted(
            k for k in set(fields) | set(reference_fields) if fields.get(k) != reference_fields.get(k)
        )
        if differing:
            shown = "; ".join(f"{k}: {fields.get(k)!r} vs {reference_fields.get(k)!r}" for k in differing)
            raise ValueError(f"{where}: processors differ ({shown}); cannot ensemble")


def body_box(hu: np.ndarray, spacing: Sequence[float], threshold: float = BODY_THRESHOLD_HU,
             margin_mm: float = BODY_MARGIN_MM) -> tuple[slice, slice] | None:  # fmt: skip
    """In-plane (y, x) bounding box of the body: the largest connected region of the axial projection of
    `hu > threshold`, grown by `margin_mm`. None when nothing is above the threshold."""
    from scipy import ndimage

    projection = (hu > threshold).any(axis=0)
    regions, count = ndimage.label(projection)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(projection, regions, index=np.arange(1, count + 1))
    body = regions == (int(np.argmax(sizes)) + 1)
    ys, xs = np.nonzero(body)
    my, mx = (math.ceil(margin_mm / float(s)) for s in spacing[1:])
    return (
        slice(max(0, ys.min() - my), min(hu.shape[1], ys.max() + 1 + my)),
        slice(max(0, xs.min() - mx), min(hu.shape[2], xs.max() + 1 + mx)),
    )


@dataclass
class _Cropped:
    """What `VolumeSegmenter.segment` reads of a volume, for an in-plane crop of it."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    source: str


class EnsemblePredictor(VolumeSegmenter):
    """`VolumeSegmenter` over one or several models with the options of :class:`PredictOptions`.

    With several models each tile batch goes through every model and the softmax probabilities are averaged;
    `predict_slices` returns their log, so the argmax and the softmax that `segment` takes of it are the
    argmax and the value of the mean probability."""

    def __init__(
        self,
        members: Sequence[tuple[str, torch.nn.Module, Any]],
        options: PredictOptions | None = None,
        batch_size: int = 8,
        tta: bool = False,
        device: str | torch.device | None = None,
    ):
        import copy

        check_ensemble(members)
        self.options = options or PredictOptions()
        _, model, processor = members[0]
        if self.options.spacing_mm is not None:
            processor = copy.deepcopy(processor)
            processor.target_spacing = (float(self.options.spacing_mm),) * 2
        super().__init__(
            model, processor, batch_size=batch_size, tta=tta, step=self.options.step, device=device
        )
        self.models = [m.to(self.device).eval() for _, m, _ in members]
        self.full_tile = self.tile
        self.patch = _patch(model.config)
        self.fit_tile = self.options.spacing_mm is not None or self.options.body_crop

    def _set_tile(self, tile: tuple[int, int]) -> None:
        if tile != self.tile:
            self.tile = tile
            self._weights = gaussian_weights(tile, device=self.device)

    def predict_slices(self, hu: torch.Tensor, spacing_yx: tuple[float, float]) -> torch.Tensor:
        if self.fit_tile:  # a slice smaller than the tile gets a tile of its own size, not air padding
            work = self.working_shape(tuple(hu.shape[-2:]), spacing_yx)
            fitted = tuple(
                min(t, self.patch * math.ceil(w / self.patch)) for t, w in zip(self.full_tile, work)
            )
            self._set_tile(fitted)
        if len(self.models) == 1:
            return super().predict_slices(hu, spacing_yx)
        total = None
        try:
            for model in self.models:
                self.model = model
                probabilities = super().predict_slices(hu, spacing_yx).softmax(dim=1)
                total = probabilities if total is None else total + probabilities
        finally:
            self.model = self.models[0]
        return (total / len(self.models)).clamp_min(1e-12).log()

    def _chunks(self, depth: int, height: int, width: int):
        self._set_tile(
            self.full_tile
        )  # plan chunks with the full tile (an upper bound on the work per slice)
        return super()._chunks(depth, height, width)

    @torch.inference_mode()
    def segment(
        self, volume: CTVolume, return_probabilities: bool = False, progress: bool = False
    ) -> SegmentationResult:
        box = body_box(volume.hu, volume.spacing) if self.options.body_crop else None
        if box is None:
            return super().segment(volume, return_probabilities, progress)
        crop = _Cropped(np.ascontiguousarray(volume.hu[:, box[0], box[1]]), volume.spacing, volume.source)
        inner = super().segment(crop, return_probabilities, progress)
        labels = np.zeros(volume.hu.shape, dtype=inner.labels.dtype)
        labels[:, box[0], box[1]] = inner.labels
        probabilities = None
        if inner.probabilities is not None:
            probabilities = np.zeros((self.num_labels, *volume.hu.shape), dtype=inner.probabilities.dtype)
            probabilities[0] = 1  # outside the body box: background
            probabilities[:, :, box[0], box[1]] = inner.probabilities
        return SegmentationResult(labels=labels, probabilities=probabilities)


def build_predictor(
    model_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    device: str = "cpu",
    batch_size: int = 8,
    tta: bool = False,
    options: PredictOptions | None = None,
) -> tuple[VolumeSegmenter, dict[int, str]]:
    """The segmenter for `meddinov3 segment`: plain `VolumeSegmenter` for one model without options (exactly
    the historical path), else :class:`EnsemblePredictor`. Returns it with the label map."""
    dirs = [model_dirs] if isinstance(model_dirs, (str, os.PathLike)) else list(model_dirs)
    members = []
    for model_dir in dirs:
        model, processor = load_segmentation_model(model_dir, device)
        members.append((str(model_dir), model, processor))
    names = {int(k): str(v) for k, v in members[0][1].config.id2label.items()}
    if len(members) == 1 and (options is None or options == PredictOptions()):
        _, model, processor = members[0]
        return VolumeSegmenter(model, processor, batch_size=batch_size, tta=tta, device=device), names
    return EnsemblePredictor(members, options, batch_size=batch_size, tta=tta, device=device), names


def roi_subset_labels(subset: Sequence[str] | None, names: Mapping[int, str]) -> dict[int, str] | None:
    """`--roi-subset liver,spleen` → {id: name} of those structures; an unknown name is refused with the
    model's names."""
    if not subset:
        return None
    by_name = {str(v): int(k) for k, v in names.items() if int(k) != 0}
    unknown = [s for s in subset if s not in by_name]
    if unknown:
        raise ValueError(
            f"--roi-subset: unknown structure(s) {', '.join(unknown)}; this model has {', '.join(by_name)}"
        )
    return {by_name[s]: s for s in subset}


def apply_roi_subset(labels: np.ndarray, keep: Mapping[int, str] | None) -> np.ndarray:
    """Labels outside `keep` become background."""
    if keep is None:
        return labels
    return np.where(np.isin(labels, list(keep)), labels, 0).astype(labels.dtype, copy=False)


def save_probabilities_npz(probabilities_zyx: np.ndarray, volume: CTVolume, path: str | os.PathLike) -> Path:
    """Write canonical (K, Z, Y, X) probabilities as nnU-Net does: `np.savez_compressed(path,
    probabilities=...)`, float32, axes (K, k, j, i) where (i, j, k) is the NIfTI's stored voxel order
    (what nnU-Net's SimpleITK/nibabel readers give). Atomic; no pickle is written (nnU-Net's `.pkl` of
    properties is not produced)."""
    from ..files import atomic_path

    stored = volume.to_original(np.asarray(probabilities_zyx), channel_axis=0)  # (i, j, k, K)
    array = np.ascontiguousarray(np.transpose(stored, (3, 2, 1, 0)), dtype=np.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a file object: numpy would otherwise append ".npz" to the name
            np.savez_compressed(handle, probabilities=array)
    return path


def use_npz_probabilities(jobs: Sequence[Any], source: str | os.PathLike) -> None:
    """`--save-probabilities npz`: each job's probabilities go to `CASE.npz` beside its labels (checked by
    the output guard like every output)."""
    from ..files import check_output_path

    for job in jobs:
        if job.probabilities is None:
            continue
        output = str(job.output)
        stem = output[: -len(".nii.gz")] if output.endswith(".nii.gz") else output.removesuffix(".nii")
        job.probabilities = str(
            check_output_path(f"{stem}.npz", [source], suffixes=(".npz",), overwrite=True, option="-o")
        )


def _readable(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.name.endswith(".npz"):
            with np.load(path) as data:
                np.asarray(data["probabilities"])
            return True
        import nibabel as nib

        np.asarray(nib.load(path).dataobj)  # reads every byte: a truncated file raises
        return True
    except Exception:  # truncated gzip (EOFError), bad header, corrupt zip, ...
        return False


def skip_finished(jobs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """`--continue`: (jobs to run, jobs skipped). A job is finished when its label file and, if requested,
    its probabilities file exist and read back completely; a truncated or unreadable one is redone."""
    todo, done = [], []
    for job in jobs:
        paths = [job.output] + ([job.probabilities] if job.probabilities else [])
        (done if all(_readable(p) for p in paths) else todo).append(job)
    return todo, done
