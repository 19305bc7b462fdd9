"""CT pipelines.

- `pipeline("image-segmentation", model=DIR)`: for MedDINOv3 models, slices are CT arrays in HU or DICOM files
  (the stock pipeline would convert them to 8-bit RGB); other models keep the stock behaviour.
- `pipeline("ct-segmentation", model=DIR)`: whole volumes (NIfTI path, nibabel image, DICOM folder) → a label
  volume on the input's voxel grid, or in the package's canonical axial order with `return_canonical=True`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.pipelines import (
    PIPELINE_REGISTRY,
    ImageFeatureExtractionPipeline,
    ImageSegmentationPipeline,
    Pipeline,
)

from .heads import is_segmentation_model
from .image_processing_meddinov3 import MedDINOv3ImageProcessor
from .modeling_meddinov3 import MedDINOv3ForSemanticSegmentation


def _is_ct_model(pipe: Pipeline) -> bool:
    return isinstance(pipe.image_processor, MedDINOv3ImageProcessor)


def pil_to_stored_values(image: Image.Image) -> np.ndarray:
    """A 16/32-bit grayscale PIL image (`I;16*`, `I`, `F`) → float32 (H, W) of its stored values, with a warning
    that they are HU only if no rescale is needed. 8-bit and colour images cannot hold HU and are refused."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        warnings.warn(
            f"PIL image of mode {image.mode!r} taken as stored values, not rescaled Hounsfield units: if they "
            "need a rescale, pass `np.asarray(image) * RescaleSlope + RescaleIntercept` or the DICOM itself",
            UserWarning,
            stacklevel=2,
        )
        return np.asarray(image).astype(np.float32)
    raise ValueError(
        f"a PIL image of mode {image.mode!r} (8-bit or colour) cannot hold Hounsfield units: pass the HU array "
        "(`dataset.pixel_array * RescaleSlope + RescaleIntercept`) or the DICOM file/dataset instead"
    )


class CTImageSegmentationPipeline(ImageSegmentationPipeline):
    """`image-segmentation` for CT: accepts HU arrays/tensors (H, W), pydicom datasets and DICOM paths, and
    returns one mask per label present, `[{"label", "score": None, "mask": PIL 8-bit (H, W)}]`. Keyword
    `spacing=(row_mm, col_mm)` resamples to the processor's working spacing when it has one. A 16-bit PIL
    image is taken as stored values (with a warning); 8-bit or colour PIL images are refused."""

    # A processor saved with remote code has an `auto_map`, from which transformers would derive a remote video
    # processor and ask whether to run it; CT pipelines have no video processor.
    _load_video_processor = False

    def check_model_type(self, supported_models: Any) -> None:
        if is_segmentation_model(self.model):
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
        if isinstance(image, Image.Image):
            image = pil_to_stored_values(image)
        inputs = self.image_processor(image, spacing=spacing, return_original_sizes=True, return_tensors="pt")
        inputs["target_size"] = [tuple(int(v) for v in inputs.pop("original_sizes")[0])]
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


