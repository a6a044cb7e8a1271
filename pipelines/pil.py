"""The reference pipeline of MAE's main_pretrain.py: PIL + torchvision transforms + DataLoader.

    RandomResizedCrop(input_size, scale, ratio, BICUBIC) -> RandomHorizontalFlip
    -> ToTensor -> Normalize(mean, std)

Same interface and the same epoch order (common.epoch_order) as DaliLoader, so
the two can be compared image for image. Resume restores the position in the
order exactly; the augmentation draws (made in the worker processes) are not
restored. torchvision is an optional dependency, imported when a loader is built.
A file that PIL cannot decode is left out as in DaliLoader: the worker reports
it with the batch, and the loader reads the next good file in its place.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from .common import Augmentation, ShardedFileLoader, derive_seeds

__all__ = ["PilLoader", "pil_transform"]


def pil_transform(aug: Augmentation, input_size: int):
    """The torchvision transform of MAE's main_pretrain.py for `aug`, to input_size x input_size."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    interpolation = {
        "cubic": InterpolationMode.BICUBIC,
        "linear": InterpolationMode.BILINEAR,
        "nearest": InterpolationMode.NEAREST,
        "lanczos": InterpolationMode.LANCZOS,
    }[aug.interpolation]
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                input_size,
                scale=tuple(aug.crop_scale),
                ratio=tuple(aug.crop_ratio),
                interpolation=interpolation,
            ),
            transforms.RandomHorizontalFlip(aug.hflip_prob),
            transforms.ToTensor(),
            transforms.Normalize(mean=tuple(aug.mean), std=tuple(aug.std)),
        ]
    )


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[str], transform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """(image, "") or, when the file cannot be decoded, (an empty image, why) for the loader to replace."""
        try:
            with open(self.files[index], "rb") as f:
                img = Image.open(f).convert("RGB")  # grey, CMYK, palette PNG -> RGB
        except Exception as e:  # any decoding failure is this file's: the loader leaves it out
            return torch.zeros(0), f"{type(e).__name__}: {e}"
        return self.transform(img), ""


def _collate(samples: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor | list[torch.Tensor], list[str]]:
    """A batch and its errors; default_collate stacks straight into shared memory (in a worker)."""
    images, errors = zip(*samples)
    if any(errors):  # different shapes: the loader replaces the failed ones and stacks
        return list(images), list(errors)
    return torch.utils.data.default_collate(list(images)), list(errors)


class _BatchSampler:
    """Yields the index lists of one epoch from a start batch; the loader sets both before each pass."""

    def __init__(self, loader: PilLoader) -> None:
        self.loader = loader
        self.epoch, self.start = 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        order: np.ndarray = self.loader.epoch_order(self.epoch)
        for row in order[self.start :].tolist():
            yield [self.loader.substitutes.get(i, i) for i in row]

    def __len__(self) -> int:
        return len(self.loader) - self.start


class PilLoader(ShardedFileLoader):
    """Same contract as DaliLoader (see pipelines.common); batches are float32 and fresh tensors."""

    kind = "pil"

    def __init__(
        self,
        files: list[str],
        batch_size: int,
        aug: Augmentation,
        *,
        input_size: int,
        seed: int,
        shard_id: int = 0,
        num_shards: int = 1,
        num_workers: int = 8,
        pin_memory: bool = True,
        device: str = "cpu",
        batches_per_epoch: int | None = None,
    ) -> None:
        """A PilLoader over `files`; batches are float32 (N, 3, H, W) moved to `device`.

        batches_per_epoch caps the epoch length, as for DaliLoader.
        """
        super().__init__(
            files, batch_size, seed=seed, shard_id=shard_id, num_shards=num_shards, batches_per_epoch=batches_per_epoch
        )
        self.aug, self.input_size = aug, input_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self._sampler = _BatchSampler(self)
        self._dataloader: torch.utils.data.DataLoader | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._start_pass()
        self._sampler.epoch, self._sampler.start = self._epoch, self._batch
        for images, errors in self._get_dataloader():
            if any(errors):  # rare: replace the undecodable images here, in the main process
                row = self.epoch_order(self._epoch)[self._batch].tolist()
                images = torch.stack(
                    [
                        self._replacement(row[k], err) if err else img
                        for k, (img, err) in enumerate(zip(images, errors, strict=True))
                    ]
                )
            self._batch += 1
            yield images.to(self.device, non_blocking=True)

    def _replacement(self, index: int, error: str) -> torch.Tensor:
        """The image read in place of file `index`, whose decoding failed (or, when `index` was already left
        out, that of the file read in its place)."""
        sub = self.leave_out(index, error)  # the existing substitute when `index` was left out already
        with torch.random.fork_rng(devices=[]):  # the train loop's RNG stream is left as it was
            torch.manual_seed(derive_seeds(self.seed, sub, count=1)[0])
            image, err = self._get_dataloader().dataset[sub]
        return self._replacement(sub, err) if err else image

    def close(self) -> None:
        self._dataloader = None  # stops persistent workers

    def _get_dataloader(self) -> torch.utils.data.DataLoader:
        if self._dataloader is None:
            generator = torch.Generator()
            generator.manual_seed(derive_seeds(self.seed, self.shard_id, count=1)[0])
            self._dataloader = torch.utils.data.DataLoader(
                _FileDataset(self.files, pil_transform(self.aug, self.input_size)),
                batch_sampler=self._sampler,
                collate_fn=_collate,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
                generator=generator,
            )
        return self._dataloader
