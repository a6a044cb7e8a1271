"""The training step: autocast forward + loss (compiled), backward, clip, fused AdamW.

Ownership: the step owns one static input buffer (N, 3, H, W) and one noise buffer (N, L);
callers copy each batch into `step.inputs` (DALI owns its own output until the next batch,
and a fixed address is what CUDA graphs need). Nothing here reads a value back to the host:
losses go into a device-side ring of `log_every` slots that `read_metrics()` fetches once per
log interval (the one host sync of the loop).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .config import Config
from .model import MaskedAutoencoderViT, build_model


def model_from_config(cfg: Config) -> MaskedAutoencoderViT:
    m = cfg.model
    return build_model(
        m.type,
        m.norm_pix_loss,
        cfg.data.input_size,
        grad_checkpointing=m.grad_checkpointing,
        embed_kept_only=m.embed_kept_only,
        attention=cfg.misc.attention,
    )


def step_options(cfg: Config) -> dict[str, Any]:
    """The TrainStep keyword arguments that the config decides."""
    a, x = cfg.data.augmentation, cfg.misc
    return {
        "mask_ratio": cfg.model.mask_ratio,
        "gradient_clip": cfg.optimization.gradient_clip,
        "mean": tuple(a.mean),
        "std": tuple(a.std),
        "compile": x.compile,
        "compile_mode": x.compile_mode,
        "compile_optimizer": x.compile and x.compile_optimizer,
        "precision": x.precision,
    }


class _HostEvent:
    """torch.cuda.Event's timing interface on the host clock (the CPU runs the step synchronously)."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return 1000 * (end.t - self.t)


class BusyTimer:
    """The time the device spends in the training step, from events around each micro-step's work,
    recorded after its batch has arrived. Compared with the wall time of a log interval it says how
    busy the device was: the rest is waiting for data or for the host. CUDA events on a GPU (no sync:
    read after the log point's sync), the host clock on the CPU."""

    def __init__(self, device: torch.device, windows: int):
        def event():
            return torch.cuda.Event(enable_timing=True) if device.type == "cuda" else _HostEvent()

        self.pairs = [(event(), event()) for _ in range(windows)]
        self.n = 0

    def start(self) -> None:
        if self.n < len(self.pairs):
            self.pairs[self.n][0].record()

    def stop(self) -> None:
        if self.n < len(self.pairs):
            self.pairs[self.n][1].record()
            self.n += 1

    def take_s(self) -> float:
        """Seconds in the windows since the last call; call after a sync (the events must have completed)."""
        total = sum(a.elapsed_time(b) for a, b in self.pairs[: self.n]) / 1000
        self.n = 0
        return total


class MAELoss(nn.Module):
    """The part that is compiled (and, with several processes, wrapped by DistributedDataParallel):
    batch -> fp32 (uint8 batches normalized here, fused into the graph) -> autocast MAE forward -> loss."""

    def __init__(
        self,
        mae: MaskedAutoencoderViT,
        mask_ratio: float,
        amp: bool,
        uint8: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
    ):
        super().__init__()
        self.mae = mae
        self.mask_ratio = mask_ratio
        self.amp = amp  # bf16 autocast on GPU; fp32 on the CPU
        self.device_type = device.type
        self.uint8 = uint8
        # plain attributes, not buffers: nothing for DDP to broadcast, constants for the compiler
        self.mean255 = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std255 = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # fp16 (DALI) / bf16 (synthetic) batches: the loss target is computed in fp32 and autocast picks
        # the matmul precision
        imgs = (imgs.float() - self.mean255) / self.std255 if self.uint8 else imgs.float()
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            loss, _, _ = self.mae(imgs, self.mask_ratio, noise)
        return loss


