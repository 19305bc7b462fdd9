"""MedDINOv3 for Hugging Face transformers.

Importing the package registers the model type `meddinov3` with transformers' Auto classes (config, model,
backbone, semantic segmentation, image processor) and the CT pipelines, so that `AutoModel.from_pretrained`,
`AutoImageProcessor.from_pretrained` and `pipeline("image-segmentation", ...)` work on MedDINOv3 folders.
"""

import os as _os
import sys as _sys

# Before torch loads its OpenMP runtime: threads waiting at a barrier sleep instead of spinning. On a busy
# machine a descheduled thread otherwise keeps the others spinning; `meddinov3 demo` took 286-329 s wall and
# 98-126 s CPU (80 steps, 2 threads, loaded 2-core machine) spinning, 25 s wall and 23 s CPU passive
# (benchmarks/README.md). Only when torch is not loaded yet and the user has not chosen a policy.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# First: hides tqdm's "IProgress not found" notice, which transformers' import would print in Jupyter.
from .progress import set_loading_progress  # isort: split

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
# Saved processors carry their code and `auto_map` (the model classes register in modeling_meddinov3.py), so
# that `trust_remote_code=True` works where this package is not installed.
MedDINOv3ImageProcessor.register_for_auto_class("AutoImageProcessor")

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
    "set_loading_progress",
]
