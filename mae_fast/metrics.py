"""Turn the per-interval device readout into a snapshot of plain floats, and print it.

The snapshot is what every sink gets (console line, log file, metrics.jsonl, dashboard);
none of them ever touches a tensor.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Snapshot:
    step: int  # optimizer steps done (global)
    epoch: int
    epoch_step: int  # steps done in this epoch
    steps_per_epoch: int
    total_steps: int
    loss: float  # last step's loss
    loss_avg: float  # mean over the interval
    loss_smooth: float  # bias-corrected EMA over steps
    lr: float
    grad_norm: float
    samples_per_s: float
    ms_per_iter: float  # per optimizer step
    data_wait_pct: float
    eta_epoch_s: float
    eta_run_s: float
    mfu: float  # model FLOPs utilization, 0..1, a share of mfu_peak (0 when the peak is unknown)
    mem_gb: float | None  # peak device memory allocated (None: not CUDA)
    elapsed_s: float
    busy_pct: float | None = None  # share of the wall time the device spent in the step (None: not measured)
    history: list[float] = field(default_factory=list)  # recent smoothed losses, one per step, for sparklines
    mfu_peak: str = ""  # what mfu is a share of, e.g. "H200 dense bf16 peak 989 TFLOP/s" ("": no MFU)
    mem_reserved_gb: float | None = None  # peak memory the CUDA caching allocator reserved
    alloc_retries: int | None = None  # the allocator's retries (it freed its cache to satisfy an allocation)

    def record(self) -> dict:
        """The metrics.jsonl record: no history; no MFU without a known peak, no memory off CUDA."""
        d = asdict(self)
        d.pop("history")
        if not self.mfu_peak:
            d.pop("mfu"), d.pop("mfu_peak")
        for key in MEMORY:
            if d[key] is None:
                d.pop(key)
        return d

    def scalars(self) -> dict[str, float]:
        """What TensorBoard and W&B get: train/KEY (the MFU only against a known peak), memory/KEY on CUDA."""
        out = {f"train/{k}": getattr(self, k) for k in SCALARS if k != "mfu" or self.mfu_peak}
        out.update({f"memory/{k}": getattr(self, k) for k in MEMORY if getattr(self, k) is not None})
        return out


SCALARS = ("loss", "loss_smooth", "lr", "grad_norm", "samples_per_s", "ms_per_iter", "data_wait_pct", "mfu")
MEMORY = ("mem_gb", "mem_reserved_gb", "alloc_retries")  # CUDA only (None elsewhere)


class NonFiniteLoss(RuntimeError):
    """The run diverged: a loss, gradient norm or weight became NaN or inf. Nothing of it was saved."""

    def __init__(self, step: int, value: float, what: str = "loss", good_checkpoint: str = ""):
        good = f"; the newest good checkpoint: {good_checkpoint}" if good_checkpoint else ""
        super().__init__(
            f"{what} became {value} at step {step}: training stopped, nothing of the diverged state was "
            f"saved{good}. Lower the lr (optimization.lr / base_lr), set optimization.gradient_clip (e.g. 1.0), "
            f"or check the data"
        )
        self.step, self.value = step, value


class Meter:
    """Host-side bookkeeping between log points: EMA of the loss, throughput, ETA."""

    def __init__(
        self,
        *,
        effective_batch: int,
        steps_per_epoch: int,
        total_steps: int,
        flops_per_step: float = 0.0,
        peak: Peak | None = None,
        ema_beta: float = 0.98,
    ):
        self.effective_batch = effective_batch
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.flops_per_step = flops_per_step
        self.peak = peak
        self._timed: tuple[float, float, float] | None = None  # the last timed interval's (dt, steps, wait s)
        self.beta = ema_beta
        self._ema = 0.0
        self._ema_n = 0
        self.history: list[float] = []
        self.t_start = time.perf_counter()
        self.t_last = self.t_start

    def restart_clock(self) -> None:
        """Leave compilation and warm-up out of the next interval's timing."""
        self.t_last = time.perf_counter()

    def update(
        self,
        *,
        first_step: int,
        losses: list[float],
        gnorms: list[float],
        lr: float,
        data_wait_s: float,
        memory: dict | None = None,
        busy_s: float | None = None,
        timed: bool = True,
    ) -> Snapshot:
        """`losses` are the steps first_step+1 .. first_step+len(losses). Raises NonFiniteLoss. `memory`: the
        Snapshot's memory fields (observe.cuda_memory). timed=False: the interval's time is not training
        throughput (it was profiled): img/s, ms/iter, data wait, MFU and the ETAs are the last timed interval's."""
        for i, v in enumerate(losses):
            if not math.isfinite(v):
                raise NonFiniteLoss(first_step + i + 1, v)
            self._ema = self.beta * self._ema + (1 - self.beta) * v
            self._ema_n += 1
            self.history.append(self._ema / (1 - self.beta**self._ema_n))
        self.history = self.history[-200:]
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        n = max(1, len(losses))
        step = first_step + len(losses)
        if timed or self._timed is None:
            self._timed = (dt, n, data_wait_s)
        else:
            busy_s = None
        dt, n_timed, data_wait_s = self._timed
        ms = 1000 * dt / n_timed
        sps = self.effective_batch * n_timed / dt if dt > 0 else 0.0
        peak = self.peak
        epoch_step = step % self.steps_per_epoch or (self.steps_per_epoch if step else 0)
        return Snapshot(
            step=step,
            epoch=(step - 1) // self.steps_per_epoch if step else 0,
            epoch_step=epoch_step,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            loss=losses[-1] if losses else float("nan"),
            loss_avg=sum(losses) / n,
            loss_smooth=self._ema / (1 - self.beta**self._ema_n) if self._ema_n else float("nan"),
            lr=lr,
            grad_norm=gnorms[-1] if gnorms else float("nan"),
            samples_per_s=sps,
            ms_per_iter=ms,
            data_wait_pct=100 * min(1.0, data_wait_s / dt) if dt > 0 else 0.0,
            eta_epoch_s=(self.steps_per_epoch - epoch_step) * ms / 1000,
            eta_run_s=(self.total_steps - step) * ms / 1000,
            mfu=(self.flops_per_step * n_timed / dt / peak.flops) if peak and dt > 0 else 0.0,
            mfu_peak=peak.name if peak else "",
            elapsed_s=now - self.t_start,
            busy_pct=100 * min(1.0, busy_s / dt) if busy_s is not None and dt > 0 else None,
            history=list(self.history),
            **{"mem_gb": None, **(memory or {})},
        )


