"""The DALI training pipeline for MAE: read -> decode + random crop -> resize -> flip -> normalize.

Graph (one pipeline per process / shard):

    paths   fn.external_source   file paths of the next batch, from _PathFeed
    jpegs   fn.io.file.read      raw bytes, read by DALI's threads
    images  fn.decoders.image_random_crop   decode only the crop (RGB; grey/CMYK/PNG too);
                                 "mixed" (nvJPEG, GPU) with a device, "cpu" without
    images  fn.resize            to input_size x input_size, cubic by default, antialiased
    out     fn.crop_mirror_normalize   coin-flip mirror, (x - 255*mean) / (255*std),
                                 CHW, float16 (or uint8 without normalization)

(ShardLoader, in shard_loader.py, is this loader with another feed: the encoded bytes of samples
read from WebDataset tar shards go straight to the decoder, source = "encoded", no io.file.read.)

Why the order is fed from Python instead of fn.readers.file(shuffle_after_epoch=True):
checked by experiment on DALI 2.4, that reader does reshuffle the whole dataset
each epoch with disjoint, complete shards, but its epoch ends with a batch
padded by copies of the last sample, shards may differ in size by one, and the
reader runs its own epoch counter, so set_epoch could not jump and a run that
stops mid-epoch would drift. Feeding paths lets one numpy function
(common.epoch_order, shared with the PIL loader) define the order: a
permutation of all files drawn from (seed, epoch), cut into equal shard blocks
of whole batches. Reading still happens in DALI's C++ threads (io.file.read).

The paths form one continuous stream across epochs, so DALI's prefetching
runs through epoch boundaries without a bubble. The random ops (crop window,
flip) are seeded once per pipeline from (seed, shard, position at build).
Resume is exact: state() stores the position and DALI's checkpoint (the state
of every RNG, enable_checkpointing=True, base64 in the JSON); load_state()
rebuilds the same graph from it and restarts the path stream at the position.

A file that passed the scan but that the decoder rejects (a corrupt Huffman
table, say) makes DALI fail the whole pipeline. The loader then decodes the
files of the batches in flight one at a time, oldest batch first and whole
(no crop), on the same decoder; leaves out the ones that fail
(ShardedFileLoader.leave_out); rebuilds the pipeline at the same position and
goes on. If no single file fails, the original error is raised.
"""

from __future__ import annotations

import base64
import collections
import gc
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from .common import Augmentation, ShardedFileLoader, derive_seeds, epoch_order

__all__ = ["DaliLoader", "dali_available"]

_DALI_INTERP = {
    "cubic": "INTERP_CUBIC",
    "linear": "INTERP_LINEAR",
    "nearest": "INTERP_NN",
    "lanczos": "INTERP_LANCZOS3",
}
# nvJPEG buffer padding from DALI's ImageNet examples: avoids reallocations on large images.
_DEVICE_MEMORY_PADDING = 211025920
_HOST_MEMORY_PADDING = 140544512


