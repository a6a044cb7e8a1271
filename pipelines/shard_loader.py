"""ShardLoader: DaliLoader's pipeline fed from WebDataset tar shards instead of a folder of files.

    shard bytes  _BlockReader      whole blocks of samples, each read as runs of shards (a ranged read
                                   each, shards.ShardSet.read_run, up to 8 in flight), the next block
                                   in a background thread
    encoded      fn.external_source  the encoded images of the next batch, from _SampleFeed
    ...          the rest of pipelines/dali.py's graph: decode + random crop, resize, flip, normalize

The order is shards.epoch_plan: shards in an order drawn from (seed, epoch), each rank a contiguous
run of the stream, shuffled in blocks of `shuffle_buffer` samples. Python keeps the whole order, so
everything DaliLoader does holds here unchanged (it is a subclass that swaps the feed): equal whole
batches per rank, set_epoch jumps, exact resume (the position + DALI's RNG checkpoint; the block is
read again and the order recomputed), and a sample that passes make-shards' checks but does not
decode is left out by ShardedFileLoader.leave_out, by its index in the shard set, and reported by
its name "shard-000003.tar:<key>" (the next sample is read in its place).

Memory: the reader holds the block being fed and the next one: about 2 * shuffle_buffer * (mean
encoded image size + 1.5 KB of tar headers and class member); 2 * 8192 * 110 KB ~ 1.8 GB per rank
for ImageNet at the default.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch

from .common import Augmentation
from .dali import DaliLoader
from .shards import EpochPlan, ReadStats, ShardSet, epoch_plan, open_shards, runs

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "ShardLoader", "bench_shards_vs_folder"]

DEFAULT_SHUFFLE_BUFFER = 8192  # samples shuffled together: ~0.9 GB of ImageNet JPEGs, about two 512 MB shards


class _BlockReader:
    """Reads blocks of samples run by run, one block ahead, in one background thread; keeps the newest two."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self.stats = ReadStats()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-reader")
        self._runs = ThreadPoolExecutor(8, thread_name_prefix="shard-runs")
        self._blocks: dict[tuple[int, int], Future] = {}  # (epoch, block) -> {sample: bytes}

    def block(
        self, key: tuple[int, int], samples: np.ndarray, ahead: tuple[tuple[int, int], np.ndarray]
    ) -> dict[int, np.ndarray]:
        """The images of block `key` (waiting for its read, if needed); then block `ahead` is read."""
        for k in [k for k in self._blocks if k not in (key, ahead[0])]:
            self._blocks.pop(k).cancel()  # the block before, or one read ahead for a position left by a jump
        if key not in self._blocks:
            self._blocks[key] = self._pool.submit(self._read, samples)
        if ahead[0] not in self._blocks:
            self._blocks[ahead[0]] = self._pool.submit(self._read, ahead[1])
        return self._blocks[key].result()

    def _read(self, samples: np.ndarray) -> dict[int, np.ndarray]:
        """One block: a ranged read per run (a lane of the epoch plan), up to 8 in flight (a store's latency)."""
        out: dict[int, np.ndarray] = {}
        for got in self._runs.map(lambda r: self.shards.read_run(*r, self.stats), runs(samples, self.shards.starts)):
            out.update(got)
        return out

    def close(self) -> None:
        for f in self._blocks.values():
            f.cancel()
        self._blocks.clear()
        self._pool.shutdown(wait=True)
        self._runs.shutdown(wait=True)


class _SampleFeed:
    """external_source callback: the encoded images of the next batch of the stream (as _PathFeed does
    with paths). Holds the reader and the plan's arguments, not the loader."""

    def __init__(self, loader: ShardLoader, epoch: int, batch: int) -> None:
        self.reader, self.shards = loader._reader, loader.shards
        self.substitutes = loader.substitutes  # live: leave_out() updates it in place
        self.in_flight: collections.deque[tuple[tuple[int, int], list[int]]] = collections.deque(
            maxlen=loader.prefetch + 2
        )
        self.plan = loader._plan  # epoch -> EpochPlan, cached
        self.batches_per_epoch = loader.batches_per_epoch
        self.epoch, self.batch = epoch, batch

    def __call__(self) -> list[np.ndarray]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        plan = self.plan(epoch=self.epoch)
        j = self.batch // plan.batches_per_block
        images = self.reader.block((self.epoch, j), plan.blocks[j], self._after(plan, j))
        indices = [self.substitutes.get(i, i) for i in plan.order[self.batch].tolist()]
        self.in_flight.append(((self.epoch, self.batch), indices))
        self.batch += 1
        # a substitute may lie outside the block: read it alone
        return [images[i] if i in images else self.shards.read_sample(i, self.reader.stats) for i in indices]

    def _after(self, plan: EpochPlan, j: int) -> tuple[tuple[int, int], np.ndarray]:
        """The block that follows block j in the stream: the next one, or the first of the next epoch."""
        if (j + 1) * plan.batches_per_block < self.batches_per_epoch:
            return (self.epoch, j + 1), plan.blocks[j + 1]
        return (self.epoch + 1, 0), self.plan(epoch=self.epoch + 1).blocks[0]


