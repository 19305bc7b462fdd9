"""Model cards (README.md with Hub metadata and a `model-index`) for MedDINOv3 folders."""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from .configuration_meddinov3 import MedDINOv3Config
from .files import atomic_path
from .heads import backbone_config, is_segmentation_config
from .image_processing_meddinov3 import CT_CLIP_RANGE, CT_MEAN, CT_STD

TEMPLATE = "templates/model_card.md"


def _template() -> str:
    return resources.files("meddinov3_hf").joinpath(TEMPLATE).read_text(encoding="utf-8")


def render_model_card(
    model_name: str,
    config: MedDINOv3Config,
    processor: object | None = None,
    base_model: str | None = None,
    source_note: str = "",
    training_data: str | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    dataset_name: str | None = None,
    model_id: str | None = None,
) -> str:
    """The README text. `metrics` maps a class name (or "mean") to {"dice": .., "hd95": .., "nsd": ..};
    they become both a table and the Hub's `model-index`."""
    is_segmentation = is_segmentation_config(config)
    backbone = backbone_config(config)  # the ViT's own config, also under a transformers head (UperNet)
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-segmentation" if is_segmentation else "image-feature-extraction",
        tags=["medical-imaging", "computed-tomography", "meddinov3", "dinov3", "vision"],
        base_model=base_model,
        model_name=model_name,
        eval_results=_eval_results(metrics, dataset_name) or None,
    )
    spacing = getattr(processor, "target_spacing", None)
    summary, head_description = _describe_head(config, is_segmentation)
    return _template().format(
        front_matter=card_data.to_yaml(),
        model_name=model_name,
        summary=summary,
        source_note=source_note,
        patch_size=backbone.patch_size,
        hidden_size=backbone.hidden_size,
        num_layers=backbone.num_hidden_layers,
        num_registers=backbone.num_register_tokens,
        head_description=head_description,
        rope_precision=backbone.rope_precision,
        clip_range=list(getattr(processor, "clip_range", CT_CLIP_RANGE)),
        image_mean=getattr(processor, "image_mean", CT_MEAN),
        image_std=getattr(processor, "image_std", CT_STD),
        spacing_note=f"; in-plane working spacing {list(spacing)} mm" if spacing else "",
        auto_class="AutoModelForSemanticSegmentation" if is_segmentation else "AutoModel",
        model_id=model_id or model_name,
        usage_extra=(
            "\nWhole volumes: `meddinov3 segment -i scan.nii.gz -o labels.nii.gz --model "
            f"{model_id or model_name}`.\n"
            if is_segmentation
            else ""
        ),
        intended_use=(
            "semantic segmentation of the listed structures on axial CT slices."
            if is_segmentation
            else "a pretrained encoder to fine-tune for CT segmentation or to extract dense features."
        ),
        training_data=training_data or "See the source checkpoint's documentation.",
        labels=_labels_table(config) if is_segmentation else "Backbone only: no classes.",
        evaluation=_evaluation_text(metrics, dataset_name),
    )


def _eval_results(
    metrics: Mapping[str, Mapping[str, float]] | None, dataset_name: str | None
) -> list[EvalResult]:
    """The Hub's `model-index` entries: one per class and numeric metric."""
    if not metrics or not dataset_name:
        return []
    return [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            metric_type=metric,
            metric_value=float(value),
            metric_name=f"{metric} ({class_name})",
        )
        for class_name, values in metrics.items()
        for metric, value in values.items()
        if isinstance(value, (int, float))
    ]


def _describe_head(config: Any, is_segmentation: bool) -> tuple[str, str]:
    """(summary sentence, head description) for a backbone, the package's own head or a transformers head."""
    if not is_segmentation:
        return "A MedDINOv3 ViT backbone for CT feature extraction and fine-tuning.", ""
    if backbone_config(config) is config:  # the package's multi-scale token aggregation head
        return (
            "A MedDINOv3 segmentation network (multi-scale token aggregation of ViT blocks "
            f"{', '.join(map(str, config.aggregation_layers))} with a transposed-convolution decoder).",
            f"; decoder widths {config.decoder_hidden_sizes}, {config.num_labels} classes",
        )
    head = config.architectures[0]
    return (
        f"A {head} segmentation head on a MedDINOv3 ViT backbone.",
        f"; {head} head, {config.num_labels} classes",
    )


def _labels_table(config: Any) -> str:
    rows = "\n".join(f"| {i} | {name} |" for i, name in sorted(config.id2label.items()))
    return "| id | label |\n|---|---|\n" + rows


def _evaluation_text(metrics: Mapping[str, Mapping[str, float]] | None, dataset_name: str | None) -> str:
    if not metrics:
        return "No evaluation results are recorded for this folder."
    rows = "\n".join(
        f"| {name} | "
        + " | ".join(f"{values.get(k, float('nan')):.4f}" for k in ("dice", "hd95", "nsd"))
        + " |"
        for name, values in metrics.items()
    )
    where = f" on {dataset_name}" if dataset_name else ""
    return (
        f"Whole-volume validation{where} (HD95 in mm, NSD at 1 mm):\n\n"
        f"| class | Dice | HD95 | NSD |\n|---|---|---|---|\n{rows}"
    )


def write_model_card(folder: str | os.PathLike, **kwargs) -> Path:
    """Render the card and write it as `folder/README.md` (atomically)."""
    path = Path(folder) / "README.md"
    text = render_model_card(**kwargs)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
