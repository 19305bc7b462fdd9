"""Sharded writing: worker processes stream the kept slices of their volumes into bounded Parquet shards
and publish a task's shards together (renamed into ``data/``) once all its volumes are written."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .discovery import _VolumeTask
from .reading import _read_volume
from .schema import _ROW_GROUP_BYTES, ARROW_SCHEMA, DATA_DIR, STATE_DIR


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
    # Everything up to the write is "reading the volume": any error there only skips this volume.
    record, vol16, keep = _read_volume(task, ctx.air_threshold, ctx.min_body_fraction)
    if vol16 is None or keep is None:
        return record
    original = _claim(ctx, record["hash"], f"{task.source}:{task.rel_path}")
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
