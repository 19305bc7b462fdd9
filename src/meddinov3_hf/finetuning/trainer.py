"""Fine-tuning MedDINOv3 for CT segmentation on an nnU-Net raw dataset with `transformers.Trainer`.

`run_finetune(argv)` is the whole command (`training/finetune.py`, `meddinov3 finetune`); the pieces are
reusable: `load_model_for_finetuning`, `prepare_data`, `MedDINOv3Trainer` (two learning rates, atomic
checkpoints, whole-volume Dice added to every evaluation), `SliceDiceMetric`, `VolumeValidator`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import HfArgumentParser, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, rotate_checkpoints

from ..convert import convert_checkpoint, detect_format
from ..data.nnunet import DatasetValidationError, NnUNetDataset, split_cases
from ..data.slices import build_slice_dataset
from ..image_processing_meddinov3 import MedDINOv3ImageProcessor
from ..metrics import compute_segmentation_metrics, write_metrics
from ..model_card import write_model_card
from ..modeling_meddinov3 import MedDINOv3ForSemanticSegmentation
from .arguments import FinetuneArguments, FinetuneTrainingArguments, parse_fold
from .data import (
    EpochSampler,
    EvalSliceDataset,
    TrainSliceDataset,
    collate_segmentation,
    isotropic,
    samples_per_epoch,
    select_cases,
    working_spacing,
)

__all__ = [
    "FinetuneData",
    "MedDINOv3Trainer",
    "SliceDiceMetric",
    "VolumeValidator",
    "build_trainer",
    "load_model_for_finetuning",
    "prepare_data",
    "run_finetune",
]

logger = logging.getLogger(__name__)

# Backbone learning rates of the reference recipe (SPEC §4).
BACKBONE_LR_CT = 3e-5
BACKBONE_LR_NATURAL = 1e-4
_STAGING_DIR = ".checkpoint-staging"  # no "checkpoint-" prefix: invisible to resume and rotation


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


class SliceDiceMetric:
    """`compute_metrics` for `batch_eval_metrics=True`: per-class Dice pooled over all validation slices
    (sums of intersections and sizes), so memory does not grow with the number of slices."""

    def __init__(self, id2label: Mapping[int, str], ignore_index: int | None = None):
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.ignore_index = ignore_index
        self._reset()

    def _reset(self) -> None:
        n = max(self.id2label) + 1
        self.intersection = np.zeros(n, dtype=np.float64)
        self.total = np.zeros(n, dtype=np.float64)

    @staticmethod
    def preprocess_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Keep argmax maps instead of logits: K times less to gather across processes."""
        return logits.argmax(dim=1)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        predictions, labels = torch.as_tensor(predictions).long(), torch.as_tensor(labels).long()
        if self.ignore_index is not None:
            valid = labels != self.ignore_index
            predictions, labels = predictions[valid], labels[valid]
        n = len(self.intersection)
        hits = predictions[predictions == labels]
        self.intersection += torch.bincount(hits.flatten().clamp(0, n - 1), minlength=n).cpu().numpy()[:n]
        self.total += torch.bincount(predictions.flatten().clamp(0, n - 1), minlength=n).cpu().numpy()[:n]
        self.total += torch.bincount(labels.flatten().clamp(0, n - 1), minlength=n).cpu().numpy()[:n]

    def result(self) -> dict[str, float]:
        out = {}
        for c, name in self.id2label.items():
            if c == 0:
                continue
            # Absent from prediction and reference alike: perfect agreement (metrics.py convention).
            out[f"dice_{name}"] = (
                1.0 if self.total[c] == 0 else float(2 * self.intersection[c] / self.total[c])
            )
        out["dice"] = float(np.mean(list(out.values()))) if out else 1.0
        return out

    def __call__(self, eval_prediction: Any, compute_result: bool = False) -> dict[str, float] | None:
        self.update(eval_prediction.predictions, eval_prediction.label_ids)
        if not compute_result:
            return None
        result = self.result()
        self._reset()
        return result


