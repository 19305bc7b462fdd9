"""CT pipelines.

- `pipeline("image-segmentation", model=DIR)`: for MedDINOv3 models, slices are CT arrays in HU or DICOM files
  (the stock pipeline would convert them to 8-bit RGB); other models keep the stock behaviour.
- `pipeline("ct-segmentation", model=DIR)`: whole volumes (NIfTI path, nibabel image, DICOM folder) → a label
  volume on the input's voxel grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.pipelines import PIPELINE_REGISTRY, ImageSegmentationPipeline, Pipeline

from .image_processing_meddinov3 import MedDINOv3ImageProcessor
from .modeling_meddinov3 import MedDINOv3ForSemanticSegmentation


def _is_ct_model(pipe: Pipeline) -> bool:
    return isinstance(pipe.image_processor, MedDINOv3ImageProcessor)


class CTImageSegmentationPipeline(ImageSegmentationPipeline):
    """`image-segmentation` for CT: accepts HU arrays/tensors (H, W), pydicom datasets and DICOM paths, and
    returns one mask per label present, `[{"label", "score": None, "mask": PIL 8-bit (H, W)}]`. Keyword
    `spacing=(row_mm, col_mm)` resamples to the processor's working spacing when it has one."""

    def check_model_type(self, supported_models: Any) -> None:
        if isinstance(self.model, MedDINOv3ForSemanticSegmentation):
            return  # registered through AutoModelForSemanticSegmentation; the stock check logs a false alarm
        super().check_model_type(supported_models)

    def _sanitize_parameters(self, **kwargs):
        spacing = kwargs.pop("spacing", None)
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if spacing is not None:
            preprocess["spacing"] = spacing
        return preprocess, forward, postprocess

    def __call__(self, inputs: Any = None, **kwargs: Any):
        # A (B, H, W) batch or a list of slices are several inputs, as a list of images would be.
        if _is_ct_model(self) and isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 3:
            inputs = list(inputs)
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image: Any, subtask: str | None = None, timeout: float | None = None, spacing=None):
        if not _is_ct_model(self):
            return super().preprocess(image, subtask=subtask, timeout=timeout)
        inputs = self.image_processor(image, spacing=spacing, return_original_sizes=True, return_tensors="pt")
        inputs["target_size"] = [tuple(int(v) for v in inputs.pop("original_sizes")[0])]
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


class CTVolumeSegmentationPipeline(Pipeline):
    """`ct-segmentation`: a NIfTI path, nibabel image, DICOM series folder or `CTVolume` → dict with `labels`
    (int array on the input's own voxel grid and orientation), `affine`, `label_names`, and `probabilities`
    when called with `return_probabilities=True`. Keywords: `tta`, `batch_size`, `spacing` (for bare arrays)."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, **kwargs):
        preprocess = {k: kwargs.pop(k) for k in ("spacing",) if k in kwargs}
        forward = {k: kwargs.pop(k) for k in ("tta", "batch_size", "return_probabilities") if k in kwargs}
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return preprocess, forward, {}

    def preprocess(self, inputs: Any, spacing=None) -> dict:
        from .volumes.io import CTVolume, load_volume

        volume = inputs if isinstance(inputs, CTVolume) else load_volume(inputs, spacing=spacing)
        return {"volume": volume}

    def _forward(
        self, model_inputs: dict, tta: bool = False, batch_size: int = 8, return_probabilities=False
    ):
        from .volumes.inference import VolumeSegmenter

        segmenter = VolumeSegmenter(self.model, self.image_processor, batch_size=batch_size, tta=tta)
        result = segmenter.segment(model_inputs["volume"], return_probabilities=return_probabilities)
        return {"result": result, "volume": model_inputs["volume"]}

    def postprocess(self, model_outputs: dict) -> dict:
        result, volume = model_outputs["result"], model_outputs["volume"]
        output = {
            "labels": volume.to_original(result.labels),
            "affine": volume.affine,
            "label_names": dict(self.model.config.id2label),
        }
        if result.probabilities is not None:
            output["probabilities"] = volume.to_original(result.probabilities, channel_axis=0)
        return output

    # Volumes are whole cases: the base class's batching of inputs would only add padding logic.
    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        model_inputs = self.preprocess(inputs, **preprocess_params)
        with torch.inference_mode():
            model_outputs = self._forward(model_inputs, **forward_params)
        return self.postprocess(model_outputs, **postprocess_params)


def register_pipelines() -> None:
    """Route the stock `image-segmentation` task through the CT-aware subclass and add `ct-segmentation`."""
    task = PIPELINE_REGISTRY.supported_tasks["image-segmentation"]
    task["impl"] = CTImageSegmentationPipeline  # silent: register_pipeline would log an overwrite warning
    if "ct-segmentation" not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            "ct-segmentation",
            pipeline_class=CTVolumeSegmentationPipeline,
            pt_model=MedDINOv3ForSemanticSegmentation,
            type="image",
        )


register_pipelines()