def dali_available() -> bool:
    """True if nvidia.dali can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


class _PathFeed:
    """external_source callback: the encoded paths of the next batch of the stream.

    The stream is epoch e batches 0..L-1, then epoch e+1, and so on; DALI calls
    this ahead of consumption (prefetch), so its position leads the loader's.
    It holds no reference to the loader, so dropping the loader frees the pipeline.
    """

    def __init__(self, loader: DaliLoader, epoch: int, batch: int) -> None:
        self.files = loader.files
        self.substitutes = loader.substitutes  # live: leave_out() updates it in place
        # the newest batches handed to DALI, ((epoch, batch), file indices), for finding a bad file
        self.in_flight: collections.deque[tuple[tuple[int, int], list[int]]] = collections.deque(
            maxlen=loader.prefetch + 2
        )
        self.sharding = loader._sharding()
        self.batches_per_epoch = loader.batches_per_epoch
        self.epoch, self.batch = epoch, batch
        self._current = self.order(epoch)  # one epoch's order: 10 MB for ImageNet

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(epoch=epoch, **self.sharding)[: self.batches_per_epoch]  # (L, batch_size)

    def __call__(self) -> list[np.ndarray]:
        if self.batch >= len(self._current):
            self.epoch, self.batch = self.epoch + 1, 0
            self._current = self.order(self.epoch)
        indices = [self.substitutes.get(i, i) for i in self._current[self.batch].tolist()]
        self.in_flight.append(((self.epoch, self.batch), indices))
        self.batch += 1
        return [_encode(self.files[i]) for i in indices]


def _encode(path: str) -> np.ndarray:
    return np.frombuffer(path.encode(), dtype=np.uint8)


class DaliLoader(ShardedFileLoader):
    """Batches of augmented images, (N, 3, H, W) float16 or uint8, from a DALI pipeline.

    One epoch per iteration: `for batch in loader` yields exactly len(loader)
    full batches, on cuda:device_id (or the CPU when device_id is None).
    set_epoch(e) selects the epoch: a no-op if e is the current epoch (so it is
    safe after load_state), continuous if e follows a finished epoch, otherwise
    a jump that rebuilds the pipeline. Iterating again without set_epoch goes on
    with the next epoch.

    Ownership: a yielded tensor is a zero-copy view of DALI's output buffer.
    Treat it as DALI's once you ask for the next batch: copy it (e.g. into a
    static input buffer) before then if you need it longer.
    """

    kind = "dali"
    source = "paths"  # what the feed gives DALI: file paths, read by fn.io.file.read; "encoded": the bytes themselves

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
        device_id: int | None = None,
        num_threads: int = 4,
        prefetch: int = 2,
        output_dtype: Literal["float16", "uint8"] = "float16",
        hw_decoder_load: float | None = None,
        batches_per_epoch: int | None = None,
        decoder: Literal["mixed", "cpu"] = "mixed",
    ) -> None:
        """A DaliLoader over `files` (paths as given; absolute is safest).

        device_id: CUDA index for GPU outputs, and for "mixed" (GPU) decoding; None runs
        everything on the CPU (hw_decoder_load then does nothing). decoder="cpu" with a
        device_id decodes on the CPU threads and does the rest on the GPU, which leaves the
        GPU's SMs to the training step when CPU cores are plentiful. seed must be the
        same on every shard (it fixes the epoch order); the augmentation RNG also
        depends on shard_id. batches_per_epoch caps the epoch below its natural
        length (all full batches): a train loop that consumes fewer batches per
        epoch should pass its count, so the stream runs on without a rebuild.
        """
        super().__init__(
            files, batch_size, seed=seed, shard_id=shard_id, num_shards=num_shards, batches_per_epoch=batches_per_epoch
        )
        self.aug, self.input_size = aug, input_size
        self.device_id = device_id
        self.num_threads, self.prefetch = num_threads, prefetch
        self.output_dtype = output_dtype
        self.hw_decoder_load = hw_decoder_load
        self.gpu_decode = device_id is not None and decoder == "mixed"
        self._pipe = None  # when set, its next output is batch (_epoch, _batch)
        self._feed: _PathFeed | None = None  # the pipe's path source
        self._stream_start: tuple[int, int] | None = None  # position the pipe was built at
        self._restore: bytes | None = None  # DALI checkpoint for the next build

    # ------------------------------------------------------------ public interface

    def set_epoch(self, epoch: int) -> None:
        # Only a jump drops the pipeline: if `epoch` starts where the stream goes on, it continues.
        jump = epoch != self._epoch and (epoch, 0) != self._next_position()
        super().set_epoch(epoch)
        if jump:
            self._close_pipe()  # its prefetched batches belong to another part of the stream
            self._restore = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._start_pass()
        if self._pipe is None:
            self._build()
        stream = None
        if self.device_id is not None:
            stream = torch.cuda.current_stream(self.device_id)
        while self._batch < self.batches_per_epoch:
            try:
                (out,) = self._pipe.run(stream)  # ready on `stream`: no host sync for GPU outputs
            except RuntimeError as e:  # DALI's "Critical error in pipeline"
                error = _dali_reason(e)
            else:
                self._batch += 1
                yield torch.from_dlpack(out.as_tensor())
                continue
            # out of the except block: its traceback no longer holds the failed pipeline's memory
            self._leave_out_bad_files(error)

    def state(self) -> dict:
        """JSON-serializable position + DALI RNG state; load_state() continues exactly from here."""
        checkpoint = self._restore
        if self._pipe is not None:
            checkpoint = self._pipe.checkpoint()
        return {
            **super().state(),
            "stream_start": list(self._stream_start) if checkpoint is not None else None,
            "dali_checkpoint": base64.b64encode(checkpoint).decode() if checkpoint else None,
        }

    def load_state(self, state: dict) -> None:
        """Restore a position saved by state() of a loader built with the same arguments."""
        super().load_state(state)  # checks the settings, then sets the position
        self._close_pipe()
        ckpt = state.get("dali_checkpoint")
        self._restore = base64.b64decode(ckpt) if ckpt else None
        start = state.get("stream_start")
        self._stream_start = (int(start[0]), int(start[1])) if start else None

    def close(self) -> None:
        """Free the pipeline (threads, pinned and GPU memory); the loader rebuilds it if used again."""
        self._close_pipe()

    # ------------------------------------------------------------ internals

    def _close_pipe(self) -> None:
        self._pipe = None  # DALI frees its resources when the Pipeline object goes
        self._feed = None
        self._stream_start = None

    def _leave_out_bad_files(self, error: str) -> None:
        """The pipeline failed: find the files in flight that fail alone, leave them out, rebuild here."""
        # the batches fed but not yet yielded, oldest first: the one that failed is the first
        in_flight = [batch for pos, batch in self._feed.in_flight if pos >= (self._epoch, self._batch)]
        self._close_pipe()  # a pipeline that raised is no longer usable
        gc.collect()  # free its decoder buffers before building more
        checker, bad, checked = _FileChecker(self), [], 0
        for batch in in_flight:
            for i in batch:
                reason = checker.check(i)
                if reason is not None:
                    bad.append((i, reason))
            checked += len(batch)
            if bad:  # a bad file in a later batch makes that one fail in its turn
                break
        del checker
        if not bad:
            raise RuntimeError(
                f"the DALI pipeline failed and none of the {checked} files in flight fails alone: {error}"
            )
        for i, reason in bad:
            self.leave_out(i, reason)
        gc.collect()
        self._restore = None  # rebuilt at the current position, its seeds drawn from that position
        self._build()

    def _build(self) -> None:
        if self._restore is None or self._stream_start is None:
            self._stream_start = (self._epoch, self._batch)
        # Seeds depend on where the pipeline starts, so a jump with set_epoch is
        # itself reproducible; a restored checkpoint then replaces the RNG states.
        seeds = derive_seeds(self.seed, self.shard_id, *self._stream_start, count=3)
        feed = self._new_feed()
        pipe = _define_pipeline(self, feed, seeds, checkpoint=self._restore)
        with warnings.catch_warnings():
            # DALI cannot save a parameterless source's position; the feed restarts it instead.
            warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline")
            pipe.build()
        self._pipe, self._feed, self._restore = pipe, feed, None

    def _new_feed(self) -> _PathFeed:
        """The external source's callback, starting at the current position (a subclass may feed bytes)."""
        return _PathFeed(self, self._epoch, self._batch)

    def _input(self, index: int) -> np.ndarray:
        """What the external source gets for file `index` alone (the file checker's input)."""
        return _encode(self.files[index])


