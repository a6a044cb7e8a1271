"""The train loop: config -> data -> model -> compiled step -> metrics and checkpoints, top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import FORMAT_VERSION, CheckpointError, CheckpointManager, load_checkpoint, rng_state, set_rng_state
from .config import Config, ConfigError, Derived, derive, format_config, lr_warnings, resolved, save_config
from .dashboard import RunInfo
from .data import TimedBatches, build_loader, find_dataset
from .distributed import Dist, any_rank, broadcast, gather, init_distributed, mean, shutdown
from .metrics import Meter, Snapshot, peak_bf16_flops
from .model import model_flops_per_image
from .optim import build_optimizer, cosine_lr, load_optimizer_state
from .runlog import RunLog
from .step import BusyTimer, TrainStep, model_from_config, step_options
from .visualize import visualize_files
from .weights import load_mae


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    if name.startswith("cuda:") and world_size > 1:
        raise ConfigError(
            f"misc.device: {name!r} would put every rank on one GPU; under torchrun use 'auto' or "
            f"'cuda' (each rank takes the GPU of its LOCAL_RANK)"
        )
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"misc.device: {name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@contextlib.contextmanager
def train_stream(device: torch.device, high_priority: bool) -> Iterator[None]:
    """misc.high_priority_stream: run the training on a high-priority CUDA stream, so that when DALI's
    decode and resize kernels (on DALI's own stream) compete with the step for the SMs, the step's
    kernels are scheduled first and DALI's fill the gaps. A no-op on the CPU or when off."""
    if device.type != "cuda" or not high_priority:
        yield
        return
    stream = torch.cuda.Stream(device, priority=-1)  # lower is higher; -1 is high on every CUDA GPU
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        torch.cuda.current_stream(device).wait_stream(stream)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    derived: Derived
    losses: list[float] = field(default_factory=list)  # every step's loss run by this process, in order
    snapshots: list[Snapshot] = field(default_factory=list)
    start_step: int = 0  # global step this process started from (> 0 after a resume)
    steps_done: int = 0  # global steps done at the end
    preempted: bool = False  # stopped by SIGTERM/SIGINT after saving a checkpoint
    resumed_from: str = ""
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out during training


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, save, exit. A second Ctrl-C exits at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_resumable(ckpt: dict, cfg: Config, derived: Derived, path: str) -> None:
    """Refuse a checkpoint whose model or batch settings differ from this run's, saying what differs."""
    saved, sd = ckpt.get("config", {}), ckpt.get("derived", {})
    pairs = [
        ("model.type", saved.get("model", {}).get("type"), cfg.model.type),
        ("data.input_size", saved.get("data", {}).get("input_size"), cfg.data.input_size),
        ("data.backend", saved.get("data", {}).get("backend"), cfg.data.backend),
        ("misc.seed (the data order)", saved.get("misc", {}).get("seed"), cfg.misc.seed),
        ("optimization.batch_size", sd.get("effective_batch"), derived.effective_batch),
        ("micro-batch size", sd.get("micro_batch_size"), derived.micro_batch_size),
        ("world size", sd.get("world_size"), derived.world_size),
        ("steps per epoch (data set size / batch)", sd.get("steps_per_epoch"), derived.steps_per_epoch),
    ]
    diffs = [f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in pairs if a != b]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it does not fit this config ({'; '.join(diffs)})")


def train(cfg: Config, *, log: Callable[[str], None] | None = None, max_steps: int | None = None) -> TrainResult:
    """Pretrain as configured, in this process or as one rank of a torchrun job.

    `max_steps` stops after that many steps of this process (tests, benchmarks); `log` replaces
    console output (the log file and metrics.jsonl are written all the same). Only rank 0 writes
    logs, metrics, the dashboard and checkpoints.
    """
    d = init_distributed(cfg.misc.device)
    try:
        return _setup_and_train(cfg, d, log, max_steps)
    finally:
        shutdown(d)


def _setup_and_train(cfg: Config, d: Dist, log: Callable[[str], None] | None, max_steps: int | None) -> TrainResult:
    seed_everything(cfg.misc.seed)  # the same initial weights on every rank
    device = resolve_device(cfg.misc.device, d.local_rank, d.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s, lg = cfg.schedule, cfg.logging

    # data first: a bad data_path stops the run before any model is built
    # rank 0 scans and every rank trains on its exact file list (the shards must partition one list)
    dataset = broadcast(d, find_dataset(cfg) if d.is_main else None)
    derived = derive(cfg, dataset.num_images, d.world_size)
    if cfg.misc.precision == "bf16" and d.enabled:
        raise ConfigError("misc.precision: bf16 runs in one process in this version; use amp with several")
    loader, input_dtype, data_desc = build_loader(
        cfg,
        dataset,
        derived.micro_batch_size,
        derived.steps_per_epoch * derived.accum_steps,
        device,
        rank=d.rank,
        world_size=d.world_size,
    )
    run_name = cfg.misc.run_name or Path(lg.output_dir).name
    where = device_name(device) + (f" x {d.world_size} processes" if d.enabled else "")
    info = RunInfo(
        run_name,
        cfg.model.type,
        where,
        f"batch {derived.effective_batch} ({derived.micro_batch_size} x {derived.accum_steps} accum"
        f"{f' x {d.world_size} ranks' if d.enabled else ''}) · lr {derived.lr:.3g} · {s.epochs} epochs · "
        f"{data_desc}",
    )
    if d.is_main:
        out = RunLog(lg.output_dir, dashboard=lg.dashboard, info=info, tensorboard=lg.tensorboard, echo=log)
    else:
        out = RunLog(None, echo=lambda message: None)
    try:
        # from here on, SIGTERM/SIGINT end the run with a checkpoint
        with StopFlag() as stop, train_stream(device, cfg.misc.high_priority_stream):
            return _train(cfg, d, device, dataset, derived, loader, input_dtype, data_desc, out, max_steps, stop)
    finally:
        out.close()
        if hasattr(loader, "close"):
            loader.close()


def _train(
    cfg: Config,
    d: Dist,
    device: torch.device,
    dataset,
    derived: Derived,
    loader,
    input_dtype: torch.dtype,
    data_desc: str,
    out: RunLog,
    max_steps: int | None,
    stop: StopFlag,
) -> TrainResult:
    o, lg, ck = cfg.optimization, cfg.logging, cfg.checkpointing
    for w in dataset.warnings + lr_warnings(cfg):
        out.info(f"WARNING: {w}")
    out.info(f"data: {data_desc}" + (f"; one shard per rank, {d.world_size} ranks" if d.enabled else ""))
    out.info(format_config(cfg, derived))
    if d.is_main:
        save_config(cfg, derived, Path(lg.output_dir) / "config.yaml")

    model = model_from_config(cfg).to(device)
    torch.manual_seed(cfg.misc.seed + d.rank)  # each rank draws its own masks
    options = step_options(cfg)
    optimizer = build_optimizer(
        model, derived.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), device, compiled=options["compile_optimizer"]
    )
    ckpts = CheckpointManager(ck.checkpoint_dir, ck.keep_last_n)
    result = TrainResult(derived)

    # resume: misc.resume names a file; misc.auto_resume takes latest.pt when there is one (rank 0 decides,
    # so that every rank starts from the same step even without a shared view of the checkpoint folder)
    resume = cfg.misc.resume or (str(ckpts.latest) if cfg.misc.auto_resume and ckpts.latest.exists() else "")
    resume = broadcast(d, resume)
    global_step = derived.start_step
    if resume:
        ckpt = load_checkpoint(resume, map_location=device)
        if ckpt.get("format") != "mae-fast":
            raise CheckpointError(
                f"misc.resume: {resume} is not a mae-fast training checkpoint (no optimizer, "
                f"schedule or data position to resume); to start from its weights, set "
                f"misc.init_weights: {resume}"
            )
        check_resumable(ckpt, cfg, derived, resume)
        model.load_state_dict(ckpt["model"], strict=True)
        load_optimizer_state(optimizer, ckpt["optimizer"])  # misc.compile_optimizer may differ
        try:
            loader.load_state(ckpt["data"][d.rank])  # each rank's own shard position and RNG
        except ValueError as e:
            raise CheckpointError(
                f"cannot resume from {resume}: its data position does not fit this run ({e})"
            ) from None
        set_rng_state(ckpt["rng"][d.rank])
        global_step = int(ckpt["step"])
        result.resumed_from = resume
        out.info(
            f"resumed from {resume}: step {global_step}, epoch {global_step // derived.steps_per_epoch} "
            f"(+{global_step % derived.steps_per_epoch} steps), saved {ckpt.get('saved_at', '?')}"
        )
    elif cfg.misc.init_weights:
        init = load_mae(cfg.misc.init_weights)
        if (init.model_type, init.model.arch.img_size) != (cfg.model.type, cfg.data.input_size):
            raise CheckpointError(
                f"misc.init_weights: {cfg.misc.init_weights} holds {init.model_type} at "
                f"{init.model.arch.img_size}px, the config asks for {cfg.model.type} at "
                f"{cfg.data.input_size}px"
            )
        model.load_state_dict(init.model.state_dict())
        for note in init.notes:
            out.info(f"init weights: {note}")
    result.start_step = global_step

    step = TrainStep(
        model,
        optimizer,
        micro_batch=derived.micro_batch_size,
        accum_steps=derived.accum_steps,
        device=device,
        input_dtype=input_dtype,
        log_every=lg.print_freq,
        distributed=d.enabled,
        **options,
    )
    flops = model_flops_per_image(model.arch, cfg.model.mask_ratio) * derived.effective_batch
    meter = Meter(
        effective_batch=derived.effective_batch,
        steps_per_epoch=derived.steps_per_epoch,
        total_steps=derived.total_steps,
        flops_per_step=flops,
        peak_flops=peak_bf16_flops(device_name(device)) * d.world_size,
    )
    out.info(
        f"model {cfg.model.type}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M "
        f"trainable parameters on {device_name(device)}; {'compiled' if cfg.misc.compile else 'eager'}; "
        f"{flops / derived.effective_batch / 1e9:.3g} GFLOP per image"
    )

    def state() -> dict:
        """The checkpoint; a collective: every rank calls it, rank 0's copy holds every rank's data position."""
        return {
            "format": "mae-fast",
            "version": FORMAT_VERSION,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": global_step // derived.steps_per_epoch,
            "step": global_step,  # done
            "rng": gather(d, rng_state()),
            "data": gather(d, loader.state()),
            "config": cfg.to_dict(),
            "derived": dataclasses.asdict(derived),
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    last_logged = global_step

    def flush_metrics(lr: float, first: bool = False) -> None:
        """Read the device-side losses since the last read: the loop's one CPU-GPU sync point."""
        nonlocal last_logged
        if global_step == last_logged:
            return
        losses, gnorms = step.read_metrics(reduce=lambda t: mean(d, t))  # the sync: busy's events are done
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        snap = meter.update(
            first_step=last_logged,
            losses=losses,
            gnorms=gnorms,
            lr=lr,
            data_wait_s=batches.take_wait(),
            mem_gb=mem,
            busy_s=busy.take_s(),
        )  # NonFiniteLoss
        last_logged = global_step
        result.losses.extend(losses)
        result.snapshots.append(snap)
        if first:
            out.info(f"first step done in {time.perf_counter() - t0:.1f}s (compilation included)")
            meter.restart_clock()
        out.metrics(snap)
        # files that passed the scan but failed to decode: every rank's (a collective), left out on every rank
        if hasattr(loader, "take_bad_files"):
            found = [f for rank_found in gather(d, loader.take_bad_files()) for f in rank_found]
            if found and d.enabled:
                loader.leave_out_paths(found)
            for path, reason in found:
                result.bad_files.append((path, reason))
                out.info(f"WARNING: {path} cannot be decoded ({reason}); left out, the next file is read in its place")

    saved: dict = {"step": global_step, "path": Path(resume) if resume else None}  # the newest model.pt

    def save(name: str | None) -> None:
        """Checkpoint `name` (None: final.pt), a collective. A second save at the same step links the first."""
        flush_metrics(lr)  # never save a state whose loss went non-finite
        again = saved["step"] == global_step and saved["path"] is not None
        ckpt = saved["path"] if again else state()
        if d.is_main:
            path = (
                ckpts.save_final(ckpt) if name is None else ckpts.save(ckpt, name, resolved(cfg, derived), out.log_path)
            )
            saved.update(step=global_step, path=path)
            out.checkpoint_saved(str(path))
        else:
            saved.update(step=global_step, path=Path("."))  # only rank 0 writes; the others just keep count
        meter.restart_clock()  # the time spent saving is not training throughput

    vis_files = dataset.files[:: max(1, len(dataset.files) // lg.visualize_images)][: lg.visualize_images]

    def visualize(done_epochs: int) -> None:
        """The reconstruction grid of fixed sample images (same images and masks every time), rank 0 only."""
        if not (d.is_main and lg.visualize_freq_epochs and vis_files and done_epochs % lg.visualize_freq_epochs == 0):
            return
        path = visualize_files(
            model,
            vis_files,
            Path(lg.output_dir) / "reconstructions" / f"epoch-{done_epochs}.png",
            cfg.model.mask_ratio,
            seed=cfg.misc.seed,
            device=device,
            mean=tuple(cfg.data.augmentation.mean),
            std=tuple(cfg.data.augmentation.std),
        )
        out.info(f"reconstructions: {path}")
        meter.restart_clock()

    def stop_requested(at_log_point: bool) -> bool:
        # one process: every step; several: at log points, where all ranks agree on it (a collective)
        if not d.enabled:
            return stop.signal is not None
        return at_log_point and any_rank(d, stop.signal is not None, device)

    batches = TimedBatches(loader)
    busy = BusyTimer(device, windows=(lg.print_freq + 1) * derived.accum_steps)  # the log points read it
    end_step = derived.total_steps if max_steps is None else min(derived.total_steps, global_step + max_steps)
    t0 = time.perf_counter()
    lr = cosine_lr(global_step, derived.lr, o.min_lr, derived.warmup_steps, derived.total_steps)
    stopping = False
    while global_step < end_step and not stopping:
        epoch = global_step // derived.steps_per_epoch
        batches.start_epoch(epoch)
        for _ in range(global_step % derived.steps_per_epoch, derived.steps_per_epoch):
            lr = cosine_lr(global_step, derived.lr, o.min_lr, derived.warmup_steps, derived.total_steps)
            for i in range(derived.accum_steps):
                batch = batches.next()
                busy.start()  # after the batch arrived: what follows is the step's own work
                step.inputs.copy_(batch, non_blocking=True)
                step.micro_step(sync_grads=i == derived.accum_steps - 1)
                if i < derived.accum_steps - 1:
                    busy.stop()
            step.optimizer_step(lr)
            busy.stop()
            global_step += 1
            first = global_step == result.start_step + 1  # report the first step at once (compile time)
            log_point = first or global_step % lg.print_freq == 0 or global_step == end_step
            if log_point:
                flush_metrics(lr, first)
            if ck.save_freq_steps and global_step % ck.save_freq_steps == 0:
                save(f"step-{global_step}")
            stopping = stop_requested(log_point)
            if global_step >= end_step or stopping:
                break
        done_epochs = global_step // derived.steps_per_epoch
        if (
            global_step % derived.steps_per_epoch == 0
            and ck.save_freq_epochs
            and done_epochs % ck.save_freq_epochs == 0
        ):
            save(f"epoch-{done_epochs}")
        if global_step % derived.steps_per_epoch == 0:
            visualize(done_epochs)
    flush_metrics(lr)
    if global_step >= derived.total_steps:  # done, even if a stop request came during the last steps
        save(None)
    elif stopping or stop_requested(True):
        out.status(
            f"received {signal.Signals(stop.signal or signal.SIGTERM).name}: saving a checkpoint at step {global_step}"
        )
        save(f"step-{global_step}")
        result.preempted = True
    result.steps_done = global_step
    out.info(
        f"{'stopped' if result.preempted else 'done'}: step {global_step}/{derived.total_steps}, "
        f"{global_step - result.start_step} steps in {time.perf_counter() - t0:.1f}s"
    )
    return result
