"""What the pipelines share: the augmentation settings, the epoch order and the loader position.

Every loader here (DaliLoader, PilLoader, SyntheticLoader) has one interface:

    loader.set_epoch(epoch)      # choose the epoch; its order comes from (seed, epoch)
    for batch in loader: ...     # len(loader) full batches (N, 3, H, W), then stops
    state = loader.state()       # JSON-serializable position (and RNG state where exact)
    loader.load_state(state)     # continue exactly where `state` was taken

Iterating again without set_epoch continues with the next epoch. EpochPosition
keeps that position for all three; ShardedFileLoader adds the files and the
order of the two that read files, and what they do about a file that passed
the scan but cannot be decoded: it is left out for good, the next good file is
read in its place (so every shape, batch count and other shard stays as it
was), and take_bad_files() hands it to the train loop to report.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # on a 0..1 scale
IMAGENET_STD = (0.229, 0.224, 0.225)
Interpolation = Literal["cubic", "linear", "nearest", "lanczos"]


@dataclass
class Augmentation:
    """RandomResizedCrop + horizontal flip + normalize, as in MAE's main_pretrain.py.

    The config's data.augmentation section (its YAML keys are these fields) and what every loader
    takes; the output size is the loader's input_size. Checked here, once: a bad value raises
    ValueError("field: ...") (the config adds its section to the key).
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # crop area as a fraction of the image's
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop width / height
    hflip_prob: float = 0.5
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    interpolation: Interpolation = "cubic"  # MAE uses bicubic

    def __post_init__(self) -> None:
        for key in ("crop_scale", "crop_ratio", "mean", "std"):
            setattr(self, key, [float(x) for x in getattr(self, key)])  # tuples from Python callers
        for key, pair in (("crop_scale", self.crop_scale), ("crop_ratio", self.crop_ratio)):
            if not (len(pair) == 2 and 0 < pair[0] <= pair[1]):
                raise ValueError(f"{key}: must be [low, high] with 0 < low <= high, got {pair}")
        if self.crop_scale[1] > 1:
            raise ValueError(f"crop_scale: area fraction cannot exceed 1, got {self.crop_scale}")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"hflip_prob: must be in [0, 1], got {self.hflip_prob}")
        if len(self.mean) != 3:
            raise ValueError(f"mean: needs 3 values (RGB), got {self.mean}")
        if len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"std: needs 3 positive values (RGB), got {self.std}")
        if self.interpolation not in typing.get_args(Interpolation):
            raise ValueError(
                f"interpolation: must be one of {typing.get_args(Interpolation)}, got {self.interpolation!r}"
            )


def batches_per_epoch(num_files: int, batch_size: int, num_shards: int) -> int:
    """Full batches each shard yields per epoch; the same on every shard."""
    return num_files // num_shards // batch_size


def check_sharding(num_files: int, batch_size: int, shard_id: int, num_shards: int, limit: int | None = None) -> int:
    """Validate the arguments; return the batches per epoch (at least 1), at most `limit`."""
    if batch_size < 1 or num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= shard_id < num_shards; "
            f"got batch_size={batch_size}, shard_id={shard_id}, num_shards={num_shards}"
        )
    n = batches_per_epoch(num_files, batch_size, num_shards)
    if n < 1:
        raise ValueError(
            f"{num_files} files are too few for one batch of {batch_size} on each of "
            f"{num_shards} shard(s) (need at least {batch_size * num_shards})"
        )
    if limit is not None:
        if limit < 1:
            raise ValueError(f"batches_per_epoch must be positive, got {limit}")
        n = min(n, limit)
    return n


def epoch_order(
    num_files: int, batch_size: int, *, seed: int, epoch: int, shard_id: int, num_shards: int
) -> np.ndarray:
    """File indices of this shard's batches in `epoch`, shape (batches_per_epoch, batch_size).

    One permutation of all files per epoch, drawn from (seed, epoch) alone, so
    every shard computes the same one; shard k takes the k-th contiguous block
    of batches_per_epoch * batch_size indices. The shards are thus disjoint,
    together cover the whole dataset except the last num_files % (num_shards *
    batch_size) of the permutation (a different random few each epoch), and
    every epoch has a fresh order. All ranks must pass the same seed.
    (numpy's default_rng((seed, epoch)) rather than a seed + epoch sum, so that
    runs with neighbouring seeds do not share epochs.)
    """
    n = batches_per_epoch(num_files, batch_size, num_shards)
    perm = np.random.default_rng((seed, epoch)).permutation(num_files)
    per_shard = n * batch_size
    block = perm[shard_id * per_shard : (shard_id + 1) * per_shard]
    return block.reshape(n, batch_size)


