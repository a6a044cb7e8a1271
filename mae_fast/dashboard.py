"""The live Rich console dashboard. It renders only the floats of a Snapshot it is handed, once
per log interval, redrawing in place, so it costs the train loop nothing between log points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .metrics import Snapshot, fmt_time

if TYPE_CHECKING:
    from .evaluate import EvalResult

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 48) -> str:
    """Recent values as one line of block characters (min..max of the shown window)."""
    vals = [v for v in values[-width:] if v == v]  # drop NaN
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - lo) / span * len(_BARS)))] for v in vals)


@dataclass
class RunInfo:
    run_name: str
    model: str
    device: str
    summary: str  # one line of config: batch, lr, epochs, data


def render(
    s: Snapshot | None,
    info: RunInfo,
    last_checkpoint: str = "",
    status: str = "",
    evals: list[tuple[int, float]] = (),
) -> Panel:
    """The whole dashboard for one snapshot (None before the first log point); `evals`: (epoch, kNN top-1 %)
    of the evaluations so far, oldest first."""
    head = Text.assemble((info.run_name, "bold cyan"), "  ", (info.model, "bold"), "  on ", info.device)
    rows = [head, Text(info.summary, style="dim")]
    if s is None:
        rows.append(Text(status or "starting (compiling the step)...", style="yellow"))
        return Panel(Group(*rows), title="mae-fast", border_style="cyan")

    bars = Table.grid(padding=(0, 1))
    bars.add_column(width=6)
    bars.add_column(ratio=1)
    bars.add_column(justify="right")
    bars.add_row(
        "epoch",
        ProgressBar(total=s.steps_per_epoch, completed=s.epoch_step),
        f"{s.epoch} · {s.epoch_step}/{s.steps_per_epoch} · eta {fmt_time(s.eta_epoch_s)}",
    )
    bars.add_row(
        "run",
        ProgressBar(total=s.total_steps, completed=s.step),
        f"step {s.step}/{s.total_steps} · eta {fmt_time(s.eta_run_s)}",
    )

    stats = Table.grid(padding=(0, 2))
    for _ in range(4):
        stats.add_column()
    stats.add_row("loss", Text(f"{s.loss:.4f}", style="bold"), "smoothed", f"{s.loss_smooth:.4f}")
    stats.add_row("lr", f"{s.lr:.3e}", "grad norm", f"{s.grad_norm:.3f}")
    stats.add_row(
        "throughput", Text(f"{s.samples_per_s:,.0f} img/s", style="bold green"), "time/iter", f"{s.ms_per_iter:.1f} ms"
    )
    wait_style = "red" if s.data_wait_pct > 10 else "green"
    busy = Text(f"{s.busy_pct:.1f} %", style="red" if s.busy_pct < 90 else "green") if s.busy_pct is not None else "n/a"
    stats.add_row("data wait", Text(f"{s.data_wait_pct:.1f} %", style=wait_style), "device busy", busy)
    mfu = f"{100 * s.mfu:.1f} %" if s.mfu_peak else "n/a"
    stats.add_row("MFU", mfu, "GPU memory", f"{s.mem_gb:.1f} GB" if s.mem_gb is not None else "n/a")
    reserved = f"{s.mem_reserved_gb:.1f} GB, {s.alloc_retries} retries" if s.mem_reserved_gb is not None else ""
    stats.add_row("elapsed", fmt_time(s.elapsed_s), "reserved" if reserved else "", reserved)
    rows += [bars, stats]
    if s.mfu_peak:
        rows.append(Text(f"MFU: a share of the {s.mfu_peak}", style="dim"))
    rows.append(Text.assemble(("loss ", "dim"), (sparkline(s.history), "magenta")))
    if evals:
        epoch, top1 = evals[-1]
        recent = " ".join(f"{v:.1f}" for _, v in evals[-6:-1])
        rows.append(
            Text.assemble(
                ("kNN  ", "dim"),
                (sparkline([v for _, v in evals]), "green"),
                "  top-1 ",
                (f"{top1:.1f} %", "bold green"),
                f" at epoch {epoch}",
                (f", {top1 - evals[0][1]:+.1f} from epoch {evals[0][0]}" if len(evals) > 1 else "", "bold"),
                (f"  (before: {recent})" if recent else "", "dim"),
            )
        )
    rows.append(Text(f"last checkpoint: {last_checkpoint or 'none yet'}", style="dim"))
    if status:
        rows.append(Text(status, style="yellow"))
    return Panel(Group(*rows), title="mae-fast", border_style="cyan")


class Dashboard:
    """A Live display that is redrawn only when update() is called."""

    def __init__(self, info: RunInfo, console: Console | None = None):
        self.info = info
        self.console = console or Console()
        self.snapshot: Snapshot | None = None
        self.last_checkpoint = ""
        self.status = ""
        self.evals: list[tuple[int, float]] = []  # (epoch, kNN top-1 %), oldest first
        self.live = Live(
            self._render(),
            console=self.console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def _render(self) -> Panel:
        return render(self.snapshot, self.info, self.last_checkpoint, self.status, self.evals)

    def start(self) -> None:
        self.live.start(refresh=True)

    def stop(self) -> None:
        self.live.stop()

    def update(
        self,
        snapshot: Snapshot | None = None,
        *,
        checkpoint: str | None = None,
        status: str | None = None,
        evaluation: EvalResult | None = None,
    ) -> None:
        """evaluation: a new evaluation (its epoch and kNN top-1 join the sparkline)."""
        if evaluation is not None:
            self.evals.append((evaluation.epoch, evaluation.knn_top1))
        if snapshot is not None:
            self.snapshot = snapshot
        if checkpoint is not None:
            self.last_checkpoint = checkpoint
        if status is not None:
            self.status = status
        self.live.update(self._render(), refresh=True)

    def print(self, message: str) -> None:
        """A message above the live panel (warnings, checkpoints)."""
        self.live.console.print(message, markup=False, highlight=False)