def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}:{m:02d}:{s:02d}"


def format_line(s: Snapshot) -> str:
    """One plain log line per interval (for a pipe, a batch job, or the log file)."""
    line = (
        f"epoch {s.epoch} [{s.epoch_step}/{s.steps_per_epoch}] step {s.step}/{s.total_steps} "
        f"loss {s.loss:.4f} (avg {s.loss_avg:.4f}, smooth {s.loss_smooth:.4f}) lr {s.lr:.3e} "
        f"| {s.samples_per_s:,.1f} img/s {s.ms_per_iter:.1f} ms/it data wait {s.data_wait_pct:.0f}% "
        + (f"busy {s.busy_pct:.0f}% " if s.busy_pct is not None else "")
        + f"| eta epoch {fmt_time(s.eta_epoch_s)} run {fmt_time(s.eta_run_s)}"
    )
    if s.mfu_peak:
        line += f" | mfu {100 * s.mfu:.1f}% of {s.mfu_peak}"
    if s.mem_gb is not None:
        line += f" | mem {s.mem_gb:.1f} GB"
    if s.mem_reserved_gb is not None:
        line += f" (reserved {s.mem_reserved_gb:.1f} GB, {s.alloc_retries} alloc retries)"
    return line


# The cards' dense (no sparsity) bf16 tensor-core peaks, FLOP/s, for MFU; each from its vendor's datasheet, which
# quotes the sparse figure too (twice these). `mae-fast bench` also measures the card's real matmul rate.
# A pattern is searched in torch.cuda.get_device_name(); the first match wins (the specific names first).
PEAK_BF16: list[tuple[str, str, float]] = [
    # (pattern, name, dense bf16 FLOP/s)
    (r"\bH200 NVL\b", "H200 NVL", 835e12),  # NVIDIA H200 datasheet (H200 NVL column: 1,671 TFLOPS with sparsity)
    (r"\bG?H200\b", "H200", 989e12),  # NVIDIA H200 datasheet (H200 SXM: 1,979 TFLOPS with sparsity); GH200 alike
    (r"\bH100 NVL\b", "H100 NVL", 835e12),  # NVIDIA H100 datasheet (H100 NVL: 1,671 TFLOPS with sparsity)
    (r"\bH100 PCIe\b", "H100 PCIe", 756e12),  # NVIDIA H100 datasheet (H100 PCIe: 1,513 TFLOPS with sparsity)
    (r"\bH100\b", "H100 SXM", 989e12),  # NVIDIA H100 datasheet (H100 SXM: 1,979 TFLOPS with sparsity)
    (r"\bA100\b", "A100", 312e12),  # NVIDIA A100 datasheet (SXM and PCIe: 312 TFLOPS, 624 with sparsity)
    (r"\bL40S\b", "L40S", 362e12),  # NVIDIA L40S datasheet (362.05 TFLOPS, 733 with sparsity)
    (r"\bL40\b", "L40", 181e12),  # NVIDIA L40 datasheet (181.05 TFLOPS, 362.1 with sparsity)
    (r"\bL4\b", "L4", 121e12),  # NVIDIA L4 datasheet (121 TFLOPS, 242 with sparsity)
    (r"\bA10\b", "A10", 125e12),  # NVIDIA A10 datasheet (125 TFLOPS, 250 with sparsity)
    (r"RTX 4090\b", "RTX 4090", 165e12),  # NVIDIA Ada whitepaper (165.2 TFLOPS with FP32 accumulate)
    (r"RTX 3090\b", "RTX 3090", 71e12),  # NVIDIA Ampere GA102 whitepaper (71 TFLOPS with FP32 accumulate)
]  # not listed (no MFU claimed): the CPU, V100 and older (no bf16 tensor cores), cards not measured against


@dataclass(frozen=True)
class Peak:
    """The FLOP/s an MFU is a share of, and its name as every printed MFU states it."""

    flops: float
    name: str  # e.g. "H200 dense bf16 peak 989 TFLOP/s"


def card_peak(device_name: str, world_size: int = 1) -> Peak | None:
    """The dense bf16 peak of `world_size` cards named `device_name` (None: the CPU or a card not in PEAK_BF16)."""
    for pattern, name, flops in PEAK_BF16:
        if re.search(pattern, device_name):
            cards = f"{world_size} x " if world_size > 1 else ""
            return Peak(flops * world_size, f"{cards}{name} dense bf16 peak {flops / 1e12:.0f} TFLOP/s")
    return None