def derive_seeds(*key: int, count: int) -> list[int]:
    """`count` independent 31-bit seeds from a tuple of ints (DALI seeds must fit int32/int64)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(count)
    return [int(s) & 0x7FFFFFFF for s in state]


def check_state(state: dict, kind: str, identity: dict) -> None:
    """Raise ValueError naming each setting that differs between a saved `state` and a loader."""
    if state.get("kind") != kind:
        raise ValueError(f"state is for a {state.get('kind')!r} loader, this one is {kind!r}")
    diffs = [f"{k}: state {state.get(k)!r} vs loader {v!r}" for k, v in identity.items() if state.get(k) != v]
    if diffs:
        raise ValueError("loader state does not match this loader: " + "; ".join(diffs))


class EpochPosition:
    """The position part of the loader interface, shared by every loader.

    The next batch to yield is batch `_batch` of epoch `_epoch`; `_batch ==
    batches_per_epoch` means that epoch is finished. A subclass sets `kind`,
    provides `_identity()` (the settings a saved state must match) and an
    `__iter__` that calls `_start_pass()` first and counts `_batch` up as it yields.
    """

    kind: str  # names the loader in state(); load_state() refuses another kind

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self._epoch, self._batch = 0, 0  # the next batch to yield

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Keep the position if `epoch` is the current one (as right after load_state), else start it."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._epoch, self._batch = epoch, 0

    def state(self) -> dict:
        """JSON-serializable position; subclasses may append keys (checkpoints store this dict)."""
        return {"kind": self.kind, "epoch": self._epoch, "batch": self._batch, **self._identity()}

    def load_state(self, state: dict) -> None:
        check_state(state, self.kind, self._identity())
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    def _identity(self) -> dict:
        raise NotImplementedError

    def _next_position(self) -> tuple[int, int]:
        """The position of the next batch, with a finished epoch (e, L) written as (e + 1, 0)."""
        if self._batch >= self.batches_per_epoch:
            return self._epoch + 1, 0
        return self._epoch, self._batch

    def _start_pass(self) -> None:
        """Top of __iter__: after a finished epoch, iterating again goes on with the next one."""
        self._epoch, self._batch = self._next_position()


class ShardedFileLoader(EpochPosition):
    """EpochPosition over this shard's part of `files`, in the order of epoch_order (DALI, PIL)."""

    def __init__(
        self,
        files: list[str],
        batch_size: int,
        *,
        seed: int,
        shard_id: int,
        num_shards: int,
        batches_per_epoch: int | None,
    ) -> None:
        super().__init__(check_sharding(len(files), batch_size, shard_id, num_shards, limit=batches_per_epoch))
        self.files = list(files)
        self.batch_size = batch_size
        self.seed = seed
        self.shard_id, self.num_shards = shard_id, num_shards
        self.substitutes: dict[int, int] = {}  # a file found undecodable -> the file read in its place
        self._found: list[tuple[str, str]] = []  # (path, reason) not yet taken by take_bad_files()

    def leave_out(self, index: int, reason: str, report: bool = True) -> int:
        """File `index` cannot be decoded: from now on read the next good file in its place; returns that index.

        A file already left out keeps its substitute (and is not reported again). The dict is updated in
        place: a running DALI path feed and the PIL sampler read it live.
        """
        if index in self.substitutes:
            return self.substitutes[index]
        n = len(self.files)
        sub = (index + 1) % n
        while sub in self.substitutes or sub == index:
            if sub == index:
                raise RuntimeError(f"no file of the {n} can be decoded; the last one: {self.files[index]}: {reason}")
            sub = (sub + 1) % n
        for k, v in self.substitutes.items():
            if v == index:  # files that were read in this one's place move on to the same substitute
                self.substitutes[k] = sub
        self.substitutes[index] = sub
        if report:
            self._found.append((self.files[index], reason))
        return sub

    def leave_out_paths(self, found: list[tuple[str, str]]) -> None:
        """Files found undecodable elsewhere (by another rank): leave them out here too, not reported again."""
        where = {path: i for i, path in enumerate(self.files)}
        for path, reason in found:
            if path in where:
                self.leave_out(where[path], reason, report=False)

    def take_bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) of the files left out since the last call."""
        found, self._found = self._found, []
        return found

    def state(self) -> dict:
        return {**super().state(), "substitutes": [[k, v] for k, v in sorted(self.substitutes.items())]}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.substitutes = {int(k): int(v) for k, v in state.get("substitutes", [])}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This shard's file indices for `epoch`, shape (len(self), batch_size)."""
        return epoch_order(epoch=epoch, **self._sharding())[: self.batches_per_epoch]

    def _sharding(self) -> dict:
        """The arguments of epoch_order other than the epoch (a fresh dict: _PathFeed keeps one)."""
        return {
            "num_files": len(self.files),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shard_id": self.shard_id,
            "num_shards": self.num_shards,
        }

    def _identity(self) -> dict:
        return {**self._sharding(), "batches_per_epoch": self.batches_per_epoch}
