"""CT-3M: build, publish and stream the axial-slice corpus used for MedDINOv3 domain-adaptive pretraining.

Building
--------
:func:`build_ct3m` turns several *sources* (``NAME=FOLDER``; each folder holds NIfTI volumes, searched
recursively, and/or DICOM series, one series per folder that directly contains DICOM files) into a
Hugging Face Parquet dataset::

    OUTPUT/
      README.md                 dataset card; its YAML ``configs`` make ``load_dataset(OUTPUT)`` work
      manifest.json             per-source counts, failures, duplicates, rule parameters, format version
      data/train-00000.parquet  shards (``data/train-*.parquet``)
      .ct3m_build/              resume state (ledger, params, lock); never uploaded

Rows are axial slices of volumes loaded by :func:`meddinov3_hf.volumes.io.load_volume` (canonical
orientation). Columns:

========================  ===========  =============================================================
``image``                 binary       raw little-endian int16 HU, C-order ``(height, width)``
``height``, ``width``     int32        slice size (any size; differs between volumes)
``spacing_y/x/z``         float32      mm; ``spacing_z`` is the distance between slices
``source``                string       source NAME
``case_id``               string       path of the volume inside its source, without ``.nii[.gz]``
``slice_index``           int32        index of the slice along canonical Z (inferior -> superior)
``volume_hash``           string       content hash of the whole volume (see below)
========================  ===========  =============================================================

Why raw bytes: decoding is a zero-copy ``np.frombuffer`` (see :func:`decode_slice`), far faster than a
nested int16 list column, and Parquet's zstd compression still applies. HU are rounded to the nearest
integer and clipped to the int16 range; CT stored as integers (practically all CT) is therefore lossless,
and volumes with fractional HU are counted in the manifest.

Rules (recorded in ``manifest.json``):

* **Air rule**: a slice is kept iff the fraction of its pixels with ``HU > air_threshold`` (default -500)
  is ``>= min_body_fraction`` (default 0.05); other slices are counted as ``slices_skipped_air``.
* **Duplicates**: a volume whose hash (blake2b-128 over its int16 shape and C-order bytes) was already
  seen is skipped and listed with the path it duplicates. With one worker the first volume in (source
  order, sorted path) order is kept; with several workers the first one to be hashed wins.
* **Bad volumes**: any error loading one volume is logged, listed in the manifest and skipped.

Parallelism and resume: volumes are grouped into tasks of ``volumes_per_task``; each worker process
loads one volume at a time and streams its slices into its own shards (at most ``max_rows_per_shard``
rows / ``max_shard_bytes`` raw image bytes each, written under a temporary name). When a task ends its
shards are renamed into ``data/`` and the parent appends ONE ledger line (fsynced) naming the task's
volumes and shards, so a shard only ever holds complete, ledgered volumes. On restart, ledgered volumes
are skipped and any shard or temporary file not named in the ledger is deleted before work resumes.

Training
--------
:func:`load_ct3m` / :class:`CT3MSliceStream` yield decoded slices as int16 torch tensors with metadata.
The pretraining loop shards them over ranks with
``datasets.distributed.split_dataset_by_node(ds, rank, world_size)`` (or ``rank=``/``world_size=``
here); slices have different sizes, so cropping/resizing belongs in the collate/augmentation step.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from meddinov3_hf.volumes.io import atomic_path, case_name, load_volume

__all__ = [
    "ARROW_SCHEMA",
    "CT3MSliceStream",
    "CT3MSource",
    "DEFAULT_AIR_THRESHOLD",
    "DEFAULT_MAX_ROWS_PER_SHARD",
    "DEFAULT_MAX_SHARD_BYTES",
    "DEFAULT_MIN_BODY_FRACTION",
    "DEFAULT_VOLUMES_PER_TASK",
    "FORMAT_VERSION",
    "add_build_ct3m_arguments",
    "build_ct3m",
    "decode_batch",
    "decode_example",
    "decode_slice",
    "discover_volumes",
    "load_ct3m",
    "parse_source",
    "push_to_hub",
    "run_build_ct3m",
    "slice_keep_mask",
    "volume_hash",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_AIR_THRESHOLD = -500.0
DEFAULT_MIN_BODY_FRACTION = 0.05
DEFAULT_MAX_ROWS_PER_SHARD = 2000
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # raw (uncompressed) image bytes; zstd shrinks CT roughly 2-3x
DEFAULT_VOLUMES_PER_TASK = 8
# Row groups are the unit a streaming reader holds in memory, so keep them well below a shard.
_ROW_GROUP_BYTES = 64 << 20

DATA_DIR = "data"
STATE_DIR = ".ct3m_build"
_LEDGER = "ledger.jsonl"
_PARAMS = "params.json"
_SHARD_RE = re.compile(r"^train-(\d+)\.parquet$")
_NOT_DICOM_SUFFIXES = frozenset(
    ".txt .json .csv .tsv .xml .yaml .yml .md .html .pdf .png .jpg .jpeg .bmp .tif .tiff .gz .zip .tar "
    ".nii .mha .mhd .nrrd .raw .npy .npz .h5 .hdf5 .pkl .py .sh .log .parquet".split()
)
_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

ARROW_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("spacing_y", pa.float32()),
        ("spacing_x", pa.float32()),
        ("spacing_z", pa.float32()),
        ("source", pa.string()),
        ("case_id", pa.string()),
        ("slice_index", pa.int32()),
        ("volume_hash", pa.string()),
    ]
)
_HF_DTYPES = {pa.binary(): "binary", pa.int32(): "int32", pa.float32(): "float32", pa.string(): "string"}


# --------------------------------------------------------------------------------------------------------
# Sources and discovery
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CT3MSource:
    """One input dataset: ``name`` becomes the ``source`` column, ``folder`` is searched recursively."""

    name: str
    folder: Path


def parse_source(spec: str) -> CT3MSource:
    """Parse ``NAME=FOLDER`` (the folder must exist)."""
    name, sep, folder = spec.partition("=")
    name = name.strip()
    if not sep or not folder:
        raise ValueError(f"source {spec!r}: expected NAME=FOLDER")
    if not _SOURCE_NAME_RE.match(name):
        raise ValueError(f"source {spec!r}: name must be letters, digits, '_', '.', '+' or '-'")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"source {name}: folder {path} does not exist or is not a folder")
    return CT3MSource(name, path)


def _is_nifti(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(".nii") or lower.endswith(".nii.gz")


def _looks_like_dicom(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        return True
    if suffix in _NOT_DICOM_SUFFIXES:
        return False
    # Anything else (no extension, UID-style names like 1.2.840.10008.5) is checked for the magic.
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"  # Part-10 preamble + magic


@dataclass(frozen=True)
class _VolumeTask:
    source: str
    rel_path: str  # posix path inside the source folder; the resume key together with `source`
    path: str  # absolute path handed to load_volume
    case_id: str


def discover_volumes(source: CT3MSource) -> list[_VolumeTask]:
    """All volumes of a source in sorted order: ``*.nii``/``*.nii.gz`` files at any depth, and every folder
    that directly contains DICOM files (``*.dcm`` or extension-less files with the ``DICM`` magic) as one
    series. Hidden files and folders (e.g. temporary files) are ignored."""
    root = source.folder.resolve()
    tasks: list[_VolumeTask] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted -> deterministic walk
        here = Path(dirpath)
        visible = sorted(f for f in filenames if not f.startswith("."))
        for fname in visible:
            if _is_nifti(fname):
                rel = (here / fname).relative_to(root).as_posix()
                parent = PurePosixPath(rel).parent
                case = case_name(fname) if parent == PurePosixPath(".") else f"{parent}/{case_name(fname)}"
                tasks.append(_VolumeTask(source.name, rel, str(here / fname), case))
        if any(not _is_nifti(f) and _looks_like_dicom(here / f) for f in visible):
            rel = here.relative_to(root).as_posix()
            case = root.name if rel == "." else rel
            tasks.append(_VolumeTask(source.name, rel + "/", str(here), case))
    tasks.sort(key=lambda t: t.rel_path)
    return tasks


# --------------------------------------------------------------------------------------------------------
# Per-volume processing
# --------------------------------------------------------------------------------------------------------


def volume_hash(volume: np.ndarray) -> str:
    """Content hash of an int16 volume: blake2b-128 over its shape (int64 LE) and C-order LE bytes."""
    vol = np.ascontiguousarray(volume, dtype="<i2")
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(vol.shape, dtype="<i8").tobytes())
    h.update(memoryview(vol).cast("B"))
    return h.hexdigest()


def slice_keep_mask(
    volume: np.ndarray,
    air_threshold: float = DEFAULT_AIR_THRESHOLD,
    min_body_fraction: float = DEFAULT_MIN_BODY_FRACTION,
) -> np.ndarray:
    """Air rule: keep slice ``z`` iff ``mean(volume[z] > air_threshold) >= min_body_fraction``."""
    body = (volume > air_threshold).reshape(volume.shape[0], -1)
    return body.mean(axis=1) >= min_body_fraction


def _hu_to_int16(hu: np.ndarray, slab: int = 32) -> tuple[np.ndarray, bool, int]:
    """Round + clip to int16; also report whether rounding changed anything and how many voxels clipped.

    Works in slabs of slices so the float temporaries stay small next to the volume itself."""
    out = np.empty(hu.shape, dtype="<i2")
    info = np.iinfo(np.int16)
    non_integer, clipped = False, 0
    for z in range(0, hu.shape[0], slab):
        part = hu[z : z + slab]
        rounded = np.rint(part)
        non_integer = non_integer or bool(np.any(rounded != part))
        clipped += int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
        np.clip(rounded, info.min, info.max, out=rounded)
        out[z : z + slab] = rounded
    return out, non_integer, clipped


@dataclass
class _WorkerContext:
    output_dir: str
    shard_counter: Any  # multiprocessing Value('q'): next free shard number, shared by all workers
    known_hashes: dict[str, str]  # hash -> "source:rel_path" of volumes already ledgered as used
    air_threshold: float
    min_body_fraction: float
    max_rows_per_shard: int
    max_shard_bytes: int

    @property
    def data_dir(self) -> Path:
        return Path(self.output_dir) / DATA_DIR

    @property
    def tmp_dir(self) -> Path:
        return Path(self.output_dir) / STATE_DIR / "tmp"

    @property
    def claims_dir(self) -> Path:
        return Path(self.output_dir) / STATE_DIR / "claims"


_CTX: _WorkerContext | None = None


def _init_worker(ctx: _WorkerContext | None) -> None:
    global _CTX
    _CTX = ctx


def _claim(ctx: _WorkerContext, digest: str, key: str) -> str | None:
    """Claim a content hash for `key`; return the key of the earlier volume when it is a duplicate.

    Claims are files created with an atomic ``os.link`` (fails if the name exists), so they work across
    worker processes without a server. They are reset every run and re-seeded from the ledger."""
    if digest in ctx.known_hashes:
        return ctx.known_hashes[digest]
    claim = ctx.claims_dir / digest
    tmp = ctx.claims_dir / f".{digest}.{os.getpid()}"
    tmp.write_text(key, encoding="utf-8")
    try:
        os.link(tmp, claim)
    except FileExistsError:
        return claim.read_text(encoding="utf-8")  # complete: written before the link appeared
    finally:
        tmp.unlink()
    return None


class _ShardWriter:
    """Streams rows into temporary shards of bounded size; :meth:`publish` renames them into ``data/``."""

    def __init__(self, ctx: _WorkerContext) -> None:
        self.ctx = ctx
        self.done: list[tuple[Path, str, int]] = []  # (tmp path, final name, rows)
        self._file: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._name = ""
        self._rows = 0
        self._bytes = 0

    def _open(self) -> None:
        counter = self.ctx.shard_counter
        with counter.get_lock():
            number = counter.value
            counter.value += 1
        self._name = f"train-{number:05d}.parquet"
        self._tmp = self.ctx.tmp_dir / f"{self._name}.{os.getpid()}.part"
        self._file = open(self._tmp, "wb")
        self._writer = pq.ParquetWriter(
            self._file,
            ARROW_SCHEMA,
            compression="zstd",
            use_dictionary=["source", "case_id", "volume_hash"],
            write_statistics=[n for n in ARROW_SCHEMA.names if n != "image"],
        )
        self._rows = self._bytes = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # durable before the rename that makes it visible
        self._file.close()
        assert self._tmp is not None
        self.done.append((self._tmp, self._name, self._rows))
        self._writer = self._file = self._tmp = None

    def write_volume(self, vol: np.ndarray, keep: np.ndarray, meta: dict[str, Any]) -> None:
        slice_bytes = int(vol.shape[1] * vol.shape[2] * 2)
        group_rows = max(1, _ROW_GROUP_BYTES // max(slice_bytes, 1))
        pending: list[int] = []
        for z in np.flatnonzero(keep).tolist():
            full = self._rows + len(pending) >= self.ctx.max_rows_per_shard or (
                self._bytes + (len(pending) + 1) * slice_bytes > self.ctx.max_shard_bytes
                and self._rows + len(pending) > 0
            )
            if full or self._writer is None or len(pending) >= group_rows:
                self._flush(vol, pending, meta)
                pending = []
                if full or self._writer is None:
                    self._close()
                    self._open()
            pending.append(z)
        self._flush(vol, pending, meta)

    def _flush(self, vol: np.ndarray, idx: list[int], meta: dict[str, Any]) -> None:
        if not idx:
            return
        assert self._writer is not None
        n = len(idx)
        h, w = int(vol.shape[1]), int(vol.shape[2])
        columns = {
            "image": pa.array([vol[z].tobytes() for z in idx], pa.binary()),
            "height": pa.array([h] * n, pa.int32()),
            "width": pa.array([w] * n, pa.int32()),
            "spacing_y": pa.array([meta["spacing"][1]] * n, pa.float32()),
            "spacing_x": pa.array([meta["spacing"][2]] * n, pa.float32()),
            "spacing_z": pa.array([meta["spacing"][0]] * n, pa.float32()),
            "source": pa.array([meta["source"]] * n, pa.string()),
            "case_id": pa.array([meta["case_id"]] * n, pa.string()),
            "slice_index": pa.array(idx, pa.int32()),
            "volume_hash": pa.array([meta["hash"]] * n, pa.string()),
        }
        self._writer.write_table(pa.Table.from_pydict(columns, schema=ARROW_SCHEMA), row_group_size=n)
        self._rows += n
        self._bytes += n * h * w * 2

    def publish(self) -> list[dict[str, Any]]:
        self._close()
        shards = []
        for tmp, name, rows in self.done:
            os.replace(tmp, self.ctx.data_dir / name)
            shards.append({"name": name, "rows": rows})
        _fsync_dir(self.ctx.data_dir)
        return shards

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
            if self._file is not None:
                self._file.close()
        for path in [p for p, _, _ in self.done] + ([self._tmp] if self._tmp else []):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _process_volume(ctx: _WorkerContext, task: _VolumeTask, writer: _ShardWriter) -> dict[str, Any]:
    record: dict[str, Any] = {"source": task.source, "path": task.rel_path, "case_id": task.case_id}
    key = f"{task.source}:{task.rel_path}"
    # Everything up to the write is "reading the volume": any error there only skips this volume.
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            volume = load_volume(task.path)
        spacing = volume.spacing
        hu, volume = volume.hu, None  # keep only the array: memory is one volume per worker
        vol16, non_integer, clipped = _hu_to_int16(hu)
        del hu
        digest = volume_hash(vol16)
        keep = slice_keep_mask(vol16, ctx.air_threshold, ctx.min_body_fraction)
    except Exception as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        return record
    record.update(
        hash=digest,
        shape=[int(s) for s in vol16.shape],
        spacing=[float(s) for s in spacing],
        warnings=[str(w.message) for w in caught],
    )
    if non_integer:
        record["non_integer_hu"] = True
    if clipped:
        record["clipped_voxels"] = clipped
    original = _claim(ctx, digest, key)
    if original is not None:
        record.update(status="duplicate", duplicate_of=original)
        return record
    # Write errors (disk full, ...) are not volume problems: they propagate and stop the build.
    writer.write_volume(vol16, keep, record)
    record.update(
        status="ok",
        slices_total=int(vol16.shape[0]),
        slices_kept=int(keep.sum()),
        slices_skipped_air=int((~keep).sum()),
    )
    return record


def _process_chunk(chunk_id: int, tasks: list[_VolumeTask]) -> dict[str, Any]:
    """Worker entry point: process a group of volumes into fresh shards and publish them together."""
    ctx = _CTX
    if ctx is None:
        raise RuntimeError("CT-3M worker used before _init_worker")
    writer = _ShardWriter(ctx)
    try:
        volumes = [_process_volume(ctx, task, writer) for task in tasks]
        shards = writer.publish()
    except BaseException:
        writer.abort()
        raise
    return {"chunk": chunk_id, "worker_pid": os.getpid(), "shards": shards, "volumes": volumes}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform/filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------------
# Ledger, cleanup, manifest
# --------------------------------------------------------------------------------------------------------


def _read_ledger(path: Path) -> list[dict[str, Any]]:
    """Ledger records; a torn last line (crash mid-append) is dropped and the file rewritten without it."""
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    lines = path.read_bytes().split(b"\n")
    torn = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "volumes" not in rec or "shards" not in rec:
                raise ValueError("not a ledger record")
        except ValueError as exc:
            if i == len(lines) - 1:  # only a last line without its newline can be torn by a crash
                torn = True
                continue
            raise RuntimeError(
                f"{path}: corrupt ledger line {i + 1} ({exc}); delete the build folder"
            ) from exc
        records.append(rec)
    if torn:
        logger.warning("%s: dropping a partially written last ledger line", path)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def _append_ledger(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _clean_orphans(output: Path, ledgered_shards: set[str]) -> list[str]:
    """Delete temporary files and shards that no ledger line names (left by an interrupted build)."""
    removed = []
    for folder in (output / STATE_DIR / "tmp", output / STATE_DIR / "claims"):
        if folder.exists():
            for p in folder.iterdir():
                p.unlink()
                removed.append(str(p.relative_to(output)))
    for folder in (output, output / STATE_DIR):  # atomic_path temporaries of manifest/README/ledger
        for p in folder.glob(".*.tmp*"):
            if p.is_file():
                p.unlink()
                removed.append(str(p.relative_to(output)))
    data = output / DATA_DIR
    for p in sorted(data.iterdir()) if data.exists() else []:
        if not p.is_file():
            continue
        is_temp = p.name.startswith(".") and ("train-" in p.name or p.name.endswith(".tmp"))
        if is_temp or (_SHARD_RE.match(p.name) and p.name not in ledgered_shards):
            p.unlink()
            removed.append(str(p.relative_to(output)))
    return removed


def _latest_volume_records(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(source, path) -> last record; a failed volume retried later is replaced by its new outcome."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        for vol in rec["volumes"]:
            latest[(vol["source"], vol["path"])] = vol
    return latest


def _rule_params(air_threshold: float, min_body_fraction: float) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "air_threshold": float(air_threshold),
        "min_body_fraction": float(min_body_fraction),
    }


_COUNT_KEYS = (
    "volumes_found",
    "volumes_used",
    "volumes_duplicate",
    "volumes_failed",
    "volumes_pending",
    "slices_total",
    "slices_kept",
    "slices_skipped_air",
    "volumes_non_integer_hu",
    "volumes_clipped_hu",
)


def _make_manifest(
    records: Sequence[Mapping[str, Any]],
    discovered: Mapping[str, list[_VolumeTask]],
    folders: Mapping[str, str],
    params: Mapping[str, Any],
    shard_limits: Mapping[str, int],
) -> dict[str, Any]:
    latest = _latest_volume_records(records)
    source_names = list(discovered) + sorted({s for s, _ in latest} - set(discovered))
    sources: dict[str, Any] = {}
    for name in source_names:
        keys = {t.rel_path for t in discovered.get(name, [])} | {p for s, p in latest if s == name}
        vols = [latest[(name, p)] for p in sorted(keys) if (name, p) in latest]
        used = [v for v in vols if v["status"] == "ok"]
        dups = [v for v in vols if v["status"] == "duplicate"]
        failed = [v for v in vols if v["status"] == "failed"]
        sources[name] = {
            "folder": folders.get(name),
            "volumes_found": len(keys),
            "volumes_used": len(used),
            "volumes_duplicate": len(dups),
            "volumes_failed": len(failed),
            "volumes_pending": len(keys) - len(vols),
            "slices_total": sum(v["slices_total"] for v in used),
            "slices_kept": sum(v["slices_kept"] for v in used),
            "slices_skipped_air": sum(v["slices_skipped_air"] for v in used),
            "volumes_non_integer_hu": sum(1 for v in used if v.get("non_integer_hu")),
            "volumes_clipped_hu": sum(1 for v in used if v.get("clipped_voxels")),
            "duplicates": [{"path": v["path"], "duplicate_of": v["duplicate_of"]} for v in dups],
            "failed": [{"path": v["path"], "error": v["error"]} for v in failed],
            "warnings": [{"path": v["path"], "warning": w} for v in used for w in v.get("warnings", [])],
        }
    totals = {k: sum(s[k] for s in sources.values()) for k in _COUNT_KEYS}
    shards = sorted((s for rec in records for s in rec["shards"]), key=lambda s: s["name"])
    totals["rows"] = sum(s["rows"] for s in shards)
    totals["shards"] = len(shards)
    return {
        "dataset": "CT-3M",
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image_encoding": "raw little-endian int16 bytes, C-order (height, width); HU rounded to the "
        "nearest integer and clipped to [-32768, 32767]",
        "orientation": "canonical axial slices of meddinov3_hf.volumes.io.load_volume: rows anterior->"
        "posterior, columns patient right->left, slice_index inferior->superior",
        "slice_rule": {
            "description": "keep a slice iff the fraction of its pixels with HU > air_threshold is "
            ">= min_body_fraction",
            "air_threshold": params["air_threshold"],
            "min_body_fraction": params["min_body_fraction"],
        },
        "deduplication": {
            "hash": "blake2b-128 over the int16 volume's shape (int64 LE) and C-order LE bytes",
            "policy": "the first volume hashed is kept (sorted order with one worker); later copies skipped",
        },
        "shard_limits": dict(shard_limits),
        "sources": sources,
        "totals": totals,
        "shards": shards,
    }


def _dataset_card(manifest: Mapping[str, Any]) -> str:
    features = "\n".join(f"  - name: {f.name}\n    dtype: {_HF_DTYPES[f.type]}" for f in ARROW_SCHEMA)
    rows = "\n".join(
        f"| {name} | {s['volumes_used']} | {s['volumes_duplicate']} | {s['volumes_failed']} | "
        f"{s['slices_kept']} | {s['slices_skipped_air']} |"
        for name, s in manifest["sources"].items()
    )
    rule = manifest["slice_rule"]
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {DATA_DIR}/train-*.parquet
dataset_info:
  features:
{features}
tags:
- medical
- ct
---

# CT-3M slices

Axial CT slices in Hounsfield units for MedDINOv3 domain-adaptive pretraining, built by
`meddinov3 build-ct3m` (format version {manifest["format_version"]}). Each source dataset keeps its own
license and terms of use: check them before sharing this dataset.

`image` holds {manifest["image_encoding"]}. Decode with `meddinov3_hf.data.ct3m.decode_slice(row)`
(or `np.frombuffer(row["image"], "<i2").reshape(row["height"], row["width"])`).

Slices kept: {rule["description"]} (air_threshold={rule["air_threshold"]},
min_body_fraction={rule["min_body_fraction"]}). Duplicate volumes are dropped by content hash.
Details per source are in `manifest.json`.

| source | volumes | duplicates | failed | slices | skipped (air) |
|---|---|---|---|---|---|
{rows}
"""


