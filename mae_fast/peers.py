"""The two peers mae-fast's benchmarks measure against, on the same model, card and data.

- the official engine (facebookresearch/mae engine_pretrain.py): eager, fp16 autocast + GradScaler,
  foreach AdamW, `loss.item()` and a synchronize every step; fed by the PIL loader end to end;
- the compiled reference: the official model as it is, tuned the usual way (torch.compile, bf16
  autocast, fused AdamW, no per-step sync); fed by DALI end to end.

Each builder returns run(images=None): one training step on `images` (or a fixed random batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import Config
from .model import build_model
from .optim import param_groups
from .runtime import sync

PeerStep = Callable[[torch.Tensor | None], None]


def reference_step(cfg: Config, device: torch.device, batch: int) -> PeerStep:
    """The official engine's step; fp32 without the scaler on the CPU. Images are copied to the device, as the
    official loop does."""
    o = cfg.optimization
    model = build_model(cfg.model.type, cfg.model.norm_pix_loss, cfg.data.input_size).to(device)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=1e-4, betas=(o.adam_beta1, o.adam_beta2))
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    fixed = torch.randn(batch, 3, cfg.data.input_size, cfg.data.input_size, device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(images: torch.Tensor | None = None) -> None:
        x = fixed if images is None else images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss, _, _ = model(x, cfg.model.mask_ratio)
        loss.item()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, float("inf"))  # the official scaler computes the norm
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sync(device)

    return run


def compiled_reference_step(cfg: Config, device: torch.device, batch: int) -> PeerStep:
    """The strong peer (torch.compile when misc.compile). What it lacks against mae-fast: the static input buffer,
    fullgraph, the tensor lr, the performance switches. Images are already on the device (DALI's)."""
    o = cfg.optimization
    model = build_model(cfg.model.type, cfg.model.norm_pix_loss, cfg.data.input_size).to(device)
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=1e-4, betas=(o.adam_beta1, o.adam_beta2), fused=True
    )
    forward = torch.compile(model) if cfg.misc.compile else model
    fixed = torch.randn(batch, 3, cfg.data.input_size, cfg.data.input_size, device=device)
    a = cfg.data.augmentation
    mean255 = torch.tensor(a.mean, device=device).view(1, 3, 1, 1) * 255
    std255 = torch.tensor(a.std, device=device).view(1, 3, 1, 1) * 255

    def run(images: torch.Tensor | None = None) -> None:
        if images is None:
            x = fixed
        elif images.dtype == torch.uint8:  # data.output_dtype uint8: DALI left the normalization to the step
            x = (images.float() - mean255) / std255
        else:
            x = images.float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = forward(x, cfg.model.mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run
