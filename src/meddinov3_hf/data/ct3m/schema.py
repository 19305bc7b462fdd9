"""CT-3M on-disk format: the Parquet schema, build defaults and folder names of a build."""

from __future__ import annotations

import re

import pyarrow as pa

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