# --------------------------------------------------------------------------------------------------------
# Build driver
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(state: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, proceed without
        yield
        return
    with open(state / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise RuntimeError(f"{state.parent}: another CT-3M build is running in this folder") from exc
        yield


def build_ct3m(
    sources: Sequence[CT3MSource | str],
    output_dir: str | os.PathLike[str],
    *,
    num_workers: int = 1,
    max_rows_per_shard: int = DEFAULT_MAX_ROWS_PER_SHARD,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    volumes_per_task: int = DEFAULT_VOLUMES_PER_TASK,
    air_threshold: float = DEFAULT_AIR_THRESHOLD,
    min_body_fraction: float = DEFAULT_MIN_BODY_FRACTION,
    quiet: bool = False,
    on_task_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Build (or resume building) CT-3M into ``output_dir``; returns the manifest (also written).

    Args:
        sources: :class:`CT3MSource` objects or ``"NAME=FOLDER"`` strings; names must be unique.
        output_dir: new/empty folder, or the folder of an earlier (interrupted or finished) build to
            resume/extend. A non-empty folder that is not a CT-3M build is refused.
        num_workers: worker processes (``<= 1`` runs in this process).
        max_rows_per_shard, max_shard_bytes: shard size limits (rows; raw image bytes).
        volumes_per_task: volumes per task; a task's shards are published and ledgered together, so
            this is also the most work an interruption can lose per worker.
        air_threshold, min_body_fraction: the air rule (module docstring); fixed for a build folder.
        quiet: no progress bar.
        on_task_done: called in this process with each task's ledger record right after it is ledgered.

    With ``num_workers > 1`` workers start by forkserver/spawn (never plain fork), so a calling script
    needs the usual ``if __name__ == "__main__":`` guard.
    """
    if max_rows_per_shard < 1 or max_shard_bytes < 1 or volumes_per_task < 1:
        raise ValueError("max_rows_per_shard, max_shard_bytes and volumes_per_task must be >= 1")
    if not 0.0 <= min_body_fraction <= 1.0:
        raise ValueError(f"min_body_fraction must be in [0, 1], got {min_body_fraction}")
    srcs = [parse_source(s) if isinstance(s, str) else s for s in sources]
    if not srcs:
        raise ValueError("at least one source NAME=FOLDER is required")
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    for s in srcs:
        if not Path(s.folder).is_dir():
            raise ValueError(f"source {s.name}: folder {s.folder} does not exist or is not a folder")

    output = Path(output_dir)
    state = output / STATE_DIR
    if output.exists() and any(output.iterdir()) and not state.is_dir():
        raise ValueError(f"{output}: folder is not empty and holds no CT-3M build ({STATE_DIR}/ missing)")
    for sub in (state / "tmp", state / "claims", output / DATA_DIR):
        sub.mkdir(parents=True, exist_ok=True)

    params = _rule_params(air_threshold, min_body_fraction)
    params_path = state / _PARAMS
    with _build_lock(state):
        if params_path.exists():
            old = json.loads(params_path.read_text(encoding="utf-8"))
            if old != params:
                raise ValueError(
                    f"{output}: existing build used {old}, this run asks for {params}; "
                    "use a new output folder to change the slice rule"
                )
        else:
            with atomic_path(params_path) as tmp:
                tmp.write_text(json.dumps(params, indent=2), encoding="utf-8")

        ledger_path = state / _LEDGER
        records = _read_ledger(ledger_path)
        ledgered_shards = {s["name"] for rec in records for s in rec["shards"]}
        removed = _clean_orphans(output, ledgered_shards)
        if removed:
            logger.info("removed %d leftover file(s) of an interrupted build: %s", len(removed), removed)

        latest = _latest_volume_records(records)
        done = {k for k, v in latest.items() if v["status"] in ("ok", "duplicate")}
        discovered = {s.name: discover_volumes(s) for s in srcs}
        pending = [t for s in srcs for t in discovered[s.name] if (t.source, t.rel_path) not in done]
        known = {v["hash"]: f"{s}:{p}" for (s, p), v in latest.items() if v["status"] == "ok"}
        next_shard = 1 + max((int(_SHARD_RE.match(n).group(1)) for n in ledgered_shards), default=-1)
        next_chunk = 1 + max((int(rec["chunk"]) for rec in records), default=-1)
        chunks = [
            (next_chunk + i, pending[j : j + volumes_per_task])
            for i, j in enumerate(range(0, len(pending), volumes_per_task))
        ]

        mp_ctx = _mp_context()
        ctx = _WorkerContext(
            output_dir=str(output),
            shard_counter=mp_ctx.Value("q", next_shard),
            known_hashes=known,
            air_threshold=float(air_threshold),
            min_body_fraction=float(min_body_fraction),
            max_rows_per_shard=int(max_rows_per_shard),
            max_shard_bytes=int(max_shard_bytes),
        )
        progress = _progress(len(pending), quiet)

        def finish(rec: dict[str, Any]) -> None:
            _append_ledger(ledger_path, rec)
            records.append(rec)
            for vol in rec["volumes"]:
                if vol["status"] == "failed":
                    logger.warning("skipping %s/%s: %s", vol["source"], vol["path"], vol["error"])
                elif vol["status"] == "duplicate":
                    logger.info("duplicate %s/%s of %s", vol["source"], vol["path"], vol["duplicate_of"])
            progress.update(len(rec["volumes"]))
            if on_task_done is not None:
                on_task_done(rec)

        try:
            if num_workers <= 1 or len(chunks) <= 1:
                _init_worker(ctx)
                try:
                    for chunk_id, tasks in chunks:
                        finish(_process_chunk(chunk_id, tasks))
                finally:
                    _init_worker(None)
            else:
                _run_parallel(chunks, ctx, mp_ctx, min(num_workers, len(chunks)), finish)
        finally:
            progress.close()

        folders = {s.name: str(s.folder) for s in srcs}
        limits = {"max_rows_per_shard": max_rows_per_shard, "max_shard_bytes": max_shard_bytes}
        manifest = _make_manifest(records, discovered, folders, params, limits)
        with atomic_path(output / "manifest.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        with atomic_path(output / "README.md") as tmp:
            tmp.write_text(_dataset_card(manifest), encoding="utf-8")
        for claim in (state / "claims").iterdir():  # per-run scratch; the ledger holds the hashes
            claim.unlink()
    return manifest


def _mp_context() -> Any:
    """Never plain fork: the parent may hold threads (torch, arrow, tqdm). forkserver (POSIX) imports this
    package once in a clean server and forks workers from it, which is much cheaper than spawning each
    (the package imports transformers); spawn elsewhere."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _run_parallel(
    chunks: list[tuple[int, list[_VolumeTask]]],
    ctx: _WorkerContext,
    mp_ctx: Any,
    workers: int,
    finish: Callable[[dict[str, Any]], None],
) -> None:
    # At most 2 tasks queued per worker: the queue stays small and an interruption wastes little.
    todo = iter(chunks)
    running: set[Future[dict[str, Any]]] = set()
    pool = ProcessPoolExecutor(workers, mp_context=mp_ctx, initializer=_init_worker, initargs=(ctx,))
    try:
        for chunk_id, tasks in todo:
            running.add(pool.submit(_process_chunk, chunk_id, tasks))
            if len(running) >= 2 * workers:
                break
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                finish(fut.result())
                nxt = next(todo, None)
                if nxt is not None:
                    running.add(pool.submit(_process_chunk, *nxt))
    finally:
        # On error, drop queued tasks; running ones finish, and their unledgered shards are cleaned up
        # by the next run.
        pool.shutdown(wait=True, cancel_futures=True)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, quiet: bool) -> Any:
    if quiet:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="vol", desc="CT-3M")