class TrainStep:
    def __init__(
        self,
        model: MaskedAutoencoderViT,
        optimizer: torch.optim.Optimizer,
        *,
        micro_batch: int,
        accum_steps: int,
        mask_ratio: float,
        gradient_clip: float,
        device: torch.device,
        input_dtype: torch.dtype = torch.float32,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        compile: bool = True,
        compile_mode: str = "default",
        compile_backend: str | Callable = "inductor",
        compile_optimizer: bool = False,
        precision: str = "amp",
        log_every: int = 100,
        distributed: bool = False,
    ):
        """distributed=True wraps the loss module in DistributedDataParallel (a process group must exist).
        compile_optimizer=True compiles the grad norm + clip + AdamW update too (build the optimizer
        with build_optimizer(..., compiled=True)).

        precision "amp": bf16 autocast over the fp32 model (on a GPU; fp32 on the CPU). "bf16": a bf16
        copy of the model runs forward and backward without autocast, so activations stay bf16 end to
        end; after every micro-step its gradients are added into fp32 gradients of `model`, which stays
        the fp32 master that the optimizer updates and checkpoints save, and is copied back into the
        bf16 copy after each update."""
        self.model = model  # uncompiled: checkpoints use its parameter names
        self.optimizer = optimizer
        self.accum_steps = accum_steps
        self.gradient_clip = gradient_clip
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]

        size = model.arch.img_size
        self.inputs = torch.zeros(micro_batch, 3, size, size, dtype=input_dtype, device=device)
        self.noise = torch.zeros(micro_batch, model.num_patches, device=device)

        self.log_every = log_every
        self.loss_ring = torch.zeros(log_every, device=device)  # mean micro-batch loss per step
        self.gnorm_ring = torch.zeros(log_every, device=device)
        self._loss_acc = torch.zeros((), device=device)
        self.slot = 0

        if precision not in ("amp", "bf16"):
            raise ValueError(f"precision must be amp or bf16, got {precision!r}")
        self.compute = model  # the module that runs the step
        if precision == "bf16":
            if distributed:
                raise ValueError("precision bf16 runs in one process in this version (use amp with several)")
            self.compute = copy.deepcopy(model).to(torch.bfloat16)
            for p in self.params:
                p.grad = torch.zeros_like(p)  # fp32 accumulators, kept allocated (zeroed in place)
        self._compute_params = [p for p in self.compute.parameters() if p.requires_grad]

        amp = device.type == "cuda" and precision == "amp"
        module: nn.Module = MAELoss(self.compute, mask_ratio, amp, input_dtype == torch.uint8, mean, std, device)
        if compile:
            kw = {"mode": compile_mode} if compile_mode != "default" and compile_backend == "inductor" else {}
            module = torch.compile(module, fullgraph=True, dynamic=False, backend=compile_backend, **kw)
        self.ddp = None
        if distributed:
            # DDP around the compiled module (Dynamo cannot trace DDP's own forward); Dynamo sees it runs inside
            # DDP and splits the graph at DDP's buckets, so the all-reduce overlaps the backward.
            # All parameters are used every step: no find_unused_parameters.
            from torch.nn.parallel import DistributedDataParallel

            module = self.ddp = DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
            )
        self.loss_fn = module
        self._update = self._clip_and_update
        if compile_optimizer:
            if self.optimizer.defaults.get("fused"):
                raise ValueError(
                    "compile_optimizer needs the foreach/capturable AdamW of build_optimizer(compiled=True)"
                )
            self._update = torch.compile(self._clip_and_update, backend=compile_backend)

    def micro_step(self, sync_grads: bool = True, noise: torch.Tensor | None = None) -> None:
        """Forward and backward of `self.inputs`, accumulating gradients scaled by 1/accum_steps.

        sync_grads=False skips the DDP gradient all-reduce (micro-steps before the last one).
        `noise` (N, L) fixes the masking (tests); by default it is drawn from torch's RNG.
        """
        if noise is None:
            torch.rand(self.noise.shape, device=self.device, out=self.noise)
        else:
            self.noise.copy_(noise)
        ctx = self.ddp.no_sync() if (self.ddp is not None and not sync_grads) else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn(self.inputs, self.noise)
            (loss / self.accum_steps).backward()
        if self.compute is not self.model:  # bf16: accumulate in fp32
            torch._foreach_add_([p.grad for p in self.params], [p.grad for p in self._compute_params])
            self.compute.zero_grad(set_to_none=True)
        self._loss_acc += loss.detach()

    def _clip_and_update(self) -> torch.Tensor:
        """Global grad norm (clipped when gradient_clip > 0), then the AdamW update; returns the norm."""
        if self.gradient_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip, foreach=True)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.params])))
        self.optimizer.step()
        if self.compute is not self.model:
            with torch.no_grad():
                torch._foreach_copy_(self._compute_params, self.params)  # the updated masters, rounded to bf16
        return gnorm

    def optimizer_step(self, lr: float) -> None:
        """Clip, update with the scheduled lr (written into the optimizer's lr tensor), record the loss."""
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)  # a 0-D tensor: no recompile, no sync
        gnorm = self._update()
        self.optimizer.zero_grad(set_to_none=self.compute is self.model)  # bf16: keep the fp32 accumulators
        self.loss_ring[self.slot].copy_(self._loss_acc / self.accum_steps)
        self.gnorm_ring[self.slot].copy_(gnorm)
        self._loss_acc.zero_()
        self.slot += 1

    def read_metrics(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[list[float], list[float]]:
        """Losses and grad norms of the steps since the last read. This is a CPU-GPU sync point.

        `reduce` combines the (2, n) tensor of losses and norms across processes (a mean over ranks).
        """
        n = self.slot
        both = torch.stack([self.loss_ring[:n], self.gnorm_ring[:n]])
        if reduce is not None:
            both = reduce(both)
        losses, gnorms = both.tolist()
        self.slot = 0
        return losses, gnorms

    @property
    def ring_full(self) -> bool:
        return self.slot >= self.log_every
