"""Checkpoint conversion from every supported format, built synthetically inside the tests."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import dino_head_state, reference_dinov3, tiny_config, to_reference_names
from safetensors.torch import load_file

from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3Model
from meddinov3_hf.cli import main as cli_main
from meddinov3_hf.convert import CheckpointError, convert_checkpoint, detect_format

BLOCKS = [0, 1, 2, 3]


def _reference_state(config, **kwargs):
    reference = reference_dinov3(config, **kwargs)
    sd = to_reference_names(
        reference.state_dict(),
        config.num_hidden_layers,
        query_value_bias=kwargs.get("query_bias", False),
        num_heads=config.num_attention_heads,
    )
    return reference, sd


def _outputs_match(folder, reference, atol=1e-5):
    model = MedDINOv3Model.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x).last_hidden_state, reference(x).last_hidden_state, atol=atol, rtol=0
        )
    return model


def test_meddinov3_release_checkpoint(tmp_path):
    config = tiny_config(layer_norm_eps=1e-6)
    reference, sd = _reference_state(config)
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    heads = dino_head_state("dino_head.", config.hidden_size) | dino_head_state(
        "ibot_head.", config.hidden_size, seed=1
    )
    teacher |= heads
    torch.save({"teacher": teacher, "iteration": 5}, tmp_path / "teacher_checkpoint.pth")
    assert detect_format(tmp_path / "teacher_checkpoint.pth") == "meddinov3"
    result = convert_checkpoint(
        tmp_path / "teacher_checkpoint.pth",
        tmp_path / "out",
        aggregation_layers=BLOCKS,
        rope_precision="fp32",
    )
    _outputs_match(tmp_path / "out", reference)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= files
    # The DINO and iBOT heads are kept, with the release's own keys, beside the backbone (issue 9).
    assert result.dropped_keys == [] and result.pretraining_head_keys == sorted(heads)
    kept = load_file(tmp_path / "out" / "pretraining_heads.safetensors")
    assert sorted(kept) == sorted(heads) and all(torch.equal(kept[k], heads[k]) for k in heads)
    assert "last_layer.weight" in " ".join(kept) and not any("weight_g" in k for k in kept)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Conversion check" in card and "pretraining_heads.safetensors" in card
    # default RoPE precision for reference-code checkpoints is the reference's bf16
    result = convert_checkpoint(
        tmp_path / "teacher_checkpoint.pth", tmp_path / "bf16", aggregation_layers=BLOCKS
    )
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["rope_precision"] == "bf16"


def test_meta_dinov3_pth_with_masked_key_bias(tmp_path):
    config = tiny_config(query_bias=True, value_bias=True, layer_norm_eps=1e-5)
    reference, sd = _reference_state(config, query_bias=True, value_bias=True)
    torch.save(sd, tmp_path / "dinov3_vitb16.pth")
    assert detect_format(tmp_path / "dinov3_vitb16.pth") == "dinov3"
    result = convert_checkpoint(
        tmp_path / "dinov3_vitb16.pth", tmp_path / "out", aggregation_layers=BLOCKS, rope_precision="fp32"
    )
    assert result.config.query_bias and result.config.value_bias and not result.config.key_bias
    _outputs_match(tmp_path / "out", reference)


def test_transformers_dinov3_folder(tmp_path):
    config = tiny_config()
    reference = reference_dinov3(config)
    reference.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "transformers"
    result = convert_checkpoint(tmp_path / "hf", tmp_path / "out", aggregation_layers=BLOCKS)
    assert result.config.rope_precision == "fp32"
    _outputs_match(tmp_path / "out", reference)


def test_nnunet_checkpoint_with_orig_mod_prefix_and_labels(tmp_path):
    config = tiny_config()
    reference, sd = _reference_state(config)
    seg = MedDINOv3ForSemanticSegmentation(config)
    decoder = {}
    for s, stage in enumerate(seg.decoder.stages):
        decoder[f"up_projection.decode.{s}.0.weight"] = stage.upsample.weight.detach().clone()
        decoder[f"up_projection.decode.{s}.0.bias"] = torch.randn(stage.upsample.bias.shape)
        decoder[f"up_projection.decode.{s}.1.weight"] = torch.randn(stage.norm.weight.shape)
        decoder[f"up_projection.decode.{s}.1.bias"] = torch.randn(stage.norm.bias.shape)
    decoder["up_projection.decode.4.weight"] = seg.decoder.classifier.weight.detach().clone()
    decoder["up_projection.decode.4.bias"] = torch.randn(3)
    weights = {f"_orig_mod.dino_encoder.{k}": v for k, v in sd.items()} | {
        f"_orig_mod.{k}": v for k, v in decoder.items()
    }
    # nnU-Net v2 stores its trainer's init arguments, plans included, in every checkpoint.
    plans = {"configurations": {"2d": {"spacing": [0.7, 0.8], "patch_size": [64, 48]}}}
    checkpoint = {
        "network_weights": weights,
        "init_args": {
            "dataset_json": {"labels": {"background": 0, "liver": 1, "kidney": 2}},
            "plans": plans,
            "configuration": "2d",
        },
    }
    torch.save(checkpoint, tmp_path / "checkpoint_final.pth")
    result = convert_checkpoint(
        tmp_path / "checkpoint_final.pth", tmp_path / "out", aggregation_layers=BLOCKS, rope_precision="fp32"
    )
    assert result.config.id2label == {0: "background", 1: "liver", 2: "kidney"}
    # the working spacing and tile of the fine-tune travel with the folder (issue 8 item 3)
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["target_spacing"] == [
        0.7,
        0.8,
    ]
    assert list(result.config.image_size) == [64, 48]
    model = MedDINOv3ForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(model.decoder.stages[2].norm.bias, decoder["up_projection.decode.2.1.bias"])
    torch.testing.assert_close(model.decoder.classifier.bias, decoder["up_projection.decode.4.bias"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.meddinov3(x).last_hidden_state, reference(x).last_hidden_state, atol=1e-5, rtol=0
        )
    assert "image-segmentation" in (tmp_path / "out" / "README.md").read_text()


def test_cli_convert_with_blocks_and_precision(tmp_path, capsys):
    config = tiny_config()
    _, sd = _reference_state(config)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, tmp_path / "t.pth")
    assert (
        cli_main(
            [
                "convert",
                str(tmp_path / "t.pth"),
                str(tmp_path / "out"),
                "--blocks",
                "1,3",
                "--rope-precision",
                "fp32",
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["aggregation_layers"] == [1, 3] and saved["rope_precision"] == "fp32"
    assert "converted" in capsys.readouterr().out


def test_missing_and_unknown_keys_fail_loudly(tmp_path):
    config = tiny_config()
    _, sd = _reference_state(config)
    broken = dict(sd)
    del broken["blocks.2.mlp.fc1.bias"]
    torch.save({"teacher": {f"backbone.{k}": v for k, v in broken.items()}}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="blocks.2.mlp.fc1.bias"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "o1", aggregation_layers=BLOCKS)
    extra = dict(sd) | {"blocks.0.attn.extra_thing": torch.zeros(2)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="extra_thing"):
        convert_checkpoint(tmp_path / "extra.pth", tmp_path / "o2", aggregation_layers=BLOCKS)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_unknown_truncated_and_non_tensor_checkpoints(tmp_path):
    torch.save({"something": torch.zeros(1)}, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="unrecognised"):
        detect_format(tmp_path / "unknown.pth")
    config = tiny_config()
    _, sd = _reference_state(config)
    torch.save(sd, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        convert_checkpoint(tmp_path / "truncated.pth", tmp_path / "o")
    with pytest.raises(CheckpointError, match="no such file"):
        detect_format(tmp_path / "nothing.pth")


def test_pickled_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"teacher": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        detect_format(tmp_path / "evil.pth")


def test_decoder_width_must_match_blocks(tmp_path):
    config = tiny_config()
    _, sd = _reference_state(config)
    seg = MedDINOv3ForSemanticSegmentation(config)
    weights = {f"dino_encoder.{k}": v for k, v in sd.items()}
    for s, stage in enumerate(seg.decoder.stages):
        weights[f"up_projection.decode.{s}.0.weight"] = stage.upsample.weight.detach()
        weights[f"up_projection.decode.{s}.0.bias"] = stage.upsample.bias.detach()
        weights[f"up_projection.decode.{s}.1.weight"] = stage.norm.weight.detach()
        weights[f"up_projection.decode.{s}.1.bias"] = stage.norm.bias.detach()
    weights["up_projection.decode.4.weight"] = seg.decoder.classifier.weight.detach()
    weights["up_projection.decode.4.bias"] = seg.decoder.classifier.bias.detach()
    torch.save({"network_weights": weights}, tmp_path / "ck.pth")
    with pytest.raises(CheckpointError, match="--blocks"):
        convert_checkpoint(tmp_path / "ck.pth", tmp_path / "o", aggregation_layers=[1, 3])
