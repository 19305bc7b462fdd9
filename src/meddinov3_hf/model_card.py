"""Model cards (README.md with Hub metadata and a `model-index`) for MedDINOv3 folders."""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from .configuration_meddinov3 import MedDINOv3Config

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
    is_segmentation = "MedDINOv3ForSemanticSegmentation" in (config.architectures or [])
    eval_results = []
    if metrics and dataset_name:
        for class_name, values in metrics.items():
            for metric, value in values.items():
                if isinstance(value, (int, float)):
                    eval_results.append(
                        EvalResult(
                            task_type="image-segmentation",
                            dataset_type=dataset_name,
                            dataset_name=dataset_name,
                            metric_type=metric,
                            metric_value=float(value),
                            metric_name=f"{metric} ({class_name})",
                        )
                    )
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-segmentation" if is_segmentation else "image-feature-extraction",
        tags=["medical-imaging", "computed-tomography", "meddinov3", "dinov3", "vision"],
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    clip = getattr(processor, "clip_range", [-1000.0, 1000.0])
    spacing = getattr(processor, "target_spacing", None)
    labels = (
        "\n".join(f"| {i} | {name} |" for i, name in sorted(config.id2label.items()))
        if is_segmentation
        else "Backbone only: no classes."
    )
    if is_segmentation:
        labels = "| id | label |\n|---|---|\n" + labels
    if metrics:
        rows = "\n".join(
            f"| {name} | "
            + " | ".join(f"{values.get(k, float('nan')):.4f}" for k in ("dice", "hd95", "nsd"))
            + " |"
            for name, values in metrics.items()
        )
        evaluation = f"Whole-volume validation{f' on {dataset_name}' if dataset_name else ''} (HD95 in mm, NSD at 1 mm):\n\n| class | Dice | HD95 | NSD |\n|---|---|---|---|\n{rows}"
    else:
        evaluation = "No evaluation results are recorded for this folder."
    return _template().format(
        front_matter=card_data.to_yaml(),
        model_name=model_name,
        summary=(
            "A MedDINOv3 segmentation network (multi-scale token aggregation of ViT blocks "
            f"{', '.join(map(str, config.aggregation_layers))} with a transposed-convolution decoder)."
            if is_segmentation
            else "A MedDINOv3 ViT backbone for CT feature extraction and fine-tuning."
        ),
        source_note=source_note,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_registers=config.num_register_tokens,
        head_description=(
            f"; decoder widths {config.decoder_hidden_sizes}, {config.num_labels} classes"
            if is_segmentation
            else ""
        ),
        rope_precision=config.rope_precision,
        clip_range=list(clip),
        image_mean=getattr(processor, "image_mean", 65.1084213256836),
        image_std=getattr(processor, "image_std", 178.01663208007812),
        spacing_note=f"; in-plane working spacing {spacing} mm" if spacing else "",
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
        labels=labels,
        evaluation=evaluation,
    )


def write_model_card(folder: str | os.PathLike, **kwargs) -> Path:
    """Render the card and write it as `folder/README.md` (atomically)."""
    path = Path(folder) / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(render_model_card(**kwargs), encoding="utf-8")
    os.replace(tmp, path)
    return path
