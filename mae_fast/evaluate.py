"""Is the representation getting better? kNN and linear-probe accuracy of the frozen encoder.

    labelled folders --scan--> files, labels (val's classes mapped onto train's by name)
        --EvalLoader (DALI: decode, shorter side to input/0.875 cubic, centre crop, normalize)-->
    encoder, no masking --> cls token after the final norm, (N, D)
        --> weighted kNN as DINO's eval_knn.py (Caron et al. 2021): cosine similarity of
            L2-normalized features, the k most similar train features vote with exp(sim / 0.07)
        --> linear probe as MAE's main_linprobe.py (He et al. 2021): BatchNorm1d without affine
            parameters, then a Linear layer, trained on the cached train features

Frozen-feature probes understate MAE: its features are made to be fine-tuned (the paper's ViT-B
gets about 68% by linear probe and 83.6% fine-tuned on ImageNet). Here kNN and the probe are
trend monitors: do they rise while the loss falls?

Used by `mae-fast eval` (evaluate_checkpoint) and by the train loop (prepare_eval_sets once,
then evaluate_in_training every evaluation.freq_epochs, a collective of all ranks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError
from .config import ConfigError
from .distributed import Dist, broadcast, gather
from .model import MaskedAutoencoderViT
from .runtime import resolve_device
from .weights import infer_arch, load_mae

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KNN_TEMPERATURE = 0.07  # DINO's T
CPU = torch.device("cpu")
SINGLE = Dist()  # one process
SIMILARITY_ELEMENTS = 2**27  # bound on one chunk of the (val rows, train rows) similarity matrix: 512 MB in fp32


class EvalDataError(ConfigError):
    """The labelled folders do not fit an evaluation (no classes, or val classes missing from train)."""


# ---------------------------------------------------------------- data


@dataclass
class EvalSets:
    """The labelled images of an evaluation; val labels are indices into the train classes."""

    train_files: list[str]
    train_labels: list[int]
    val_files: list[str]
    val_labels: list[int]
    classes: list[str]  # the train folder's classes, in label order
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def subsample(n: int, max_n: int, seed: int) -> np.ndarray:
    """Indices of a uniform random subset of max_n of range(n) (without replacement, from `seed` alone),
    in increasing order; all of them when max_n <= 0 or max_n >= n."""
    if max_n <= 0 or max_n >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


def scan_labelled(
    train_path: str,
    val_path: str,
    *,
    max_train: int = 0,
    seed: int = 0,
    cache_dir: str | None = None,
    names: tuple[str, str] = ("evaluation train set", "evaluation val set"),
) -> EvalSets:
    """Scan both folders (cached, as training data), check that val's classes are a subset of train's,
    map val's labels onto train's by class name, subsample the train bank to max_train (uniform, seeded).

    Raises EvalDataError (a ConfigError) for a flat folder or val classes that train lacks, and
    DatasetScanError for a missing or empty folder; the message starts with the folder's name in `names`
    (e.g. the config keys)."""
    from .pipelines.scan import DatasetScanError, scan_dataset

    scans = {}
    for flag, path, name in (("train", train_path, names[0]), ("val", val_path, names[1])):
        try:
            scans[flag] = scan_dataset(path, cache_dir=cache_dir, progress=False)
        except DatasetScanError as e:
            raise DatasetScanError(f"{name}: {e}") from None
        if scans[flag].classes == ["."]:
            raise EvalDataError(f"{name}: {path} has no class subfolders (expected {path}/<class>/*)")
    train, val = scans["train"], scans["val"]
    known = set(train.classes)
    extra = [c for c in val.classes if c not in known]
    if extra:
        shown = ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
        raise EvalDataError(
            f"{names[1]}: the classes of the val set must be a subset of the train set's: {len(extra)} class(es) "
            f"of {val_path} are not in {train_path}: {shown}"
        )
    index = {c: i for i, c in enumerate(train.classes)}
    val_labels = [index[val.classes[label]] for label in val.labels]
    keep = subsample(len(train.files), max_train, seed)
    notes = [f"{len(r.bad)} unreadable file(s) left out of {r.root}" for r in (train, val) if r.bad]
    if len(keep) < len(train.files):
        notes.append(f"train bank: a uniform random {len(keep)} of {len(train.files)} images (seed {seed})")
    return EvalSets(
        [train.files[i] for i in keep],
        [train.labels[i] for i in keep],
        list(val.files),
        val_labels,
        list(train.classes),
        notes,
    )


def prepare_eval_sets(
    train_path: str,
    val_path: str,
    *,
    max_train: int = 0,
    seed: int = 0,
    cache_dir: str | None = None,
    dist: Dist = SINGLE,
    names: tuple[str, str] = ("evaluation train set", "evaluation val set"),
    make_sample: bool = False,
) -> EvalSets:
    """scan_labelled on rank 0, the same EvalSets on every rank (a collective: every rank calls it).

    Call once before training; an error (bad folder, class subset rule) is raised on every rank.
    make_sample: rank 0 first writes the labelled sample pair when both folders are missing and are
    DIR/train and DIR/val (sample_labelled_if_missing), as data.make_sample does for the training data."""
    sets, error = None, None
    if dist.is_main:
        try:
            if make_sample:
                sample_labelled_if_missing(train_path, val_path)
            sets = scan_labelled(train_path, val_path, max_train=max_train, seed=seed, cache_dir=cache_dir, names=names)
        except Exception as e:  # sent to the other ranks so that none waits for sets that never come
            error = e
    sets, error = broadcast(dist, (sets, error))
    if error is not None:
        raise error
    return sets


def sample_labelled_if_missing(train_path: str, val_path: str) -> bool:
    """Write the demo's labelled sample set (sample_data.DEMO_LABELLED) at DIR when train_path and val_path are
    DIR/train and DIR/val and neither exists; True when it wrote it. Any other layout is left to the scan
    (a missing folder is an error there)."""
    train, val = Path(train_path), Path(val_path)
    if train.exists() or val.exists() or (train.name, val.name) != ("train", "val") or train.parent != val.parent:
        return False
    from .pipelines.sample_data import DEMO_LABELLED, make_labelled_sample

    make_labelled_sample(str(train.parent), **DEMO_LABELLED)
    return True


# ---------------------------------------------------------------- model


@dataclass
class LoadedEncoder:
    model: MaskedAutoencoderViT  # the encoder's weights (a decoder too when the file has one)
    model_type: str
    source: str  # "mae-fast" | "official" | "official-encoder" | "timm-export"
    step: int | None  # optimizer steps done, for a mae-fast checkpoint
    mean: tuple[float, float, float]  # the normalization it was trained with
    std: tuple[float, float, float]
    notes: list[str]


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)  # 8-byte little-endian header length, then the JSON header
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def load_timm_export(path: str | Path) -> MaskedAutoencoderViT:
    """An MAE whose encoder holds the weights of `mae-fast export --format timm` (a timm VisionTransformer's
    state dict; a classifier head, if any, is ignored). The decoder is freshly initialized."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    _, arch = infer_arch(sd, str(path))
    model = MaskedAutoencoderViT(arch)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not (k.startswith("decoder_") or k == "mask_token") for k in missing):
        raise CheckpointError(
            f"{path}: timm weights do not fit an MAE encoder: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def _checkpoint_step(path: Path) -> int | None:
    """The step of a mae-fast checkpoint, read through a memory map (the tensors are not loaded)."""
    import argparse

    path = path / "model.pt" if path.is_dir() else path
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    step = obj.get("step") if isinstance(obj, dict) and obj.get("format") == "mae-fast" else None
    return int(step) if isinstance(step, int) else None


def load_encoder(path: str | Path) -> LoadedEncoder:
    """The encoder of a mae-fast checkpoint, an official MAE checkpoint (full or encoder-only) or a timm export."""
    path = Path(path)
    if path.is_file() and _is_safetensors(path):
        model = load_timm_export(path)
        name, _ = infer_arch(model.state_dict(), str(path))
        note = f"{path}: timm export of {name} ({model.arch.img_size}px)"
        return LoadedEncoder(model, name, "timm-export", None, IMAGENET_MEAN, IMAGENET_STD, [note])
    loaded = load_mae(path)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    aug = ((loaded.config or {}).get("data") or {}).get("augmentation") or {}
    if aug.get("mean") and aug.get("std"):
        mean, std = tuple(float(x) for x in aug["mean"]), tuple(float(x) for x in aug["std"])
    step = _checkpoint_step(path) if loaded.source == "mae-fast" else None
    return LoadedEncoder(loaded.model, loaded.model_type, loaded.source, step, mean, std, loaded.notes)


def _unwrap(model: nn.Module) -> MaskedAutoencoderViT:
    """The MAE inside a torch.compile wrapper and/or DistributedDataParallel."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------- features


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    files: list[str],
    *,
    input_size: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    batch_size: int = 128,
    device: torch.device = CPU,
    num_threads: int = 2,
    decoder: str = "mixed",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Frozen features of `files`, in order: (N, D), row i = the cls token of files[i] after the encoder's
    final norm, all patches visible (mask ratio 0), eval mode, no grad.

    On CUDA: DALI decodes on the GPU (decoder="mixed") or CPU ("cpu"), the encoder runs under bf16
    autocast and the features are fp16; on the CPU: fp32 throughout. `out` (N, D), if given, receives
    the rows (e.g. a bank on another device). The model's train/eval mode is restored.
    """
    from .pipelines.eval_pipeline import EvalLoader

    mae = _unwrap(model)
    input_size = input_size or mae.arch.img_size
    if input_size != mae.arch.img_size:
        raise ValueError(f"input_size {input_size} differs from the model's {mae.arch.img_size}px")
    cuda = device.type == "cuda"
    dim = mae.arch.embed_dim
    if out is None:
        out = torch.empty(len(files), dim, dtype=torch.float16 if cuda else torch.float32, device=device)
    if out.shape != (len(files), dim):
        raise ValueError(f"out has shape {tuple(out.shape)}, need {(len(files), dim)}")
    loader = EvalLoader(
        files,
        batch_size,
        input_size=input_size,
        mean=mean,
        std=std,
        device_id=(torch.cuda.current_device() if device.index is None else device.index) if cuda else None,
        num_threads=num_threads,
        output_dtype="float16" if cuda else "float32",
        decoder=decoder if cuda else "cpu",
    )
    threads = torch.get_num_threads()
    if not cuda:  # DALI's decoding threads and torch's share the cores: split them (measured 2x on 2 cores)
        threads = max(1, min(threads, (os.cpu_count() or 1) - num_threads))
    was_training = mae.training
    mae.eval()
    row = 0
    try:
        with _num_threads(threads):
            for imgs in loader:  # (n, 3, S, S), DALI's until the next batch: used at once
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    cls = mae.forward_features(imgs)[:, 0]  # (n, D)
                out[row : row + len(cls)].copy_(cls, non_blocking=True)
                row += len(cls)
    finally:
        mae.train(was_training)
    if row != len(files):
        raise RuntimeError(f"the evaluation pipeline gave {row} images for {len(files)} files")
    return out


# ---------------------------------------------------------------- kNN


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
    chunk: int | None = None,
) -> torch.Tensor:
    """DINO's weighted kNN votes: (Nv, num_classes), score[i, c] = sum over the k train features most
    cosine-similar to val_feats[i] of label c of exp(similarity / temperature).

    Features need not be normalized (this L2-normalizes them without copying the bank). The similarity
    matrix is computed `chunk` val rows at a time (default: SIMILARITY_ELEMENTS in all), on the bank's
    device, in the bank's dtype with fp32 (or fp64) scores. k is capped at the bank's size.
    """
    n_train = train_feats.shape[0]
    if n_train == 0:
        raise ValueError("the kNN bank is empty")
    k = min(k, n_train)
    device = train_feats.device
    acc = torch.promote_types(train_feats.dtype, torch.float32)  # fp32, or fp64 for fp64 features
    # 1 / ||train row||, a vector: the bank itself is never normalized (or copied)
    inv_norm = torch.cat([x.to(acc).norm(dim=1) for x in train_feats.split(65536)]).clamp_min(1e-12).reciprocal()
    labels = train_labels.to(device=device, dtype=torch.long)
    chunk = chunk or max(1, min(4096, SIMILARITY_ELEMENTS // n_train))
    scores = torch.zeros(val_feats.shape[0], num_classes, dtype=acc, device=device)
    for start in range(0, val_feats.shape[0], chunk):
        q = F.normalize(val_feats[start : start + chunk].to(device=device, dtype=acc), dim=1)
        sim = (q.to(train_feats.dtype) @ train_feats.T).to(acc) * inv_norm  # (c, N_train) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k)
        scores[start : start + len(q)].scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of class scores (N, C) against labels (N,) (top-5: top-C if C < 5)."""
    labels = labels.to(scores.device, dtype=torch.long)
    pred = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (N, 5)
    hit = pred == labels[:, None]
    n = max(1, len(labels))
    return 100.0 * hit[:, 0].sum().item() / n, 100.0 * hit.any(dim=1).sum().item() / n


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
    chunk: int | None = None,
) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 accuracy in percent (knn_scores, then topk_accuracy)."""
    scores = knn_scores(train_feats, train_labels, val_feats, num_classes, k, temperature, chunk)
    return topk_accuracy(scores, val_labels)


# ---------------------------------------------------------------- linear probe


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    epochs: int = 100,
    batch_size: int | None = None,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of MAE's linear probe on frozen features: BatchNorm1d(affine=False,
    eps=1e-6) then Linear (weight trunc_normal(std=0.01), bias 0), cross-entropy, trained on the cached
    train features on their device.

    MAE trains it with LARS at batch 16384 for 90 epochs of images; on cached features AdamW (lr 1e-2,
    half-cycle cosine, no warmup) for `epochs` passes in batches of batch_size (default N/8, within
    [16, 4096]: ~800 steps for a small set, ~31k for ImageNet) gets there in seconds. Deterministic for a
    seed (its own generators; the global RNG streams are untouched).
    """
    n, dim = train_feats.shape
    if n < 2:
        raise ValueError("the linear probe needs at least 2 train features")
    device = train_feats.device
    batch = min(n, batch_size or min(4096, max(16, n // 8)))
    steps_per_epoch = n // batch  # whole batches only: BatchNorm statistics of a batch of 1 are undefined
    total = epochs * steps_per_epoch
    y = train_labels.to(device=device, dtype=torch.long)
    # Tiny CPU steps run on one thread: with several, each op waits at a barrier for threads that a busy
    # machine has descheduled (measured: 200x slower on 2 loaded cores).
    threads = 1 if device.type == "cpu" and batch * dim * num_classes < 2**22 else torch.get_num_threads()
    # fork_rng: the layers' default initialization draws from the global stream before it is replaced
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        torch.enable_grad(),
        _num_threads(threads),
    ):
        init = torch.Generator().manual_seed(seed)
        order = torch.Generator(device=device).manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(head[1].weight, std=0.01, generator=init)
        nn.init.zeros_(head[1].bias)
        head = head.to(device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        for _ in range(epochs):
            perm = torch.randperm(n, generator=order, device=device)
            for s in range(steps_per_epoch):
                idx = perm[s * batch : (s + 1) * batch]
                loss = F.cross_entropy(head(train_feats[idx].float()), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                cosine.step()
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(v.to(device).float()) for v in val_feats.split(16384)])
    return topk_accuracy(logits, val_labels)


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    knn_top1: float  # percent
    knn_top5: float
    linear_top1: float | None  # None without the linear probe
    linear_top5: float | None
    k: int
    num_train: int
    num_val: int
    num_classes: int
    feature_dim: int
    seconds: float  # all of it: extraction, kNN, probe
    extract_s: float  # the feature extraction alone (both sets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"kNN (k={self.k}, T={KNN_TEMPERATURE}): top-1 {self.knn_top1:.2f}%  top-5 {self.knn_top5:.2f}%"]
        if self.linear_top1 is not None:
            lines.append(f"linear probe: top-1 {self.linear_top1:.2f}%  top-5 {self.linear_top5:.2f}%")
        rate = (self.num_train + self.num_val) / max(self.extract_s, 1e-9)
        lines.append(
            f"{self.num_train} train / {self.num_val} val images, {self.num_classes} classes, "
            f"{self.feature_dim}-d features; {self.seconds:.1f}s ({self.extract_s:.1f}s extracting, {rate:.0f} img/s)"
        )
        return "\n".join(lines)


def _bank_device(device: torch.device, rows: int, dim: int) -> torch.device:
    """The device for a bank of fp16 features: the GPU when twice its size (kNN chunks, probe) fits beside
    1 GiB to spare, else the CPU."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 2 * rows * dim * 2 + 2**30 < free else torch.device("cpu")


def _shard(n: int, d: Dist) -> tuple[int, int]:
    """This rank's contiguous block [lo, hi) of n items; the blocks of ranks 0..W-1 cover 0..n in order."""
    bounds = np.linspace(0, n, d.world_size + 1).astype(int)
    return int(bounds[d.rank]), int(bounds[d.rank + 1])


def _gather_rows(d: Dist, part: torch.Tensor, n: int, bank: torch.Tensor | None) -> None:
    """Rank 0: copy every rank's block of rows (rank order: rows 0..n) into `bank`; others pass bank=None.
    A collective (torch.distributed.gather), in pieces of ~32 MB so no rank holds a second copy."""
    bounds = np.linspace(0, n, d.world_size + 1).astype(int)
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


def _features(
    model: nn.Module, files: list[str], d: Dist, device: torch.device, **extract: Any
) -> tuple[torch.Tensor | None, float]:
    """Features of all `files`, each rank extracting its block, on rank 0 (None elsewhere); seconds taken.

    A failure on any rank is raised on every rank, after all of them have finished their block."""
    mae = _unwrap(model)
    t0 = time.perf_counter()
    dim, cuda = mae.arch.embed_dim, device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    bank = None
    if d.is_main:
        bank = torch.empty(len(files), dim, dtype=dtype, device=_bank_device(device, len(files), dim))
    lo, hi = _shard(len(files), d)
    error = None
    try:
        if d.enabled:
            part = extract_features(model, files[lo:hi], device=device, **extract)
        else:
            part = extract_features(model, files, device=device, out=bank, **extract)
    except Exception as e:
        error, part = f"rank {d.rank}: {type(e).__name__}: {e}", torch.zeros(0, dim, dtype=dtype, device=device)
    errors = [x for x in gather(d, error) if x is not None]  # every rank arrives here, failed or not
    if errors:
        raise RuntimeError("feature extraction failed: " + "; ".join(errors))
    if d.enabled:
        _gather_rows(d, part, len(files), bank)
    if cuda:
        torch.cuda.synchronize(device)  # honest timing: the features are done
    return bank, time.perf_counter() - t0


def run_eval(
    model: nn.Module,
    sets: EvalSets,
    *,
    device: torch.device,
    dist: Dist = SINGLE,
    k: int = 20,
    linear: bool = False,
    input_size: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    batch_size: int = 128,
    num_threads: int = 2,
    decoder: str = "mixed",
    seed: int = 0,
    probe_epochs: int = 100,
) -> EvalResult:
    """kNN (and the linear probe) of `model`'s frozen features on `sets`; a collective with several ranks
    (each extracts its block; rank 0 classifies; every rank returns rank 0's result)."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if not sets.train_files or not sets.val_files:
        raise EvalDataError("the evaluation needs at least one train and one val image")
    t0 = time.perf_counter()
    extract = dict(
        input_size=input_size, mean=mean, std=std, batch_size=batch_size, num_threads=num_threads, decoder=decoder
    )
    train_feats, train_s = _features(model, sets.train_files, dist, device, **extract)
    val_feats, val_s = _features(model, sets.val_files, dist, device, **extract)
    result, error = None, None
    if dist.is_main:
        try:
            train_labels, val_labels = torch.tensor(sets.train_labels), torch.tensor(sets.val_labels)
            top1, top5 = knn_classify(train_feats, train_labels, val_feats, val_labels, sets.num_classes, k)
            lin1 = lin5 = None
            if linear:
                lin1, lin5 = linear_probe(
                    train_feats, train_labels, val_feats, val_labels, sets.num_classes, seed=seed, epochs=probe_epochs
                )
            result = EvalResult(
                top1,
                top5,
                lin1,
                lin5,
                min(k, len(sets.train_files)),
                len(sets.train_files),
                len(sets.val_files),
                sets.num_classes,
                train_feats.shape[1],
                time.perf_counter() - t0,
                train_s + val_s,
            )
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    result, error = broadcast(dist, (result, error))  # the other ranks wait here for rank 0
    if error is not None:
        raise RuntimeError(f"evaluation failed on rank 0: {error}")
    return result


def evaluate(
    model: nn.Module,
    train_dir: str,
    val_dir: str,
    *,
    k: int = 20,
    linear: bool = False,
    max_train: int = 0,
    device: torch.device = CPU,
    seed: int = 0,
    cache_dir: str | None = None,
    **options: Any,
) -> EvalResult:
    """One process: scan the labelled folders (scan_labelled) and run_eval on them. `options` go to run_eval
    (input_size, mean, std, batch_size, num_threads, decoder, probe_epochs)."""
    sets = scan_labelled(train_dir, val_dir, max_train=max_train, seed=seed, cache_dir=cache_dir)
    return run_eval(model, sets, device=device, k=k, linear=linear, seed=seed, **options)


def evaluate_in_training(
    model: nn.Module,
    sets: EvalSets,
    *,
    dist: Dist,
    device: torch.device,
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    k: int = 20,
    linear_probe: bool = False,
    batch_size: int = 128,
    num_threads: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """The train loop's evaluation, a collective: EVERY rank calls it at the same point, with the same `sets`
    (from prepare_eval_sets, made once before training, which also subsamples the bank).

    model: the uncompiled MAE (compile and DDP wrappers are looked through); it runs in eval mode with
    no grad and is put back in the mode it was in. Each rank extracts the features of its block of
    the train and val images (DALI, on `device`), rank 0 gathers them and runs kNN (and the linear
    probe); every rank returns rank 0's numbers:

        {"knn_top1": %, "knn_top5": %, "eval_s": seconds}  + {"linear_top1": %, "linear_top5": %} with linear_probe

    (percent as floats in [0, 100]; eval_s is this rank's wall time for the whole call.)

    The RNG streams of the training (torch CPU and CUDA, numpy, python) are not advanced. A failure on
    any rank raises RuntimeError on every rank (no rank is left waiting in a collective).
    """
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        result = run_eval(
            model,
            sets,
            device=device,
            dist=dist,
            k=k,
            linear=linear_probe,
            input_size=input_size,
            mean=tuple(mean),
            std=tuple(std),
            batch_size=batch_size,
            num_threads=num_threads,
            seed=seed,
        )
    out = {"knn_top1": result.knn_top1, "knn_top5": result.knn_top5}
    if linear_probe:
        out.update(linear_top1=result.linear_top1, linear_top5=result.linear_top5)
    out["eval_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- command line


def versions() -> dict[str, str | None]:
    """torch, DALI, timm and mae-fast versions (None for one not installed)."""
    import importlib.metadata

    out: dict[str, str | None] = {"torch": torch.__version__}
    try:
        import nvidia.dali

        out["dali"] = nvidia.dali.__version__
    except ImportError:
        out["dali"] = None
    for name in ("timm", "mae-fast"):
        try:
            out[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def evaluate_checkpoint(
    checkpoint: str,
    train_dir: str,
    val_dir: str,
    *,
    k: int = 20,
    linear: bool = False,
    max_train: int = 0,
    device: str = "auto",
    batch_size: int = 128,
    num_threads: int = 4,
    seed: int = 0,
    json_path: str | None = None,
    cache_dir: str | None = None,
    print_fn: Any = print,
) -> dict[str, Any]:
    """`mae-fast eval`: load any supported checkpoint, evaluate, print the numbers, write --json; return the record."""
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    if max_train < 0:
        raise ConfigError(f"--max-train must be >= 0 (0: all), got {max_train}")
    dev = resolve_device(device, key="--device")
    sets = scan_labelled(  # errors first
        train_dir, val_dir, max_train=max_train, seed=seed, cache_dir=cache_dir, names=("--train", "--val")
    )
    loaded = load_encoder(checkpoint)
    for note in loaded.notes + sets.notes:
        print_fn(note)
    result = run_eval(
        loaded.model.to(dev),
        sets,
        device=dev,
        k=k,
        linear=linear,
        mean=loaded.mean,
        std=loaded.std,
        batch_size=batch_size,
        num_threads=num_threads,
        seed=seed,
    )
    print_fn(result.summary())
    record = {
        "checkpoint": str(checkpoint),
        "step": loaded.step,
        "source": loaded.source,
        "model_type": loaded.model_type,
        "input_size": loaded.model.arch.img_size,
        "train": str(train_dir),
        "val": str(val_dir),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        **result.to_dict(),
        "versions": versions(),
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
        print_fn(f"wrote {json_path}")
    return record
