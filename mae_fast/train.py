"""The train loop: config -> data -> model -> compiled step -> metrics, top to bottom."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import Config, Derived, derive, format_config, lr_warnings, save_config
from .data import TimedBatches, build_loader, find_dataset
from .metrics import Meter, Snapshot, format_line, peak_bf16_flops
from .model import build_model, model_flops_per_image
from .optim import build_optimizer, cosine_lr
from .step import TrainStep


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"misc.device is {name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    derived: Derived
    losses: list[float] = field(default_factory=list)  # every step's loss, in order
    snapshots: list[Snapshot] = field(default_factory=list)
    steps_done: int = 0


def train(cfg: Config, *, log: Callable[[str], None] = print, max_steps: int | None = None) -> TrainResult:
    """Pretrain as configured. `max_steps` stops early (tests, benchmarks)."""
    seed_everything(cfg.misc.seed)
    device = resolve_device(cfg.misc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    o, s, lg = cfg.optimization, cfg.schedule, cfg.logging

    # data first: a bad data_path stops the run before any model is built
    dataset = find_dataset(cfg)
    derived = derive(cfg, dataset.num_images)
    loader, input_dtype, data_desc = build_loader(cfg, dataset, derived.micro_batch_size,
                                                  derived.steps_per_epoch * derived.accum_steps, device)
    for w in dataset.warnings + lr_warnings(cfg):
        log(f"WARNING: {w}")
    log(f"data: {data_desc}")
    log(format_config(cfg, derived))
    out_dir = Path(lg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, derived, out_dir / "config.yaml")

    model = build_model(cfg.model.type, cfg.model.norm_pix_loss, cfg.data.input_size,
                        cfg.model.grad_checkpointing).to(device)
    optimizer = build_optimizer(model, derived.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), device)
    a = cfg.data.augmentation
    step = TrainStep(model, optimizer, micro_batch=derived.micro_batch_size, accum_steps=derived.accum_steps,
                     mask_ratio=cfg.model.mask_ratio, gradient_clip=o.gradient_clip, device=device,
                     input_dtype=input_dtype, mean=tuple(a.mean), std=tuple(a.std),
                     compile=cfg.misc.compile, compile_mode=cfg.misc.compile_mode, log_every=lg.print_freq)
    flops = model_flops_per_image(model.arch, cfg.model.mask_ratio) * derived.effective_batch
    meter = Meter(effective_batch=derived.effective_batch, steps_per_epoch=derived.steps_per_epoch,
                  total_steps=derived.total_steps, flops_per_step=flops,
                  peak_flops=peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else 0.0)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"model {cfg.model.type}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M "
        f"trainable parameters on {dev_name}; {'compiled' if cfg.misc.compile else 'eager'}; "
        f"{flops / derived.effective_batch / 1e9:.3g} GFLOP per image")

    result = TrainResult(derived)
    batches = TimedBatches(loader)
    global_step = derived.start_step
    last_logged = global_step
    end_step = derived.total_steps if max_steps is None else min(derived.total_steps, global_step + max_steps)
    t0 = time.perf_counter()
    for epoch in range(s.start_epoch, s.epochs):
        if global_step >= end_step:
            break
        batches.start_epoch(epoch)
        for _ in range(derived.steps_per_epoch):
            lr = cosine_lr(global_step, derived.lr, o.min_lr, derived.warmup_steps, derived.total_steps)
            for i in range(derived.accum_steps):
                step.inputs.copy_(batches.next(), non_blocking=True)
                step.micro_step(sync_grads=i == derived.accum_steps - 1)
            step.optimizer_step(lr)
            global_step += 1
            first = global_step == derived.start_step + 1  # report the first step at once (compile time)
            if first or global_step % lg.print_freq == 0 or global_step == end_step:
                losses, gnorms = step.read_metrics()  # the loop's one CPU-GPU sync point
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                snap = meter.update(first_step=last_logged, losses=losses, gnorms=gnorms, lr=lr,
                                    data_wait_s=batches.take_wait(), mem_gb=mem)
                last_logged = global_step
                result.losses += losses
                result.snapshots.append(snap)
                if first:
                    log(f"first step done in {time.perf_counter() - t0:.1f}s (compilation included), "
                        f"loss {snap.loss:.4f}")
                    meter.restart_clock()
                else:
                    log(format_line(snap))
            if global_step >= end_step:
                break
    result.steps_done = global_step - derived.start_step
    log(f"done: {result.steps_done} steps in {time.perf_counter() - t0:.1f}s")
    return result
