"""The DALI evaluation pipeline: every file exactly once, in order, with the standard evaluation transform.

Graph (built for one pass over the files and dropped after it):

    paths   fn.external_source   the paths of the next batch, in file order; the last batch is
                                 smaller (DALI runs variable batch sizes), so nothing is dropped
                                 or padded
    jpegs   fn.io.file.read      raw bytes, read by DALI's threads
    images  fn.decoders.image    RGB; "mixed" (nvJPEG, GPU) with a device, "cpu" without
    images  fn.resize            shorter side to R = int(input_size / crop_fraction), the longer one to
                                 int(R * long / short), cubic, antialiased: torchvision's
                                 Resize(int(224 / 0.875), BICUBIC), as MAE's and DeiT's evaluation
    images  fn.slice             the centre input_size x input_size at torchvision's CenterCrop offsets,
                                 int(round((side - input_size) / 2)) (Python's round: half to even)
    out     fn.crop_mirror_normalize   (x - 255*mean) / (255*std), CHW, float16 or float32

The sizes and offsets come from each file's header (fn.peek_image_shape, EXIF orientation applied as the
decoder does), in integer arithmetic: eval_geometry is the same rule in Python.

Batch j holds files[j * batch_size : (j + 1) * batch_size] (with indexed(), files that cannot be decoded
are left out and the batches after them hold the next files). There are no random operations.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .dali import _DEVICE_MEMORY_PADDING, _HOST_MEMORY_PADDING, _dali_reason

__all__ = ["EvalDecodeError", "EvalLoader", "EvalTransform", "eval_geometry", "eval_resize_size"]

_OUTPUT_DTYPES = ("float16", "float32")


class EvalDecodeError(RuntimeError):
    """A file that passed the dataset scan could not be decoded by DALI."""


def eval_resize_size(input_size: int, crop_fraction: float = 0.875) -> int:
    """The shorter side before the centre crop: int(input_size / crop_fraction), 256 for 224 (as MAE's evaluation)."""
    return max(input_size, int(input_size / crop_fraction))


def _half_to_even(d):
    """int(round(d / 2)) for an integer d >= 0 with Python's rounding (half to even), in integer operations
    that work on ints and on DALI's integer nodes alike."""
    half = d // 2
    return half + (d % 2) * (half % 2)


def eval_geometry(width: int, height: int, input_size: int, crop_fraction: float = 0.875) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of an image, as torchvision's
    Resize(int(input_size / crop_fraction)) + CenterCrop(input_size) computes them."""
    r = eval_resize_size(input_size, crop_fraction)
    short = min(width, height)
    w, h = width * r // short, height * r // short
    return w, h, _half_to_even(w - input_size), _half_to_even(h - input_size)


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


@dataclass(frozen=True)
class EvalTransform:
    """What the pipeline makes of an image: input_size x input_size at the centre of the image resized to
    int(input_size / crop_fraction) on its shorter side, (x - mean) / std (mean, std on a 0..1 scale)."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    output_dtype: str = "float16"  # or "float32"
    crop_fraction: float = 0.875

    def __post_init__(self) -> None:
        if self.input_size < 1:
            raise ValueError(f"need input_size >= 1, got {self.input_size}")
        if self.output_dtype not in _OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {_OUTPUT_DTYPES}, got {self.output_dtype!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")


class EvalLoader:
    """Images (n, 3, input_size, input_size) of `files`, in order, in batches of batch_size (the last one
    may be smaller): len(loader) batches, files[j*B:(j+1)*B] in batch j, each file exactly once.

    On cuda:device_id when device_id is given (decoded by nvJPEG with decoder="mixed", on the CPU
    threads with decoder="cpu"), else on the CPU. Each iteration is a fresh pass from the first file.

    Ownership: a yielded tensor is a zero-copy view of DALI's output; use or copy it before asking
    for the next batch.
    """

    prefetch = 2  # batches in flight

    def __init__(
        self,
        files: list[str],
        batch_size: int,
        transform: EvalTransform,
        *,
        device_id: int | None = None,
        num_threads: int = 2,
        decoder: str = "mixed",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"need batch_size >= 1, got {batch_size}")
        if decoder not in ("mixed", "cpu"):
            raise ValueError(f"decoder must be 'mixed' or 'cpu', got {decoder!r}")
        self.files = list(files)
        self.batch_size, self.transform = batch_size, transform
        self.input_size, self.resize_size = (
            transform.input_size,
            eval_resize_size(transform.input_size, transform.crop_fraction),
        )
        self.device_id = device_id
        self.gpu_decode = device_id is not None and decoder == "mixed"
        self.num_threads = num_threads

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The batches of a pass; raises EvalDecodeError at a file that cannot be decoded."""
        for _, batch in self.indexed(skip_undecodable=False):
            yield batch

    def indexed(self, skip_undecodable: bool = True) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices into files, their images) of each batch of a pass, in file order. A file DALI cannot decode
        is found (each one in flight decoded alone), left out and added to self.skipped, and the pass goes on
        from the first file of the failed batch; skip_undecodable=False raises EvalDecodeError instead."""
        self.skipped: list[str] = []
        todo = list(range(len(self.files)))
        while todo:
            pipe = self._build(_OrderedFeed([self.files[i] for i in todo], self.batch_size))
            stream = torch.cuda.current_stream(self.device_id) if self.device_id is not None else None
            for j in range(math.ceil(len(todo) / self.batch_size)):
                try:
                    (out,) = pipe.run(stream)
                except RuntimeError as e:  # DALI's "Critical error in pipeline", which does not name the file
                    reason = _dali_reason(e)
                    break
                yield todo[j * self.batch_size : (j + 1) * self.batch_size], torch.from_dlpack(out.as_tensor())
            else:
                return
            # out of the except block: its traceback no longer holds the failed pipeline
            del pipe
            gc.collect()  # free its decoder buffers before building the checker
            # the failed batch is j or one prefetched after it
            todo = todo[j * self.batch_size :]
            candidates = [self.files[i] for i in todo[: (self.prefetch + 1) * self.batch_size]]
            bad = self._undecodable(candidates)
            if not bad:
                raise EvalDecodeError(
                    f"DALI failed ({reason}), and none of the {len(candidates)} files in flight fails alone"
                )
            if not skip_undecodable:
                raise EvalDecodeError(f"DALI cannot decode {', '.join(bad)} ({reason}); remove it from the folder")
            self.skipped += bad
            bad_set = set(bad)
            todo = [i for i in todo if self.files[i] not in bad_set]

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
            jpegs = fn.io.file.read(paths)
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
            if self.device_id is not None and not self.gpu_decode:
                images = images.gpu()  # decoded on the CPU threads; resize and normalize on the GPU
            images = self._resize_and_crop(images, fn.peek_image_shape(jpegs, dtype=types.INT32))
            out = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT16 if self.transform.output_dtype == "float16" else types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in self.transform.mean],
                std=[255 * s for s in self.transform.std],
            )
            pipe.set_outputs(out)
        pipe.build()
        return pipe

    def _resize_and_crop(self, images, hwc):
        """eval_geometry in DALI's integer arithmetic on the (H, W, C) of each image, then resize and slice."""
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, types

        s, r = self.input_size, self.resize_size
        height, width = hwc[0], hwc[1]
        short = dmath.min(height, width)
        w, h = width * r // short, height * r // short
        images = fn.resize(
            images,
            resize_x=fn.cast(w, dtype=types.FLOAT),
            resize_y=fn.cast(h, dtype=types.FLOAT),
            interp_type=types.INTERP_CUBIC,
            antialias=True,
        )
        start = fn.stack(_half_to_even(h - s), _half_to_even(w - s))
        return fn.slice(images, start=start, shape=[s, s], axis_names="HW")
