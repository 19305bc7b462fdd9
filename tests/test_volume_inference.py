"""Whole-volume segmentation: geometry, sliding windows, TTA, memory bounds, and the CLI around it."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor
from meddinov3_hf.cli import main as cli_main
from meddinov3_hf.image_processing_meddinov3 import CT_MEAN, CT_STD
from meddinov3_hf.volumes import inference
from meddinov3_hf.volumes.inference import VolumeSegmenter, gaussian_weights, plan_jobs, tile_starts
from meddinov3_hf.volumes.io import load_volume


class ThresholdModel(torch.nn.Module):
    """Pointwise stand-in: class 1 where HU > 300, else 0 — whatever tile or flip it sees."""

    def __init__(self, image_size=32):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.config = SimpleNamespace(num_labels=2, patch_size=16, image_size=image_size)
        self.calls = []

    def forward(self, pixel_values):
        self.calls.append(tuple(pixel_values.shape))
        hu = pixel_values * (CT_STD + 1e-8) + CT_MEAN
        fg = (hu - 300.0) * self.scale
        return SimpleNamespace(logits=torch.cat([-fg, fg], dim=1))


def _scan(shape_xyz=(37, 29, 6), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 50, shape_xyz).astype(np.int16) - 200
    data[:2] = -1000  # air at the border, as in any CT
    data[5:12, 3:9, 1:4] = 800  # an off-centre "bone" block
    data[-4:, -3:, -1] = 900
    return data


AFFINES = {
    "RAS": np.diag([0.8, 0.9, 2.5, 1.0]),
    "LPS": np.diag([-0.8, -0.9, 2.5, 1.0]),
    "permuted": np.array([[0, 0, 2.5, 0], [0.8, 0, 0, 0], [0, -0.9, 0, 0], [0, 0, 0, 1.0]]),
}
_c, _s = np.cos(0.35), np.sin(0.35)
AFFINES["oblique"] = np.array(
    [[0.8 * _c, -0.9 * _s, 0, 1], [0.8 * _s, 0.9 * _c, 0, 2], [0, 0, 2.5, 3], [0, 0, 0, 1]]
)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_labels_overlay_the_scan_for_any_orientation(tmp_path, name):
    data = _scan()
    if name == "permuted":
        data = np.transpose(data, (2, 0, 1)).copy()
    nib.save(nib.Nifti1Image(data, AFFINES[name]), tmp_path / "scan.nii.gz")
    volume = load_volume(tmp_path / "scan.nii.gz")
    segmenter = VolumeSegmenter(ThresholdModel(), MedDINOv3ImageProcessor(), batch_size=3)
    result = segmenter.segment(volume)
    from meddinov3_hf.volumes.io import save_labels

    save_labels(result.labels, volume, tmp_path / "labels.nii.gz")
    saved = nib.load(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), (data > 300).astype(np.uint8))
    np.testing.assert_allclose(saved.affine, AFFINES[name], atol=1e-6)
    assert saved.get_data_dtype() == np.uint8


def test_sliding_window_covers_large_slices_and_blends():
    assert tile_starts(32, 32) == [0] and tile_starts(20, 32) == [0]
    starts = tile_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 68 and all(b - a <= 16 for a, b in zip(starts, starts[1:]))
    weights = gaussian_weights((32, 32))
    assert weights.max() == 1 and weights.min() > 0 and weights[16, 16] > weights[0, 0]
    model = ThresholdModel(image_size=32)
    hu = torch.from_numpy(_scan((3, 70, 90)).astype(np.float32))
    logits = VolumeSegmenter(model, batch_size=4).predict_slices(hu, (1.0, 1.0))
    assert logits.shape == (3, 2, 70, 90)
    assert torch.equal(logits.argmax(1), (hu > 300).long())
    assert all(call[-2:] == (32, 32) for call in model.calls) and max(c[0] for c in model.calls) <= 4


def test_small_slices_are_padded_to_the_tile_not_shrunk():
    model = ThresholdModel(image_size=64)
    hu = torch.from_numpy(_scan((2, 20, 24)).astype(np.float32))
    logits = VolumeSegmenter(model).predict_slices(hu, (1.0, 1.0))
    assert model.calls == [(2, 1, 64, 64)] and logits.shape == (2, 2, 20, 24)


def test_working_spacing_resampling_round_trip():
    processor = MedDINOv3ImageProcessor(target_spacing=[0.5, 0.5])
    segmenter = VolumeSegmenter(ThresholdModel(image_size=64), processor)
    assert segmenter.working_shape((60, 40), (1.0, 1.0)) == (120, 80)
    hu = torch.full((1, 60, 40), -200.0)
    hu[0, 10:40, 8:30] = 800
    labels = segmenter.predict_slices(hu, (1.0, 1.0)).argmax(1)[0]
    truth = hu[0] > 300
    dice = 2 * (labels.bool() & truth).sum() / (labels.sum() + truth.sum())
    assert dice > 0.97


def test_tta_is_flip_equivariant_on_a_real_model():
    torch.manual_seed(0)
    model = MedDINOv3ForSemanticSegmentation(tiny_config(image_size=32)).eval()
    hu = torch.randn(2, 32, 48) * 400
    tta = VolumeSegmenter(model, tta=True)
    plain = VolumeSegmenter(model, tta=False)
    a = tta.predict_slices(hu, (1.0, 1.0))
    b = tta.predict_slices(hu.flip(-1), (1.0, 1.0)).flip(-1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, plain.predict_slices(hu, (1.0, 1.0)), atol=1e-4)


def test_memory_is_bounded_per_chunk(monkeypatch):
    model = ThresholdModel(image_size=32)
    segmenter = VolumeSegmenter(model, batch_size=4)
    chunks = list(segmenter._chunks(1000, 512, 512))
    assert max(c.stop - c.start for c in chunks) * 2 * 512 * 512 <= 64 * 1024 * 1024
    assert chunks[0].start == 0 and chunks[-1].stop == 1000
    monkeypatch.setattr(inference, "_MEMMAP_THRESHOLD", 10)
    volume = load_volume(
        _scan((8, 20, 20)).astype(np.float32).transpose(2, 1, 0).copy(), spacing=(1.0, 1.0, 1.0)
    )
    result = segmenter.segment(volume, return_probabilities=True)
    assert isinstance(result.probabilities, np.memmap) and result.probabilities.dtype == np.float16
    np.testing.assert_allclose(result.probabilities.astype(np.float32).sum(0), 1.0, atol=1e-3)


# -- CLI ------------------------------------------------------------------------------------------------------
def _write_scan(path, affine=AFFINES["LPS"], shape=(37, 29, 6)):
    nib.save(nib.Nifti1Image(_scan(shape), affine), path)
    return path


def _segment(source, output, model, *flags: str) -> int:
    """`meddinov3 segment -i SOURCE -o OUTPUT --model MODEL --quiet FLAGS...` → exit code."""
    return cli_main(
        ["segment", "-i", str(source), "-o", str(output), "--model", str(model), "--quiet", *flags]
    )


def test_cli_segment_file_with_probabilities(tmp_path, model_dir):
    scan = _write_scan(tmp_path / "scan.nii.gz")
    before = scan.read_bytes()
    code = _segment(
        str(scan),
        str(tmp_path / "out" / "seg.nii.gz"),
        str(model_dir),
        "--tta",
        "--save-probabilities",
        "--batch-size",
        "2",
    )
    assert code == 0 and scan.read_bytes() == before
    labels = nib.load(tmp_path / "out" / "seg.nii.gz")
    assert labels.shape == (37, 29, 6) and labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, AFFINES["LPS"])
    probs = nib.load(tmp_path / "out" / "seg_probabilities.nii.gz")
    assert probs.shape == (37, 29, 6, 3)
    np.testing.assert_array_equal(np.asanyarray(labels.dataobj), probs.get_fdata().argmax(-1))


def test_cli_segment_folder_and_evaluate(tmp_path, model_dir, capsys):
    (tmp_path / "in").mkdir()
    for i in range(2):
        _write_scan(tmp_path / "in" / f"case{i}_0000.nii.gz")
    assert _segment(str(tmp_path / "in"), str(tmp_path / "pred"), str(model_dir)) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "case0.labels.json", "case0.nii.gz", "case1.labels.json", "case1.nii.gz"
    ]  # fmt: skip
    code = cli_main(
        [
            "evaluate",
            "--pred",
            str(tmp_path / "pred"),
            "--gt",
            str(tmp_path / "pred"),
            "-o",
            str(tmp_path / "metrics.json"),
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mean"]["mean"]["dice"] == pytest.approx(1.0)
    assert (tmp_path / "metrics.csv").read_text().startswith("case,")


def test_cli_segment_on_two_processes(tmp_path, model_dir):
    (tmp_path / "in").mkdir()
    for i in range(3):
        _write_scan(tmp_path / "in" / f"c{i}.nii.gz")
    assert _segment(str(tmp_path / "in"), str(tmp_path / "one"), str(model_dir)) == 0
    assert _segment(str(tmp_path / "in"), str(tmp_path / "two"), str(model_dir), "--device", "cpu, cpu") == 0
    for i in range(3):
        a = np.asanyarray(nib.load(tmp_path / "one" / f"c{i}.nii.gz").dataobj)
        b = np.asanyarray(nib.load(tmp_path / "two" / f"c{i}.nii.gz").dataobj)
        np.testing.assert_array_equal(a, b)


def test_cli_dicom_series_input(tmp_path, model_dir):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    series = generate_uid()
    (tmp_path / "dicom").mkdir()
    for z in range(4):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(tmp_path / f"{z}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.Rows, ds.Columns, ds.PixelSpacing = 24, 20, [0.9, 0.8]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * z]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = (np.random.default_rng(z).integers(0, 1800, (24, 20))).astype(np.int16).tobytes()
        ds.save_as(tmp_path / "dicom" / f"{z}.dcm", enforce_file_format=True)
    assert _segment(str(tmp_path / "dicom"), str(tmp_path / "seg.nii.gz"), str(model_dir)) == 0
    volume = load_volume(tmp_path / "dicom")
    saved = nib.load(tmp_path / "seg.nii.gz")
    np.testing.assert_allclose(saved.affine, volume.affine, atol=1e-5)
    assert saved.shape == volume.original_shape


@pytest.mark.parametrize(
    "case,match",
    [
        ("text", "scan.nii.gz"),
        ("2d", "2-D|3-D|dimension"),
        ("same", "overwrite"),
        ("backbone", "no segmentation head"),
        ("missing", "no such file"),
    ],
)
def test_cli_segment_bad_input(tmp_path, model_dir, capsys, case, match):
    scan = tmp_path / "scan.nii.gz"
    model = model_dir
    output = tmp_path / "seg.nii.gz"
    if case == "text":
        scan.write_text("not a nifti")
    elif case == "2d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), scan)
    else:
        _write_scan(scan)
    if case == "same":
        output = scan
    if case == "backbone":
        from meddinov3_hf import MedDINOv3Model

        model = tmp_path / "backbone"
        MedDINOv3Model(tiny_config()).save_pretrained(model)
    if case == "missing":
        scan = tmp_path / "nothing.nii.gz"
    before = scan.read_bytes() if scan.exists() else None
    code = _segment(str(scan), str(output), str(model))
    assert code != 0
    assert __import__("re").search(match, capsys.readouterr().err)
    if case != "same":
        assert not output.exists()
    if before is not None:
        assert scan.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "tmp" in p.name]


def test_cli_evaluate_shape_mismatch(tmp_path, capsys):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 5), np.uint8), np.eye(4)), tmp_path / "b.nii.gz")
    assert (
        cli_main(["evaluate", "--pred", str(tmp_path / "a.nii.gz"), "--gt", str(tmp_path / "b.nii.gz")]) != 0
    )
    err = capsys.readouterr().err
    assert "a.nii.gz" in err and "b.nii.gz" in err


def _features(scan, model, output, *flags: str) -> int:
    return cli_main(["features", "-i", str(scan), "--model", str(model), "-o", str(output), *flags])


def test_cli_pictures(tmp_path, model_dir):
    from PIL import Image

    scan = _write_scan(tmp_path / "scan.nii.gz")
    labels = np.zeros((37, 29, 6), np.uint8)
    labels[5:12, 3:9, 1:4] = 1
    nib.save(nib.Nifti1Image(labels, AFFINES["LPS"]), tmp_path / "labels.nii.gz")
    assert (
        cli_main(
            [
                "overlay",
                "-i",
                str(scan),
                "--labels",
                str(tmp_path / "labels.nii.gz"),
                "-o",
                str(tmp_path / "overlay.png"),
                "--names",
                "1=bone",
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "overlay.png") as picture:
        image = np.asarray(picture)
    assert image.ndim == 3 and (image[..., 0] > image[..., 1] + 40).any()  # red label pixels present
    assert _features(scan, model_dir, str(tmp_path / "pca.png"), "--size", "64", "--slice", "2") == 0
    with Image.open(tmp_path / "pca.png") as pca:
        assert pca.size == (128, 64)
    assert _features(scan, model_dir, str(tmp_path / "x.png"), "--slice", "99") == 2


def test_plan_jobs_validation(tmp_path):
    scan = _write_scan(tmp_path / "scan.nii.gz")
    with pytest.raises(ValueError, match="nii"):
        plan_jobs(scan, tmp_path / "out_folder")


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "meddinov3_hf.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "segment" in out.stdout
