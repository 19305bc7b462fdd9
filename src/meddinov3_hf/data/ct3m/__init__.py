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

Modules: ``schema`` (format and defaults), ``discovery`` (sources and their volumes), ``reading`` (int16
conversion, hash, air rule), ``writing`` (worker processes and shards), ``ledger`` (resume state),
``manifest`` (manifest, dataset card, Hub upload), ``build`` (the driver), ``stream`` (decoding and
streaming), ``command`` (``meddinov3 build-ct3m``). Everything public is importable from this package.
"""

from __future__ import annotations

from .build import build_ct3m
from .command import add_build_ct3m_arguments, run_build_ct3m
from .discovery import CT3MSource, discover_volumes, parse_source
from .manifest import push_to_hub
from .reading import slice_keep_mask, volume_hash
from .schema import (
    ARROW_SCHEMA,
    DATA_DIR,
    DEFAULT_AIR_THRESHOLD,
    DEFAULT_MAX_ROWS_PER_SHARD,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_MIN_BODY_FRACTION,
    DEFAULT_VOLUMES_PER_TASK,
    FORMAT_VERSION,
    STATE_DIR,
)
from .stream import CT3MSliceStream, decode_batch, decode_example, decode_slice, load_ct3m

__all__ = [
    "ARROW_SCHEMA",
    "CT3MSliceStream",
    "CT3MSource",
    "DATA_DIR",
    "DEFAULT_AIR_THRESHOLD",
    "DEFAULT_MAX_ROWS_PER_SHARD",
    "DEFAULT_MAX_SHARD_BYTES",
    "DEFAULT_MIN_BODY_FRACTION",
    "DEFAULT_VOLUMES_PER_TASK",
    "FORMAT_VERSION",
    "STATE_DIR",
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