class _FileChecker:
    """The loader's graph at batch size 1, decoding whole images, fed one path at a time: does this
    file go through? (Whole, so that a failure does not depend on the crop drawn.)"""

    def __init__(self, loader: DaliLoader) -> None:
        self.loader = loader
        self._pipe = None

    def check(self, index: int) -> str | None:
        """None if file `index` decodes, else why not (the pipeline is rebuilt after a failure)."""
        if self._pipe is None:
            self._pipe = _define_pipeline(self.loader, None, [0, 0, 0], checkpoint=None, batch_size=1)
            self._pipe.build()
        self._pipe.feed_input(self.loader.source, [self.loader._input(index)])
        try:
            self._pipe.run()
        except RuntimeError as e:
            self._pipe = None
            return _dali_reason(e).replace(self.loader.files[index], "").rstrip(" :")
        return None


def _dali_reason(error: Exception) -> str:
    """The informative line of a DALI pipeline error: the one after 'encountered:'."""
    lines = [line.strip() for line in str(error).splitlines()]
    after = lines[lines.index("encountered:") + 1 :] if "encountered:" in lines else lines
    return next((line for line in after if line), "DALI pipeline error")


def _define_pipeline(
    loader: DaliLoader,
    feed: _PathFeed | None,
    seeds: list[int],
    checkpoint: bytes | None,
    batch_size: int | None = None,
):
    """The pipeline graph. With batch_size (the file checker): no feed (feed=None; the input is fed
    with pipe.feed_input(loader.source, ...)), whole-image decoding, a queue of one."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    aug = loader.aug
    pipe = Pipeline(
        batch_size=batch_size or loader.batch_size,
        num_threads=loader.num_threads,
        device_id=loader.device_id,
        seed=seeds[0],
        prefetch_queue_depth=1 if batch_size else loader.prefetch,
        enable_checkpointing=True,
        checkpoint=checkpoint,
        exec_dynamic=True,  # outputs stay valid while referenced; run(stream) needs it
    )
    if not loader.gpu_decode:
        decoder = {"device": "cpu"}
    else:
        decoder = {
            "device": "mixed",
            "device_memory_padding": _DEVICE_MEMORY_PADDING,
            "host_memory_padding": _HOST_MEMORY_PADDING,
        }
        if loader.hw_decoder_load is not None:
            decoder["hw_decoder_load"] = loader.hw_decoder_load
    with pipe:
        data = fn.external_source(source=feed, name=loader.source, batch=True, dtype=types.UINT8, ndim=1)
        jpegs = fn.io.file.read(data) if loader.source == "paths" else data  # encoded images
        if batch_size:  # the file checker: the whole image
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        else:
            images = fn.decoders.image_random_crop(
                jpegs,
                output_type=types.RGB,
                random_area=list(aug.crop_scale),
                random_aspect_ratio=list(aug.crop_ratio),
                num_attempts=10,  # as torchvision; then, as there, the largest crop with the ratio clamped
                seed=seeds[1],
                **decoder,
            )
        if loader.device_id is not None and not loader.gpu_decode:
            images = images.gpu()  # decoded on the CPU threads; resize, flip and normalize on the GPU
        images = fn.resize(
            images,
            resize_x=loader.input_size,
            resize_y=loader.input_size,
            interp_type=getattr(types, _DALI_INTERP[aug.interpolation]),
            antialias=True,
        )
        mirror = fn.random.coin_flip(probability=aug.hflip_prob, seed=seeds[2])
        if loader.output_dtype == "uint8":
            out = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.UINT8, output_layout="CHW")
        else:
            out = fn.crop_mirror_normalize(
                images,
                mirror=mirror,
                dtype=types.FLOAT16,
                output_layout="CHW",
                mean=[255 * m for m in aug.mean],
                std=[255 * s for s in aug.std],
            )
        pipe.set_outputs(out)
    return pipe
