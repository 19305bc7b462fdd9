"""`evaluate` metric: per-class Dice, HD95 and normalized surface Dice for integer label maps.

Load it offline from the installed package::

    import evaluate
    from meddinov3_hf.metrics import METRIC_PATH

    metric = evaluate.load(METRIC_PATH)
    metric.compute(predictions=[pred_zyx], references=[gt_zyx], spacing=(3.0, 0.8, 0.8), num_labels=4)

Each prediction/reference is one case: a 2-D ``(Y, X)`` or 3-D ``(Z, Y, X)`` integer label map (all cases
in one call must have the same dimensionality). The numbers come from
:func:`meddinov3_hf.metrics.compute_segmentation_metrics` and the means from
:func:`meddinov3_hf.metrics.mean_over_cases` (as in `meddinov3 evaluate` and fine-tuning); see that module
for the empty-mask conventions. The script imports the installed package by absolute name, so
``evaluate.load(path)`` works on a copy of this file too. Large 3-D volumes pass through Arrow as nested
lists, which is slow: for whole CT volumes prefer ``meddinov3_hf.volumes.evaluation.evaluate_folders`` or
the function itself.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

from meddinov3_hf.metrics import compute_segmentation_metrics, mean_over_cases

_DESCRIPTION = "Per-class Dice, 95th-percentile Hausdorff distance (mm) and normalized surface Dice."
_CITATION = """\
@article{nikolov2021clinically,
  title={Clinically applicable segmentation of head and neck anatomy for radiotherapy},
  author={Nikolov, Stanislav and others},
  journal={Journal of Medical Internet Research}, volume={23}, number={7}, year={2021}
}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of integer label maps, each (Y, X) or (Z, Y, X).
    references: list of integer label maps, same shapes as predictions.
    num_labels (int, optional): number of classes INCLUDING background; classes 1..num_labels-1 are scored.
    labels (dict[int, str], optional): class value -> name (overrides num_labels).
    spacing (sequence of float, optional): voxel size in mm per axis; default 1 mm.
    tolerance_mm (float, optional): NSD tolerance, default 1.0.
Returns:
    mean_dice, mean_hd95, mean_nsd: averages over classes and cases.
    per_class: {class: {dice, hd95, nsd}} averaged over the cases that have the class.
    per_example: list of compute_segmentation_metrics results, one per case.
"""


def _label_feature(ndim: int) -> Any:
    feature: Any = datasets.Value("int64")
    for _ in range(ndim):
        feature = datasets.Sequence(feature)
    return feature


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MedDINOv3SegmentationMetric(evaluate.Metric):
    """Dice / HD95 / NSD for 2-D or 3-D integer label maps."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # 3-D volumes or 2-D slices; evaluate picks the option that matches the first example.
            features=[
                datasets.Features({"predictions": _label_feature(3), "references": _label_feature(3)}),
                datasets.Features({"predictions": _label_feature(2), "references": _label_feature(2)}),
            ],
        )

    def _compute(
        self,
        predictions: list[Any],
        references: list[Any],
        num_labels: int | None = None,
        labels: dict[int, str] | None = None,
        spacing: Any = None,
        tolerance_mm: float = 1.0,
    ) -> dict[str, Any]:
        if labels is None and num_labels is not None:
            labels = {i: str(i) for i in range(1, int(num_labels))}
        per_example = [
            compute_segmentation_metrics(np.asarray(p), np.asarray(r), spacing, labels, tolerance_mm)
            for p, r in zip(predictions, references, strict=True)
        ]
        means = mean_over_cases(per_example)
        overall = means.pop("mean")
        return {
            "mean_dice": overall["dice"],
            "mean_hd95": overall["hd95"],
            "mean_nsd": overall["nsd"],
            "per_class": means,
            "per_example": per_example,
        }
