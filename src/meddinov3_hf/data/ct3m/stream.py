"""Decoding CT-3M rows and streaming them for training (``datasets`` and torch ``IterableDataset``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch


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