# --------------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------------


def push_to_hub(
    output_dir: str | os.PathLike[str],
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    api: Any = None,
    commit_message: str = "Upload CT-3M",
) -> Any:
    """Upload a finished build (``README.md``, ``manifest.json``, ``data/*.parquet``) as a dataset repo.

    ``api`` defaults to ``huggingface_hub.HfApi()``; any object with ``create_repo`` and ``upload_folder``
    works (tests pass a stand-in). The build state folder is never uploaded. Private by default because
    source licenses may not allow redistribution. Returns ``upload_folder``'s result.
    """
    output = Path(output_dir)
    if not (output / "manifest.json").is_file() or not (output / "README.md").is_file():
        raise FileNotFoundError(f"{output}: no finished CT-3M build (manifest.json/README.md missing)")
    if not any((output / DATA_DIR).glob("train-*.parquet")):
        raise FileNotFoundError(f"{output}: no shards in {DATA_DIR}/")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token)
    return api.upload_folder(
        folder_path=str(output),
        repo_id=repo_id,
        repo_type="dataset",
        token=token,
        commit_message=commit_message,
        allow_patterns=["README.md", "manifest.json", f"{DATA_DIR}/train-*.parquet"],
    )


# --------------------------------------------------------------------------------------------------------
# Decoding and streaming for training
# --------------------------------------------------------------------------------------------------------


