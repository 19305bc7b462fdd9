"""MedDINOv3 for Hugging Face transformers.

Importing the package registers the model type `meddinov3` with transformers' Auto classes (config, model,
backbone, semantic segmentation, image processor) and the CT pipelines, so that `AutoModel.from_pretrained`,
`AutoImageProcessor.from_pretrained` and `pipeline("image-segmentation", ...)` work on MedDINOv3 folders.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
)

from .configuration_meddinov3 import MedDINOv3Config
from .image_processing_meddinov3 import WINDOW_PRESETS, MedDINOv3ImageProcessor, normalize_hu
from .modeling_meddinov3 import (
    MedDINOv3Backbone,
    MedDINOv3ForSemanticSegmentation,
    MedDINOv3Model,
    MedDINOv3PreTrainedModel,
)

AutoConfig.register("meddinov3", MedDINOv3Config, exist_ok=True)
AutoModel.register(MedDINOv3Config, MedDINOv3Model, exist_ok=True)
AutoBackbone.register(MedDINOv3Config, MedDINOv3Backbone, exist_ok=True)
AutoModelForSemanticSegmentation.register(MedDINOv3Config, MedDINOv3ForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(MedDINOv3Config, MedDINOv3ImageProcessor, exist_ok=True)

from . import pipelines as _pipelines  # noqa: E402, F401  (registers the pipelines; needs the classes above)

__version__ = "0.1.0"

__all__ = [
    "MedDINOv3Backbone",
    "MedDINOv3Config",
    "MedDINOv3ForSemanticSegmentation",
    "MedDINOv3ImageProcessor",
    "MedDINOv3Model",
    "MedDINOv3PreTrainedModel",
    "WINDOW_PRESETS",
    "normalize_hu",
]
