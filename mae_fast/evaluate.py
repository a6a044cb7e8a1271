"""Is the representation getting better? kNN and linear-probe accuracy of the frozen encoder.

    labelled folders --scan_labelled--> EvalSets (val's classes mapped onto train's by name)
        --EvalLoader (DALI: decode, torchvision's Resize(int(S/0.875), BICUBIC) + CenterCrop(S), normalize)-->
    encoder, no masking --> cls token after the final norm, (N, D)
        --> probes.knn_classify (DINO) and probes.linear_probe (MAE), on rank 0

Frozen-feature probes understate MAE: its features are made to be fine-tuned (the paper's ViT-B
gets about 68% by linear probe and 83.6% fine-tuned on ImageNet). Here kNN and the probe are
trend monitors: do they rise while the loss falls?

One component: an Evaluator is built once (from the config with Evaluator.from_config, or from EvalSets
and EvalOptions), says when it is due(epoch) and, called with the model and the step, returns one
EvalResult; the run log, metrics.jsonl, TensorBoard, the dashboard and `mae-fast eval` format that type.
With several ranks a call is a collective: each rank extracts its block of images, rank 0 classifies.
Files that cannot be decoded are named in EvalResult.skipped and left out, as training leaves them out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn

from .config import Config, ConfigError
from .distributed import Dist, broadcast, gather
from .labelled import EvalDataError, EvalSets, sample_labelled_if_missing, scan_labelled
from .model import MaskedAutoencoderViT
from .pipelines.common import IMAGENET_MEAN, IMAGENET_STD
from .probes import KNN_TEMPERATURE, LabelledFeatures, knn_classify, linear_probe, num_threads

CPU = torch.device("cpu")
SINGLE = Dist()  # one process
T = TypeVar("T")


def on_main(d: Dist, make: Callable[[], T]) -> T:
    """make() on rank 0, its result on every rank (a collective); its error, if any, is raised on every rank."""
    result, error = None, None
    if d.is_main:
        try:
            result = make()
        except Exception as e:  # sent to the other ranks so that none waits for a result that never comes
            error = e
    result, error = broadcast(d, (result, error))
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------- options and result


@dataclass(frozen=True)
class EvalOptions:
    """Everything an evaluation needs besides the images and the model."""

    k: int = 20  # neighbours that vote
    linear: bool = False  # also the linear probe
    input_size: int | None = None  # None: the model's
    mean: tuple[float, ...] = IMAGENET_MEAN  # the normalization the model was trained with
    std: tuple[float, ...] = IMAGENET_STD
    batch_size: int = 128  # images per forward pass
    num_threads: int = 2  # DALI's
    decoder: str = "mixed"  # on CUDA: "mixed" (nvJPEG) or "cpu"; always "cpu" on the CPU
    seed: int = 0  # of the linear probe
    probe_epochs: int = 100
    freq_epochs: int = 10  # due(epoch): every freq_epochs-th epoch (0: none) and the last one
    last_epoch: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.batch_size < 1 or self.num_threads < 1:
            raise ConfigError(f"batch_size and num_threads must be positive, got {self.batch_size}, {self.num_threads}")


@dataclass(frozen=True)
class EvalResult:
    """One evaluation (accuracies in percent); step and epoch are set in training."""

    knn_top1: float
    knn_top5: float
    linear_top1: float | None  # None without the linear probe
    linear_top5: float | None
    k: int  # as used: capped at the bank's size
    num_train: int  # images scored (the skipped ones left out)
    num_val: int
    num_classes: int
    feature_dim: int
    seconds: float  # all of it: extraction, kNN, probe
    extract_s: float  # the feature extraction alone (both sets)
    skipped: tuple[str, ...] = ()  # files that could not be decoded, left out
    step: int | None = None
    epoch: int | None = None

    def scores(self) -> dict[str, float]:
        """The numbers a run records (metrics.jsonl, TensorBoard's eval/*): accuracies, eval_s, and skipped when
        files were left out."""
        out = {"knn_top1": self.knn_top1, "knn_top5": self.knn_top5}
        if self.linear_top1 is not None:
            out.update(linear_top1=self.linear_top1, linear_top5=self.linear_top5)
        out["eval_s"] = self.seconds
        if self.skipped:
            out["skipped"] = len(self.skipped)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": list(self.skipped)}


# ---------------------------------------------------------------- features


def unwrap(model: nn.Module) -> MaskedAutoencoderViT:
    """The MAE inside a torch.compile wrapper and/or DistributedDataParallel."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    files: list[str],
    options: EvalOptions = EvalOptions(),
    device: torch.device = CPU,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Frozen features of `files`, in order, and the indices of the files that could not be decoded (their rows
    are zero): (N, D), row i = the cls token of files[i] after the encoder's final norm, all patches visible
    (mask ratio 0), eval mode, no grad.

    On CUDA: DALI decodes on the GPU (options.decoder="mixed") or CPU ("cpu"), the encoder runs under bf16
    autocast and the features are fp16; on the CPU: fp32 throughout. `out` (N, D), if given, receives
    the rows (e.g. a bank on another device). The model's train/eval mode is restored.
    """
    from .pipelines.eval_pipeline import EvalLoader, EvalTransform

    mae = unwrap(model)
    input_size = options.input_size or mae.arch.img_size
    if input_size != mae.arch.img_size:
        raise ValueError(f"input_size {input_size} differs from the model's {mae.arch.img_size}px")
    cuda = device.type == "cuda"
    dim = mae.arch.embed_dim
    if out is None:
        out = torch.empty(len(files), dim, dtype=torch.float16 if cuda else torch.float32, device=device)
    if out.shape != (len(files), dim):
        raise ValueError(f"out has shape {tuple(out.shape)}, need {(len(files), dim)}")
    dtype = "float16" if cuda else "float32"
    loader = EvalLoader(
        files,
        options.batch_size,
        EvalTransform(input_size, options.mean, options.std, dtype),
        device_id=(torch.cuda.current_device() if device.index is None else device.index) if cuda else None,
        num_threads=options.num_threads,
        decoder=options.decoder if cuda else "cpu",
    )
    threads = torch.get_num_threads()
    if not cuda:  # DALI's decoding threads and torch's share the cores: split them (measured 2x on 2 cores)
        threads = max(1, min(threads, (os.cpu_count() or 1) - options.num_threads))
    was_training = mae.training
    mae.eval()
    done = np.zeros(len(files), dtype=bool)
    try:
        with num_threads(threads):
            for rows, imgs in loader.indexed():  # (n, 3, S, S), DALI's until the next batch: used at once
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    cls = mae.forward_features(imgs)[:, 0]  # (n, D)
                out.index_copy_(0, torch.as_tensor(rows, device=out.device), cls.to(out.device, out.dtype))
                done[rows] = True
    finally:
        mae.train(was_training)
    skipped = np.flatnonzero(~done).tolist()
    if len(skipped) != len(loader.skipped):
        raise RuntimeError(f"the evaluation pipeline gave {int(done.sum())} images for {len(files)} files")
    out[torch.as_tensor(skipped, dtype=torch.long, device=out.device)] = 0
    return out, skipped


def _bank_device(device: torch.device, rows: int, dim: int) -> torch.device:
    """The device for a bank of fp16 features: the GPU when twice its size (kNN chunks, probe) fits beside
    1 GiB to spare, else the CPU."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 2 * rows * dim * 2 + 2**30 < free else torch.device("cpu")


def _blocks(n: int, d: Dist) -> np.ndarray:
    """The bounds of the ranks' contiguous blocks of n items: rank r has [bounds[r], bounds[r + 1])."""
    return np.linspace(0, n, d.world_size + 1).astype(int)


def _gather_rows(d: Dist, part: torch.Tensor, n: int, bank: torch.Tensor | None) -> None:
    """Rank 0: copy every rank's block of rows (rank order: rows 0..n) into `bank`; others pass bank=None.
    A collective (torch.distributed.gather), in pieces of ~32 MB so no rank holds a second copy."""
    bounds = _blocks(n, d)
    sizes = np.diff(bounds)
    rows, dim = int(sizes.max()), part.shape[1]
    piece = max(1, 2**24 // max(1, dim))
    for s in range(0, rows, piece):
        e = min(rows, s + piece)
        mine = torch.zeros(e - s, dim, dtype=part.dtype, device=part.device)  # padded: every rank sends e - s rows
        have = max(0, min(e, len(part)) - s)
        mine[:have] = part[s : s + have]
        inbox = [torch.empty_like(mine) for _ in range(d.world_size)] if d.is_main else None
        tdist.gather(mine, inbox, dst=0)
        if d.is_main:
            for r, got in enumerate(inbox):
                keep = max(0, min(e, int(sizes[r])) - s)
                bank[bounds[r] + s : bounds[r] + s + keep].copy_(got[:keep])


# ---------------------------------------------------------------- the component


class Evaluator:
    """kNN (and the linear probe) of a model's frozen features on fixed labelled sets; built once, called at each
    evaluation. With several ranks (dist) every call is a collective: every rank calls it at the same point."""

    def __init__(self, sets: EvalSets, options: EvalOptions, device: torch.device = CPU, dist: Dist = SINGLE):
        if not sets.train_files or not sets.val_files:
            raise EvalDataError("the evaluation needs at least one train and one val image")
        if options.linear and len(sets.train_files) < 2:
            raise EvalDataError(f"the linear probe needs at least 2 train images, got {len(sets.train_files)}")
        self.sets, self.options, self.device, self.dist = sets, options, device, dist

    @classmethod
    def from_config(cls, cfg: Config, d: Dist, device: torch.device) -> Evaluator | None:
        """The evaluation.* section's Evaluator, its folders scanned once by rank 0 (a collective; errors name the
        config key and are raised on every rank); None when evaluation is off. With data.make_sample, rank 0
        first writes the labelled sample pair when both folders are missing (sample_labelled_if_missing)."""
        e, a = cfg.evaluation, cfg.data.augmentation
        if not e.enabled:
            return None

        def scan() -> EvalSets:
            if cfg.data.make_sample:
                sample_labelled_if_missing(e.train_path, e.val_path)
            names = ("evaluation.train_path", "evaluation.val_path")
            cache = cfg.data.scan_cache_dir or None
            return scan_labelled(
                e.train_path, e.val_path, max_train=e.max_train_images, seed=cfg.misc.seed, cache_dir=cache, names=names
            )

        options = EvalOptions(
            k=e.k,
            linear=e.linear_probe,
            input_size=cfg.data.input_size,
            mean=tuple(a.mean),
            std=tuple(a.std),
            batch_size=e.batch_size,
            num_threads=max(1, cfg.data.num_workers),
            seed=cfg.misc.seed,
            freq_epochs=e.freq_epochs,
            last_epoch=cfg.schedule.epochs,
        )
        return cls(on_main(d, scan), options, device, d)

    def due(self, epoch: int) -> bool:
        """At the end of every freq_epochs-th epoch and of the last one (the baseline before the first step is
        the caller's, once per run)."""
        freq = self.options.freq_epochs
        return epoch == self.options.last_epoch or bool(epoch and freq and epoch % freq == 0)

    def describe(self) -> str:
        o, s = self.options, self.sets
        return (
            f"kNN (k={o.k}){' and linear probe' if o.linear else ''} of the frozen encoder, "
            f"{len(s.train_files)} train / {len(s.val_files)} val images in {s.num_classes} classes"
        )

    def __call__(self, model: nn.Module, step: int | None = None, epoch: int | None = None) -> EvalResult:
        """Evaluate `model` (compile and DDP wrappers are looked through; it runs in eval mode with no grad and is
        put back in its mode) after `step` optimizer steps. The RNG streams (torch CPU and CUDA) are left as
        they were. A failure on any rank is raised on every rank (none is left in a collective): EvalDataError for data
        that cannot be evaluated, RuntimeError for the rest."""
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            train, train_skipped, train_s = self._features(model, self.sets.train_files)
            val, val_skipped, val_s = self._features(model, self.sets.val_files)
        result, error = None, None
        if self.dist.is_main:
            try:
                result = self._classify(train, train_skipped, val, val_skipped)
            except Exception as e:
                error = _failure(e, "rank 0")
        result, error = broadcast(self.dist, (result, error))  # the other ranks wait here for rank 0
        if error is not None:
            _raise([error], "evaluation failed")
        skipped = tuple(self.sets.train_files[i] for i in train_skipped)
        skipped += tuple(self.sets.val_files[i] for i in val_skipped)
        if skipped:  # left out of the later calls too, as training leaves them out (the same on every rank)
            self.sets = self.sets.without(set(skipped))
        extra = dict(seconds=time.perf_counter() - t0, extract_s=train_s + val_s, skipped=skipped)
        return EvalResult(**result, **extra, step=step, epoch=epoch)

    def _classify(
        self, train: torch.Tensor, train_skipped: list[int], val: torch.Tensor, val_skipped: list[int]
    ) -> dict[str, Any]:
        """Rank 0: kNN and the probe on the decoded images' features (the skipped rows left out)."""
        feats = LabelledFeatures(
            *_kept(train, self.sets.train_labels, train_skipped),
            *_kept(val, self.sets.val_labels, val_skipped),
            self.sets.num_classes,
        )
        if not len(feats.train) or not len(feats.val):
            raise EvalDataError("no image of the evaluation train set or of its val set could be decoded")
        o = self.options
        top1, top5 = knn_classify(feats, o.k)
        lin1 = lin5 = None
        if o.linear:
            lin1, lin5 = linear_probe(feats, seed=o.seed, epochs=o.probe_epochs)
        n, m = len(feats.train), len(feats.val)
        return dict(
            knn_top1=top1,
            knn_top5=top5,
            linear_top1=lin1,
            linear_top5=lin5,
            k=min(o.k, n),
            num_train=n,
            num_val=m,
            num_classes=feats.num_classes,
            feature_dim=train.shape[1],
        )

    def _features(self, model: nn.Module, files: list[str]) -> tuple[torch.Tensor | None, list[int], float]:
        """Features of all `files` on rank 0 (None elsewhere), each rank extracting its block; the indices of the
        files that could not be decoded (every rank's); seconds taken. A failure on any rank is raised on every
        rank, after all of them have finished their block."""
        d, device = self.dist, self.device
        t0 = time.perf_counter()
        dim, cuda = unwrap(model).arch.embed_dim, device.type == "cuda"
        dtype = torch.float16 if cuda else torch.float32
        bank = None
        if d.is_main:
            bank = torch.empty(len(files), dim, dtype=dtype, device=_bank_device(device, len(files), dim))
        lo, hi = _blocks(len(files), d)[d.rank : d.rank + 2]
        error, skipped = None, []
        try:
            if d.enabled:
                part, skipped = extract_features(model, files[lo:hi], self.options, device)
            else:
                part, skipped = extract_features(model, files, self.options, device, out=bank)
        except Exception as e:
            error, part = _failure(e, f"rank {d.rank}"), torch.zeros(0, dim, dtype=dtype, device=device)
        reports = gather(d, (error, [int(lo) + i for i in skipped]))  # every rank arrives here, failed or not
        errors = [e for e, _ in reports if e is not None]
        if errors:
            _raise(errors, "feature extraction failed")
        if d.enabled:
            _gather_rows(d, part, len(files), bank)
        if cuda:
            torch.cuda.synchronize(device)  # honest timing: the features are done
        return bank, sorted(i for _, s in reports for i in s), time.perf_counter() - t0


def _failure(e: Exception, where: str) -> tuple[bool, str]:
    """An exception as it crosses ranks: (is it bad data (EvalDataError), its message)."""
    return isinstance(e, EvalDataError), str(e) if isinstance(e, EvalDataError) else f"{where}: {type(e).__name__}: {e}"


def _raise(errors: list[tuple[bool, str]], what: str) -> None:
    """Raise on every rank what failed on one: bad data as EvalDataError (one error line), the rest as RuntimeError."""
    data = [message for is_data, message in errors if is_data]
    if data:
        raise EvalDataError(data[0])
    raise RuntimeError(f"{what}: " + "; ".join(message for _, message in errors))


def _kept(feats: torch.Tensor, labels: list[int], skipped: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and labels of the files that were decoded (a copy of the rows only when some were skipped)."""
    labels = torch.tensor(labels)
    if not skipped:
        return feats, labels
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[skipped] = False
    return feats[keep.to(feats.device)], labels[keep]


def evaluate(
    model: nn.Module, train_dir: str, val_dir: str, options: EvalOptions = EvalOptions(), device: torch.device = CPU
) -> EvalResult:
    """One process: scan the labelled folders (all the train images) and evaluate `model` on them."""
    return Evaluator(scan_labelled(train_dir, val_dir), options, device)(model)


__all__ = [
    "KNN_TEMPERATURE",
    "EvalDataError",
    "EvalOptions",
    "EvalResult",
    "EvalSets",
    "Evaluator",
    "evaluate",
    "extract_features",
    "scan_labelled",
]
