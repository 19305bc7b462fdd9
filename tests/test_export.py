"""`meddinov3 export --format onnx`: onnxruntime logits equal PyTorch's (fp32, ≤ 1e-4) at fixed and dynamic sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor
from meddinov3_hf.cli import main

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _model_folder(path, rope_precision="fp32"):
    torch.manual_seed(0)
    model = MedDINOv3ForSemanticSegmentation(tiny_config(image_size=64, rope_precision=rope_precision)).eval()
    with torch.no_grad():  # non-trivial decoder biases so that a dropped op shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(path)
    MedDINOv3ImageProcessor(size={"height": 64, "width": 48}).save_pretrained(path)
    return model


def _onnx_logits(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    return session.run(["logits"], {"pixel_values": x.numpy()})[0]


def test_fixed_size_export_matches_pytorch(tmp_path, capsys):
    model = _model_folder(tmp_path / "seg")
    out = tmp_path / "seg.onnx"
    assert main(["export", "--format", "onnx", str(tmp_path / "seg"), str(out)]) == 0
    assert "max abs logits" in capsys.readouterr().out
    x = torch.randn(1, 1, 64, 48)  # the processor's size is the default traced size
    with torch.no_grad():
        expected = model(pixel_values=x).logits.numpy()
    got = _onnx_logits(out, x)
    assert got.shape == expected.shape == (1, 3, 64, 48)
    assert np.abs(got - expected).max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["meddinov3.id2label"]) == {"0": "background", "1": "liver", "2": "kidney"}
    assert json.loads(meta["meddinov3.processor"])["size"] == {"height": 64, "width": 48}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # a fixed graph refuses another size
        session.run(["logits"], {"pixel_values": np.zeros((1, 1, 80, 48), np.float32)})


def test_dynamic_export_matches_pytorch_at_other_sizes_and_batches(tmp_path):
    model = _model_folder(tmp_path / "seg", rope_precision="fp32")
    out = tmp_path / "dyn.onnx"
    code = main(["export", str(tmp_path / "seg"), str(out), "--dynamic", "--height", "32", "--width", "32"])
    assert code == 0
    for shape in [(1, 1, 32, 32), (3, 1, 48, 80), (2, 1, 96, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(pixel_values=x).logits.numpy()
        got = _onnx_logits(out, x)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4, shape


def test_export_refuses_bad_outputs_and_writes_nothing(tmp_path, capsys):
    _model_folder(tmp_path / "seg")
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"keep me")
    assert main(["export", str(tmp_path / "seg"), str(existing)]) != 0
    assert "exists" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert main(["export", str(tmp_path / "seg"), str(tmp_path / "model.pt")]) != 0
    assert ".onnx" in capsys.readouterr().err and not (tmp_path / "model.pt").exists()
    assert main(["export", str(tmp_path / "seg"), str(tmp_path / "seg" / "model.onnx")]) != 0
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "seg"), str(tmp_path / "x.onnx"), "--height", "50"]) != 0
    assert "multiples of the patch size" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx", "seg"]


def test_bf16_rope_emulation_is_bit_exact_and_bf16_models_export(tmp_path):
    # onnxruntime has no bfloat16 arithmetic on CPU, so bf16-RoPE models (the released checkpoint's numerics)
    # are traced with a float32 emulation that must reproduce torch's bfloat16 computation bit for bit.
    from meddinov3_hf.export import _apply_rope_emulated_bf16, _EmulatedBf16Rope
    from meddinov3_hf.modeling_meddinov3 import MedDINOv3RopePositionEmbedding, apply_rope_in_table_dtype

    rope = MedDINOv3RopePositionEmbedding(tiny_config(rope_precision="bf16", hidden_size=64))
    emulated = _EmulatedBf16Rope(rope)
    for size in [(16, 16), (64, 48), (896, 512)]:
        x = torch.zeros(1, 1, *size)
        (cos, sin), (cos_e, sin_e) = rope(x), emulated(x)
        assert cos.dtype == torch.bfloat16
        assert torch.equal(cos.float(), cos_e) and torch.equal(sin.float(), sin_e), size
        q, k = torch.randn(2, 2, 5 + cos.shape[0], 32), torch.randn(2, 2, 5 + cos.shape[0], 32)
        expected, got = (
            apply_rope_in_table_dtype(q, k, cos, sin),
            _apply_rope_emulated_bf16(q, k, cos_e, sin_e),
        )
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1]), size
    model = _model_folder(tmp_path / "seg", rope_precision="bf16")
    out = tmp_path / "bf16.onnx"
    assert main(["export", str(tmp_path / "seg"), str(out), "--dynamic"]) == 0
    x = torch.randn(2, 1, 80, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).logits.numpy()
    assert np.abs(_onnx_logits(out, x) - expected).max() <= 1e-4
    from meddinov3_hf import export, modeling_meddinov3

    with export._onnx_runnable_rope(model):
        assert isinstance(model.meddinov3.rope_embeddings, _EmulatedBf16Rope)
    assert type(model.meddinov3.rope_embeddings) is MedDINOv3RopePositionEmbedding  # restored after tracing
    assert modeling_meddinov3.apply_rope_in_table_dtype is apply_rope_in_table_dtype
