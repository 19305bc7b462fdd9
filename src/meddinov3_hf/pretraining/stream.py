"""The data side of a pretraining run: per-step crop sizes and the stream of collated multi-crop batches.

Exact resume: every random draw is a function of (seed, step, rank[, example position]). Stage-3 crop sizes come
from a generator seeded by (seed, step); the crops of an example from one seeded by (seed, rank, epoch, position).
The data order of a process is its `split_dataset_by_node` stream, epochs chained with `set_epoch(epoch)`; each
DataLoader worker reads that whole stream and renders every n-th batch, so the content of batch t does not
depend on the number of workers, and a checkpoint stores the stream position (epoch, offset) of every process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .config import PretrainConfig
from .crops import MultiCropAugmentation, collate_multicrop

__all__ = [
    "CropBatchStream",
    "CropSizePlan",
    "build_augmentation",
    "crop_batch_loader",
    "health_slices",
    "mix_seed",
    "open_slice_stream",
]


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (order matters)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint64)[0] >> 1)


class CropSizePlan:
    """(global, local, gram) crop sizes of a step; stage 3 samples them from `size_choices` with a generator
    seeded by (seed, step), so every process (and every loader worker) agrees."""

    def __init__(self, crops: Any, gram_enabled: bool, seed: int):
        self.crops, self.gram_enabled, self.seed = crops, gram_enabled, seed
        choices = crops.size_choices or []
        self.choices = [(int(c["global"]), int(c["local"]), c.get("gram")) for c in choices]
        p = np.array([float(c["p"]) for c in choices], dtype=np.float64)
        self.p = p / p.sum() if len(p) else p

    def at(self, step: int) -> tuple[int, int, int | None]:
        if not self.choices:
            g, loc, gram = self.crops.global_size, self.crops.local_size, self.crops.gram_size
        else:
            rng = np.random.default_rng(mix_seed(self.seed, 0x5A7E5, step))
            g, loc, gram = self.choices[int(rng.choice(len(self.choices), p=self.p))]
        if not self.gram_enabled:
            gram = None
        return int(g), int(loc), (int(gram) if gram is not None and int(gram) != int(g) else None)

    def max_sizes(self) -> tuple[int, int, int | None]:
        sizes = [self.at(0)] if not self.choices else [(g, lc, gr) for g, lc, gr in self.choices]
        grams = [s[2] for s in sizes if s[2] is not None]
        return max(s[0] for s in sizes), max(s[1] for s in sizes), (max(grams) if grams else None)


class CropBatchStream(torch.utils.data.IterableDataset):
    """Collated multi-crop batches from one process's slice stream, infinitely (epochs chained).

    Batch t (0-based, counted on this process) holds examples [t·B, (t+1)·B) of the chained stream; loader
    worker w of n renders the batches with t ≡ w (mod n), so the DataLoader's round-robin order yields
    t = start_batch, start_batch + 1, ... Each batch also carries `position` = (epoch, offset) just past its
    last example, which a checkpoint stores."""

    def __init__(
        self,
        dataset: Any,
        augmentation: MultiCropAugmentation,
        sizes: CropSizePlan,
        batch_size: int,
        accumulation: int,
        seed: int,
        rank: int,
        start_batch: int = 0,
        start_position: tuple[int, int] = (0, 0),
    ):
        super().__init__()
        self.dataset, self.augmentation, self.sizes = dataset, augmentation, sizes
        self.batch_size, self.accumulation = batch_size, accumulation
        self.seed, self.rank = seed, rank
        self.start_batch, self.start_position = start_batch, start_position

    def _examples(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        epoch, offset = self.start_position
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            index = -1
            for index, example in enumerate(self.dataset):
                if index >= offset:
                    yield epoch, index, example
            if index < 0:
                raise RuntimeError(
                    f"process {self.rank} received no CT slices: fewer data rows than processes?"
                )
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # datasets splits its shards between loader workers when iterated inside one; we want every worker to
        # see the whole process stream (striding by batch instead), so hide the worker info from it.
        examples = _without_worker_info(self._examples) if info is not None else self._examples()
        t = self.start_batch
        while True:
            batch_examples = [next(examples) for _ in range(self.batch_size)]
            if (t - self.start_batch) % n_workers == worker:
                yield self._render(t, batch_examples)
            t += 1

    def _render(self, t: int, batch_examples: list[tuple[int, int, dict[str, Any]]]) -> dict[str, Any]:
        g_size, l_size, gram_size = self.sizes.at(t // self.accumulation)
        samples = []
        for epoch, index, example in batch_examples:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, epoch, index))
            image = torch.as_tensor(example["image"]).to(torch.float32)
            samples.append(
                self.augmentation(
                    image, generator=gen, global_size=g_size, local_size=l_size, gram_size=gram_size
                )
            )
        batch = collate_multicrop(samples)
        last_epoch, last_index, _ = batch_examples[-1]
        batch["position"] = torch.tensor([last_epoch, last_index + 1])
        batch["batch_index"] = torch.tensor(t)
        return batch


def _without_worker_info(factory) -> Iterator[Any]:
    """Run a generator with torch's worker info hidden (datasets would otherwise shard per worker)."""
    import torch.utils.data._utils.worker as worker_mod

    gen = factory()
    while True:
        saved = worker_mod._worker_info
        worker_mod._worker_info = None
        try:
            item = next(gen)
        finally:
            worker_mod._worker_info = saved
        yield item


def open_slice_stream(cfg: PretrainConfig, rank: int, world_size: int) -> Any:
    from meddinov3_hf.data.ct3m import load_ct3m

    if cfg.dataset is None:
        raise ValueError("no dataset: pass --dataset DIR_OR_HUB_ID (or dataset=... in the config)")
    return load_ct3m(
        cfg.dataset,
        streaming=True,
        shuffle_buffer_size=cfg.train.shuffle_buffer_size,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
    )


def health_slices(cfg: PretrainConfig) -> list[torch.Tensor]:
    """The first `health.num_slices` slices (HU) of `health.dataset`, else of the training dataset."""
    from meddinov3_hf.data.ct3m import load_ct3m

    ds = load_ct3m(cfg.health.dataset or cfg.dataset, streaming=True)
    slices = []
    for example in ds:
        slices.append(torch.as_tensor(example["image"]).float())
        if len(slices) >= cfg.health.num_slices:
            break
    return slices


def build_augmentation(cfg: PretrainConfig) -> MultiCropAugmentation:
    c = cfg.crops
    return MultiCropAugmentation(
        global_size=c.global_size,
        local_size=c.local_size,
        n_local=c.n_local,
        global_scale=tuple(c.global_scale),
        local_scale=tuple(c.local_scale),
        gram_size=None,  # per step, from CropSizePlan
    )


def crop_batch_loader(
    cfg: PretrainConfig,
    rank: int,
    world_size: int,
    start_step: int,
    start_position: tuple[int, int],
    pin_memory: bool,
) -> Iterator[dict[str, Any]]:
    """This process's batches from optimizer step `start_step` on (each step takes
    `gradient_accumulation_steps` of them), read from `start_position` of its slice stream."""
    accumulation = cfg.train.gradient_accumulation_steps
    sizes = CropSizePlan(cfg.crops, cfg.gram.enabled, cfg.train.seed)
    stream = CropBatchStream(
        open_slice_stream(cfg, rank, world_size),
        build_augmentation(cfg),
        sizes,
        cfg.train.batch_size,
        accumulation,
        cfg.train.seed,
        rank,
        start_batch=start_step * accumulation,
        start_position=start_position,
    )
    workers = cfg.train.num_workers
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return iter(loader)
