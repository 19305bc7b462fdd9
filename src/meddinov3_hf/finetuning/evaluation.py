"""Evaluation during fine-tuning: pooled slice Dice for the Trainer's `compute_metrics`, and whole-volume
validation of the fold's validation cases with the volume segmentation path."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.cases import SegmentationCases
from ..image_processing_meddinov3 import MedDINOv3ImageProcessor
from ..metrics import compute_segmentation_metrics, dice_score, mean_over_cases

__all__ = ["SliceDiceMetric", "VolumeValidator"]


class SliceDiceMetric:
    """`compute_metrics` for `batch_eval_metrics=True`: per-class Dice pooled over all validation slices
    (sums of intersections and sizes), so memory does not grow with the number of slices."""

    def __init__(self, id2label: Mapping[int, str], ignore_index: int | None = None):
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.ignore_index = ignore_index
        self._reset()

    def _reset(self) -> None:
        n = max(self.id2label) + 1
        self.intersection = np.zeros(n, dtype=np.float64)
        self.total = np.zeros(n, dtype=np.float64)

    @staticmethod
    def preprocess_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Keep argmax maps instead of logits: K times less to gather across processes."""
        return logits.argmax(dim=1)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        predictions, labels = torch.as_tensor(predictions).long(), torch.as_tensor(labels).long()
        if self.ignore_index is not None:
            valid = labels != self.ignore_index
            predictions, labels = predictions[valid], labels[valid]
        n = len(self.intersection)
        hits = predictions[predictions == labels]
        self.intersection += torch.bincount(hits.flatten().clamp(0, n - 1), minlength=n).cpu().numpy()[:n]
        self.total += torch.bincount(predictions.flatten().clamp(0, n - 1), minlength=n).cpu().numpy()[:n]
        self.total += torch.bincount(labels.flatten().clamp(0, n - 1), minlength=n).cpu().numpy()[:n]

    def result(self) -> dict[str, float]:
        out = {}
        for c, name in self.id2label.items():
            if c == 0:
                continue
            # Absent from prediction and reference alike: perfect agreement (metrics.py convention).
            out[f"dice_{name}"] = (
                1.0 if self.total[c] == 0 else float(2 * self.intersection[c] / self.total[c])
            )
        out["dice"] = float(np.mean(list(out.values()))) if out else 1.0
        return out

    def __call__(self, eval_prediction: Any, compute_result: bool = False) -> dict[str, float] | None:
        self.update(eval_prediction.predictions, eval_prediction.label_ids)
        if not compute_result:
            return None
        result = self.result()
        self._reset()
        return result


class VolumeValidator:
    """Whole-volume validation of the fold's validation cases with the volume segmentation path.

    Cases are spread over the processes and the results gathered, so every process returns the same dict:
    `{"cases": {case: {class: {...}}}, "mean": {class: {"dice", "hd95", "nsd"}, "mean": {...}}}`."""

    def __init__(
        self,
        dataset: SegmentationCases,
        case_ids: Sequence[str],
        processor: MedDINOv3ImageProcessor,
        tile_size: int,
        batch_size: int = 8,
        tta: bool = False,
    ):
        self.dataset = dataset
        self.case_ids = list(case_ids)
        self.processor = processor
        self.tile_size = int(tile_size)
        self.batch_size = batch_size
        self.tta = tta

    def __call__(
        self,
        model: nn.Module,
        case_ids: Sequence[str] | None = None,
        surface_metrics: bool = True,
        predictions_dir: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        from ..volumes.inference import VolumeSegmenter
        from ..volumes.io import save_labels

        state = PartialState()
        cases = list(self.case_ids if case_ids is None else case_ids)
        mine = cases[state.process_index :: state.num_processes]
        was_training = model.training
        segmenter = VolumeSegmenter(
            model, self.processor, batch_size=self.batch_size, tta=self.tta, tile_size=self.tile_size
        )
        id2label = {int(k): v for k, v in self.dataset.id2label.items()}
        results: list[tuple[str, dict]] = []
        try:
            for case in mine:
                volume, reference = self.dataset.load_case(case)
                predicted = segmenter.segment(volume).labels
                if self.dataset.ignore_label is not None:
                    # Voxels marked "ignore" are scored neither as hits nor as errors.
                    predicted = np.where(reference == self.dataset.ignore_label, reference, predicted)
                if surface_metrics:
                    scores = compute_segmentation_metrics(predicted, reference, volume.spacing, id2label)
                else:
                    scores = _dice_only(predicted, reference, id2label)
                if predictions_dir is not None:
                    save_labels(
                        predicted, volume, Path(predictions_dir) / f"{case}{self.dataset.file_ending}"
                    )
                results.append((case, scores))
        finally:
            model.train(was_training)
        if state.num_processes > 1:
            results = gather_object(results)
        per_case = dict(sorted(results))
        return {"cases": per_case, "mean": mean_over_cases(per_case.values())}


def _dice_only(pred: np.ndarray, gt: np.ndarray, id2label: Mapping[int, str]) -> dict[str, dict[str, float]]:
    """Per-class Dice alone (the cheap score used during training), shaped like the full metrics."""
    out = {
        name: {"dice": dice_score(pred == value, gt == value)} for value, name in id2label.items() if value
    }
    out["mean"] = {"dice": float(np.mean([v["dice"] for v in out.values()])) if out else 1.0}
    return out
