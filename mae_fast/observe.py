"""Where a run's time and memory go: the run report (versions and hardware, metrics.jsonl's first record), the
profiler window of logging.profile_start_step / profile_steps, CUDA memory figures, and what a CUDA out-of-memory
error leaves behind (a memory snapshot and one line saying what to lower)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from .config import Config, ConfigError, Derived
from .metrics import Peak
from .runtime import device_name, sync


def git_commit() -> str | None:
    """The checkout's short commit, when mae-fast runs from one (MAE_FAST_GIT_SHA for a copy without .git)."""
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        sha = subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or os.environ.get("MAE_FAST_GIT_SHA") or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """mae-fast, its commit, and the versions of what it runs on (None: not installed / not a CUDA build)."""
    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {
        "mae_fast": _version("mae-fast"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dali": dali_version,
        "timm": _version("timm"),
    }


def run_report(cfg: Config, derived: Derived, device: torch.device, world_size: int) -> dict:
    """What ran where: metrics.jsonl's first record ({"kind": "report", ...}), also printed at start."""
    cuda = device.type == "cuda"
    return {
        "kind": "report",
        "time": time.time(),
        **versions(),
        "device": device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "device_count": torch.cuda.device_count() if cuda else 1,
        "world_size": world_size,
        "attention": cfg.misc.attention,
        "precision": "amp (fp32 on the CPU)" if cfg.misc.precision == "amp" and not cuda else cfg.misc.precision,
        "effective_batch": derived.effective_batch,
        "micro_batch_size": derived.micro_batch_size,
        "accum_steps": derived.accum_steps,
    }


def format_report(r: dict) -> str:
    """run: mae-fast 0.1.0 (git 1a2b3c4) · torch 2.14.1 (CUDA 13.0) · DALI 2.0 · timm 1.0.31 / ..."""
    git = f" (git {r['git_commit']})" if r["git_commit"] else ""
    cuda = f" (built with CUDA {r['cuda']})" if r["cuda"] else " (no CUDA)"
    count = "" if r["device"].startswith("cpu") else f" x {r['device_count']} visible"
    batch = f"{r['effective_batch']} ({r['micro_batch_size']} x {r['accum_steps']} accum x {r['world_size']} ranks)"
    return (
        f"run: mae-fast {r['mae_fast'] or '?'}{git} · torch {r['torch']}{cuda} · DALI {r['dali'] or 'not installed'} "
        f"· timm {r['timm'] or '?'} · python {r['python']}\n"
        f"run: {r['device']}{count} · world size {r['world_size']} · attention {r['attention']} "
        f"· precision {r['precision']} · effective batch {batch}"
    )


def mfu_basis(flops_per_image: float, peak: Peak | None, device: torch.device) -> str:
    """The line stating, once at start, what every MFU of the run is computed from."""
    flops = f"{flops_per_image / 1e9:.3g} GFLOP per image (matmuls of forward + backward)"
    if peak is not None:
        return f"MFU: {flops}, as a share of the {peak.name}"
    why = "on the CPU" if device.type != "cuda" else f"{device_name(device)} is not in metrics.PEAK_BF16"
    return f"MFU: {flops}; no MFU is claimed {why} (no known dense bf16 peak)"


def cuda_memory(device: torch.device) -> dict | None:
    """Peak allocated and reserved memory (GB) since the start, and the allocator's retries; None off CUDA."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {
        "mem_gb": stats.get("allocated_bytes.all.peak", 0) / 2**30,
        "mem_reserved_gb": stats.get("reserved_bytes.all.peak", 0) / 2**30,
        "alloc_retries": int(stats.get("num_alloc_retries", 0)),
    }


class StepProfiler:
    """torch.profiler over `steps` optimizer steps from step number `start` (1-based: the first step is 1), on
    the main process. It writes a Chrome/Perfetto trace under `out_dir` and returns the top-kernels table: by
    self time on the device on CUDA, by self CPU time on the CPU."""

    def __init__(self, start: int, steps: int, out_dir: Path, device: torch.device, active: bool = True):
        self.start, self.steps, self.out_dir, self.device, self.active = start, steps, out_dir, device, active
        self._prof: torch.profiler.profile | None = None
        self.running = False  # inside the profiled steps (on every rank; only the active one records)

    @property
    def enabled(self) -> bool:
        return self.start > 0 and self.steps > 0

    def begins_before(self, step: int) -> bool:
        """The profiled window starts with step number `step`."""
        return self.enabled and step == self.start

    def ends_after(self, step: int) -> bool:
        """Step number `step` is the window's last one."""
        return self.enabled and step == self.start + self.steps - 1

    def begin(self) -> None:
        self.running = True
        if not self.active:
            return
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        if not cuda:  # a CUDA build of torch on a machine without a GPU: Kineto's "gpuGetDeviceCount failed"
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def end(self) -> tuple[Path, str] | None:
        """Stop, write the trace; (trace path, top-kernels table), None on the other ranks."""
        self.running = False
        if self._prof is None:
            return None
        sync(self.device)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        last = self.start + self.steps - 1
        path = self.out_dir / f"trace-steps-{self.start}-{last}.json.gz"
        prof.export_chrome_trace(str(path))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        return path, prof.key_averages().table(sort_by=key, row_limit=15)


class OutOfMemory(ConfigError):
    """CUDA ran out of memory in the training step: the micro-batch does not fit (exit 2, one line)."""


def out_of_memory(device: torch.device, micro_batch: int, step: int, out_dir: Path | None) -> OutOfMemory:
    """After a CUDA OOM in step number `step`: dump the allocator's memory snapshot under out_dir (rank 0 passes
    its output_dir, the others None) and return the error to raise, naming the micro-batch and what to lower."""
    snapshot = ""
    if device.type == "cuda" and out_dir is not None:
        path = out_dir / f"memory-snapshot-step-{step}.pickle"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
            snapshot = f"; memory snapshot: {path} (drag it onto https://pytorch.org/memory_viz to see what held it)"
        except (OSError, RuntimeError) as e:
            snapshot = f"; no memory snapshot ({e})"
    return OutOfMemory(oom_message(micro_batch, step) + snapshot)


def oom_message(micro_batch: int, step: int) -> str:
    return (
        f"CUDA out of memory in training step {step} at optimization.micro_batch_size {micro_batch}: lower "
        f"optimization.micro_batch_size (the effective batch and lr stay, the accumulation steps rise), or set "
        f"model.grad_checkpointing: true"
    )
