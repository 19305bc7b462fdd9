"""Fine-tuning MedDINOv3 for CT segmentation on an nnU-Net raw dataset with `transformers.Trainer`.

`run_finetune(argv)` is the whole command (`training/finetune.py`, `meddinov3 finetune`); the pieces are
reusable: `load_model_for_finetuning` (`.loading`), `split_data` → `working_processor` → `prepare_data` (the
datasets' transforms are built from the processor), `MedDINOv3Trainer` (two learning rates,
atomic checkpoints, whole-volume Dice added to every evaluation), `SliceDiceMetric` and `VolumeValidator`
(`.evaluation`). This module is the wiring; it re-exports those names.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import HfArgumentParser, PreTrainedModel, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, rotate_checkpoints

from ..data.nnunet import DatasetValidationError, NnUNetDataset, split_cases
from ..data.slices import build_slice_dataset
from ..heads import backbone_config, backbone_parameter_names
from ..image_processing_meddinov3 import MedDINOv3ImageProcessor
from ..model_card import write_model_card
from ..volumes.evaluation import write_metrics
from .arguments import FinetuneArguments, FinetuneTrainingArguments, parse_fold
from .data import (
    EpochSampler,
    EvalSliceDataset,
    TrainSliceDataset,
    collate_segmentation,
    derive_target_spacing,
    isotropic,
    samples_per_epoch,
    select_cases,
)
from .evaluation import SliceDiceMetric, VolumeValidator
from .loading import load_model_for_finetuning

__all__ = [
    "FinetuneData",
    "FinetuneSplit",
    "MedDINOv3Trainer",
    "SliceDiceMetric",
    "VolumeValidator",
    "build_trainer",
    "load_model_for_finetuning",
    "prepare_data",
    "run_finetune",
    "split_data",
    "working_processor",
]

logger = logging.getLogger(__name__)

# Backbone learning rates of the MedDINOv3 fine-tuning recipe (arXiv 2509.02379, segmentation fine-tuning setup).
BACKBONE_LR_CT = 3e-5
BACKBONE_LR_NATURAL = 1e-4
_STAGING_DIR = ".checkpoint-staging"  # no "checkpoint-" prefix: invisible to resume and rotation


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------


class MedDINOv3Trainer(Trainer):
    """`Trainer` with

    - two AdamW parameter groups: backbone (`heads.backbone_module`) at `backbone_learning_rate`, the head at
      `args.learning_rate`, both with `args.weight_decay`; the stock linear schedule scales both;
    - `EpochSampler` for `TrainSliceDataset` (resumable, process-independent sample identity);
    - whole-volume Dice (`eval_volume_dice`, `eval_volume_dice_<class>`) added to every evaluation when a
      `volume_validator` is given, so `metric_for_best_model="volume_dice"` keeps the best checkpoint;
    - checkpoints written into a staging folder and renamed into place, so a kill never leaves a
      `checkpoint-N` that `--resume_from_checkpoint` would pick up half-written."""

    def __init__(
        self,
        *args: Any,
        backbone_learning_rate: float = BACKBONE_LR_CT,
        volume_validator: VolumeValidator | None = None,
        volume_eval_max_cases: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # The model's forward takes **kwargs, which the Trainer reads as "normalises by num_items_in_batch
        # itself" and then multiplies the loss by the number of processes. Ours is a per-batch mean.
        self.model_accepts_loss_kwargs = False
        self.backbone_learning_rate = float(backbone_learning_rate)
        self.volume_validator = volume_validator
        self.volume_eval_max_cases = volume_eval_max_cases
        self._staging_root: str | None = None

    # -- optimiser ------------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        in_backbone = backbone_parameter_names(model)  # whichever head: ours, UperNet, ... (`heads`)
        backbone, head = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (backbone if name in in_backbone else head).append(param)
        # Decoder first: the Trainer logs the first group's rate as `learning_rate`.
        groups = [
            {"params": head, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay},
            {"params": backbone, "lr": self.backbone_learning_rate, "weight_decay": self.args.weight_decay},
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    # -- data -----------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, TrainSliceDataset):
            return EpochSampler(len(dataset))
        return super()._get_train_sampler(train_dataset)

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluation_loop(
        self,
        dataloader,
        description,
        prediction_loss_only=None,
        ignore_keys=None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self.volume_validator is not None and description == "Evaluation":
            cases = self.volume_validator.case_ids[: self.volume_eval_max_cases]
            model = self.accelerator.unwrap_model(self.model)
            results = self.volume_validator(model, cases, surface_metrics=False)
            for name, values in results["mean"].items():
                key = "volume_dice" if name == "mean" else f"volume_dice_{name}"
                output.metrics[f"{metric_key_prefix}_{key}"] = values["dice"]
        return output

    # -- atomic checkpoints ---------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, _STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # debris of a run killed while saving
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        # The base class resolved the best checkpoint inside the staging folder; point it at the real one.
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            if os.path.exists(os.path.join(staged, "trainer_state.json")):
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            if os.path.exists(final):
                shutil.rmtree(final)  # re-saving the same step (e.g. the end of training)
            os.replace(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


@dataclass
class FinetuneSplit:
    """The dataset, its fold split into slice datasets, and the working spacing (row, col) in mm."""

    dataset: NnUNetDataset
    train_cases: list[str]
    val_cases: list[str]
    train_slices: Any
    val_slices: Any
    target_spacing: tuple[float, float]
    slices: Any


@dataclass
class FinetuneData(FinetuneSplit):
    """A `FinetuneSplit` plus the torch datasets the Trainer reads."""

    train: TrainSliceDataset
    eval: EvalSliceDataset


def split_data(args: FinetuneArguments, training_args: FinetuneTrainingArguments) -> FinetuneSplit:
    """Validate the dataset, build (or reuse) the slice cache, split by fold and derive the working spacing."""
    dataset = NnUNetDataset(args.dataset)
    with training_args.main_process_first(desc="slice dataset"):
        if args.validate_dataset and training_args.should_save:
            dataset.validate_or_raise(check_image_data=False)  # the slice build reads every voxel anyway
        slices = build_slice_dataset(dataset.root, args.slice_cache_dir)
    train_cases, val_cases = split_cases(
        dataset.case_ids, parse_fold(args.fold), splits_file=args.splits_file
    )
    train_slices, val_slices = select_cases(slices, train_cases), select_cases(slices, val_cases)
    target_spacing = args.target_spacing
    if target_spacing is None:
        spacing = derive_target_spacing(train_slices, args.patch_size, args.reference_patch_cap)
        target_spacing = (isotropic(spacing),) * 2  # one in-plane spacing, the coarser axis
    return FinetuneSplit(
        dataset, list(train_cases), list(val_cases), train_slices, val_slices, target_spacing, slices
    )


def working_processor(
    processor: MedDINOv3ImageProcessor | None, target_spacing: tuple[float, float]
) -> MedDINOv3ImageProcessor:
    """The processor the model is trained and saved with: the source folder's (its HU window) or the default,
    resampling every slice to the working spacing."""
    processor = processor or MedDINOv3ImageProcessor()
    processor.target_spacing = target_spacing
    processor.size = None  # resampling to the working spacing decides the size
    return processor


def prepare_data(
    args: FinetuneArguments,
    training_args: FinetuneTrainingArguments,
    processor: MedDINOv3ImageProcessor,
    split: FinetuneSplit | None = None,
) -> FinetuneData:
    """The training and evaluation datasets, their transforms built from `processor` (its target spacing and
    HU normalisation, so training sees what inference will). `split` defaults to `split_data(...)`."""
    split = split_data(args, training_args) if split is None else split
    if processor.target_spacing != split.target_spacing:
        raise ValueError(
            f"the processor's target_spacing {processor.target_spacing} is not the working spacing "
            f"{split.target_spacing}; build it with working_processor"
        )
    n = samples_per_epoch(
        args.iterations_per_epoch,
        training_args.per_device_train_batch_size,
        training_args.world_size,
        training_args.gradient_accumulation_steps,
    )
    train = TrainSliceDataset(
        split.train_slices,
        n,
        args.patch_size,
        seed=training_args.seed,
        oversample_foreground=args.oversample_foreground,
        augment=not args.disable_augmentation,
        processor=processor,
    )
    evaluation = EvalSliceDataset(
        split.val_slices, args.patch_size, max_slices=args.max_eval_slices, processor=processor
    )
    fields = {name: getattr(split, name) for name in FinetuneSplit.__dataclass_fields__}
    return FinetuneData(**fields, train=train, eval=evaluation)


def build_trainer(
    args: FinetuneArguments, training_args: FinetuneTrainingArguments, callbacks: list | None = None
) -> tuple[MedDINOv3Trainer, FinetuneData]:
    """Everything `run_finetune` trains with, without training (tests and benchmarks use it too)."""
    if args.patch_size % 16:
        raise ValueError(f"--patch_size must be a multiple of 16, got {args.patch_size}")
    _ = training_args.device  # sets up the distributed state: world_size is 1 until then
    set_seed(training_args.seed)  # the decoder's random init must not depend on what ran before
    split = split_data(args, training_args)
    model, processor, natural = load_model_for_finetuning(
        args.model,
        split.dataset.id2label,
        training_args.output_dir,
        drop_path_rate=args.drop_path_rate,
        ignore_index=split.dataset.ignore_label,
        main_process_first=training_args.main_process_first,
    )
    backbone_config(model.config).image_size = args.patch_size  # the inference tile defaults to the patch
    processor = working_processor(processor, split.target_spacing)
    data = prepare_data(args, training_args, processor, split)
    backbone_lr = args.backbone_learning_rate
    if backbone_lr is None:
        backbone_lr = BACKBONE_LR_NATURAL if natural else BACKBONE_LR_CT
    validator = VolumeValidator(
        data.dataset, data.val_cases, processor, args.patch_size, args.volume_batch_size, args.volume_tta
    )
    if not args.volume_eval_during_training and training_args.metric_for_best_model == "volume_dice":
        training_args.metric_for_best_model = "dice"  # slice Dice is the best we have then
    training_args.batch_eval_metrics = True  # pooled Dice sums instead of every logit in memory
    metric = SliceDiceMetric(data.dataset.id2label, data.dataset.ignore_label)
    trainer = MedDINOv3Trainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collate_segmentation,
        processing_class=processor,
        compute_metrics=metric,
        preprocess_logits_for_metrics=SliceDiceMetric.preprocess_logits,
        callbacks=callbacks,
        backbone_learning_rate=backbone_lr,
        volume_validator=validator if args.volume_eval_during_training else None,
        volume_eval_max_cases=args.volume_eval_max_cases,
    )
    trainer.final_validator = validator  # used at the end whatever volume_eval_during_training says
    return trainer, data


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def final_validation(
    trainer: MedDINOv3Trainer, args: FinetuneArguments, output_dir: str | os.PathLike
) -> dict[str, Any]:
    """Whole-volume Dice/HD95/NSD of the validation cases → `output_dir/validation/metrics.json` (+ .csv)."""
    folder = Path(output_dir) / "validation"
    predictions = folder / "predictions" if args.save_validation_predictions else None
    model = trainer.accelerator.unwrap_model(trainer.model)
    results = trainer.final_validator(model, predictions_dir=predictions)
    if trainer.args.should_save:
        write_metrics(
            {"cases": {c: {"metrics": m} for c, m in results["cases"].items()}, "mean": results["mean"]},
            folder / "metrics.json",
            folder / "metrics.csv",
        )
    return results


def _card_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {
        name: {k: v for k, v in values.items() if k in ("dice", "hd95", "nsd")}
        for name, values in results["mean"].items()
    }


def write_output_card(
    output_dir: str | os.PathLike,
    model: PreTrainedModel,
    processor: MedDINOv3ImageProcessor,
    data: FinetuneData,
    args: FinetuneArguments,
    results: Mapping[str, Any] | None,
    model_id: str | None = None,
) -> Path:
    meta = data.dataset.meta
    name = str(meta.get("name") or data.dataset.root.name)
    training_data = (
        f"Fine-tuned on the nnU-Net dataset `{name}` ({meta.get('description', 'CT')}): "
        f"{len(data.train_cases)} training and {len(data.val_cases)} validation cases (fold {args.fold}); "
        f"patches of {args.patch_size}² pixels at {data.target_spacing[0]:.4f} mm in-plane."
    )
    return write_model_card(
        output_dir,
        model_name=args.model_name or Path(output_dir).name,
        config=model.config,
        processor=processor,
        base_model=None if Path(args.model).exists() else args.model,
        source_note=f"Fine-tuned from `{Path(args.model).name}` with `meddinov3 finetune`.",
        training_data=training_data,
        metrics=_card_metrics(results) if results else None,
        dataset_name=name,
        model_id=model_id,
    )


def run_finetune(argv: list[str] | None = None) -> int:
    """The fine-tuning command. Returns the process exit status."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # torchrun / accelerate launch on a CPU-only machine: transformers only builds a gloo process group
        # (instead of silently running every rank as a separate single-process job) when told it is on CPU.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    from .preflight import check_hub_push, check_output_dir, explain_arguments_error

    parser = HfArgumentParser((FinetuneArguments, FinetuneTrainingArguments))
    try:
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # TrainingArguments' own validation, e.g. --bf16 without bf16 support
        print(f"error: {explain_arguments_error(err)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    # The Trainer's own Hub push would overwrite our model card and needs the network at start-up; we push
    # the finished folder ourselves (finetuning.hub).
    push, training_args.push_to_hub = training_args.push_to_hub, False
    try:
        # nnU-Net's way of naming datasets (an ID or DatasetXXX_Name under $nnUNet_raw), and
        # `--resume_from_checkpoint true` = the latest checkpoint-N of --output_dir (transformers' rule).
        from ..data.nnunet_ids import resolve_nnunet_dataset
        from .resume import resolve_resume_checkpoint

        args.dataset = str(resolve_nnunet_dataset(args.dataset))
        training_args.resume_from_checkpoint = resolve_resume_checkpoint(
            training_args.resume_from_checkpoint, training_args.output_dir
        )
        # Before any work: an output that would overwrite the inputs, a push that could only fail at the end.
        check_output_dir(training_args.output_dir, args.dataset, args.model)
        if push:
            repo = training_args.hub_model_id or Path(training_args.output_dir).name
            check_hub_push(repo, token=training_args.hub_token)
        trainer, data = build_trainer(args, training_args)
    except (DatasetValidationError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output_dir = Path(training_args.output_dir)
    logger.info(
        "%d training / %d validation cases (fold %s); %d process(es), %d patches of %d px per optimizer step "
        "at %.4f mm",
        len(data.train_cases), len(data.val_cases), args.fold, training_args.world_size,
        training_args.world_size * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps,
        args.patch_size, data.target_spacing[0],
    )  # fmt: skip
    if not args.validation_only:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model(str(output_dir))  # model + processor (working spacing) + config
        trainer.save_state()
    results = final_validation(trainer, args, output_dir)
    trainer.log({f"final_volume_{k}": v for k, v in results["mean"].get("mean", {}).items()})
    if trainer.args.should_save:
        _save_card_and_push(trainer, data, args, training_args, results, push)
    trainer.accelerator.wait_for_everyone()
    return 0


def _save_card_and_push(
    trainer: MedDINOv3Trainer,
    data: FinetuneData,
    args: FinetuneArguments,
    training_args: FinetuneTrainingArguments,
    results: dict[str, Any],
    push: bool,
) -> None:
    """On the saving process: the model (validation-only runs), its model card, and the Hub pushes asked for."""
    output_dir = Path(training_args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    repo_id = training_args.hub_model_id or output_dir.name
    if args.validation_only:
        trainer.save_model(str(output_dir))
    write_output_card(
        output_dir, model, trainer.processing_class, data, args, results, model_id=repo_id if push else None
    )
    if push:
        from .hub import push_finetuned_model

        push_finetuned_model(
            output_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo
        )
    if args.push_dataset_to_hub:
        from .hub import push_slice_dataset

        push_slice_dataset(data.slices, args.push_dataset_to_hub, token=training_args.hub_token)
