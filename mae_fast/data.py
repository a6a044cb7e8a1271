"""Choose and build the batch source for the train loop: DALI, PIL reference, or synthetic.

Every loader yields (N, 3, H, W) batches of one fixed shape, exactly len(loader) per epoch,
and has set_epoch / state / load_state. The loop copies each batch into the step's static
input buffer (DALI owns its output only until the next batch) and times the wait.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError
from .pipelines.scan import DatasetScanError, format_bad, scan_dataset


@dataclass
class Dataset:
    files: list[str]  # checked image paths ([] for synthetic data)
    num_images: int  # images in the whole data set (all shards)
    warnings: list[str]  # for the user: files left out, the scan's notes (a cache that could not be written)


def scan(cfg: Config, progress: bool = True):
    """List and check the images under data.data_path (creating the sample set first if configured)."""
    d = cfg.data
    path = Path(d.data_path)
    if d.make_sample and not path.exists():
        from .pipelines.sample_data import make_sample_data

        make_sample_data(str(path))
    try:
        return scan_dataset(
            str(path), cache_dir=d.scan_cache_dir or None, num_workers=max(4, d.num_workers), progress=progress
        )
    except DatasetScanError as e:
        raise DatasetScanError(f"data.data_path: {e}") from None


def find_dataset(cfg: Config, progress: bool = True) -> Dataset:
    """The images to train on; raises DatasetScanError (naming the path) before any model is built."""
    if cfg.data.backend == "synthetic":
        return Dataset([], cfg.data.synthetic_images, [])
    result = scan(cfg, progress=progress)
    return Dataset(result.files, len(result.files), ([format_bad(result)] if result.bad else []) + result.notes)


def build_loader(
    cfg: Config,
    dataset: Dataset,
    micro_batch: int,
    batches_per_epoch: int,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Any, torch.dtype, str]:
    """The configured loader for this rank -> (loader, batch dtype, description)."""
    d = cfg.data
    seed = cfg.misc.seed
    if d.backend == "synthetic":
        from .pipelines.synthetic import SyntheticLoader

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        loader = SyntheticLoader(
            micro_batch,
            d.input_size,
            batches_per_epoch=batches_per_epoch,
            device=str(device),
            dtype=dtype,
            seed=seed + rank,
        )
        return loader, dtype, f"synthetic {d.input_size}px images on {device}"
    aug = d.augmentation
    if d.backend == "dali":
        from .pipelines.dali import DaliLoader, dali_available

        if not dali_available():
            raise ConfigError(
                "data.backend: dali, but nvidia.dali cannot be imported here; install "
                "nvidia-dali-cuda130 (pip) or set data.backend: pil"
            )
        device_id = (device.index or 0) if device.type == "cuda" else None
        decoder = "cpu" if d.decoder == "cpu" else "mixed"  # mixed needs a GPU: without one all runs on the CPU
        loader = DaliLoader(
            dataset.files,
            micro_batch,
            aug,
            input_size=d.input_size,
            seed=seed,
            shard_id=rank,
            num_shards=world_size,
            device_id=device_id,
            num_threads=max(1, d.num_workers),
            prefetch=d.prefetch,
            output_dtype=d.output_dtype,
            hw_decoder_load=d.hw_decoder_load,
            batches_per_epoch=batches_per_epoch,
            decoder=decoder,
        )
        dtype = torch.float16 if d.output_dtype == "float16" else torch.uint8
        where = (
            f"DALI, decode on {'GPU (mixed)' if loader.gpu_decode else 'CPU'}"
            f"{', rest on GPU' if device_id is not None and not loader.gpu_decode else ''}, {d.num_workers} threads"
        )
    else:
        from .pipelines.pil import PilLoader

        loader = PilLoader(
            dataset.files,
            micro_batch,
            aug,
            input_size=d.input_size,
            seed=seed,
            shard_id=rank,
            num_shards=world_size,
            num_workers=d.num_workers,
            pin_memory=d.pin_memory and device.type == "cuda",
            device=str(device),
            batches_per_epoch=batches_per_epoch,
        )
        dtype = torch.float32
        where = f"PIL (torchvision), {d.num_workers} workers"
    return loader, dtype, f"{dataset.num_images} images in {d.data_path}; {where}"


class TimedBatches:
    """Batches of a loader, with the seconds spent waiting for them. start_epoch(e) begins epoch e (or goes
    on where a resumed loader stands in it); at the end of an epoch next() goes on with the next one."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.wait_s = 0.0
        self._it: Iterator | None = None

    def start_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        self._it = iter(self.loader)

    def next(self) -> torch.Tensor:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:  # the epoch is done: iterating again goes on with the next one
            self._it = iter(self.loader)
            batch = next(self._it)
        self.wait_s += time.perf_counter() - t0
        return batch

    def take_wait(self) -> float:
        w, self.wait_s = self.wait_s, 0.0
        return w
