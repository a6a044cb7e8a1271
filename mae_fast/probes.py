"""The math of the frozen-feature probes, on tensors only (no files, no DALI, no ranks):

    weighted kNN as DINO's eval_knn.py (Caron et al. 2021): cosine similarity of L2-normalized
        features, the k most similar train features vote with exp(sim / 0.07)
    linear probe as MAE's main_linprobe.py (He et al. 2021): BatchNorm1d without affine parameters,
        then a Linear layer, trained on the cached train features

Both score val features against labels as top-1 and top-5 accuracy in percent (topk_accuracy: top-5 is
top-C when there are C < 5 classes, so it is 100% with C <= 5; kNN's top-5 is top-k when k < 5, as DINO's).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

KNN_TEMPERATURE = 0.07  # DINO's T
SIMILARITY_ELEMENTS = 2**27  # bound on one chunk of the (val rows, train rows) similarity matrix: 512 MB in fp32


@dataclass
class LabelledFeatures:
    """Frozen features of a labelled train set (the kNN bank, the probe's training data) and a val set; labels are
    class indices in [0, num_classes)."""

    train: torch.Tensor  # (N, D)
    train_labels: torch.Tensor  # (N,)
    val: torch.Tensor  # (M, D)
    val_labels: torch.Tensor  # (M,)
    num_classes: int


def subsample(n: int, max_n: int, seed: int) -> np.ndarray:
    """Indices of a uniform random subset of max_n of range(n) (without replacement, from `seed` alone),
    in increasing order; all of them when max_n <= 0 or max_n >= n."""
    if max_n <= 0 or max_n >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    chunk: int | None = None,
) -> torch.Tensor:
    """DINO's weighted kNN votes: (Nv, num_classes), score[i, c] = sum over the k train features most
    cosine-similar to val_feats[i] of label c of exp(similarity / KNN_TEMPERATURE).

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
        scores[start : start + len(q)].scatter_add_(1, labels[top_idx], (top_sim / KNN_TEMPERATURE).exp())
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, top: int = 5) -> tuple[float, float]:
    """Top-1 and top-`top` accuracy in percent of class scores (N, C) against labels (N,) (top-C if C < top)."""
    labels = labels.to(scores.device, dtype=torch.long)
    pred = scores.topk(min(top, scores.shape[1]), dim=1).indices  # (N, top)
    hit = pred == labels[:, None]
    n = max(1, len(labels))
    return 100.0 * hit[:, 0].sum().item() / n, 100.0 * hit.any(dim=1).sum().item() / n


def knn_classify(feats: LabelledFeatures, k: int = 20, chunk: int | None = None) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 accuracy in percent (knn_scores, then topk_accuracy). As DINO's eval_knn.py,
    top-5 is top-min(5, k): with fewer than 5 neighbours only k classes have votes, and the classes without
    any would fill the rest in index order."""
    scores = knn_scores(feats.train, feats.train_labels, feats.val, feats.num_classes, k, chunk)
    return topk_accuracy(scores, feats.val_labels, top=min(5, k, len(feats.train)))


def linear_probe(
    feats: LabelledFeatures, *, seed: int = 0, epochs: int = 100, batch_size: int | None = None, lr: float = 1e-2
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of MAE's linear probe on frozen features: BatchNorm1d(affine=False,
    eps=1e-6) then Linear (weight trunc_normal(std=0.01), bias 0), cross-entropy, trained on the cached
    train features on their device.

    MAE trains it with LARS at batch 16384 for 90 epochs of augmented images; on cached features AdamW (lr 1e-2,
    no weight decay, half-cycle cosine, no warmup) for `epochs` passes in batches of batch_size (default N/8,
    within [16, 4096]: ~800 steps for a small set, ~31k for ImageNet) gets there in seconds. Deterministic for a
    seed (its own generators; the global RNG streams are untouched).
    """
    n, dim = feats.train.shape
    if n < 2:
        raise ValueError("the linear probe needs at least 2 train features")
    device = feats.train.device
    batch = min(n, batch_size or min(4096, max(16, n // 8)))
    steps_per_epoch = n // batch  # whole batches only: BatchNorm statistics of a batch of 1 are undefined
    total = epochs * steps_per_epoch
    y = feats.train_labels.to(device=device, dtype=torch.long)
    # Tiny CPU steps run on one thread: with several, each op waits at a barrier for threads that a busy
    # machine has descheduled (measured: 200x slower on 2 loaded cores).
    threads = 1 if device.type == "cpu" and batch * dim * feats.num_classes < 2**22 else torch.get_num_threads()
    # fork_rng: the layers' default initialization draws from the global stream before it is replaced
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        torch.enable_grad(),
        num_threads(threads),
    ):
        init = torch.Generator().manual_seed(seed)
        order = torch.Generator(device=device).manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, feats.num_classes))
        nn.init.trunc_normal_(head[1].weight, std=0.01, generator=init)
        nn.init.zeros_(head[1].bias)
        head = head.to(device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
        cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        for _ in range(epochs):
            perm = torch.randperm(n, generator=order, device=device)
            for s in range(steps_per_epoch):
                idx = perm[s * batch : (s + 1) * batch]
                loss = F.cross_entropy(head(feats.train[idx].float()), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                cosine.step()
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(v.to(device).float()) for v in feats.val.split(16384)])
    return topk_accuracy(logits, feats.val_labels)
