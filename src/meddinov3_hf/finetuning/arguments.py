"""Command-line arguments of `training/finetune.py` (`meddinov3 finetune`), parsed with `HfArgumentParser`.

Two dataclasses: `FinetuneArguments` (our own flags) and `FinetuneTrainingArguments`, transformers'
`TrainingArguments` with the MedDINOv3 recipe (docs/method.md §4) as defaults, so every usual Trainer flag works and
overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..image_processing_meddinov3 import as_target_spacing

__all__ = ["FinetuneArguments", "FinetuneTrainingArguments", "parse_fold"]


@dataclass
class FinetuneArguments:
    """Flags of the fine-tuning script that are not `TrainingArguments`."""

    dataset: str = field(
        metadata={
            "help": "nnU-Net raw dataset folder (dataset.json, imagesTr/, labelsTr/), or a dataset ID (1) or name "
            "(Dataset001_AMOS) under $nnUNet_raw, as nnU-Net resolves them.",
            "aliases": ["-d"],
        }
    )
    model: str = field(
        metadata={
            "help": "Starting point: a MedDINOv3 folder (backbone or fine-tuned), a transformers DINOv3ViTModel "
            "folder, or a MedDINOv3/DINOv3 .pth checkpoint (converted on the fly)."
        }
    )
    fold: str = field(default="0", metadata={"help": "nnU-Net cross-validation fold 0-4, or 'all'."})
    splits_file: str | None = field(
        default=None, metadata={"help": "nnU-Net splits_final.json overriding the generated 5-fold split."}
    )
    patch_size: int = field(
        default=896, metadata={"help": "Square training patch in pixels (multiple of 16)."}
    )
    # HfArgumentParser parses lists, not tuples: the flag takes 1 or 2 values and `__post_init__` stores the
    # processor's type, a (row, col) tuple.
    target_spacing: list[float] | None = field(
        default=None,
        metadata={
            "help": "In-plane working spacing (mm): one value for both axes, or ROW COL. Default: median "
            "spacing × median in-plane shape (capped at --reference_patch_cap) / patch_size, over the "
            "training cases."
        },
    )
    reference_patch_cap: int = field(
        default=512, metadata={"help": "Cap on the median in-plane shape used by the working-spacing rule."}
    )
    iterations_per_epoch: int = field(
        default=250, metadata={"help": "Optimizer steps per epoch (nnU-Net: 250); an epoch samples patches."}
    )
    oversample_foreground: float = field(
        default=0.33, metadata={"help": "Fraction of patches centred on a foreground voxel."}
    )
    disable_augmentation: bool = field(
        default=False, metadata={"help": "Random crops only: no spatial or intensity augmentation."}
    )
    backbone_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Backbone learning rate (the decoder uses --learning_rate). Default 3e-5, or 1e-4 when "
            "starting from natural-image DINOv3 weights."
        },
    )
    drop_path_rate: float = field(default=0.2, metadata={"help": "Stochastic depth in the backbone."})
    slice_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of slice datasets (default $MEDDINOV3_CACHE or ~/.cache)."}
    )
    validate_dataset: bool = field(
        default=True,
        metadata={"help": "Check every file of the dataset before training (reports all problems)."},
    )
    max_eval_slices: int | None = field(
        default=512, metadata={"help": "Validation slices used for the per-class slice Dice (evenly spaced)."}
    )
    volume_eval_during_training: bool = field(
        default=True,
        metadata={
            "help": "Add whole-volume Dice (`eval_volume_dice`) to each evaluation: best-checkpoint metric."
        },
    )
    volume_eval_max_cases: int | None = field(
        default=None, metadata={"help": "Cap on validation cases scored at each evaluation during training."}
    )
    volume_batch_size: int = field(
        default=8, metadata={"help": "Tiles per forward pass in volume validation."}
    )
    volume_tta: bool = field(
        default=False, metadata={"help": "Mirroring test-time augmentation in validation."}
    )
    save_validation_predictions: bool = field(
        default=False, metadata={"help": "Write the final validation label maps to output_dir/validation/."}
    )
    validation_only: bool = field(
        default=False,
        metadata={
            "help": "Skip training: run whole-volume validation of --model on the fold and write metrics."
        },
    )
    model_name: str | None = field(default=None, metadata={"help": "Name shown in the model card."})
    push_dataset_to_hub: str | None = field(
        default=None, metadata={"help": "Also push the slice dataset to this Hub dataset repo (private)."}
    )

    def __post_init__(self):
        self.target_spacing = as_target_spacing(self.target_spacing)  # one value means both axes


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`TrainingArguments` whose defaults follow the MedDINOv3 fine-tuning recipe (docs/method.md §4)."""

    learning_rate: float = field(
        default=3e-4, metadata={"help": "Decoder learning rate (docs/method.md §4: 3e-4)."}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay, both groups."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (docs/method.md §4: 0.98)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Linear decay to 0 ('poly 1.0')."})
    # Our datasets yield exactly the model inputs; the column filter would only inspect them.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep dataset columns."})
    metric_for_best_model: str | None = field(
        default="volume_dice",
        metadata={"help": "Best-checkpoint metric: mean whole-volume Dice of the validation cases."},
    )


def parse_fold(fold: str | int) -> int | str:
    """'all' or a fold number."""
    if isinstance(fold, int) or str(fold).strip().lower() != "all":
        try:
            return int(fold)
        except ValueError as err:
            raise ValueError(f"--fold must be an integer or 'all', got {fold!r}") from err
    return "all"
