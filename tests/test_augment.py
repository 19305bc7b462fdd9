"""Training / evaluation slice transforms: geometry, label safety, determinism, oversampling, speed."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddinov3_hf.data.augment import (
    AIR_HU,
    NO_AUGMENTATION,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    sample_generator,
    spacing_for_patch,
)
from meddinov3_hf.data.synthetic import make_synthetic_ct
from meddinov3_hf.image_processing_meddinov3 import normalize_hu

NO_AUG = dict(NO_AUGMENTATION, oversample_foreground=0.0)
ALL_AUG = dict(
    oversample_foreground=0.5,
    p_rotation=1.0,
    p_scale=1.0,
    p_noise=1.0,
    p_blur=1.0,
    p_brightness=1.0,
    p_contrast=1.0,
    p_lowres=1.0,
    p_gamma=1.0,
    p_gamma_inverted=1.0,
    p_mirror=0.5,
)


@pytest.fixture(scope="module")
def ct_slice() -> tuple[torch.Tensor, torch.Tensor]:
    hu, labels = make_synthetic_ct((8, 96, 80), (2.5, 0.8, 0.8), seed=11, n_organs=5)
    z = int(np.argmax([len(np.unique(labels[i])) for i in range(8)]))  # slice with most classes
    return torch.from_numpy(hu[z]), torch.from_numpy(labels[z])


def test_output_shapes_and_label_values(ct_slice):
    hu, lab = ct_slice
    t = SegmentationTrainTransform(patch_size=64, target_spacing=0.5, **ALL_AUG)
    for i in range(10):
        x, y = t(hu, lab, (0.8, 0.8), sample_generator(0, 0, i))
        assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert y.shape == (64, 64) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(lab.unique().tolist())  # nearest: no invented labels


def test_deterministic_per_seed(ct_slice):
    hu, lab = ct_slice
    t = SegmentationTrainTransform(patch_size=48, target_spacing=0.6, **ALL_AUG)
    a = t(hu, lab, (0.8, 0.8), sample_generator(1, 3, 7))
    b = t(hu, lab, (0.8, 0.8), sample_generator(1, 3, 7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (sample_generator(2, 3, 7), sample_generator(1, 4, 7), sample_generator(1, 3, 8)):
        c = t(hu, lab, (0.8, 0.8), other)
        assert not torch.equal(a[0], c[0])


def test_identity_when_all_probabilities_zero(ct_slice):
    hu, lab = ct_slice
    t = SegmentationTrainTransform(patch_size=(40, 32), target_spacing=None, **NO_AUG)
    x, y = t(hu, lab, (0.8, 0.8), sample_generator(0, 0, 3))
    ref = normalize_hu(hu.float())
    # The output must be an exact crop of the normalised input at some integer offset.
    matches = [
        (oy, ox)
        for oy in range(hu.shape[0] - 40 + 1)
        for ox in range(hu.shape[1] - 32 + 1)
        if torch.allclose(x[0], ref[oy : oy + 40, ox : ox + 32], atol=1e-5)
    ]
    assert len(matches) == 1
    oy, ox = matches[0]
    assert torch.equal(y, lab[oy : oy + 40, ox : ox + 32].long())


def test_resampling_matches_interpolate(ct_slice):
    hu, lab = ct_slice
    x, y = SegmentationEvalTransform(None, target_spacing=0.4)(hu, lab, (0.8, 0.8))
    assert x.shape == (1, 192, 160)  # 2x upsampled (already a multiple of 16)
    ref = normalize_hu(F.interpolate(hu.float()[None, None], scale_factor=2, mode="bilinear")[0, 0])
    # Same sampling positions as F.interpolate(align_corners=False); the outermost ring differs only
    # because outside the slice is air instead of edge replication.
    assert torch.allclose(x[0, 1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-4)
    ref_lab = F.interpolate(lab.float()[None, None], scale_factor=2, mode="nearest-exact")[0, 0].long()
    assert torch.equal(y, ref_lab)


def test_anisotropic_spacing_becomes_isotropic():
    hu = torch.full((30, 60), 40, dtype=torch.int16)
    t = SegmentationEvalTransform(None, target_spacing=1.0)
    x, _ = t(hu, None, (1.0, 0.5))
    assert t.resampled_hw((30, 60), (1.0, 0.5)) == (30, 30)
    assert x.shape == (1, 32, 32)  # padded to a multiple of 16 at the bottom/right
    air = normalize_hu(torch.tensor(AIR_HU))
    assert torch.allclose(x[0, :30, :30], normalize_hu(torch.tensor(40.0)))
    assert torch.allclose(x[0, 30:], air) and torch.allclose(x[0, :, 30:], air)


def test_padding_small_slice_train_and_eval():
    hu = torch.randint(-200, 300, (20, 24), dtype=torch.int16)
    lab = torch.ones((20, 24), dtype=torch.uint8) * 2
    air = normalize_hu(torch.tensor(AIR_HU))
    for i in range(5):
        x, y = SegmentationTrainTransform(32, None, **NO_AUG)(hu, lab, (1.0, 1.0), sample_generator(0, 0, i))
        assert (y == 2).sum() == 20 * 24 and set(y.unique().tolist()) == {0, 2}
        assert torch.allclose(x[0][y == 0], air)  # padding is air
        rows, cols = (y == 2).nonzero()[:, 0], (y == 2).nonzero()[:, 1]
        crop = x[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert torch.allclose(crop, normalize_hu(hu.float()), atol=1e-5)  # image copied unchanged
    x, y = SegmentationEvalTransform(32)(hu, lab, (1.0, 1.0))
    assert torch.allclose(x[0, 6:26, 4:28], normalize_hu(hu.float()), atol=1e-5)  # centred
    assert int((y == 2).sum()) == 20 * 24 and torch.equal(y[6:26, 4:28], lab.long())


def _blob_slice(size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    hu = torch.zeros((size, size), dtype=torch.int16)
    lab = torch.zeros((size, size), dtype=torch.uint8)
    lab[100:103, 15:18] = 1  # tiny foreground far from the centre
    return hu, lab


@pytest.mark.parametrize(("p", "n"), [(0.0, 200), (0.33, 800), (1.0, 100)])
def test_foreground_oversampling_rate(p: float, n: int):
    hu, lab = _blob_slice()
    t = SegmentationTrainTransform(16, None, **{**NO_AUG, "oversample_foreground": p})
    hits = sum(bool((t(hu, lab, (1.0, 1.0), sample_generator(5, 0, i))[1] > 0).any()) for i in range(n))
    # Random crops contain the 3x3 blob with probability ((16 + 2) / 113)^2 ≈ 0.025.
    expected = p + (1 - p) * 0.025
    assert abs(hits / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 0.01


def test_oversampled_patch_is_centred_on_foreground():
    hu, lab = _blob_slice()
    t = SegmentationTrainTransform(16, None, **{**NO_AUG, "oversample_foreground": 1.0})
    for i in range(20):
        _, y = t(hu, lab, (1.0, 1.0), sample_generator(0, 0, i))
        ys, xs = (y > 0).nonzero(as_tuple=True)
        assert abs(ys.float().mean() - 7.5) <= 1.5 and abs(xs.float().mean() - 7.5) <= 1.5


def test_rotation_by_90_degrees_and_mirroring_are_exact():
    hu = torch.randint(-1000, 1000, (32, 32), dtype=torch.int16)
    lab = torch.randint(0, 4, (32, 32), dtype=torch.uint8)
    quarter = {**NO_AUG, "p_rotation": 1.0, "rotation_range": (math.pi / 2, math.pi / 2)}
    x, y = SegmentationTrainTransform(32, None, **quarter)(hu, lab, (1.0, 1.0), sample_generator(0, 0, 0))
    ref = normalize_hu(hu.float())
    candidates = [k for k in (1, 3) if torch.allclose(x[0], torch.rot90(ref, k), atol=1e-4)]
    assert len(candidates) == 1 and torch.equal(y, torch.rot90(lab.long(), candidates[0]))
    mirror = {**NO_AUG, "p_mirror": 1.0}
    x, y = SegmentationTrainTransform(32, None, **mirror)(hu, lab, (1.0, 1.0), sample_generator(0, 0, 0))
    assert torch.allclose(x[0], torch.flip(ref, (0, 1)), atol=1e-5)
    assert torch.equal(y, torch.flip(lab.long(), (0, 1)))


def test_scaling_changes_field_of_view():
    hu = torch.zeros((128, 128), dtype=torch.int16)
    lab = torch.zeros((128, 128), dtype=torch.uint8)
    lab[48:80, 48:80] = 1
    zoom_out = {**NO_AUG, "p_scale": 1.0, "scale_range": (2.0, 2.0)}
    eval_t = SegmentationEvalTransform(64)
    _, y_plain = eval_t(hu, lab, (1.0, 1.0))
    t = SegmentationTrainTransform(64, None, **zoom_out)
    _, y = t(hu, lab, (1.0, 1.0), sample_generator(0, 0, 0))
    assert int(y_plain.sum()) == 32 * 32
    assert abs(int(y.sum()) - 16 * 16) <= 40  # twice the field of view: a quarter of the area


def test_intensity_augmentations_keep_statistics_reasonable(ct_slice):
    hu, lab = ct_slice
    plain = SegmentationTrainTransform(64, None, **NO_AUG)
    gamma_only = SegmentationTrainTransform(64, None, **{**NO_AUG, "p_gamma": 1.0})
    x0, _ = plain(hu, lab, (0.8, 0.8), sample_generator(0, 0, 0))
    x1, _ = gamma_only(hu, lab, (0.8, 0.8), sample_generator(0, 0, 0))
    assert not torch.allclose(x0, x1)
    assert torch.allclose(x0.mean(), x1.mean(), atol=1e-3) and torch.allclose(x0.std(), x1.std(), atol=1e-3)
    contrast = SegmentationTrainTransform(64, None, **{**NO_AUG, "p_contrast": 1.0})
    x2, _ = contrast(hu, lab, (0.8, 0.8), sample_generator(0, 0, 0))
    assert x2.min() >= x0.min() - 1e-5 and x2.max() <= x0.max() + 1e-5  # range preserved


def test_invalid_arguments():
    with pytest.raises(ValueError, match="p_blur"):
        SegmentationTrainTransform(p_blur=1.5)
    with pytest.raises(ValueError, match="spacing_yx"):
        SegmentationTrainTransform(32)(torch.zeros(8, 8), torch.zeros(8, 8), (0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        SegmentationTrainTransform(32)(torch.zeros(8, 8), torch.zeros(8, 9), (1.0, 1.0))
    assert spacing_for_patch(0.78125) == pytest.approx(0.4464285714)


def test_transforms_on_a_decoded_slice_dataset_row(tmp_path: Path):
    from meddinov3_hf.data.slices import build_slice_dataset, decode_row
    from meddinov3_hf.data.synthetic import write_nnunet_dataset

    root = write_nnunet_dataset(tmp_path / "ds", n_cases=1, shape=(4, 40, 48), spacing=(3.0, 0.9, 0.9))
    ds = build_slice_dataset(root, cache_dir=tmp_path / "cache")
    hu, label, spacing = decode_row(ds[2])
    assert hu.shape == label.shape == (40, 48) and spacing == pytest.approx((0.9, 0.9))
    hu, label = torch.from_numpy(hu.copy()), torch.from_numpy(label.copy())
    x, y = SegmentationTrainTransform(32, 0.6)(
        hu, label, spacing, sample_generator(0, 0, 2), ds[2]["classes"]
    )
    assert x.shape == (1, 32, 32) and y.shape == (32, 32)
    x, y = SegmentationEvalTransform(None, 0.9)(hu, label, spacing)
    assert x.shape == (1, 48, 48) and y is not None and y.shape == (48, 48)


def test_target_spacing_is_one_per_axis_tuple_everywhere():
    """One value means both axes; the transforms, the processor and its resampled shape agree."""
    from meddinov3_hf.image_processing_meddinov3 import MedDINOv3ImageProcessor, as_target_spacing

    assert (
        as_target_spacing(0.6) == as_target_spacing([0.6]) == (0.6, 0.6) and as_target_spacing(None) is None
    )
    assert SegmentationTrainTransform(32, 0.6).target_spacing == (0.6, 0.6)
    anisotropic = SegmentationEvalTransform(None, (1.0, 0.5))
    processor = MedDINOv3ImageProcessor(target_spacing=[1.0, 0.5])
    assert processor.target_spacing == (1.0, 0.5)
    for shape, spacing in (((30, 60), (1.0, 0.5)), ((37, 29), (0.8, 0.7)), ((5, 3), (0.1, 0.1))):
        assert anisotropic.resampled_hw(shape, spacing) == processor.resampled_shape(shape, spacing)
    assert processor.resampled_shape((37, 29), (0.8, 0.7)) == (round(37 * 0.8), round(29 * 0.7 / 0.5))
    hu = torch.zeros(30, 60)
    x, _ = anisotropic(hu, None, (1.0, 0.25))
    assert x.shape == (1, 32, 32)  # (30, 30) padded to the multiple of 16
    for bad in (0.0, -1.0, (1.0, 2.0, 3.0), float("nan")):
        with pytest.raises(ValueError, match="target_spacing"):
            SegmentationTrainTransform(32, bad)


def test_throughput_512_to_896():
    hu, lab = make_synthetic_ct((1, 512, 512), (2.5, 0.78125, 0.78125), seed=0)
    hu_t, lab_t = torch.from_numpy(hu[0]), torch.from_numpy(lab[0])
    t = SegmentationTrainTransform(896, spacing_for_patch(0.78125))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t(hu_t, lab_t, (0.78125, 0.78125), sample_generator(0, 0, 0))  # warm-up
        start = time.perf_counter()
        n = 10
        for i in range(n):
            x, _ = t(hu_t, lab_t, (0.78125, 0.78125), sample_generator(0, 0, i))
        per_sample = (time.perf_counter() - start) / n
    finally:
        torch.set_num_threads(threads)
    assert x.shape == (1, 896, 896)
    print(f"train transform 512^2 -> 896^2: {per_sample * 1e3:.1f} ms/sample on one thread")
    assert per_sample < 0.5  # target < 40 ms; loose bound because the test machine is shared
