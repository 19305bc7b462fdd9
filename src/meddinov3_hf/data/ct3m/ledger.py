"""The build ledger (one fsynced JSON line per finished task) and the cleanup of an interrupted build.

A shard only ever holds complete, ledgered volumes: on restart, ledgered volumes are skipped and any
shard or temporary file not named in the ledger is deleted before work resumes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meddinov3_hf.files import atomic_path

from .schema import _SHARD_RE, DATA_DIR, STATE_DIR

logger = logging.getLogger(__name__)


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
