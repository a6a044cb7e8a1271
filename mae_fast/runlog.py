"""Where a run's messages and metrics go: the console (live dashboard on a terminal, plain lines
otherwise), the complete log file mae_pretrain_YYYYMMDD_HHMMSS.log (flushed as written),
metrics.jsonl (the run report first, {"kind": "report", ...}, then one record per log interval, and one with
"kind": "eval" per evaluation), TensorBoard scalars when it is installed, and a W&B run (tracking.py) when on."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .dashboard import Dashboard, RunInfo
from .metrics import Snapshot, format_line

if TYPE_CHECKING:
    from .evaluate import EvalResult


class RunLog:
    def __init__(
        self,
        output_dir: str | Path | None,
        *,
        dashboard: str = "auto",
        info: RunInfo | None = None,
        tensorboard: bool = False,
        echo: Callable[[str], None] | None = None,
        stream: TextIO | None = None,
    ):
        """output_dir None: console only (non-zero ranks, benchmarks). `echo` replaces console printing."""
        self.stream = stream or sys.stdout
        self.echo = echo
        self.log_path: Path | None = None
        self._file = self._jsonl = self._tb = None
        self.tracker = None  # a tracking.WandbRun, set after the run report
        self.dashboard: Dashboard | None = None
        if output_dir is not None:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.log_path = out / f"mae_pretrain_{time.strftime('%Y%m%d_%H%M%S')}.log"
            self._file = open(self.log_path, "a", buffering=1)  # line-buffered: flushed as written
            self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(out / "tensorboard"))
                except ImportError:
                    self.info(
                        "WARNING: logging.tensorboard is on but tensorboard is not installed: no TensorBoard "
                        "scalars (pip install tensorboard)"
                    )
        live = dashboard == "on" or (dashboard == "auto" and echo is None and self.stream.isatty())
        self.dashboard = Dashboard(info or RunInfo("run", "", "", "")) if live and info is not None else None
        if self.dashboard:
            self.dashboard.start()

    def _console(self, message: str) -> None:
        if self.echo is not None:
            self.echo(message)
        elif self.dashboard is not None:
            self.dashboard.print(message)
        else:
            print(message, file=self.stream, flush=True)

    def _write(self, attr: str, text: str) -> None:
        """Append to the log file ("_file") or metrics.jsonl ("_jsonl"). A file that cannot be written (a full disk)
        is reported once and dropped: training goes on, checkpoints keep their own error handling."""
        f = getattr(self, attr)
        if f is None:
            return
        try:
            f.write(text)
        except OSError as e:
            setattr(self, attr, None)
            self._console(
                f"WARNING: cannot write {f.name} ({e.strerror or e}); it is not written from here on, training goes on"
            )

    def _to_file(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write("_file", "".join(f"[{stamp}] {line}\n" for line in message.splitlines() or [""]))

    def info(self, message: str) -> None:
        self._to_file(message)
        self._console(message)

    def report(self, record: dict, text: str) -> None:
        """The run report (observe.run_report), printed and written as metrics.jsonl's first record."""
        self.info(text)
        self._write("_jsonl", json.dumps(record) + "\n")

    def metrics(self, snap: Snapshot) -> None:
        line = format_line(snap)
        self._to_file(line)
        self._write("_jsonl", json.dumps({"time": time.time(), **snap.record()}) + "\n")
        if self._tb is not None:
            for key, value in snap.scalars().items():
                self._tb.add_scalar(key, value, snap.step)
        if self.tracker is not None:
            self.tracker.metrics(snap)
        if self.dashboard is not None:
            self.dashboard.update(snap)
        else:
            self._console(line)

    def evaluation(self, result: EvalResult) -> None:
        """One evaluation after result.step optimizer steps, result.epoch epochs done (0: the baseline before the
        first step): a log line, a metrics.jsonl record {"kind": "eval", ...}, eval/* scalars, the sparkline."""
        line = format_eval(result)
        self._to_file(line)
        self._console(line)  # rare and worth seeing: printed with the dashboard too
        scores = result.scores()
        record = {"time": time.time(), "step": result.step, "epoch": result.epoch, **scores, "kind": "eval"}
        self._write("_jsonl", json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in scores.items():
                self._tb.add_scalar(f"eval/{key}", value, result.step)
        if self.tracker is not None:
            self.tracker.evaluation(result.step, result.epoch, scores)
        if self.dashboard is not None:
            self.dashboard.update(evaluation=result)

    def image(self, path: Path, step: int, caption: str) -> None:
        """A picture written during the run (a reconstruction grid): to W&B when on (the file is the record)."""
        if self.tracker is not None:
            self.tracker.image(path, step, caption)

    def checkpoint_saved(self, path: str) -> None:
        self._to_file(f"checkpoint saved: {path}")
        if self.dashboard is not None:
            self.dashboard.update(checkpoint=path)
        else:
            self._console(f"checkpoint saved: {path}")

    def status(self, message: str) -> None:
        """A transient state shown on the dashboard (or printed), and logged."""
        self._to_file(message)
        if self.dashboard is not None:
            self.dashboard.update(status=message)
        else:
            self._console(message)

    def close(self, failed: bool = False) -> None:
        """Stop the sinks; `failed`: the run ended with an error (W&B marks the run failed). Idempotent."""
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None
        for f in (self._file, self._jsonl):
            if f is not None:
                with contextlib.suppress(OSError):  # a full disk: reported when writing
                    f.close()
        if self._tb is not None:
            self._tb.close()
        if self.tracker is not None:
            self.tracker.close(failed)
        self._file = self._jsonl = self._tb = self.tracker = None


def format_eval(r: EvalResult) -> str:
    """eval epoch 10: knn top-1 93.3% top-5 100.0% (linear top-1 97.1% top-5 100.0%) in 1.4 s"""
    line = f"eval epoch {r.epoch}: knn top-1 {r.knn_top1:.1f}% top-5 {r.knn_top5:.1f}%"
    if r.linear_top1 is not None:
        line += f" (linear top-1 {r.linear_top1:.1f}% top-5 {r.linear_top5:.1f}%)"
    if r.skipped:
        line += f", {len(r.skipped)} undecodable file(s) left out"
    return line + f" in {r.seconds:.1f} s"