def decode_slice(row: Mapping[str, Any]) -> np.ndarray:
    """The int16 HU slice ``(height, width)`` of a CT-3M row (a writable copy)."""
    data = row["image"]
    h, w = int(row["height"]), int(row["width"])
    if len(data) != h * w * 2:
        where = f"{row.get('source')}/{row.get('case_id')} slice {row.get('slice_index')}"
        raise ValueError(f"CT-3M row {where}: image has {len(data)} bytes, expected {h}x{w}x2")
    return np.frombuffer(data, dtype="<i2").reshape(h, w).astype(np.int16)


def decode_example(row: Mapping[str, Any], as_torch: bool = True) -> dict[str, Any]:
    """A row with ``image`` decoded to an int16 tensor (or numpy array); other columns unchanged."""
    out = dict(row)
    img = decode_slice(row)
    out["image"] = torch.from_numpy(img) if as_torch else img
    return out


def decode_batch(batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """Batched version for ``Dataset.set_transform(decode_batch)`` on a non-streaming dataset."""
    out = dict(batch)
    keys = list(batch)
    out["image"] = [
        torch.from_numpy(decode_slice({k: batch[k][i] for k in keys})) for i in range(len(batch["image"]))
    ]
    return out


def load_ct3m(
    path_or_hub_id: str | os.PathLike[str],
    split: str = "train",
    streaming: bool = True,
    *,
    shuffle_buffer_size: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    as_torch: bool = True,
    num_shards: int = 64,
    cache_dir: str | None = None,
    token: str | None = None,
) -> Any:
    """CT-3M as a ``datasets.IterableDataset`` of decoded slices.

    Args:
        path_or_hub_id: a build folder, a ``.parquet`` file/glob, or a Hub dataset id.
        streaming: stream the Parquet files (default). ``False`` loads (memory-maps) the data first and
            converts with ``to_iterable_dataset(num_shards)``, so both give the same kind of object.
        shuffle_buffer_size: if > 0, shuffle shard order and examples with a buffer of this many raw
            (still encoded) rows; call ``ds.set_epoch(epoch)`` each epoch for a new order.
        rank, world_size: if given, keep this rank's part via
            ``datasets.distributed.split_dataset_by_node`` (what the pretraining loop does); whole shards
            go to each rank when the shard count divides by ``world_size``.
        as_torch: ``image`` as an int16 ``torch.Tensor`` (else numpy).

    Each example: ``image`` (H, W) int16 HU plus ``height``, ``width``, ``spacing_y``, ``spacing_x``,
    ``spacing_z``, ``source``, ``case_id``, ``slice_index``, ``volume_hash``.
    """
    from datasets import load_dataset

    target = str(path_or_hub_id)
    kwargs: dict[str, Any] = {"split": split, "streaming": streaming, "cache_dir": cache_dir}
    if token is not None:
        kwargs["token"] = token
    if target.endswith(".parquet"):
        ds = load_dataset("parquet", data_files={split: target}, **kwargs)
    else:
        ds = load_dataset(target, **kwargs)
    if not streaming:
        ds = ds.to_iterable_dataset(num_shards=max(1, min(num_shards, len(ds))))
    if shuffle_buffer_size > 0:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer_size)  # before decoding: buffer stays small
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("pass both rank and world_size (or neither)")
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds.map(decode_example, fn_kwargs={"as_torch": as_torch})


