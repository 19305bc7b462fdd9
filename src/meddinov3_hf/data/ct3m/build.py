"""The CT-3M build driver: checks, resume state, serial or parallel task execution, manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from meddinov3_hf.files import atomic_path

from . import schema, writing
from .discovery import CT3MSource, _VolumeTask, discover_volumes, parse_source
from .ledger import _append_ledger, _clean_orphans, _latest_volume_records, _read_ledger
from .manifest import _dataset_card, _make_manifest, _rule_params
from .schema import _LEDGER, _PARAMS, _SHARD_RE, DATA_DIR, STATE_DIR
from .writing import _init_worker, _process_chunk, _WorkerContext

logger = logging.getLogger(__name__)


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
    max_rows_per_shard: int = schema.DEFAULT_MAX_ROWS_PER_SHARD,
    max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES,
    volumes_per_task: int = schema.DEFAULT_VOLUMES_PER_TASK,
    air_threshold: float = schema.DEFAULT_AIR_THRESHOLD,
    min_body_fraction: float = schema.DEFAULT_MIN_BODY_FRACTION,
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
    srcs = _checked_sources(sources)
    output = Path(output_dir)
    state = _prepare_output(output)
    params = _rule_params(air_threshold, min_body_fraction)
    with _build_lock(state):
        _check_params(output, state / _PARAMS, params)
        ledger_path = state / _LEDGER
        records = _resume(output, ledger_path)
        discovered = {s.name: discover_volumes(s) for s in srcs}
        chunks, known, next_shard = _plan(
            records, [t for s in srcs for t in discovered[s.name]], volumes_per_task
        )
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
        progress = _progress(sum(len(tasks) for _, tasks in chunks), quiet)
        try:
            finish = _ledger_task(ledger_path, records, progress, on_task_done)
            if num_workers <= 1 or len(chunks) <= 1:
                _run_serial(chunks, ctx, finish)
            else:
                _run_parallel(chunks, ctx, mp_ctx, min(num_workers, len(chunks)), finish)
        finally:
            progress.close()

        folders = {s.name: str(s.folder) for s in srcs}
        limits = {"max_rows_per_shard": max_rows_per_shard, "max_shard_bytes": max_shard_bytes}
        manifest = _make_manifest(records, discovered, folders, params, limits)
        _write_manifest(output, manifest)
        for claim in (state / "claims").iterdir():  # per-run scratch; the ledger holds the hashes
            claim.unlink()
    return manifest


def _checked_sources(sources: Sequence[CT3MSource | str]) -> list[CT3MSource]:
    srcs = [parse_source(s) if isinstance(s, str) else s for s in sources]
    if not srcs:
        raise ValueError("at least one source NAME=FOLDER is required")
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    for s in srcs:
        if not Path(s.folder).is_dir():
            raise ValueError(f"source {s.name}: folder {s.folder} does not exist or is not a folder")
    return srcs


def _prepare_output(output: Path) -> Path:
    """Create the build folders (refusing a non-empty folder that is not a build); returns the state folder."""
    state = output / STATE_DIR
    if output.exists() and any(output.iterdir()) and not state.is_dir():
        raise ValueError(f"{output}: folder is not empty and holds no CT-3M build ({STATE_DIR}/ missing)")
    for sub in (state / "tmp", state / "claims", output / DATA_DIR):
        sub.mkdir(parents=True, exist_ok=True)
    return state


def _check_params(output: Path, params_path: Path, params: dict[str, Any]) -> None:
    """The slice rule is fixed for a build folder: record it on the first run, refuse another later."""
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


def _resume(output: Path, ledger_path: Path) -> list[dict[str, Any]]:
    """The ledger records of earlier runs, after deleting whatever an interrupted run left unledgered."""
    records = _read_ledger(ledger_path)
    ledgered_shards = {s["name"] for rec in records for s in rec["shards"]}
    removed = _clean_orphans(output, ledgered_shards)
    if removed:
        logger.info("removed %d leftover file(s) of an interrupted build: %s", len(removed), removed)
    return records


def _plan(
    records: Sequence[dict[str, Any]], found: Sequence[_VolumeTask], volumes_per_task: int
) -> tuple[list[tuple[int, list[_VolumeTask]]], dict[str, str], int]:
    """(numbered tasks of the volumes not yet done, hashes already used, next free shard number)."""
    latest = _latest_volume_records(records)
    done = {k for k, v in latest.items() if v["status"] in ("ok", "duplicate")}
    pending = [t for t in found if (t.source, t.rel_path) not in done]
    known = {v["hash"]: f"{s}:{p}" for (s, p), v in latest.items() if v["status"] == "ok"}
    ledgered_shards = {s["name"] for rec in records for s in rec["shards"]}
    next_shard = 1 + max((int(_SHARD_RE.match(n).group(1)) for n in ledgered_shards), default=-1)
    next_chunk = 1 + max((int(rec["chunk"]) for rec in records), default=-1)
    chunks = [
        (next_chunk + i, pending[j : j + volumes_per_task])
        for i, j in enumerate(range(0, len(pending), volumes_per_task))
    ]
    return chunks, known, next_shard


def _ledger_task(
    ledger_path: Path,
    records: list[dict[str, Any]],
    progress: Any,
    on_task_done: Callable[[dict[str, Any]], None] | None,
) -> Callable[[dict[str, Any]], None]:
    """What the parent does with each finished task's record: ledger it (fsynced), log, report."""

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

    return finish


def _write_manifest(output: Path, manifest: dict[str, Any]) -> None:
    with atomic_path(output / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    with atomic_path(output / "README.md") as tmp:
        tmp.write_text(_dataset_card(manifest), encoding="utf-8")


def _run_serial(
    chunks: list[tuple[int, list[_VolumeTask]]],
    ctx: _WorkerContext,
    finish: Callable[[dict[str, Any]], None],
) -> None:
    _init_worker(ctx)
    try:
        for chunk_id, tasks in chunks:
            finish(_process_chunk(chunk_id, tasks))
    finally:
        _init_worker(None)


def _mp_context() -> Any:
    """Never plain fork: the parent may hold threads (torch, arrow, tqdm). forkserver (POSIX) imports this
    package once in a clean server and forks workers from it, which is much cheaper than spawning each
    (the package imports transformers); spawn elsewhere."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([writing.__name__])  # the workers' module
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
