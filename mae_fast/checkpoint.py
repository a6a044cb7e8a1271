"""Checkpoints: the seed guide's layout, atomic writes, safe loading, exact resume state.

    checkpoint_dir/
        epoch-N/  model.pt  config.json  mae_pretrain_*.log     every save_freq_epochs (N epochs done)
        step-N/   model.pt  config.json  mae_pretrain_*.log     every save_freq_steps (N steps done)
        latest.pt                                               the newest save, always
        final.pt                                                at the end of the run

model.pt holds what training_state() puts there: the uncompiled model's state dict (official
parameter names), the optimizer, epoch and step, every rank's RNG states (torch, CUDA, numpy,
python) and data loader position, and the resolved config with its derived values, under
"format": "mae-fast" and "version": FORMAT_VERSION (a newer version is refused on load). Which
checkpoint may resume which config is check_resumable's rule. A model.pt is only ever
written with finite weights (check_finite). keep_last_n applies to epoch-N and step-N separately. Every file is written to a temporary name, flushed, fsynced and renamed,
so a crash or a full disk leaves the previous checkpoint intact. Files are read with
torch.load(weights_only=True): a checkpoint cannot run code on load.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import random
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Call write(file_object) on a temporary file beside `path`, fsync it, then rename over `path`.

    On any error (a full disk included) the temporary file is removed, `path` is untouched and
    the error propagates as CheckpointError naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode a plain open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit, a SIGTERM at start-up
            raise
        raise CheckpointError(f"could not write {path}: {e}") from e


def rng_state() -> dict:
    """This process's RNG states (each rank saves its own; CUDA: the current device's generator)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    # .cpu(): a checkpoint loaded with map_location=<gpu> carries these byte tensors on the GPU,
    # and the RNG setters take CPU tensors only
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    rng: list,
    data: list,
    config: dict,
    derived: Any,
) -> dict:
    """The checkpoint of a run after `step` optimizer steps; `rng` and `data` hold every rank's RNG state and
    loader position, in rank order; `derived` is config.Derived."""
    return {
        "format": "mae-fast",
        "version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": step // derived.steps_per_epoch,  # done
        "step": step,  # done
        "rng": rng,
        "data": data,
        "config": config,
        "derived": dataclasses.asdict(derived),
        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def check_finite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding a NaN or inf: one fused reduction, then a sync."""
    named = [(n, t) for n, t in model.state_dict().items() if t.is_floating_point()]
    sums = torch.stack(torch._foreach_norm([t for _, t in named], 1))  # a NaN or inf makes its L1 norm non-finite
    if bool(torch.isfinite(sums).all()):
        return []
    names = [n for n, _ in named]
    return [n for n, ok in zip(names, torch.isfinite(sums).tolist()) if not ok]


def check_resumable(ckpt: dict, cfg: Any, derived: Any, path: str) -> list[str]:
    """Refuse a checkpoint whose model, loss or batch settings differ from this run's config (cfg: config.Config),
    saying what differs; return notes on what a changed lr or length does to the schedule."""
    saved, sd = ckpt.get("config", {}), ckpt.get("derived", {})

    def get(section: str, key: str) -> Any:
        return saved.get(section, {}).get(key)

    pairs = [
        ("model.type", get("model", "type"), cfg.model.type),
        ("model.mask_ratio", get("model", "mask_ratio"), cfg.model.mask_ratio),
        ("model.norm_pix_loss", get("model", "norm_pix_loss"), cfg.model.norm_pix_loss),
        ("data.input_size", get("data", "input_size"), cfg.data.input_size),
        ("data.backend", get("data", "backend"), cfg.data.backend),
        ("misc.seed (the data order)", get("misc", "seed"), cfg.misc.seed),
        ("optimization.batch_size", sd.get("effective_batch"), derived.effective_batch),
        ("micro-batch size", sd.get("micro_batch_size"), derived.micro_batch_size),
        ("world size", sd.get("world_size"), derived.world_size),
        ("steps per epoch (data set size / batch)", sd.get("steps_per_epoch"), derived.steps_per_epoch),
    ]
    diffs = [f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in pairs if a != b]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it does not fit this config ({'; '.join(diffs)})")
    notes = []
    if sd.get("lr") != derived.lr or get("optimization", "min_lr") != cfg.optimization.min_lr:
        notes.append(
            f"the peak lr was {sd.get('lr')!r} (min_lr {get('optimization', 'min_lr')!r}), now {derived.lr:g} "
            f"(min_lr {cfg.optimization.min_lr:g}): the schedule continues from step {ckpt['step']} with the new values"
        )
    if sd.get("total_steps") != derived.total_steps or sd.get("warmup_steps") != derived.warmup_steps:
        notes.append(
            f"the run was {get('schedule', 'epochs')} epochs ({sd.get('total_steps')} steps, warmup "
            f"{sd.get('warmup_steps')}), now {cfg.schedule.epochs} ({derived.total_steps} steps, warmup "
            f"{derived.warmup_steps}): the cosine is recomputed over the new length, so the lr jumps to "
            f"its value at step {ckpt['step']} of the new schedule"
        )
    return notes


def save_torch(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


_SIGNATURES = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"\x1f\x8b": "gzip data"}


def _why_unreadable(path: Path, error: Exception) -> str:
    """Why torch.load refused `path`, in words (not torch's advice to load with weights_only=False, which would let
    the file run code)."""
    head = path.read_bytes()[:8] if path.stat().st_size else b""
    if not head:
        return "the file is empty (0 bytes; a write that never finished?)"
    for magic, what in _SIGNATURES.items():
        if head.startswith(magic):
            return f"the file is {what}, not a PyTorch checkpoint"
    if "weights_only" in str(error) and head.startswith(b"PK"):
        return "it holds Python objects other than tensors and plain values, which a safe load refuses"
    if not head.startswith((b"PK", b"\x80")):
        return f"the file is not a PyTorch checkpoint (it starts with {head.hex(' ')})"
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"the file is truncated or damaged ({type(error).__name__}{': ' + first[:200] if first else ''})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True; clear errors for a missing file or a file that is no checkpoint.

    The one extra type allowed is argparse.Namespace, which facebookresearch/mae checkpoints carry as "args".
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is a folder without a model.pt")
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors, truncated zip, a foreign pickle with code
        raise CheckpointError(f"{path} is not a readable checkpoint: {_why_unreadable(path, e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(obj).__name__})")
    if obj.get("format") == "mae-fast":
        _check_fields(obj, path)
    elif "model" in obj:
        _check_state_dict(obj["model"], path, "model")
    return obj


def _check_fields(ckpt: dict, path: Path) -> None:
    """The fields of a mae-fast checkpoint that its readers use (resume, weights, eval), where present: types
    and bounds, each failure a CheckpointError naming the file and the field (a missing one is the reader's to
    name: weights need only "model"). The tensors' shapes are load_state_dict's to check."""

    def check(key: str, kind: type, where: dict = ckpt, prefix: str = "") -> Any:
        value = where.get(key)
        if key in where and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
            raise CheckpointError(f"{path}: {prefix}{key}: expected {kind.__name__}, got {type(value).__name__}")
        return value

    version = check("version", int) or 1
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer mae-fast (checkpoint format {version}; this version reads "
            f"up to {FORMAT_VERSION}): upgrade mae-fast to load it"
        )
    if "model" in ckpt:
        _check_state_dict(ckpt["model"], path, "model")
    if (check("step", int) or 0) < 0:
        raise CheckpointError(f"{path}: step: must be >= 0, got {ckpt['step']}")
    check("optimizer", dict)
    check("derived", dict)
    model_cfg = check("model", dict, check("config", dict) or {}, "config.")
    check("norm_pix_loss", bool, model_cfg or {}, "config.model.")
    for key in ("rng", "data"):
        states = check(key, list) or []
        if not all(isinstance(x, dict) for x in states):
            raise CheckpointError(f"{path}: {key}: expected one state (an object) per rank")


def _check_state_dict(sd: Any, path: Path, key: str) -> None:
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: {key}: expected a state dict (names -> tensors)")


class RunFolderError(ValueError):
    """A run's folder cannot be written, or another run holds it (exit code 2: nothing was touched yet)."""


class RunLock:
    """An exclusive lock on a run's folder for the life of the run (rank 0): a second run on the same
    checkpoint_dir or output_dir is refused at start, naming the holder.

    flock() on FOLDER/.mae-fast.lock: the kernel drops it when the holding process dies (SIGKILL
    included), so a killed run never blocks the next start, on this host or through a file system
    that supports locks (NFSv4, Lustre with flock). The file's text (host, pid, start time) is only
    there to name the holder. A shared file system without lock support could leave a stale lock:
    delete the file once no run uses the folder.
    """

    NAME = ".mae-fast.lock"

    def __init__(self, folder: str | Path, key: str):
        self.path, self.key = Path(folder) / self.NAME, key
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl
        import socket

        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise RunFolderError(f"{self.key}: {self.path.parent} is a file, not a folder")
        try:  # also the check, before any work, that the folder can be written
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a link planted at the lock's name is refused, never written through;
            # O_NONBLOCK: a FIFO there cannot hang the open (it is refused below, as anything but a file is)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunFolderError(
                    f"{self.key}: {self.path} is a symbolic link; refused (a run writes its lock there): remove it"
                ) from None
            raise RunFolderError(f"{self.key}: cannot write to {self.path.parent} ({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunFolderError(f"{self.key}: {self.path} is not a regular file; refused: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 500).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(
                f"{self.key}: {self.path.parent} is in use by another run ({holder}); wait for it to end, or give this run "
                f"its own checkpointing.checkpoint_dir / logging.output_dir (if no such run exists, delete "
                f"{self.path})"
            ) from None
        text = f"host {socket.gethostname()}, pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            os.ftruncate(fd, 0)
            os.write(fd, text.encode())
        except OSError as e:  # a full disk: nothing of the run is written yet
            os.close(fd)
            raise RunFolderError(f"{self.key}: cannot write {self.path} ({e.strerror or e})") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (its text is the last holder's)
            self._fd = None


class CheckpointManager:
    """Writes the numbered directories, latest.pt and final.pt; rotates keep_last_n."""

    def __init__(self, root: str | Path, keep_last_n: int):
        self.root = Path(root)
        self.keep_last_n = keep_last_n

    @property
    def latest(self) -> Path:
        return self.root / "latest.pt"

    def save(self, state: dict | Path, name: str, config: dict, log_file: Path | None) -> Path:
        """Save `state` as <name>/model.pt, with the config and the log so far, and as latest.pt.

        `state` may be the path of a model.pt already written for this same step: it is hard-linked,
        not serialized again (an epoch end that is also a step-N save, or the end of the run).
        """
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
        if log_file is not None and log_file.exists():
            atomic_write(folder / log_file.name, lambda f: f.write(log_file.read_bytes()))
        model_pt = folder / "model.pt"
        self._put(state, model_pt)
        self._link(model_pt, self.latest)
        self._rotate()
        return model_pt

    def save_final(self, state: dict | Path) -> Path:
        path = self.root / "final.pt"
        self._put(state, path)
        self._link(path, self.latest)
        return path

    def _put(self, state: dict | Path, path: Path) -> None:
        if isinstance(state, Path):
            if state.resolve() != path.resolve():
                self._link(state, path)
        else:
            save_torch(path, state)

    def _link(self, src: Path, dst: Path) -> None:
        """dst becomes the same file as src, atomically: a hard link (no second write), else a copy."""
        if dst.exists() and os.path.samefile(src, dst):
            return  # already one file (rename() would keep the temporary link)
        tmp = dst.with_name(f".{dst.name}.link")
        try:
            tmp.unlink(missing_ok=True)
            os.link(src, tmp)
            os.replace(tmp, dst)
            _fsync_dir(dst.parent)
        except OSError:
            atomic_write(dst, lambda f: f.write(src.read_bytes()))

    def numbered(self, kind: str) -> list[Path]:
        """kind-N directories ("epoch" or "step") holding a model.pt, in increasing N."""
        dirs = [
            d
            for d in self.root.glob(f"{kind}-*")
            if d.is_dir() and d.name[len(kind) + 1 :].isdigit() and (d / "model.pt").exists()
        ]
        return sorted(dirs, key=lambda d: int(d.name[len(kind) + 1 :]))

    def clean_stale(self) -> list[str]:
        """Remove what a killed run or a full disk left behind: temporary files of unfinished writes, and
        numbered folders without a model.pt. Call it holding the folder's RunLock. Returns what was removed."""
        if not self.root.is_dir():
            return []
        removed = []
        for folder in [self.root, *(d for d in self.root.iterdir() if d.is_dir())]:
            for tmp in [*folder.glob(".*.tmp"), *folder.glob(".*.link")]:
                tmp.unlink(missing_ok=True)
                removed.append(str(tmp))
        for d in self.root.glob("*-*"):
            kind, _, n = d.name.partition("-")
            if kind in ("epoch", "step") and n.isdigit() and d.is_dir() and not (d / "model.pt").exists():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"{d}/")
        return removed

    def _rotate(self) -> None:
        """Keep the newest keep_last_n epoch-N and, separately, step-N directories."""
        if self.keep_last_n <= 0:
            return
        for kind in ("epoch", "step"):
            for d in self.numbered(kind)[: -self.keep_last_n]:
                shutil.rmtree(d, ignore_errors=True)
