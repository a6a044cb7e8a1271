"""AdamW with MAE's weight-decay groups, and the per-iteration warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and 1-D parameters (norms, tokens are 3-D and do decay, as timm's
    param_groups_weight_decay used by the official MAE). Frozen parameters (fixed pos embeds) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
    compiled: bool = False,
) -> torch.optim.AdamW:
    """AdamW whose lr is a 0-D tensor on the device, so changing it never recompiles nor syncs.

    Fused: one kernel for all parameters on CUDA (a fused CPU kernel on the CPU). compiled=True
    builds the foreach + capturable variant instead, the one torch.compile traces into its own
    kernels. A tensor lr is only accepted by the fused or capturable variants.
    """
    lr_t = torch.tensor(lr, dtype=torch.float32, device=device)
    groups = param_groups(model, weight_decay)
    for g in groups:
        g["lr"] = lr_t  # one shared tensor: the schedule writes it in place each step
    kind = {"foreach": True, "capturable": True} if compiled else {"fused": True}
    return torch.optim.AdamW(groups, lr=lr_t, betas=betas, **kind)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state but keep this optimizer's kernel choice (fused, or foreach +
    capturable): load_state_dict alone would also take the flags of the run that saved it."""
    keep = {k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable")}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(keep)


def cosine_lr(step: int, peak: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Per-iteration linear warmup, then half-cycle cosine to min_lr (MAE's util/lr_sched.py, per step)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