class VolumeValidator:
    """Whole-volume validation of the fold's validation cases with the volume segmentation path.

    Cases are spread over the processes and the results gathered, so every process returns the same dict:
    `{"cases": {case: {class: {...}}}, "mean": {class: {"dice", "hd95", "nsd"}, "mean": {...}}}`."""

    def __init__(
        self,
        dataset: NnUNetDataset,
        case_ids: Sequence[str],
        processor: MedDINOv3ImageProcessor,
        tile_size: int,
        batch_size: int = 8,
        tta: bool = False,
    ):
        self.dataset = dataset
        self.case_ids = list(case_ids)
        self.processor = processor
        self.tile_size = int(tile_size)
        self.batch_size = batch_size
        self.tta = tta

    def __call__(
        self,
        model: nn.Module,
        case_ids: Sequence[str] | None = None,
        surface_metrics: bool = True,
        predictions_dir: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        from ..volumes.inference import VolumeSegmenter
        from ..volumes.io import save_labels

        state = PartialState()
        cases = list(self.case_ids if case_ids is None else case_ids)
        mine = cases[state.process_index :: state.num_processes]
        was_training = model.training
        segmenter = VolumeSegmenter(
            model, self.processor, batch_size=self.batch_size, tta=self.tta, tile_size=self.tile_size
        )
        id2label = {int(k): v for k, v in self.dataset.id2label.items()}
        results: list[tuple[str, dict]] = []
        try:
            for case in mine:
                volume, reference = self.dataset.load_case(case)
                predicted = segmenter.segment(volume).labels
                if self.dataset.ignore_label is not None:
                    # Voxels marked "ignore" are scored neither as hits nor as errors.
                    predicted = np.where(reference == self.dataset.ignore_label, reference, predicted)
                if surface_metrics:
                    scores = compute_segmentation_metrics(predicted, reference, volume.spacing, id2label)
                else:
                    scores = _dice_only(predicted, reference, id2label)
                if predictions_dir is not None:
                    save_labels(
                        predicted, volume, Path(predictions_dir) / f"{case}{self.dataset.file_ending}"
                    )
                results.append((case, scores))
        finally:
            model.train(was_training)
        if state.num_processes > 1:
            results = gather_object(results)
        per_case = dict(sorted(results))
        return {"cases": per_case, "mean": _mean_over_cases(per_case)}


def _dice_only(pred: np.ndarray, gt: np.ndarray, id2label: Mapping[int, str]) -> dict[str, dict[str, float]]:
    out = {}
    for value, name in id2label.items():
        if value == 0:
            continue
        p, g = pred == value, gt == value
        total = int(p.sum()) + int(g.sum())
        out[name] = {"dice": 1.0 if total == 0 else 2.0 * int((p & g).sum()) / total}
    out["mean"] = {"dice": float(np.mean([v["dice"] for v in out.values()])) if out else 1.0}
    return out


def _mean_over_cases(per_case: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per class (and "mean"), the average of each score over the cases."""
    classes: dict[str, dict[str, list[float]]] = {}
    for scores in per_case.values():
        for name, values in scores.items():
            for key in ("dice", "hd95", "nsd"):
                if key in values:
                    classes.setdefault(name, {}).setdefault(key, []).append(float(values[key]))
    return {name: {k: float(np.mean(v)) for k, v in values.items()} for name, values in classes.items()}


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------


class MedDINOv3Trainer(Trainer):
    """`Trainer` with

    - two AdamW parameter groups: backbone (`meddinov3.*`) at `backbone_learning_rate`, everything else at
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
        backbone, head = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (backbone if name.startswith("meddinov3.") else head).append(param)
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


# ---------------------------------------------------------------------------------------------------------
# Model and data preparation
# ---------------------------------------------------------------------------------------------------------


def _source_kind(path: Path) -> tuple[str, str]:
    """("meddinov3" | "dinov3_vit" | "checkpoint", detail)."""
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; --model must be a model folder or a .pth file")
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        if model_type not in ("meddinov3", "dinov3_vit"):
            raise ValueError(f"{path}: model_type {model_type!r} is neither 'meddinov3' nor 'dinov3_vit'")
        return model_type, model_type
    if path.is_file():
        return "checkpoint", detect_format(path)
    raise FileNotFoundError(f"{path}: --model does not exist")


def _aggregation_layers(source: Path) -> list[int]:
    """The paper's blocks 2, 5, 8, 11 of 12 generalised to depth n: the last block of each quarter."""
    depth = 12  # .pth checkpoints are the ViT-B releases
    if source.is_dir():
        depth = int(json.loads((source / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    quarter = max(1, depth // 4)
    return sorted({min(depth, quarter * k) - 1 for k in range(1, 5)})


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
) -> tuple[MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor | None, bool]:
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
                convert_checkpoint(path, target, aggregation_layers=_aggregation_layers(path))
        path = target
    id2label = {int(k): str(v) for k, v in id2label.items()}
    # id2label alone sets num_labels; passing both makes transformers warn when the source had other labels.
    kwargs: dict[str, Any] = dict(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    if ignore_index is not None:
        kwargs["semantic_loss_ignore_index"] = int(ignore_index)
    model, info = MedDINOv3ForSemanticSegmentation.from_pretrained(
        path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("decoder.")]
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


@dataclass
class FinetuneData:
    dataset: NnUNetDataset
    train_cases: list[str]
    val_cases: list[str]
    train: TrainSliceDataset
    eval: EvalSliceDataset
    target_spacing: tuple[float, float]
    slices: Any


def prepare_data(args: FinetuneArguments, training_args: FinetuneTrainingArguments) -> FinetuneData:
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
    if args.target_spacing is not None:
        spacing = (float(args.target_spacing),) * 2
    else:
        spacing = working_spacing(train_slices, args.patch_size, args.reference_patch_cap)
    transform_spacing = isotropic(spacing)
    n = samples_per_epoch(
        args.iterations_per_epoch,
        training_args.per_device_train_batch_size,
        training_args.world_size,
        training_args.gradient_accumulation_steps,
    )
    train = TrainSliceDataset(
        train_slices,
        n,
        args.patch_size,
        transform_spacing,
        seed=training_args.seed,
        oversample_foreground=args.oversample_foreground,
        augment=not args.disable_augmentation,
    )
    evaluation = EvalSliceDataset(val_slices, args.patch_size, transform_spacing, args.max_eval_slices)
    return FinetuneData(
        dataset, list(train_cases), list(val_cases), train, evaluation, (transform_spacing,) * 2, slices
    )


def build_trainer(
    args: FinetuneArguments, training_args: FinetuneTrainingArguments, callbacks: list | None = None
) -> tuple[MedDINOv3Trainer, FinetuneData]:
    """Everything `run_finetune` trains with, without training (tests and benchmarks use it too)."""
    if args.patch_size % 16:
        raise ValueError(f"--patch_size must be a multiple of 16, got {args.patch_size}")
    _ = training_args.device  # sets up the distributed state: world_size is 1 until then
    set_seed(training_args.seed)  # the decoder's random init must not depend on what ran before
    data = prepare_data(args, training_args)
    model, processor, natural = load_model_for_finetuning(
        args.model,
        data.dataset.id2label,
        training_args.output_dir,
        drop_path_rate=args.drop_path_rate,
        ignore_index=data.dataset.ignore_label,
        main_process_first=training_args.main_process_first,
    )
    model.config.image_size = args.patch_size  # the inference tile defaults to the training patch
    processor = processor or MedDINOv3ImageProcessor()
    processor.target_spacing = list(data.target_spacing)
    processor.size = None  # resampling to the working spacing decides the size
    data.train.set_normalizer(processor.normalize)
    data.eval.set_normalizer(processor.normalize)
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
    model: MedDINOv3ForSemanticSegmentation,
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
    parser = HfArgumentParser((FinetuneArguments, FinetuneTrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    # The Trainer's own Hub push would overwrite our model card and needs the network at start-up; we push
    # the finished folder ourselves (finetuning.hub).
    push, training_args.push_to_hub = training_args.push_to_hub, False
    try:
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
    model = trainer.accelerator.unwrap_model(trainer.model)
    repo_id = training_args.hub_model_id or output_dir.name
    if trainer.args.should_save:
        if args.validation_only:
            trainer.save_model(str(output_dir))
        write_output_card(
            output_dir,
            model,
            trainer.processing_class,
            data,
            args,
            results,
            model_id=repo_id if push else None,
        )
        if push:
            from .hub import push_finetuned_model

            push_finetuned_model(
                output_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo
            )
        if args.push_dataset_to_hub:
            from .hub import push_slice_dataset

            push_slice_dataset(data.slices, args.push_dataset_to_hub, token=training_args.hub_token)
    trainer.accelerator.wait_for_everyone()
    return 0
