"""The training step: autocast forward + loss (compiled), backward, clip, fused AdamW.

Ownership: the step owns one static input buffer (N, 3, H, W) and one noise buffer (N, L);
`run(batch)` copies each batch into it (DALI owns its own output until the next batch, and a
fixed address is what CUDA graphs need). Nothing here reads a value back to the host: each
step's loss and grad norm go into device-side rings (grown by the step as needed) that
`read_metrics()` fetches once per log interval, the one host sync of the loop.

A step whose gradient norm is not finite is not applied: the fused AdamW skips the update on the
device (its found_inf input, as GradScaler uses it), and its inf/nan norm reaches the ring, so
the loop stops the run at the next read (misc.compile_optimizer's AdamW has no such input: there
the checkpoint's finite-weights check is what keeps a diverged state out of any save).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from .config import Config
from .model import MaskedAutoencoderViT, build_model
from .optim import build_optimizer
from .pipelines.common import IMAGENET_MEAN, IMAGENET_STD


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


@dataclass(frozen=True)
class StepOptions:
    """What the config decides about the step (values checked by the config)."""

    mask_ratio: float = 0.75
    gradient_clip: float = 0.0  # global-norm clip; 0 = off
    mean: tuple[float, ...] = IMAGENET_MEAN  # for uint8 batches, normalized inside the graph
    std: tuple[float, ...] = IMAGENET_STD
    compile: bool = True
    compile_mode: str = "default"
    compile_backend: str | Callable = "inductor"  # tests pass a counting backend
    compile_optimizer: bool = False  # needs build_optimizer(..., compiled=True)
    precision: str = "amp"  # amp | bf16

    @classmethod
    def from_config(cls, cfg: Config) -> StepOptions:
        a, x = cfg.data.augmentation, cfg.misc
        return cls(
            mask_ratio=cfg.model.mask_ratio,
            gradient_clip=cfg.optimization.gradient_clip,
            mean=tuple(a.mean),
            std=tuple(a.std),
            compile=x.compile,
            compile_mode=x.compile_mode,
            compile_optimizer=x.compile and x.compile_optimizer,
            precision=x.precision,
        )


def build_train_step(
    cfg: Config,
    model: MaskedAutoencoderViT,
    *,
    device: torch.device,
    micro_batch: int,
    accum_steps: int = 1,
    input_dtype: torch.dtype = torch.float32,
    lr: float = 0.0,
    distributed: bool = False,
) -> TrainStep:
    """The configured step and its matching optimizer (fused AdamW, or the compiled one), for `model`
    already on `device`. The one builder train, bench and the tests use."""
    o, options = cfg.optimization, StepOptions.from_config(cfg)
    optimizer = build_optimizer(
        model, lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), device, compiled=options.compile_optimizer
    )
    return TrainStep(
        model,
        optimizer,
        micro_batch=micro_batch,
        accum_steps=accum_steps,
        device=device,
        input_dtype=input_dtype,
        options=options,
        distributed=distributed,
    )


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
    read after the log point's sync), the host clock on the CPU. Grows its event pairs as needed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list[tuple] = []
        self.n = 0
        self.open = False  # a window was started and not yet stopped

    def _event(self):
        return torch.cuda.Event(enable_timing=True) if self.cuda else _HostEvent()

    def start(self) -> None:
        if self.n == len(self.pairs):
            self.pairs.append((self._event(), self._event()))
        self.pairs[self.n][0].record()
        self.open = True

    def stop(self) -> None:
        if self.open:
            self.pairs[self.n][1].record()
            self.n, self.open = self.n + 1, False

    def take_s(self) -> float:
        """Seconds in the windows since the last call; call after a sync (the events must have completed)."""
        total = sum(a.elapsed_time(b) for a, b in self.pairs[: self.n]) / 1000
        self.n = 0
        return total


class MAELoss(nn.Module):
    """The part that is compiled (and, with several processes, wrapped by DistributedDataParallel):
    batch -> fp32 (uint8 batches normalized here, fused into the graph) -> autocast MAE forward -> loss."""

    def __init__(self, mae: MaskedAutoencoderViT, options: StepOptions, amp: bool, uint8: bool, device: torch.device):
        super().__init__()
        self.mae = mae
        self.mask_ratio = options.mask_ratio
        self.amp = amp  # bf16 autocast on GPU; fp32 on the CPU
        self.device_type = device.type
        self.uint8 = uint8
        # plain attributes, not buffers: nothing for DDP to broadcast, constants for the compiler
        self.mean255 = torch.tensor(options.mean, device=device).view(1, 3, 1, 1) * 255
        self.std255 = torch.tensor(options.std, device=device).view(1, 3, 1, 1) * 255

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # fp16 (DALI) / bf16 (synthetic) batches: the loss target is computed in fp32 and autocast picks
        # the matmul precision
        imgs = (imgs.float() - self.mean255) / self.std255 if self.uint8 else imgs.float()
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            loss, _, _ = self.mae(imgs, self.mask_ratio, noise)
        return loss


class Readout(NamedTuple):
    losses: list[float]  # per optimizer step since the last read
    gnorms: list[float]
    busy_s: float  # device seconds in the step since the last read


class TrainStep:
    def __init__(
        self,
        model: MaskedAutoencoderViT,
        optimizer: torch.optim.Optimizer,
        *,
        micro_batch: int,
        accum_steps: int,
        device: torch.device,
        input_dtype: torch.dtype = torch.float32,
        options: StepOptions = StepOptions(),
        distributed: bool = False,
    ):
        """distributed=True wraps the loss module in DistributedDataParallel (a process group must exist).

        precision "amp": bf16 autocast over the fp32 model (on a GPU; fp32 on the CPU). "bf16": a bf16
        copy of the model runs forward and backward without autocast, so activations stay bf16 end to
        end; after every micro-step its gradients are added into fp32 gradients of `model`, which stays
        the fp32 master that the optimizer updates and checkpoints save, and is copied back into the
        bf16 copy after each update. One process only (DDP would reduce only the copy's gradients)."""
        self.model = model  # uncompiled: checkpoints use its parameter names
        self.optimizer = optimizer
        self.accum_steps = accum_steps
        self.gradient_clip = options.gradient_clip
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]

        size = model.arch.img_size
        self.inputs = torch.zeros(micro_batch, 3, size, size, dtype=input_dtype, device=device)
        self.noise = torch.zeros(micro_batch, model.num_patches, device=device)

        self.loss_ring = torch.zeros(64, device=device)  # mean micro-batch loss per step; grown when full
        self.gnorm_ring = torch.zeros(64, device=device)
        self._loss_acc = torch.zeros((), device=device)
        self.slot = 0
        self.busy = BusyTimer(device)
        self.fused = bool(optimizer.defaults.get("fused"))  # can skip a non-finite update on the device

        self.bf16 = options.precision == "bf16"
        self.compute = model  # the module that runs the step: the model, or its bf16 copy
        if self.bf16:
            if distributed:
                raise ValueError("precision bf16 runs in one process in this version (use amp with several)")
            self.compute = copy.deepcopy(model).to(torch.bfloat16)
            for p in self.params:
                p.grad = torch.zeros_like(p)  # fp32 accumulators, kept allocated (zeroed in place)
        self._compute_params = [p for p in self.compute.parameters() if p.requires_grad]

        amp = device.type == "cuda" and not self.bf16
        module: nn.Module = MAELoss(self.compute, options, amp, input_dtype == torch.uint8, device)
        backend = options.compile_backend
        if options.compile:
            kw = {"mode": options.compile_mode} if options.compile_mode != "default" and backend == "inductor" else {}
            module = torch.compile(module, fullgraph=True, dynamic=False, backend=backend, **kw)
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
        if options.compile_optimizer:
            if self.fused:
                raise ValueError(
                    "compile_optimizer needs the foreach/capturable AdamW of build_optimizer(compiled=True)"
                )
            self._update = torch.compile(self._clip_and_update, backend=backend)

    def run(self, batch: torch.Tensor, *, last_micro: bool = True, noise: torch.Tensor | None = None) -> None:
        """Forward and backward of one micro-batch, accumulating gradients scaled by 1/accum_steps.

        `batch` (N, 3, H, W) is copied into the static input buffer. last_micro=False skips the DDP
        gradient all-reduce (micro-steps before the last one of an optimizer step). `noise` (N, L)
        fixes the masking (tests); by default it is drawn from torch's RNG.
        """
        self.busy.start()  # the batch has arrived: what follows is the step's own work
        self.inputs.copy_(batch, non_blocking=True)
        if noise is None:
            torch.rand(self.noise.shape, device=self.device, out=self.noise)
        else:
            self.noise.copy_(noise)
        ctx = self.ddp.no_sync() if (self.ddp is not None and not last_micro) else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn(self.inputs, self.noise)
            (loss / self.accum_steps).backward()
        if self.bf16:  # accumulate in fp32
            torch._foreach_add_([p.grad for p in self.params], [p.grad for p in self._compute_params])
            self.compute.zero_grad(set_to_none=True)
        self._loss_acc += loss.detach()
        if not last_micro:
            self.busy.stop()  # the last micro-step's window closes after the update

    def _clip_and_update(self) -> torch.Tensor:
        """Global grad norm (clipped when gradient_clip > 0), then the AdamW update; returns the norm."""
        if self.gradient_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip, foreach=True)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.params])))
        if self.fused:  # a non-finite norm: the fused kernel leaves weights and moments as they were
            self.optimizer.found_inf = (~torch.isfinite(gnorm)).float()
        self.optimizer.step()
        if self.bf16:
            with torch.no_grad():
                torch._foreach_copy_(self._compute_params, self.params)  # the updated masters, rounded to bf16
        return gnorm

    def optimizer_step(self, lr: float) -> None:
        """Clip, update with the scheduled lr (written into the optimizer's lr tensor), record the loss."""
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)  # a 0-D tensor: no recompile, no sync
        gnorm = self._update()
        self.optimizer.zero_grad(set_to_none=not self.bf16)  # bf16: keep the fp32 accumulators
        if self.slot == len(self.loss_ring):  # a reader slower than 64 steps: twice the room (no sync)
            self.loss_ring = torch.cat([self.loss_ring, torch.zeros_like(self.loss_ring)])
            self.gnorm_ring = torch.cat([self.gnorm_ring, torch.zeros_like(self.gnorm_ring)])
        self.loss_ring[self.slot].copy_(self._loss_acc / self.accum_steps)
        self.gnorm_ring[self.slot].copy_(gnorm)
        self._loss_acc.zero_()
        self.slot += 1
        self.busy.stop()

    def read_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Readout:
        """Losses, grad norms and busy time of the steps since the last read. This is a CPU-GPU sync point.

        `reduce` combines the (2, n) tensor of losses and norms across processes (a mean over ranks).
        """
        n = self.slot
        both = torch.stack([self.loss_ring[:n], self.gnorm_ring[:n]])
        if reduce is not None:
            both = reduce(both)
        losses, gnorms = both.tolist()  # the sync: the busy timer's events are done too
        self.slot = 0
        return Readout(losses, gnorms, self.busy.take_s())
