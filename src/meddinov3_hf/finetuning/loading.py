"""The model fine-tuning starts from: any checkpoint the package loads, with a fresh head for the labels.

A backbone (MedDINOv3 or DINOv3 folder, .pth checkpoint) gets the package's own head, the class
`AutoModelForSemanticSegmentation` maps `MedDINOv3Config` to; a saved segmentation folder keeps its head, e.g.
transformers' `UperNetForSemanticSegmentation` on a `MedDINOv3Backbone` (`heads` is the seam).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForSemanticSegmentation, PreTrainedModel

from ..convert import convert_checkpoint, detect_format
from ..heads import backbone_config, backbone_prefix, is_segmentation_model, set_loss_ignore_index
from ..image_processing_meddinov3 import MedDINOv3ImageProcessor

__all__ = ["load_model_for_finetuning"]


def _source_kind(path: Path) -> tuple[str, str]:
    """("meddinov3" | "dinov3_vit" | "checkpoint", detail); a head on a MedDINOv3 backbone is "meddinov3"."""
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; --model must be a model folder or a .pth file")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model_type = config.get("model_type")
        if (config.get("backbone_config") or {}).get("model_type") == "meddinov3":
            return "meddinov3", str(model_type)  # e.g. UperNet on MedDINOv3Backbone
        if model_type not in ("meddinov3", "dinov3_vit"):
            raise ValueError(
                f"{path}: model_type {model_type!r} is neither 'meddinov3' nor 'dinov3_vit', "
                "nor a head on a 'meddinov3' backbone"
            )
        return model_type, model_type
    if path.is_file():
        return "checkpoint", detect_format(path)
    raise FileNotFoundError(f"{path}: --model does not exist")


def _converted_dir(source: Path, work_dir: Path) -> Path:
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}\0{st.st_mtime_ns}\0{st.st_size}".encode()).hexdigest()[:12]
    # "_" prefix: the Hub upload and checkpoint rotation both skip it.
    return work_dir / f"_base_model-{key}"


def load_model_for_finetuning(
    model_path: str | os.PathLike,
    id2label: Mapping[int, str],
    work_dir: str | os.PathLike,
    drop_path_rate: float | None = None,
    ignore_index: int | None = None,
    main_process_first: Any = None,
) -> tuple[PreTrainedModel, MedDINOv3ImageProcessor | None, bool]:
    """A segmentation model for `id2label` from any starting point the package loads.

    Returns (model, the folder's processor or None, whether the backbone has natural-image DINOv3 weights).
    DINOv3 folders and .pth checkpoints are converted once into `work_dir/_base_model-*` (on the main process
    first when `main_process_first` is `TrainingArguments.main_process_first`). Backbone weights missing from
    the source raise: `from_pretrained` would only warn and train from noise."""
    path = Path(model_path)
    kind, detail = _source_kind(path)
    natural = detail in ("dinov3_vit", "dinov3", "transformers")
    if kind != "meddinov3":
        target = _converted_dir(path, Path(work_dir))
        guard = main_process_first(desc="convert --model") if main_process_first else _nullcontext()
        with guard:
            if not (target / "config.json").is_file():
                # Aggregated blocks: the config's one default (`default_aggregation_layers`, 2, 5, 8, 11 of 12).
                convert_checkpoint(path, target)
        path = target
    id2label = {int(k): str(v) for k, v in id2label.items()}
    # id2label alone sets num_labels; passing both makes transformers warn when the source had other labels.
    config = AutoConfig.from_pretrained(path, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if drop_path_rate is not None:
        backbone_config(config).drop_path_rate = float(drop_path_rate)
    if ignore_index is not None:
        set_loss_ignore_index(config, ignore_index)
    # The segmentation class of the config's type: ours for a MedDINOv3 folder, the folder's own head otherwise.
    model, info = AutoModelForSemanticSegmentation.from_pretrained(
        path, config=config, output_loading_info=True, ignore_mismatched_sizes=True
    )
    if not is_segmentation_model(model):
        raise ValueError(f"{path}: {type(model).__name__} is not a segmentation model")
    prefix = backbone_prefix(model) + "."
    missing = [k for k in info.get("missing_keys", []) if k.startswith(prefix)]
    if missing:
        raise ValueError(f"{path}: backbone weights missing from the checkpoint: {sorted(missing)[:10]}")
    processor = None
    if (path / "preprocessor_config.json").is_file():
        processor = MedDINOv3ImageProcessor.from_pretrained(path)
    return model, processor, natural


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
