"""Choose and build the batch source for the train loop: DALI (over image files or WebDataset shards),
PIL reference, or synthetic.

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

from .config import Config, ConfigError, DataConfig
from .pipelines.scan import DatasetScanError, format_bad, scan_dataset
from .pipelines.shards import MANIFEST_NAME, ShardSet, is_shard_path, open_shards


@dataclass
class Dataset:
    files: list[str]  # checked image paths ([] for synthetic data and for shards)
    num_images: int  # images in the whole data set (all ranks)
    warnings: list[str]  # for the user: files left out, the scan's notes (a cache that could not be written)
    # data.format shards: the checked shard set (its indexes, in memory). Broadcast to the ranks as it is, as the
    # folder's file list is: for ImageNet both pickle to ~75 MB in 0.3 s, and no rank re-reads the indexes
    shards: ShardSet | None = None


SAMPLE_FOLDER = "sample"  # the one folder name data.make_sample writes into


def scan(cfg: Config, progress: bool = True):
    """List and check the images under data.data_path (creating the sample set first if configured)."""
    d = cfg.data
    path = Path(d.data_path)
    if d.make_sample and not path.exists():
        if path.name != SAMPLE_FOLDER:  # a mistyped data_path must not quietly fill with sample photos
            raise DatasetScanError(
                f"data.data_path: {path} does not exist (data.make_sample creates the sample set only in a folder "
                f"named {SAMPLE_FOLDER!r}, such as ./data/{SAMPLE_FOLDER})"
            )
        from .pipelines.sample_data import make_sample_data

        make_sample_data(str(path))
    if (path / "train").is_dir() and (path / "val").is_dir():  # the official --data_path is this root
        raise DatasetScanError(
            f"data.data_path: {path} holds train/ and val/ (an ImageNet root): pretraining would read both as two "
            f"classes; set data.data_path: {path / 'train'}"
        )
    try:
        return scan_dataset(
            str(path), cache_dir=d.scan_cache_dir or None, num_workers=max(4, d.num_workers), progress=progress
        )
    except DatasetScanError as e:
        raise DatasetScanError(f"data.data_path: {e}") from None


def _has_manifest(path: str) -> bool:
    return Path(path).is_file() or (Path(path) / MANIFEST_NAME).is_file()


def data_format(cfg: Config) -> str:
    """data.format resolved: "folder" or "shards" (auto: shards when data_path holds a manifest or *.tar).

    Refused, naming data.format: shards on a folder without shards; folder on make-shards' output (a
    manifest). folder on a folder of *.tar without a manifest is scanned for images, as asked."""
    d = cfg.data
    found = is_shard_path(d.data_path)
    if d.format == "auto":
        return "shards" if found else "folder"
    if d.format == "shards" and not found and Path(d.data_path).is_dir():
        raise ConfigError(
            f"data.format: shards, but data.data_path {d.data_path} holds no shards (no {MANIFEST_NAME}, no *.tar); "
            f"make them with: mae-fast make-shards {d.data_path} DST, or set data.format: folder (or auto)"
        )
    if d.format == "folder" and found and _has_manifest(d.data_path):
        raise ConfigError(
            f"data.format: folder, but data.data_path {d.data_path} holds WebDataset shards (a {MANIFEST_NAME} of "
            f"make-shards); set data.format: shards (or auto), or point data.data_path at the image folder"
        )
    return d.format


def find_shards(cfg: Config) -> Dataset:
    """The checked shard set of data.data_path; raises DatasetScanError naming every unusable shard."""
    d = cfg.data
    if d.backend == "pil":
        raise ConfigError(
            f"data.backend: pil reads image files; the shards in data.data_path {d.data_path} are read by the "
            f"dali backend (set data.backend: dali), or point data.data_path at the image folder"
        )
    try:
        shard_set = open_shards(d.data_path, options=d.storage_options, pattern=d.shards, cache_dir=d.scan_cache_dir)
    except DatasetScanError as e:
        guessed = d.format == "auto" and Path(d.data_path).is_dir() and not _has_manifest(d.data_path)
        why = " (data.format auto read it as shards: it holds *.tar files; data.format: folder reads its images)"
        raise DatasetScanError(f"data.data_path: {e}{why if guessed else ''}") from None
    warnings = []
    if shard_set.bad:
        warnings.append(
            f"{len(shard_set.bad)} source files were left out by make-shards (listed in its {MANIFEST_NAME})"
        )
    return Dataset([], len(shard_set), warnings, shards=shard_set)


def find_dataset(cfg: Config, progress: bool = True) -> Dataset:
    """The images to train on; raises DatasetScanError or ConfigError (naming the key) before any model is built."""
    if cfg.data.backend == "synthetic":
        return Dataset([], cfg.data.synthetic_images, [])
    if data_format(cfg) == "shards":
        return find_shards(cfg)
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
    if d.backend == "synthetic":
        from .pipelines.synthetic import SyntheticLoader

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        loader = SyntheticLoader(
            micro_batch,
            d.input_size,
            batches_per_epoch=batches_per_epoch,
            device=str(device),
            dtype=dtype,
            seed=cfg.misc.seed + rank,
        )
        return loader, dtype, f"synthetic {d.input_size}px images on {device}"
    sharding = {
        "seed": cfg.misc.seed,
        "shard_id": rank,
        "num_shards": world_size,
        "batches_per_epoch": batches_per_epoch,
    }
    if d.backend == "dali":
        loader, dtype, where = _dali_loader(d, dataset, micro_batch, device, sharding)
    else:
        from .pipelines.pil import PilLoader

        if dataset.shards is not None:
            raise ConfigError(f"data.backend: pil reads image files, not the shards in {d.data_path}; use dali")
        pin = d.pin_memory and device.type == "cuda"
        loader = PilLoader(
            dataset.files, micro_batch, d.augmentation, input_size=d.input_size, num_workers=d.num_workers,
            pin_memory=pin, device=str(device), **sharding,
        )  # fmt: skip
        dtype, where = torch.float32, f"PIL (torchvision), {d.num_workers} workers"
    return loader, dtype, f"{_describe_source(d, dataset, loader, world_size)}; {where}"


def _dali_loader(d: DataConfig, dataset: Dataset, micro_batch: int, device: torch.device, sharding: dict):
    """A DaliLoader over the files, or a ShardLoader over the shards -> (loader, batch dtype, description)."""
    from .pipelines.dali import DaliLoader, dali_available

    if not dali_available():
        raise ConfigError(
            "data.backend: dali, but nvidia.dali cannot be imported here; install "
            "nvidia-dali-cuda130 (pip) or set data.backend: pil"
        )
    device_id = (device.index or 0) if device.type == "cuda" else None
    options = dict(
        input_size=d.input_size,
        device_id=device_id,
        num_threads=max(1, d.num_workers),
        prefetch=d.prefetch,
        output_dtype=d.output_dtype,
        hw_decoder_load=d.hw_decoder_load,
        decoder="cpu" if d.decoder == "cpu" else "mixed",  # mixed needs a GPU: without one all runs on the CPU
        **sharding,
    )
    if dataset.shards is not None:
        from .pipelines.shard_loader import ShardLoader

        loader = ShardLoader(dataset.shards, micro_batch, d.augmentation, shuffle_buffer=d.shuffle_buffer, **options)
    else:
        loader = DaliLoader(dataset.files, micro_batch, d.augmentation, **options)
    dtype = torch.float16 if d.output_dtype == "float16" else torch.uint8
    rest = ", rest on GPU" if device_id is not None and not loader.gpu_decode else ""
    where = f"DALI, decode on {'GPU (mixed)' if loader.gpu_decode else 'CPU'}{rest}, {d.num_workers} threads"
    return loader, dtype, where


def _describe_source(d: DataConfig, dataset: Dataset, loader: Any, world_size: int) -> str:
    if dataset.shards is None:
        return f"{dataset.num_images} images in {d.data_path}"
    s = dataset.shards
    block = min(loader.shuffle_buffer, len(s) // world_size)  # a block never outgrows the rank's part
    held = 2 * block * float(s.sizes.mean()) / 1e6  # MB: the block being fed and the next one
    memory = f"{held / 1e3:.2g} GB" if held >= 1e3 else f"{held:.3g} MB"
    return (
        f"{len(s)} samples in {len(s.tars)} shards in {d.data_path}; shuffle buffer {loader.shuffle_buffer} "
        f"samples (~{memory} held per rank)"
    )


def sample_images(dataset: Dataset, n: int) -> list[str | bytes]:
    """n fixed images spread over the data set, for the reconstruction grid: file paths, or the encoded bytes of
    shard samples (read here: n small reads)."""
    if dataset.shards is not None:
        s = dataset.shards
        return [s.read_sample(i).tobytes() for i in range(0, len(s), max(1, len(s) // n))[:n]]
    return dataset.files[:: max(1, len(dataset.files) // n)][:n]


SOURCES = {"dali": "image files (data.format folder)", "shards": "WebDataset shards (data.format shards)"}


def check_same_source(ckpt: dict, loader: Any, path: str) -> None:
    """Refuse a checkpoint whose data position is for the other source (a folder run's in a shard run, or the
    reverse): both run with data.backend dali, but their orders and positions do not carry over."""
    saved = next(iter(ckpt.get("data") or []), None)
    kind = saved.get("kind") if isinstance(saved, dict) else None
    mine = getattr(loader, "kind", None)
    if kind in SOURCES and mine in SOURCES and kind != mine:
        from .checkpoint import CheckpointError

        raise CheckpointError(
            f"cannot resume from {path}: it was saved by a run reading {SOURCES[kind]}, this run reads "
            f"{SOURCES[mine]} from data.data_path; the data order and position do not carry over. Resume with "
            f"the data it was saved with, or start a new run from its weights (misc.init_weights: {path}, "
            f"another checkpointing.checkpoint_dir)"
        )


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
