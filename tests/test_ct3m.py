"""CT-3M builder, resume, streaming and publishing on small generated NIfTI / DICOM volumes."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from meddinov3_hf.data import ct3m
from meddinov3_hf.data.ct3m import (
    CT3MSliceStream,
    CT3MSource,
    build_ct3m,
    decode_slice,
    load_ct3m,
    parse_source,
    push_to_hub,
)
from meddinov3_hf.volumes.io import load_volume

REPO = Path(__file__).resolve().parents[1]


def _phantom(shape: tuple[int, int, int], seed: int, air_slices=(), sparse_slices=()) -> np.ndarray:
    """(Z, Y, X) int16 HU: air, a soft-tissue ellipse with noise and a bone spot; some slices all air,
    some with a body fraction far below 5 %."""
    z, y, x = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.35 * x)) ** 2 <= 1
    vol = np.full(shape, -1000, np.int16)
    for k in range(z):
        if k in air_slices:
            continue
        if k in sparse_slices:
            vol[k, :2, :2] = 40  # 4 pixels: < 5 % body
            continue
        vol[k][body] = 40 + rng.integers(-60, 60, int(body.sum()))
        vol[k, y // 2, x // 2] = 700
    return vol


def _write_nifti(path: Path, vol_zyx: np.ndarray, spacing=(2.5, 0.8, 0.7)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sz, sy, sx = spacing
    # Stored RAS with axes (X, Y, Z): load_volume must flip it into its canonical LPS layout.
    nib.save(nib.Nifti1Image(np.transpose(vol_zyx, (2, 1, 0)), np.diag([sx, sy, sz, 1.0])), path)


def _write_dicom_series(folder: Path, vol_zyx: np.ndarray, spacing=(3.0, 0.9, 0.6)) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for k, sl in enumerate(vol_zyx):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"IM{k:04d}"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.Rows, ds.Columns = sl.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (sl.astype(np.int16) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{k:04d}", enforce_file_format=True)  # no extension: found by DICM magic
    (folder / "notes.txt").write_text("not dicom")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Source A: 3 good volumes (different sizes), a renamed copy, a truncated file and a 2-D file.
    Source B: volumes in nested folders (same file name twice)."""
    root = tmp_path_factory.mktemp("sources")
    a, b = root / "A", root / "B"
    _write_nifti(a / "case_1.nii.gz", _phantom((6, 48, 40), 1, air_slices=(0, 5)))
    _write_nifti(a / "case_2.nii.gz", _phantom((5, 32, 36), 2, sparse_slices=(1,)))
    _write_nifti(a / "sub" / "case_3_0000.nii", _phantom((4, 40, 40), 3))
    shutil.copy(a / "case_1.nii.gz", a / "zz_copy_of_1.nii.gz")  # duplicate content, other name
    _write_nifti(root / "tmp_ok.nii.gz", _phantom((6, 48, 48), 9))
    raw = gzip.decompress((root / "tmp_ok.nii.gz").read_bytes())
    (a / "truncated.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.int16), np.eye(4)), a / "flat2d.nii.gz")
    (a / "readme.txt").write_text("ignored")
    _write_nifti(
        b / "p1" / "image.nii.gz", _phantom((7, 30, 34), 4, air_slices=(6,)), spacing=(1.5, 0.6, 0.6)
    )
    _write_nifti(b / "p2" / "image.nii.gz", _phantom((3, 28, 28), 5))
    return {"root": root, "A": a, "B": b, "sources": [f"A={a}", f"B={b}"]}


def _rows(output: Path) -> list[dict]:
    rows = []
    for shard in sorted((output / "data").glob("train-*.parquet")):
        rows.extend(pq.read_table(shard).to_pylist())
    return rows


def _key(row: dict) -> tuple:
    return (row["source"], row["case_id"], row["slice_index"])


def _expected_keep(hu: np.ndarray) -> list[int]:
    frac = (hu > -500).reshape(hu.shape[0], -1).mean(axis=1)
    return [int(k) for k in np.flatnonzero(frac >= 0.05)]


GOOD = {
    ("A", "case_1"): "A/case_1.nii.gz",
    ("A", "case_2"): "A/case_2.nii.gz",
    ("A", "sub/case_3"): "A/sub/case_3_0000.nii",
    ("B", "p1/image"): "B/p1/image.nii.gz",
    ("B", "p2/image"): "B/p2/image.nii.gz",
}


@pytest.fixture(scope="module")
def reference_build(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ct3m"
    build_ct3m(corpus["sources"], out, max_rows_per_shard=5, volumes_per_task=2, quiet=True)
    return out


def test_lossless_air_rule_and_shards(corpus, reference_build):
    rows = _rows(reference_build)
    keys = [_key(r) for r in rows]
    assert len(keys) == len(set(keys)), "a slice was written twice"
    by_case: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        by_case.setdefault((r["source"], r["case_id"]), {})[r["slice_index"]] = r
    assert set(by_case) == set(GOOD), "duplicate/bad volumes must not produce rows"
    for (source, case), rel in GOOD.items():
        vol = load_volume(corpus["root"] / rel)
        hu16 = vol.hu.astype(np.int16)
        assert sorted(by_case[(source, case)]) == _expected_keep(hu16)
        for z, row in by_case[(source, case)].items():
            img = decode_slice(row)
            assert img.dtype == np.int16 and img.shape == (row["height"], row["width"])
            np.testing.assert_array_equal(img, hu16[z])  # bit-exact HU
            assert row["spacing_z"] == pytest.approx(vol.spacing[0])
            assert (row["spacing_y"], row["spacing_x"]) == pytest.approx(vol.spacing[1:])
            assert row["volume_hash"] == ct3m.volume_hash(hu16)
    # All-air (case_1: 0, 5; p1: 6) and sparse (case_2: 1) slices are gone.
    assert 0 not in by_case[("A", "case_1")] and 5 not in by_case[("A", "case_1")]
    assert 1 not in by_case[("A", "case_2")] and 6 not in by_case[("B", "p1/image")]
    shard_rows = [pq.ParquetFile(p).metadata.num_rows for p in (reference_build / "data").glob("*.parquet")]
    assert max(shard_rows) <= 5 and sum(shard_rows) == len(rows)


def test_manifest_counts(reference_build):
    m = json.loads((reference_build / "manifest.json").read_text())
    assert m["format_version"] == ct3m.FORMAT_VERSION
    assert m["slice_rule"]["air_threshold"] == -500 and m["slice_rule"]["min_body_fraction"] == 0.05
    a, b = m["sources"]["A"], m["sources"]["B"]
    assert (a["volumes_found"], a["volumes_used"], a["volumes_duplicate"], a["volumes_failed"]) == (
        6,
        3,
        1,
        2,
    )
    assert a["duplicates"] == [{"path": "zz_copy_of_1.nii.gz", "duplicate_of": "A:case_1.nii.gz"}]
    failed = {f["path"]: f["error"] for f in a["failed"]}
    assert set(failed) == {"truncated.nii.gz", "flat2d.nii.gz"}
    assert "truncated.nii.gz" in failed["truncated.nii.gz"] and "3-D" in failed["flat2d.nii.gz"]
    assert (a["slices_total"], a["slices_kept"], a["slices_skipped_air"]) == (15, 12, 3)
    assert (b["volumes_found"], b["volumes_used"], b["slices_kept"], b["slices_skipped_air"]) == (2, 2, 9, 1)
    t = m["totals"]
    assert t["slices_kept"] == t["rows"] == 21 and t["volumes_failed"] == 2 and t["volumes_pending"] == 0
    assert sum(s["rows"] for s in m["shards"]) == 21


def test_load_dataset_reads_every_row(reference_build, tmp_path):
    from datasets import load_dataset

    expected = {_key(r) for r in _rows(reference_build)}
    streamed = load_dataset(str(reference_build), split="train", streaming=True)
    seen = [_key(r) for r in streamed]
    assert len(seen) == len(expected) and set(seen) == expected
    files = sorted(str(p) for p in (reference_build / "data").glob("train-*.parquet"))
    generic = load_dataset("parquet", data_files=files, split="train", streaming=True)
    assert sum(1 for _ in generic) == len(expected)
    local = load_dataset(str(reference_build), split="train", cache_dir=str(tmp_path / "cache"))
    assert local.num_rows == len(expected) and local.features["image"].dtype == "binary"
    local.set_transform(ct3m.decode_batch)  # map-free decoding for a non-streaming dataset
    first = local[0]
    assert first["image"].dtype == torch.int16 and tuple(first["image"].shape) == (
        first["height"],
        first["width"],
    )


def test_load_ct3m_torch_shuffle_and_split(reference_build, tmp_path, monkeypatch):
    import datasets

    # datasets sleeps 5 s after a shuffled (interleaved) stream ends, as an arrow shutdown workaround.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)
    rows = {_key(r): decode_slice(r) for r in _rows(reference_build)}
    ds = load_ct3m(reference_build, shuffle_buffer_size=8, seed=1)
    got = list(ds)
    assert {_key(r) for r in got} == set(rows) and len(got) == len(rows)
    for r in got:
        assert isinstance(r["image"], torch.Tensor) and r["image"].dtype == torch.int16
        np.testing.assert_array_equal(r["image"].numpy(), rows[_key(r)])
    parts = [{_key(r) for r in load_ct3m(reference_build, rank=k, world_size=2)} for k in range(2)]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(rows)
    local = load_ct3m(reference_build, streaming=False, cache_dir=str(tmp_path / "c"), as_torch=False)
    assert sorted(_key(r) for r in local) == sorted(rows)
    stream = CT3MSliceStream(reference_build)
    assert sum(1 for _ in torch.utils.data.DataLoader(stream, batch_size=None)) == len(rows)


def test_resume_after_crash(corpus, reference_build, tmp_path):
    out = tmp_path / "ct3m"

    def crash(record):
        raise KeyboardInterrupt("simulated crash after the first task was ledgered")

    with pytest.raises(KeyboardInterrupt):
        build_ct3m(
            corpus["sources"], out, max_rows_per_shard=5, volumes_per_task=2, quiet=True, on_task_done=crash
        )
    ledger = (out / ct3m.STATE_DIR / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 1 and not (out / "manifest.json").exists()
    # Leftovers of a worker killed mid-write, plus a torn ledger line.
    (out / ct3m.STATE_DIR / "tmp" / "train-00042.parquet.123.part").write_bytes(b"PAR1 half")
    (out / "data" / "train-00042.parquet").write_bytes(b"not ledgered")
    (out / "data" / ".train-00043.parquet.abc.tmp.parquet").write_bytes(b"temp")
    with open(out / ct3m.STATE_DIR / "ledger.jsonl", "a") as f:
        f.write('{"chunk": 7, "shards": [{"name": "train-00042.parq')

    manifest = build_ct3m(corpus["sources"], out, max_rows_per_shard=5, volumes_per_task=2, quiet=True)
    rows = _rows(out)
    keys = [_key(r) for r in rows]
    assert len(keys) == len(set(keys))
    ref = _rows(reference_build)
    assert sorted((_key(r), r["image"]) for r in rows) == sorted((_key(r), r["image"]) for r in ref)
    assert not any((out / ct3m.STATE_DIR / "tmp").iterdir())
    assert not (out / "data" / ".train-00043.parquet.abc.tmp.parquet").exists()
    assert {p.name for p in (out / "data").iterdir()} == {s["name"] for s in manifest["shards"]}
    ref_manifest = json.loads((reference_build / "manifest.json").read_text())
    assert manifest["totals"] == ref_manifest["totals"]
    # A finished build re-run is a no-op; changing the slice rule for the folder is refused.
    assert build_ct3m(corpus["sources"], out, quiet=True)["totals"] == manifest["totals"]
    with pytest.raises(ValueError, match="slice rule"):
        build_ct3m(corpus["sources"], out, air_threshold=-300, quiet=True)


def test_parallel_build_matches_serial(corpus, reference_build, tmp_path):
    # Which copy of the duplicated volume survives depends on which worker hashes it first, so rows are
    # compared by content; all other volumes must match exactly, names included.
    out = tmp_path / "par"
    pids: set[int] = set()
    manifest = build_ct3m(
        corpus["sources"],
        out,
        num_workers=2,
        max_rows_per_shard=5,
        volumes_per_task=1,
        quiet=True,
        on_task_done=lambda rec: pids.add(rec["worker_pid"]),
    )
    assert pids and os.getpid() not in pids, "tasks must run in worker processes"
    rows, ref = _rows(out), _rows(reference_build)
    as_set = {(r["volume_hash"], r["slice_index"], r["image"], r["spacing_z"]) for r in rows}
    assert len(rows) == len(ref) and as_set == {
        (r["volume_hash"], r["slice_index"], r["image"], r["spacing_z"]) for r in ref
    }
    assert manifest["totals"]["volumes_duplicate"] == 1 and manifest["totals"]["volumes_failed"] == 2
    non_dup = {_key(r) for r in rows if r["case_id"] not in ("case_1", "zz_copy_of_1")}
    assert non_dup == {_key(r) for r in ref if r["case_id"] != "case_1"}
    shard_rows = [pq.ParquetFile(p).metadata.num_rows for p in (out / "data").glob("*.parquet")]
    assert max(shard_rows) <= 5


def test_dicom_series_source(tmp_path):
    vol = _phantom((5, 30, 26), 7, air_slices=(4,))
    series = tmp_path / "dcm" / "patient1" / "series1"
    _write_dicom_series(series, vol)
    _write_nifti(tmp_path / "dcm" / "patient2.nii.gz", _phantom((3, 20, 20), 8))
    tasks = ct3m.discover_volumes(CT3MSource("D", tmp_path / "dcm"))
    assert [(t.rel_path, t.case_id) for t in tasks] == [
        ("patient1/series1/", "patient1/series1"),
        ("patient2.nii.gz", "patient2"),
    ]
    out = tmp_path / "out"
    manifest = build_ct3m([f"D={tmp_path / 'dcm'}"], out, quiet=True)
    assert manifest["sources"]["D"]["volumes_used"] == 2, manifest["sources"]["D"]["failed"]
    canon = load_volume(series).hu.astype(np.int16)
    dicom_rows = sorted(
        (r for r in _rows(out) if r["case_id"] == "patient1/series1"), key=lambda r: r["slice_index"]
    )
    assert [r["slice_index"] for r in dicom_rows] == _expected_keep(canon) == [0, 1, 2, 3]
    for r in dicom_rows:
        np.testing.assert_array_equal(decode_slice(r), canon[r["slice_index"]])
        assert (r["spacing_z"], r["spacing_y"], r["spacing_x"]) == pytest.approx((3.0, 0.9, 0.6))


class FakeHfApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "commit-url"


def test_push_to_hub_uses_api(reference_build, tmp_path):
    api = FakeHfApi()
    assert push_to_hub(reference_build, "me/ct3m", api=api) == "commit-url"
    (_, create), (_, upload) = api.calls
    assert create["repo_type"] == "dataset" and create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == "me/ct3m" and upload["repo_type"] == "dataset"
    assert upload["folder_path"] == str(reference_build)
    assert not any(ct3m.STATE_DIR in p for p in upload["allow_patterns"])
    with pytest.raises(FileNotFoundError, match="no finished CT-3M build"):
        push_to_hub(tmp_path, "me/ct3m", api=FakeHfApi())


def test_bad_arguments_and_decode_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="NAME=FOLDER"):
        parse_source("no-equals-sign")
    with pytest.raises(ValueError, match="does not exist"):
        parse_source(f"X={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unique"):
        build_ct3m([f"A={corpus['A']}", f"A={corpus['B']}"], tmp_path / "o", quiet=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no CT-3M build"):
        build_ct3m(corpus["sources"], tmp_path / "busy", quiet=True)
    with pytest.raises(ValueError, match="expected 4x4x2"):
        decode_slice(
            {"image": b"\0" * 10, "height": 4, "width": 4, "source": "A", "case_id": "c", "slice_index": 0}
        )


def test_script_help_and_run(corpus, tmp_path):
    script = REPO / "training" / "build_ct3m.py"
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "NAME=FOLDER" in res.stdout and "--num-workers" in res.stdout
    parser = __import__("argparse").ArgumentParser()
    ct3m.add_build_ct3m_arguments(parser)
    args = parser.parse_args([f"B={corpus['B']}", "-o", str(tmp_path / "cli"), "-q"])
    assert ct3m.run_build_ct3m(args) == 0
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["totals"]["rows"] == 9
    bad = parser.parse_args([f"B={tmp_path / 'nope'}", "-o", str(tmp_path / "cli2"), "-q"])
    assert ct3m.run_build_ct3m(bad) == 2
