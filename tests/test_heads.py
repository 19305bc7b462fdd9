"""The segmentation-head seam (issue #11 §4): fine-tuning and whole-volume inference take any segmentation
head on the MedDINOv3 backbone; transformers' UperNet is fine-tuned and segments a volume here."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from transformers import UperNetConfig, UperNetForSemanticSegmentation

from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3Model
from meddinov3_hf.cli import main as cli_main
from meddinov3_hf.data.synthetic import write_nnunet_dataset
from meddinov3_hf.finetuning import run_finetune
from meddinov3_hf.finetuning.arguments import FinetuneArguments, FinetuneTrainingArguments
from meddinov3_hf.finetuning.trainer import build_trainer
from meddinov3_hf.heads import (
    backbone_config,
    backbone_parameter_names,
    backbone_prefix,
    check_logits,
    is_segmentation_config,
    is_segmentation_model,
    patch_size,
    set_loss_ignore_index,
)
from meddinov3_hf.model_card import render_model_card
from meddinov3_hf.volumes.inference import VolumeSegmenter, load_segmentation_model
from meddinov3_hf.volumes.io import load_volume


def _upernet(num_labels: int = 3) -> UperNetForSemanticSegmentation:
    config = UperNetConfig(
        backbone_config=tiny_config(), num_labels=num_labels, hidden_size=16, use_auxiliary_head=False
    )
    return UperNetForSemanticSegmentation(config)


def test_segmentation_models_are_recognised_by_type_not_by_name():
    ours, upernet, backbone = (
        MedDINOv3ForSemanticSegmentation(tiny_config()),
        _upernet(),
        MedDINOv3Model(tiny_config()),
    )
    assert is_segmentation_model(ours) and is_segmentation_model(upernet)
    assert not is_segmentation_model(backbone) and not is_segmentation_model(torch.nn.Linear(2, 2))
    for model in (ours, upernet, backbone):
        model.config.architectures = [type(model).__name__]
    assert is_segmentation_config(ours.config) and is_segmentation_config(upernet.config)
    assert not is_segmentation_config(backbone.config)  # same config type, but a backbone-only folder
    # The backbone group is derived from the model, whatever the attribute is called.
    assert backbone_prefix(ours) == "meddinov3" and backbone_prefix(upernet) == "backbone"
    assert backbone_parameter_names(upernet) == {
        f"backbone.{n}" for n, _ in upernet.backbone.named_parameters()
    }
    assert backbone_parameter_names(ours) == {f"meddinov3.{n}" for n, _ in ours.meddinov3.named_parameters()}
    assert (
        backbone_config(upernet.config) is upernet.config.backbone_config and patch_size(upernet.config) == 16
    )
    set_loss_ignore_index(upernet.config, 7)
    set_loss_ignore_index(ours.config, 7)
    assert upernet.config.loss_ignore_index == 7 and ours.config.semantic_loss_ignore_index == 7


def test_logits_of_the_wrong_shape_are_refused():
    x = torch.zeros(2, 1, 32, 32)
    check_logits(torch.zeros(2, 3, 32, 32), x, 3)
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3, 8, 8\); expected .* \(2, 3, 32, 32\)"):
        check_logits(torch.zeros(2, 3, 8, 8), x, 3)
    with pytest.raises(ValueError, match="expected"):
        check_logits(torch.zeros(2, 4, 32, 32), x, 3)


def test_model_card_of_a_transformers_head_describes_head_and_backbone():
    config = _upernet().config
    config.architectures = ["UperNetForSemanticSegmentation"]
    card = render_model_card("ct-upernet", config)
    assert "UperNetForSemanticSegmentation segmentation head on a MedDINOv3 ViT backbone" in card
    assert "pipeline_tag: image-segmentation" in card and "AutoModelForSemanticSegmentation" in card


SPACING = (2.5, 0.8, 0.8)


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", str(root / "ds"), "--model", str(root / "upernet"), "--fold", "all", "--patch_size", "32",
        "--slice_cache_dir", str(root / "cache"), "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--iterations_per_epoch", "2", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--disable_augmentation", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def upernet_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upernet")
    write_nnunet_dataset(root / "ds", n_cases=2, shape=(4, 48, 48), spacing=SPACING, seed=0)
    torch.manual_seed(0)
    _upernet().save_pretrained(root / "upernet")
    out = root / "run"
    argv = _argv(root, out, "--max_steps", "3", "--learning_rate", "1e-2", "--backbone_learning_rate", "1e-3")
    assert run_finetune(argv) == 0
    return root


def test_upernet_head_fine_tunes_with_two_learning_rates(upernet_run):
    root, out = upernet_run, upernet_run / "run"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["UperNetForSemanticSegmentation"]
    assert config["id2label"] == {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}
    before, after = load_file(root / "upernet" / "model.safetensors"), load_file(out / "model.safetensors")
    # Both groups trained: a backbone weight and a decoder weight moved, the fresh classifier has 4 classes.
    assert not torch.equal(
        before["backbone.embeddings.patch_embeddings.weight"],
        after["backbone.embeddings.patch_embeddings.weight"],
    )
    assert not torch.equal(
        before["decode_head.fpn_bottleneck.conv.weight"], after["decode_head.fpn_bottleneck.conv.weight"]
    )
    assert after["decode_head.classifier.weight"].shape[0] == 4
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    assert set(metrics["mean"]) == {"liver", "kidney", "spleen", "mean"}
    assert "UperNetForSemanticSegmentation segmentation head" in (out / "README.md").read_text()
    # The backbone parameter group is the UperNet's backbone, at the backbone rate.
    parser_args = FinetuneArguments, FinetuneTrainingArguments
    from transformers import HfArgumentParser

    args, training_args = HfArgumentParser(parser_args).parse_args_into_dataclasses(
        args=_argv(root, root / "groups", "--max_steps", "1", "--backbone_learning_rate", "1e-3")
    )
    trainer, _ = build_trainer(args, training_args)
    head_group, backbone_group = trainer.create_optimizer().param_groups
    backbone_ids = {id(p) for p in trainer.model.backbone.parameters()}
    assert {id(p) for p in backbone_group["params"]} == backbone_ids and backbone_group["lr"] == 1e-3
    assert not backbone_ids & {id(p) for p in head_group["params"]}


def test_fine_tuned_upernet_segments_a_volume(upernet_run, tmp_path):
    out = upernet_run / "run"
    model, processor = load_segmentation_model(out)
    assert isinstance(model, UperNetForSemanticSegmentation)
    assert processor.target_spacing is not None  # the working spacing saved by fine-tuning
    scan = next((upernet_run / "ds" / "imagesTr").glob("*.nii.gz"))
    volume = load_volume(scan)
    result = VolumeSegmenter(model, processor, batch_size=2).segment(volume, return_probabilities=True)
    assert result.labels.shape == volume.hu.shape and set(np.unique(result.labels)) <= {0, 1, 2, 3}
    assert result.probabilities.shape == (4, *volume.hu.shape)
    # The CLI's segment path gives the same labels, written on the scan's grid.
    code = cli_main(
        ["segment", "-i", str(scan), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(out), "--quiet"]
    )
    assert code == 0
    written = nib.load(tmp_path / "seg.nii.gz")
    np.testing.assert_allclose(written.affine, nib.load(scan).affine)
    assert written.shape == nib.load(scan).shape
    assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1, 2, 3}
