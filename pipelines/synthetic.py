"""Random images with the loaders' interface: no files, no decoding (for benchmarks and tests)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .common import EpochPosition, derive_seeds

__all__ = ["SyntheticLoader"]


class SyntheticLoader(EpochPosition):
    """batches_per_epoch batches of N(0, 1) images (N, 3, H, W), made on `device`.

    Batch i of epoch e is a function of (seed, e, i) only, so the same seed
    gives the same batches and resume is exact.
    """

    kind = "synthetic"

    def __init__(
        self,
        batch_size: int,
        input_size: int,
        *,
        batches_per_epoch: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or input_size < 1 or batches_per_epoch < 1:
            raise ValueError(
                "batch_size, input_size and batches_per_epoch must be positive, got "
                f"{batch_size}, {input_size}, {batches_per_epoch}"
            )
        super().__init__(batches_per_epoch)
        self.shape = (batch_size, 3, input_size, input_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self._generator = torch.Generator(device=self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._start_pass()
        while self._batch < self.batches_per_epoch:
            self._generator.manual_seed(derive_seeds(self.seed, self._epoch, self._batch, count=1)[0])
            self._batch += 1
            x = torch.randn(self.shape, generator=self._generator, device=self.device)
            yield x.to(self.dtype)

    def close(self) -> None:
        """Nothing to free; here so every loader has the same interface."""

    def _identity(self) -> dict:
        return {"shape": list(self.shape), "batches_per_epoch": self.batches_per_epoch, "seed": self.seed}
