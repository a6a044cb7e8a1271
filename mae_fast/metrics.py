"""Turn the per-interval device readout into a snapshot of plain floats, and print it.

The snapshot is what every sink gets (console line, log file, metrics.jsonl, dashboard);
none of them ever touches a tensor.
"""

from __future__ import annotations

import math
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
    mfu: float  # model FLOPs utilization, 0..1 (0 when the peak is unknown)
    mem_gb: float  # peak device memory allocated
    elapsed_s: float
    busy_pct: float | None = None  # share of the wall time the device spent in the step (None: not measured)
    history: list[float] = field(default_factory=list)  # recent smoothed losses, one per step, for sparklines

    def record(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d


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
        peak_flops: float = 0.0,
        ema_beta: float = 0.98,
    ):
        self.effective_batch = effective_batch
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
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
        mem_gb: float = 0.0,
        busy_s: float | None = None,
    ) -> Snapshot:
        """`losses` are the steps first_step+1 .. first_step+len(losses). Raises NonFiniteLoss."""
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
        ms = 1000 * dt / n
        sps = self.effective_batch * n / dt if dt > 0 else 0.0
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
            mfu=(self.flops_per_step * n / dt / self.peak_flops) if self.peak_flops and dt > 0 else 0.0,
            mem_gb=mem_gb,
            elapsed_s=now - self.t_start,
            busy_pct=100 * min(1.0, busy_s / dt) if busy_s is not None and dt > 0 else None,
            history=list(self.history),
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
    if s.mfu:
        line += f" | mfu {100 * s.mfu:.1f}%"
    if s.mem_gb:
        line += f" mem {s.mem_gb:.1f} GB"
    return line


# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for MFU in the train loop.
# `mae-fast bench-step` measures the card's real matmul rate instead.
_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def peak_bf16_flops(device_name: str) -> float:
    for key, value in _PEAK_BF16.items():
        if key in device_name:
            return value
    return 0.0