class ShardLoader(DaliLoader):
    """DaliLoader over the samples of a shard folder: the same batches, interface, state and guarantees.

    `shards`: a folder of shards, its manifest, or a ShardSet from shards.open_shards (which checks every
    shard and raises DatasetScanError naming a missing, truncated or mismatched one). shard_id and
    num_shards are the rank and the world size, as for DaliLoader (not tar files). shuffle_buffer:
    samples shuffled together, rounded up to whole batches; the same on every rank.
    """

    kind = "shards"
    source = "encoded"

    def __init__(
        self,
        shards: str | ShardSet,
        batch_size: int,
        aug: Augmentation,
        *,
        input_size: int,
        seed: int,
        shard_id: int = 0,
        num_shards: int = 1,
        device_id: int | None = None,
        num_threads: int = 4,
        prefetch: int = 2,
        output_dtype: Literal["float16", "uint8"] = "float16",
        hw_decoder_load: float | None = None,
        batches_per_epoch: int | None = None,
        decoder: Literal["mixed", "cpu"] = "mixed",
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be positive, got {shuffle_buffer}")
        self.shards = shards if isinstance(shards, ShardSet) else open_shards(shards)
        super().__init__(
            self.shards.names,
            batch_size,
            aug,
            input_size=input_size,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            device_id=device_id,
            num_threads=num_threads,
            prefetch=prefetch,
            output_dtype=output_dtype,
            hw_decoder_load=hw_decoder_load,
            batches_per_epoch=batches_per_epoch,
            decoder=decoder,
        )
        self.shuffle_buffer = -(-shuffle_buffer // batch_size) * batch_size  # whole batches
        self._reader = _BlockReader(self.shards)
        self._plan = functools.lru_cache(maxsize=2)(
            functools.partial(
                epoch_plan,
                self.shards.counts,
                batch_size,
                seed=seed,
                shard_id=shard_id,
                num_shards=num_shards,
                block_size=self.shuffle_buffer,
            )
        )

    @property
    def read_stats(self) -> ReadStats:
        """Opens, read calls and bytes read so far (all shard reads of this loader)."""
        return self._reader.stats

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, shape (len(self), batch_size)."""
        return self._plan(epoch=epoch).order[: self.batches_per_epoch]

    def close(self) -> None:
        """Free the pipeline and the blocks held in memory (the loader starts again if used again)."""
        super().close()
        self._reader.close()
        self._reader = _BlockReader(self.shards)

    def rewind(self, batches: int) -> None:
        """Step back `batches` batches in this epoch and drop the pipeline with what it prefetched: after a shard
        read failed (ShardReadError) part-way through a training step, the position the checkpoint saves is the
        step's first batch, read again on resume."""
        self.close()
        self._batch = max(0, self._batch - batches)

    def _identity(self) -> dict:
        return {**super()._identity(), "shuffle_buffer": self.shuffle_buffer, "shards": self.shards.fingerprint}

    def _new_feed(self) -> _SampleFeed:
        return _SampleFeed(self, self._epoch, self._batch)

    def _input(self, index: int) -> np.ndarray:
        return self.shards.read_sample(index, self._reader.stats)


def bench_shards_vs_folder(
    files: list[str],
    shards: str | ShardSet,
    batch_size: int,
    aug: Augmentation,
    *,
    input_size: int,
    batches: int = 40,
    warmup: int = 5,
    **options,
) -> list[dict]:
    """img/s and MB/s (encoded bytes) of DaliLoader over `files` and ShardLoader over `shards` (the same
    images), one after the other in this process; `options` go to both (num_threads, device_id, ...)."""
    shard_set = shards if isinstance(shards, ShardSet) else open_shards(shards)
    loaders = {
        "folder": lambda: DaliLoader(files, batch_size, aug, input_size=input_size, seed=0, **options),
        "shards": lambda: ShardLoader(shard_set, batch_size, aug, input_size=input_size, seed=0, **options),
    }
    mean_bytes = {
        "folder": float(np.mean([os.path.getsize(f) for f in files])),
        "shards": float(shard_set.sizes.mean()),
    }
    results = []
    for name, make in loaders.items():
        loader = make()
        it, t = _batches(loader), 0.0
        for i in range(warmup + batches):
            if i == warmup:
                t = time.perf_counter()
            batch = next(it)
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)
        sec = time.perf_counter() - t
        img_s = batches * batch_size / sec
        row = {"loader": name, "img_s": img_s, "MB_s": img_s * mean_bytes[name] / 1e6, "batch": batch_size}
        if isinstance(loader, ShardLoader):
            row["reads"] = loader.read_stats.as_dict()
        results.append(row)
        loader.close()
    return results


def _batches(loader: DaliLoader):
    while True:
        yield from loader
