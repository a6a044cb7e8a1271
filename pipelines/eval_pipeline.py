"""The DALI evaluation pipeline: every file exactly once, in order, with the standard evaluation transform.

Graph (built for one pass over the files and dropped after it):

    paths   fn.external_source   the paths of the next batch, in file order; the last batch is
                                 smaller (DALI runs variable batch sizes), so nothing is dropped
                                 or padded
    jpegs   fn.io.file.read      raw bytes, read by DALI's threads
    images  fn.decoders.image    RGB; "mixed" (nvJPEG, GPU) with a device, "cpu" without
    images  fn.resize            shorter side to round(input_size / crop_fraction), cubic, antialiased
                                 (MAE's and DeiT's Resize(int(224 / 0.875)) + CenterCrop(224))
    out     fn.crop_mirror_normalize   centre crop input_size x input_size, (x - 255*mean) / (255*std),
                                 CHW, float16 or float32

Batch j holds files[j * batch_size : (j + 1) * batch_size]. There are no random operations.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator

import numpy as np
import torch

from .dali import _DEVICE_MEMORY_PADDING, _HOST_MEMORY_PADDING, _dali_reason

__all__ = ["EvalDecodeError", "EvalLoader", "eval_resize_size"]

_OUTPUT_DTYPES = ("float16", "float32")


class EvalDecodeError(RuntimeError):
    """A file that passed the dataset scan could not be decoded by DALI."""


def eval_resize_size(input_size: int, crop_fraction: float = 0.875) -> int:
    """The shorter side before the centre crop: 256 for 224 (crop_fraction 0.875, as MAE's evaluation)."""
    return max(input_size, round(input_size / crop_fraction))


class _OrderedFeed:
    """external_source callback: the encoded paths of the next batch; StopIteration after the last one."""

    def __init__(self, files: list[str], batch_size: int) -> None:
        self.files, self.batch_size, self.start = files, batch_size, 0

    def __call__(self) -> list[np.ndarray]:
        if self.start >= len(self.files):
            raise StopIteration
        batch = self.files[self.start : self.start + self.batch_size]
        self.start += len(batch)
        return [np.frombuffer(p.encode(), dtype=np.uint8) for p in batch]


class EvalLoader:
    """Images (n, 3, input_size, input_size) of `files`, in order, in batches of batch_size (the last one
    may be smaller): len(loader) batches, files[j*B:(j+1)*B] in batch j, each file exactly once.

    On cuda:device_id when device_id is given (decoded by nvJPEG with decoder="mixed", on the CPU
    threads with decoder="cpu"), else on the CPU. Each iteration is a fresh pass from the first file.

    Ownership: a yielded tensor is a zero-copy view of DALI's output; use or copy it before asking
    for the next batch.
    """

    def __init__(
        self,
        files: list[str],
        batch_size: int,
        *,
        input_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device_id: int | None = None,
        num_threads: int = 2,
        output_dtype: str = "float16",
        decoder: str = "mixed",
        crop_fraction: float = 0.875,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1 or input_size < 1:
            raise ValueError(f"need batch_size >= 1 and input_size >= 1, got {batch_size}, {input_size}")
        if output_dtype not in _OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {_OUTPUT_DTYPES}, got {output_dtype!r}")
        if decoder not in ("mixed", "cpu"):
            raise ValueError(f"decoder must be 'mixed' or 'cpu', got {decoder!r}")
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.files = list(files)
        self.batch_size = batch_size
        self.input_size, self.resize_size = input_size, eval_resize_size(input_size, crop_fraction)
        self.mean, self.std = tuple(mean), tuple(std)
        self.device_id = device_id
        self.gpu_decode = device_id is not None and decoder == "mixed"
        self.num_threads, self.output_dtype, self.prefetch = num_threads, output_dtype, prefetch

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.files:
            return
        pipe = self._build(_OrderedFeed(self.files, self.batch_size))
        stream = torch.cuda.current_stream(self.device_id) if self.device_id is not None else None
        for j in range(len(self)):
            try:
                (out,) = pipe.run(stream)
            except RuntimeError as e:  # DALI's "Critical error in pipeline", which does not name the file
                reason = _dali_reason(e)
            else:
                yield torch.from_dlpack(out.as_tensor())
                continue
            # out of the except block: its traceback no longer holds the failed pipeline
            del pipe
            gc.collect()  # free its decoder buffers before building the checker
            # the failed batch is j or one prefetched after it
            candidates = self.files[j * self.batch_size : (j + self.prefetch + 1) * self.batch_size]
            bad = self._undecodable(candidates)
            if not bad:
                raise EvalDecodeError(
                    f"DALI failed ({reason}), and none of the {len(candidates)} files in flight fails alone"
                )
            raise EvalDecodeError(f"DALI cannot decode {', '.join(bad)} ({reason}); remove it from the folder")

    def _undecodable(self, paths: list[str]) -> list[str]:
        """The paths that fail to decode alone (the same graph at batch size 1, fed one path at a time)."""
        bad, pipe = [], None
        for path in paths:
            if pipe is None:
                pipe = self._build(None, batch_size=1)
            pipe.feed_input("paths", [np.frombuffer(path.encode(), dtype=np.uint8)])
            try:
                pipe.run()
            except RuntimeError:
                bad.append(path)
                pipe = None  # no longer usable
        return bad

    def _build(self, feed: _OrderedFeed | None, batch_size: int | None = None):
        """The graph; feed=None (with batch_size): no source, paths are given with pipe.feed_input("paths", ...)."""
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        pipe = Pipeline(
            batch_size=batch_size or self.batch_size,  # the largest batch; the feed's last one is smaller
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=0,  # no random operations
            prefetch_queue_depth=1 if feed is None else self.prefetch,
            exec_dynamic=True,  # outputs stay valid while referenced; run(stream) needs it
        )
        if self.gpu_decode:
            decoder = {
                "device": "mixed",
                "device_memory_padding": _DEVICE_MEMORY_PADDING,
                "host_memory_padding": _HOST_MEMORY_PADDING,
            }
        else:
            decoder = {"device": "cpu"}
        with pipe:
            paths = fn.external_source(source=feed, name="paths", batch=True, dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(fn.io.file.read(paths), output_type=types.RGB, **decoder)
            if self.device_id is not None and not self.gpu_decode:
                images = images.gpu()  # decoded on the CPU threads; resize and normalize on the GPU
            images = fn.resize(images, resize_shorter=self.resize_size, interp_type=types.INTERP_CUBIC, antialias=True)
            out = fn.crop_mirror_normalize(
                images,
                crop=(self.input_size, self.input_size),
                crop_pos_x=0.5,
                crop_pos_y=0.5,
                dtype=types.FLOAT16 if self.output_dtype == "float16" else types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in self.mean],
                std=[255 * s for s in self.std],
            )
            pipe.set_outputs(out)
        pipe.build()
        return pipe
