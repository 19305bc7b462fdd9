"""CT image processor: HU handling (never 8-bit), windows, resizing, DICOM, post-processing, bad input."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from transformers import AutoImageProcessor

from meddinov3_hf import MedDINOv3ImageProcessor
from meddinov3_hf.image_processing_meddinov3 import CT_MEAN, CT_STD, WINDOW_PRESETS

CT_SMALL = get_testdata_file("CT_small.dcm")


def test_reference_normalisation_on_int16_hu():
    hu = np.array([[-2000, -1000, 0], [65, 1000, 3000]], dtype=np.int16)
    hu = np.tile(hu, (8, 8))  # 16×24, already multiples of 16 after rounding → no resize
    out = MedDINOv3ImageProcessor(size={"height": 16, "width": 24})(hu)["pixel_values"]
    assert out.shape == (1, 1, 16, 24) and out.dtype == torch.float32
    expected = (np.clip(hu.astype(np.float64), -1000, 1000) - CT_MEAN) / (CT_STD + 1e-8)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_hu_resolution_is_not_quantised_to_8_bit():
    hu = np.linspace(-1000, 1000, 32 * 32, dtype=np.float32).reshape(32, 32)
    out = MedDINOv3ImageProcessor()(hu)["pixel_values"][0, 0]
    assert len(torch.unique(out)) == 32 * 32  # 8-bit would leave at most 256 levels
    assert torch.allclose(out * (CT_STD + 1e-8) + CT_MEAN, torch.from_numpy(hu), atol=1e-3)


@pytest.mark.parametrize("name", sorted(WINDOW_PRESETS))
def test_window_presets_map_to_minus_one_one(name):
    level, width = WINDOW_PRESETS[name]
    hu = np.array(
        [[level - width, level - width / 2, level, level + width / 2, level + width] * 16] * 16, np.float32
    )
    out = MedDINOv3ImageProcessor(window=name)(hu)["pixel_values"][0, 0, 0, :5]
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))


def test_custom_window_and_errors():
    processor = MedDINOv3ImageProcessor(window=(0, 200))
    assert processor.clip_range == [-100.0, 100.0] and processor.image_std == 100.0
    with pytest.raises(ValueError, match="unknown window"):
        MedDINOv3ImageProcessor(window="kidney-ish")
    with pytest.raises(ValueError, match="width"):
        MedDINOv3ImageProcessor(window=(0, -5))


def test_batches_channels_and_nearest_multiple_of_16():
    batch = torch.full((3, 1, 100, 70), -500, dtype=torch.int16)
    out = MedDINOv3ImageProcessor()(batch)["pixel_values"]
    assert out.shape == (3, 1, 96, 64)
    out3 = MedDINOv3ImageProcessor(num_output_channels=3)(batch.numpy())["pixel_values"]
    assert out3.shape == (3, 3, 96, 64) and torch.equal(out3[:, 0], out3[:, 2])
    listed = MedDINOv3ImageProcessor(size={"height": 32, "width": 32})(
        [np.zeros((40, 50)), np.zeros((20, 20))]
    )
    assert listed["pixel_values"].shape == (2, 1, 32, 32)


def test_resize_is_antialiased_torch():
    stripes = np.tile(np.array([-1000.0, 1000.0], np.float32), (64, 32))  # 1-pixel stripes, 64×64
    out = MedDINOv3ImageProcessor(size={"height": 16, "width": 16})(stripes)["pixel_values"][0, 0]
    hu = out * (CT_STD + 1e-8) + CT_MEAN
    assert hu.std() < 50  # antialiasing averages the stripes; plain bilinear would alias to ±1000


def test_target_spacing_resamples_by_physical_size():
    processor = MedDINOv3ImageProcessor(target_spacing=[0.4464, 0.4464])
    out = processor(np.zeros((512, 512), np.int16) - 1000, spacing=(0.78125, 0.78125))["pixel_values"]
    assert out.shape == (1, 1, 896, 896)  # the 896 rule of the reference fine-tuning


def test_dicom_file_and_dataset_give_rescaled_hu():
    ds = pydicom.dcmread(CT_SMALL)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    processor = MedDINOv3ImageProcessor()
    from_path = processor(CT_SMALL)["pixel_values"][0, 0]
    from_dataset = processor(ds)["pixel_values"][0, 0]
    torch.testing.assert_close(from_path, from_dataset)
    expected = (np.clip(hu, -1000, 1000) - CT_MEAN) / (CT_STD + 1e-8)
    np.testing.assert_allclose(from_path.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert hu.min() < -100  # a real CT slice with air/fat: proves the rescale intercept was applied


def test_dicom_spacing_is_used_for_target_spacing():
    ds = pydicom.dcmread(CT_SMALL)
    row, col = (float(v) for v in ds.PixelSpacing)
    out = MedDINOv3ImageProcessor(target_spacing=[row * 2, col * 2])(ds)["pixel_values"]
    assert out.shape[-2:] == (64, 64)  # 128×128 at twice the spacing


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((2, 3, 4, 5, 6)), "expected a CT slice"),
        (np.array([[np.nan, 0.0]] * 16), "NaN"),
        (np.array([[np.inf, 0.0]] * 16), "NaN or infinite"),
        (np.array([["a", "b"]]), "numeric"),
        ("missing-file.dcm", "cannot read"),
    ],
)
def test_bad_input_raises_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MedDINOv3ImageProcessor()(bad)


def test_eight_bit_pictures_warn():
    with pytest.warns(UserWarning, match="8-bit"):
        MedDINOv3ImageProcessor()(np.full((16, 16), 128, np.uint8))


def test_post_process_semantic_segmentation_resizes_logits():
    logits = torch.zeros(2, 3, 8, 8)
    logits[0, 2, :, 4:] = 5
    logits[1, 1] = 5
    maps = MedDINOv3ImageProcessor().post_process_semantic_segmentation(
        type("Out", (), {"logits": logits})(), target_sizes=[(16, 16), (4, 6)]
    )
    assert maps[0].shape == (16, 16) and maps[1].shape == (4, 6)
    assert (maps[0][:, :7] == 0).all() and (maps[0][:, 9:] == 2).all() and (maps[1] == 1).all()
    with pytest.raises(ValueError, match="target sizes"):
        MedDINOv3ImageProcessor().post_process_semantic_segmentation(logits, target_sizes=[(4, 4)])


def test_save_load_round_trip(tmp_path):
    processor = MedDINOv3ImageProcessor(window="liver", target_spacing=[0.5, 0.5], num_output_channels=3)
    processor.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "meddinov3"}')
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MedDINOv3ImageProcessor)
    assert loaded.clip_range == processor.clip_range and loaded.target_spacing == (0.5, 0.5)
    assert loaded.num_output_channels == 3 and loaded.window == "liver"
    hu = np.random.default_rng(0).normal(0, 300, (32, 32))
    torch.testing.assert_close(loaded(hu)["pixel_values"], processor(hu)["pixel_values"])
