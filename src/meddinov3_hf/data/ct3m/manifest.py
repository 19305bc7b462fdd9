"""The manifest (per-source counts, failures, duplicates, rule parameters), the dataset card and the
Hub upload of a finished CT-3M build."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .discovery import _VolumeTask
from .ledger import _latest_volume_records
from .schema import _HF_DTYPES, ARROW_SCHEMA, DATA_DIR, FORMAT_VERSION


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