class CT3MSliceStream(torch.utils.data.IterableDataset):
    """Torch ``IterableDataset`` over CT-3M slices for the pretraining loop (wraps :func:`load_ct3m`).

    Use it directly with a ``DataLoader`` (any ``num_workers``: the underlying ``datasets`` stream splits
    its shards between loader workers). Call :meth:`set_epoch` each epoch when shuffling.
    """

    def __init__(self, path_or_hub_id: str | os.PathLike[str], split: str = "train", **kwargs: Any) -> None:
        super().__init__()
        self.dataset = load_ct3m(path_or_hub_id, split=split, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def num_shards(self) -> int:
        return int(self.dataset.num_shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataset)


# --------------------------------------------------------------------------------------------------------
# Command line (used by `meddinov3 build-ct3m` and training/build_ct3m.py)
# --------------------------------------------------------------------------------------------------------


def add_build_ct3m_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``build-ct3m`` options to ``parser``."""
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="NAME=FOLDER",
        help="input dataset: NIfTI files (recursive) and/or DICOM series folders; repeat for each source",
    )
    parser.add_argument("-o", "--output", required=True, help="output folder (re-run to resume)")
    parser.add_argument("--num-workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--max-rows-per-shard", type=int, default=DEFAULT_MAX_ROWS_PER_SHARD)
    parser.add_argument(
        "--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="raw image bytes per shard"
    )
    parser.add_argument(
        "--volumes-per-task",
        type=int,
        default=DEFAULT_VOLUMES_PER_TASK,
        help="volumes published/ledgered together (work lost per worker on interruption)",
    )
    parser.add_argument(
        "--air-threshold",
        type=float,
        default=DEFAULT_AIR_THRESHOLD,
        help="HU above which a pixel counts as body (default -500)",
    )
    parser.add_argument(
        "--min-body-fraction",
        type=float,
        default=DEFAULT_MIN_BODY_FRACTION,
        help="keep a slice if this fraction of pixels is body (default 0.05)",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished build (HF_TOKEN)")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run_build_ct3m(args: argparse.Namespace) -> int:
    """Run a build from parsed arguments; 0 on success (bad volumes are reported, not fatal), 2 on bad
    arguments."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        sources = [parse_source(s) for s in args.sources]
        manifest = build_ct3m(
            sources,
            args.output,
            num_workers=args.num_workers,
            max_rows_per_shard=args.max_rows_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            volumes_per_task=args.volumes_per_task,
            air_threshold=args.air_threshold,
            min_body_fraction=args.min_body_fraction,
            quiet=args.quiet,
        )
    except ValueError as exc:
        print(f"build-ct3m: error: {exc}", file=sys.stderr)
        return 2
    t = manifest["totals"]
    print(
        f"CT-3M: {t['rows']} slices in {t['shards']} shards from {t['volumes_used']} volumes "
        f"({t['volumes_duplicate']} duplicates, {t['volumes_failed']} failed, "
        f"{t['slices_skipped_air']} air slices skipped) -> {args.output}"
    )
    if args.push_to_hub:
        push_to_hub(args.output, args.push_to_hub, private=not args.public)
        print(f"uploaded to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0