class CTVolumeSegmentationPipeline(Pipeline):
    """`ct-segmentation`: a NIfTI path, nibabel image, DICOM series folder or `CTVolume` → a dict.

    By default the arrays are on the input's own voxel grid, in its stored axis order (as the file holds them,
    so they can be saved with `affine`): `labels` (X, Y, Z) ints, `affine` (that order's voxel → RAS world),
    `label_names`, and with `return_probabilities=True` `probabilities` (X, Y, Z, K) float16, channels last as
    nibabel stores 4-D images.

    With `return_canonical=True` the arrays are in the package's canonical axial order (Z, Y, X): `labels[z]`
    is an axial slice, z runs inferior → superior, rows anterior → posterior and columns patient right → left
    (radiological display, so `plt.imshow(labels[z])` looks like a CT viewer). Added keys: `hu` (Z, Y, X) float32,
    `spacing` (sz, sy, sx) mm; `affine` is then the canonical array's affine; `probabilities` are (Z, Y, X, K).
    `visualize.overlay_slice(result, z)` draws a slice with its labels and legend.

    Keywords: `channels_first=True` moves the class axis of `probabilities` first, as transformers' logits
    ((K, X, Y, Z) or (K, Z, Y, X)); `tta`, `batch_size`, `spacing` (for bare arrays), `progress` (a bar over
    the slice chunks; off by default)."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def _sanitize_parameters(self, **kwargs):
        preprocess = {k: kwargs.pop(k) for k in ("spacing",) if k in kwargs}
        forward_keys = ("tta", "batch_size", "return_probabilities", "progress")
        forward = {k: kwargs.pop(k) for k in forward_keys if k in kwargs}
        postprocess = {k: kwargs.pop(k) for k in ("return_canonical", "channels_first") if k in kwargs}
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return preprocess, forward, postprocess

    def preprocess(self, inputs: Any, spacing=None) -> dict:
        from .volumes.io import CTVolume, load_volume

        volume = inputs if isinstance(inputs, CTVolume) else load_volume(inputs, spacing=spacing)
        return {"volume": volume}

    def _forward(
        self,
        model_inputs: dict,
        tta: bool = False,
        batch_size: int = 8,
        return_probabilities=False,
        progress: bool = False,
    ):
        from .volumes.inference import VolumeSegmenter

        segmenter = VolumeSegmenter(self.model, self.image_processor, batch_size=batch_size, tta=tta)
        result = segmenter.segment(
            model_inputs["volume"], return_probabilities=return_probabilities, progress=progress
        )
        return {"result": result, "volume": model_inputs["volume"]}

    def postprocess(
        self, model_outputs: dict, return_canonical: bool = False, channels_first: bool = False
    ) -> dict:
        result, volume = model_outputs["result"], model_outputs["volume"]
        names = dict(self.model.config.id2label)
        probabilities = result.probabilities  # (K, Z, Y, X), canonical
        if return_canonical:
            output = {
                "labels": result.labels,
                "hu": volume.hu,
                "spacing": tuple(float(s) for s in volume.spacing),
                "affine": volume.canonical_affine,
                "label_names": names,
            }
            if probabilities is not None:
                output["probabilities"] = (
                    probabilities if channels_first else np.moveaxis(probabilities, 0, -1)
                )
            return output
        output = {"labels": volume.to_original(result.labels), "affine": volume.affine, "label_names": names}
        if probabilities is not None:
            stored = volume.to_original(probabilities, channel_axis=0)  # (X, Y, Z, K)
            output["probabilities"] = np.moveaxis(stored, -1, 0) if channels_first else stored
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


class CTImageFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    """`image-feature-extraction` for CT (issue 9): for MedDINOv3 models it takes what the slice segmentation
    pipeline takes (HU arrays/tensors (H, W) or a (B, H, W) batch, pydicom datasets, DICOM paths) and returns the
    `last_hidden_state` (CLS, registers, patch tokens) per slice, or the CLS token with `pool=True`. Other
    models keep the stock behaviour."""

    _load_video_processor = False  # as in CTImageSegmentationPipeline

    def __call__(self, *args: Any, **kwargs: Any):
        if (
            args
            and isinstance(self.image_processor, MedDINOv3ImageProcessor)
            and isinstance(args[0], (np.ndarray, torch.Tensor))
            and args[0].ndim == 3
        ):
            args = (list(args[0]), *args[1:])
        return super().__call__(*args, **kwargs)

    def preprocess(self, image: Any, timeout: float | None = None, **image_processor_kwargs):
        if not isinstance(self.image_processor, MedDINOv3ImageProcessor):
            return super().preprocess(image, timeout=timeout, **image_processor_kwargs)
        inputs = self.image_processor(image, return_tensors="pt", **image_processor_kwargs)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


PIPELINE_REGISTRY.supported_tasks["image-feature-extraction"]["impl"] = CTImageFeatureExtractionPipeline
