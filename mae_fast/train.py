"""The train loop: config -> data -> model -> compiled step -> metrics and checkpoints, top to bottom.

`train()` sets the run up and hands it to a Trainer, whose `fit()` is the loop: a new run first scores
its initial encoder (the epoch-0 evaluation); then each iteration is one optimizer step (inside the
profiler's window when one is set; a shard lost under it stops the run with a checkpoint), then the
side jobs that are due, in a fixed order that every rank follows (log, share undecodable files,
evaluate, save, end of epoch, stop). The collectives among them (marked "a collective") are reached
by every rank at the same steps, so several processes cannot deadlock on them.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    RunLock,
    check_finite,
    check_resumable,
    load_checkpoint,
    rng_state,
    set_rng_state,
    training_state,
)
from .config import (
    CheckpointingConfig,
    Config,
    ConfigError,
    Derived,
    derive,
    format_config,
    lr_warnings,
    resolved,
    save_config,
)
from .dashboard import RunInfo
from .data import Dataset, TimedBatches, build_loader, check_same_source, find_dataset, sample_images
from .distributed import Dist, any_rank, broadcast, gather, init_distributed, mean, shutdown
from .evaluate import EvalResult, Evaluator
from .metrics import Meter, NonFiniteLoss, Snapshot, card_peak
from .model import model_flops_per_image
from .observe import StepProfiler, cuda_memory, format_report, mfu_basis, out_of_memory, run_report
from .optim import cosine_lr, load_optimizer_state
from .pipelines.shards import ShardReadError
from .pipelines.validate import DatasetScanError
from .preempt import StoppedAtStartup
from .runlog import RunLog
from .runtime import device_name, seed_everything, setup_device, train_stream
from .step import build_train_step, model_from_config
from .tracking import WandbRun, require_wandb
from .visualize import visualize_files
from .weights import load_mae


@dataclass
class TrainResult:
    derived: Derived
    start_step: int = 0  # global step this process started from (> 0 after a resume)
    steps_done: int = 0  # global steps done at the end
    preempted: bool = False  # stopped by SIGTERM/SIGINT after saving a checkpoint
    resumed_from: str = ""
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out during training
    final_loss: float = float("nan")  # the last step's loss
    seconds: float = 0.0  # wall time of the loop (compilation included)
    last_checkpoint: str = ""  # the newest model.pt / final.pt written ("" if none, or not rank 0)
    log_path: str = ""
    evaluations: list[EvalResult] = field(default_factory=list)  # each evaluation, epoch 0 (the baseline) first


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, save, exit. A second Ctrl-C exits at once. While `starting`
    (until the first step is done: Trainer.fit clears it), SIGTERM stops at once instead (StoppedAtStartup)."""

    def __init__(self):
        self.signal: int | None = None
        self.starting = True
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.starting:  # nothing trained yet: stop at once (Ctrl-C: as before any handler, KeyboardInterrupt)
            raise StoppedAtStartup(signum) if signum == signal.SIGTERM else KeyboardInterrupt
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def checkpoints_due(step: int, steps_per_epoch: int, ck: CheckpointingConfig) -> list[str]:
    """The checkpoints to write after optimizer step `step` (steps done): step-N every save_freq_steps, epoch-N
    at the end of every save_freq_epochs-th epoch."""
    names = [f"step-{step}"] if ck.save_freq_steps and step % ck.save_freq_steps == 0 else []
    epoch, rest = divmod(step, steps_per_epoch)
    if rest == 0 and ck.save_freq_epochs and epoch % ck.save_freq_epochs == 0:
        names.append(f"epoch-{epoch}")
    return names


OnLog = Callable[[Snapshot, list[float]], None]  # called at each log point: the snapshot and its steps' losses


def train(
    cfg: Config, *, log: Callable[[str], None] | None = None, max_steps: int | None = None, on_log: OnLog | None = None
) -> TrainResult:
    """Pretrain as configured, in this process or as one rank of a torchrun job.

    `max_steps` stops after that many steps of this process (tests, benchmarks); `log` replaces
    console output (the log file and metrics.jsonl are written all the same); `on_log` sees every
    snapshot. Only rank 0 writes logs, metrics, the dashboard and checkpoints.
    """
    with StopFlag() as stop:  # first: a SIGTERM from here on ends the run with exit 4, never the default action
        d = init_distributed(cfg.misc.device)
        try:
            with _locks(cfg, d):
                return _train(cfg, d, log, max_steps, on_log, stop)
        finally:
            shutdown(d)


def _locks(cfg: Config, d: Dist) -> contextlib.ExitStack:
    """Rank 0 holds the run's folders for the whole run (one run per checkpoint_dir and output_dir)."""
    stack = contextlib.ExitStack()
    if d.is_main:
        ck, out = Path(cfg.checkpointing.checkpoint_dir), Path(cfg.logging.output_dir)
        stack.enter_context(RunLock(ck, "checkpointing.checkpoint_dir"))
        if out.resolve() != ck.resolve():
            stack.enter_context(RunLock(out, "logging.output_dir"))
    return stack


def _train(
    cfg: Config, d: Dist, log: Callable | None, max_steps: int | None, on_log: OnLog | None, stop: StopFlag
) -> TrainResult:
    require_wandb(cfg)  # logging.wandb_project without wandb installed: stop before any work
    seed_everything(cfg.misc.seed)  # the same initial weights on every rank
    device = setup_device(cfg.misc.device, d.local_rank, d.world_size)
    if cfg.misc.precision == "bf16" and d.enabled:
        raise ConfigError("misc.precision: bf16 runs in one process in this version; use amp with several")
    # data first: a bad data_path stops the run before any model is built;
    # rank 0 scans and every rank trains on its exact file list (the shards must partition one list)
    dataset = broadcast(d, find_dataset(cfg) if d.is_main else None)
    evaluator = Evaluator.from_config(cfg, d, device)  # so do bad evaluation folders (a collective; None: off)
    derived = derive(cfg, dataset.num_images, d.world_size)
    micro, per_epoch = derived.micro_batch_size, derived.steps_per_epoch * derived.accum_steps
    loader, input_dtype, data_desc = build_loader(
        cfg, dataset, micro, per_epoch, device, rank=d.rank, world_size=d.world_size
    )
    out = _run_log(cfg, d, derived, device, data_desc, log)
    try:
        report = run_report(cfg, derived, device, d.world_size)
        out.report(report, format_report(report))  # metrics.jsonl's first record (of this run: the file appends)
        out.tracker = WandbRun.start(cfg, derived, report) if d.is_main else None
        # SIGTERM: stops at once until the first step is done (StopFlag.starting), then ends the run with a checkpoint
        for w in dataset.warnings + lr_warnings(cfg):
            out.info(f"WARNING: {w}")
        out.info(f"data: {data_desc}" + (f"; one shard per rank, {d.world_size} ranks" if d.enabled else ""))
        out.info(format_config(cfg, derived))
        with train_stream(device, cfg.misc.high_priority_stream):
            trainer = Trainer(
                cfg, d, device, dataset, derived, TimedBatches(loader), input_dtype, out, stop, evaluator=evaluator
            )
            trainer.on_log = on_log
            return trainer.fit(max_steps)
    except BaseException:
        out.close(failed=True)
        raise
    finally:
        out.close()  # (a second close does nothing)
        loader.close()
        if cfg.logging.memory_history and device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled=None)


def _run_log(
    cfg: Config, d: Dist, derived: Derived, device: torch.device, data_desc: str, echo: Callable | None
) -> RunLog:
    """Where this rank's messages go: console, log file, metrics.jsonl, dashboard (rank 0); nowhere (others)."""
    if not d.is_main:
        return RunLog(None, echo=lambda message: None)
    lg, s = cfg.logging, cfg.schedule
    ranks = f" x {d.world_size} ranks" if d.enabled else ""
    info = RunInfo(
        cfg.misc.run_name or Path(lg.output_dir).name,
        cfg.model.type,
        device_name(device) + (f" x {d.world_size} processes" if d.enabled else ""),
        f"batch {derived.effective_batch} ({derived.micro_batch_size} x {derived.accum_steps} accum{ranks}) · "
        f"lr {derived.lr:.3g} · {s.epochs} epochs · {data_desc}",
    )
    return RunLog(lg.output_dir, dashboard=lg.dashboard, info=info, tensorboard=lg.tensorboard, echo=echo)


class Trainer:
    """One run: its state (model, step, optimizer, loader position, checkpoints) and the jobs of its loop."""

    def __init__(
        self,
        cfg: Config,
        d: Dist,
        device: torch.device,
        dataset: Dataset,
        derived: Derived,
        batches: TimedBatches,
        input_dtype: torch.dtype,
        out: RunLog,
        stop: StopFlag,
        evaluator: Evaluator | None = None,
    ):
        self.cfg, self.d, self.device, self.derived = cfg, d, device, derived
        self.batches, self.out, self.stop = batches, out, stop
        self.loader = batches.loader
        if d.is_main:
            save_config(cfg, derived, Path(cfg.logging.output_dir) / "config.yaml")

        self.model = model_from_config(cfg).to(device)
        torch.manual_seed(cfg.misc.seed + d.rank)  # each rank draws its own masks
        self.step_fn = build_train_step(
            cfg,
            self.model,
            device=device,
            micro_batch=derived.micro_batch_size,
            accum_steps=derived.accum_steps,
            input_dtype=input_dtype,
            lr=derived.lr,
            distributed=d.enabled,
        )
        self.ckpts = CheckpointManager(cfg.checkpointing.checkpoint_dir, cfg.checkpointing.keep_last_n)
        if d.is_main:  # rank 0 holds the folder's lock: nothing else writes there
            for path in self.ckpts.clean_stale():
                out.info(f"removed {path}, left by an interrupted write")
        self.result = TrainResult(derived, log_path=str(out.log_path or ""))
        self.saved: tuple[int, Path | None] = (-1, None)  # (step, path) of the newest model.pt (path: rank 0)
        resumed = self.resume()
        self.step = self.init_weights() if resumed is None else resumed  # global optimizer steps done
        self.result.start_step = self.last_logged = self.step
        self.lr = self.lr_at(self.step)
        flops = model_flops_per_image(self.model.arch, cfg.model.mask_ratio)
        peak = card_peak(device_name(device), d.world_size) if device.type == "cuda" else None
        self.meter = Meter(
            effective_batch=derived.effective_batch,
            steps_per_epoch=derived.steps_per_epoch,
            total_steps=derived.total_steps,
            flops_per_step=flops * derived.effective_batch,
            peak=peak,
        )
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad) / 1e6
        out.info(
            f"model {cfg.model.type}: {params:.1f}M trainable parameters on {device_name(device)}; "
            f"{'compiled' if cfg.misc.compile else 'eager'}"
        )
        out.info(mfu_basis(flops, peak, device))
        lg = cfg.logging
        self.profiler = StepProfiler(
            lg.profile_start_step, lg.profile_steps, Path(lg.output_dir) / "profile", device, active=d.is_main
        )
        if lg.memory_history and device.type == "cuda":  # stack traces in the snapshot of an out-of-memory error
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        n = cfg.logging.visualize_images
        self.vis_files = sample_images(dataset, n) if d.is_main and cfg.logging.visualize_freq_epochs else []
        self.on_log: OnLog | None = None
        self.evaluator = evaluator
        if evaluator is not None:
            e = cfg.evaluation
            when = f"every {e.freq_epochs} epochs and at the end" if e.freq_epochs else "at the end of the run"
            out.info(f"evaluation: {evaluator.describe()}, at a new run's start (epoch 0), {when}")
            for note in evaluator.sets.notes:
                out.info(f"evaluation: {note}")

    def lr_at(self, step: int) -> float:
        o, dv = self.cfg.optimization, self.derived
        return cosine_lr(step, dv.lr, o.min_lr, dv.warmup_steps, dv.total_steps)

    # -- the start: resume or initial weights, each returning the start step -------------------------

    def resume(self) -> int | None:
        """misc.resume names a file; misc.auto_resume takes latest.pt when there is one (rank 0 decides, so that
        every rank starts from the same step even without a shared view of the checkpoint folder). Returns the
        step resumed at, None when there is nothing to resume."""
        x = self.cfg.misc
        path = x.resume or (str(self.ckpts.latest) if x.auto_resume and self.ckpts.latest.exists() else "")
        path = broadcast(self.d, path)
        if not path:
            return None
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.get("format") != "mae-fast":
            raise CheckpointError(
                f"misc.resume: {path} is not a mae-fast training checkpoint (no optimizer, schedule or data "
                f"position to resume); to start from its weights, set misc.init_weights: {path}"
            )
        notes = check_resumable(ckpt, self.cfg, self.derived, path)
        check_same_source(ckpt, self.loader, path)  # a folder run's checkpoint in a shard run, or the reverse
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
            load_optimizer_state(self.step_fn.optimizer, ckpt["optimizer"])  # misc.compile_optimizer may differ
            self.loader.load_state(ckpt["data"][self.d.rank])  # each rank's own shard position and RNG
            set_rng_state(ckpt["rng"][self.d.rank])
            step = int(ckpt["step"])
        except (KeyError, IndexError, ValueError, RuntimeError) as e:  # a key, a shape, a position that does not fit
            what = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())[:400] or type(e).__name__
            raise CheckpointError(f"cannot resume from {path}: it does not fit this run ({what})") from None
        self.result.resumed_from, self.result.last_checkpoint = path, path
        self.saved = (step, Path(path))
        spe = self.derived.steps_per_epoch
        self.out.info(
            f"resumed from {path}: step {step}, epoch {step // spe} (+{step % spe} steps), "
            f"saved {ckpt.get('saved_at', '?')}"
        )
        for note in notes:
            self.out.info(f"WARNING: resuming with a changed schedule: {note}")
        return step

    def init_weights(self) -> int:
        """misc.init_weights: start from these weights (a fresh optimizer and schedule); returns the start step."""
        path, m = self.cfg.misc.init_weights, self.cfg
        if path:
            init = load_mae(path)
            if (init.model_type, init.model.arch.img_size) != (m.model.type, m.data.input_size):
                raise CheckpointError(
                    f"misc.init_weights: {path} holds {init.model_type} at {init.model.arch.img_size}px, "
                    f"the config asks for {m.model.type} at {m.data.input_size}px"
                )
            self.model.load_state_dict(init.model.state_dict())
            for note in init.notes:
                self.out.info(f"init weights: {note}")
        return self.derived.start_step

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, max_steps: int | None) -> TrainResult:
        dv, ck, print_freq = self.derived, self.cfg.checkpointing, self.cfg.logging.print_freq
        start, spe = self.step, dv.steps_per_epoch
        end = dv.total_steps if max_steps is None else min(dv.total_steps, start + max_steps)
        if self.evaluator is not None and not self.result.resumed_from and start < end:
            self.evaluate()  # the baseline: the initial (or misc.init_weights') encoder, once per run
        self.t0 = time.perf_counter()
        stopping = False
        while self.step < end and not stopping:
            if self.step == start or self.step % spe == 0:
                self.batches.start_epoch(self.step // spe)
            if self.profiler.begins_before(self.step + 1):
                self.log()  # the interval before the profiled steps is timed as usual
                self.profiler.begin()
            try:
                self.train_step()
            except ShardReadError as e:  # a shard gone, shrunk or replaced under the run
                self.stop_for_lost_shard(e)
            self.stop.starting = False  # a step is done (compiled): from now on SIGTERM saves a checkpoint
            if self.profiler.running and self.profiler.ends_after(self.step):
                self.profile_end()
            log_point = self.step == start + 1 or self.step % print_freq == 0 or self.step == end
            if log_point:
                self.log(first=self.step == start + 1)
                self.share_bad_files()
            if self.evaluation_due():
                self.evaluate()
            for name in checkpoints_due(self.step, spe, ck):
                self.save(name)
            if self.step % spe == 0:
                self.visualize(self.step // spe)
            stopping = self.stop_requested(log_point)
        return self.finish(stopping, end)

    def train_step(self) -> None:
        """One optimizer step: accum_steps micro-batches, forward and backward each, then the update."""
        self.lr = self.lr_at(self.step)
        accum = self.derived.accum_steps
        try:
            for i in range(accum):
                self.micro = i  # micro-batches of this step read so far (stop_for_lost_shard steps back over them)
                self.step_fn.run(self.batches.next(), last_micro=i == accum - 1)
            self.step_fn.optimizer_step(self.lr)
        except torch.OutOfMemoryError:  # a snapshot of the memory, and one line: what to lower
            out_dir = Path(self.cfg.logging.output_dir) if self.d.is_main else None
            raise out_of_memory(self.device, self.derived.micro_batch_size, self.step + 1, out_dir) from None
        self.step += 1

    def profile_end(self) -> None:
        """After the last profiled step: the trace is written, the profiled interval logged (its losses; not timed:
        img/s and the ETA stay the last timed interval's), and the top-kernels table goes into the log."""
        traced = self.profiler.end()
        self.log(timed=False)
        self.meter.restart_clock()
        if traced is not None:
            path, table = traced
            p = self.profiler
            by = "self time on the device" if self.device.type == "cuda" else "self CPU time"
            self.out.info(
                f"profile of steps {p.start}-{p.start + p.steps - 1}: trace {path} (open it in https://ui.perfetto.dev "
                f"or chrome://tracing); top kernels by {by}:\n{table}"
            )

    def stop_for_lost_shard(self, error: ShardReadError) -> NoReturn:
        """Save the last whole step and stop with one line naming the shard (DatasetScanError: exit 2); once the
        shard is back, the run resumes from that checkpoint. With several ranks only the failing one knows, so no
        collective save is possible: the line names the newest checkpoint instead."""
        if self.profiler.running:  # the trace of the steps so far is still written
            self.profile_end()
        # the unfinished step's micro-batches are read again on resume; the run goes on from there, but not bit
        # for bit as an uninterrupted one would: the rebuilt pipeline draws other crops (and masks, with accumulation)
        self.loader.rewind(self.micro)
        if self.d.enabled:  # rank 0 writes the checkpoints: its latest.pt, at the step this rank last saved
            newest = f"{self.ckpts.latest} (step {self.saved[0]})" if self.saved[0] >= 0 else "none yet"
            raise DatasetScanError(f"{error}; stopped (the newest checkpoint is {newest})") from None
        self.stop.starting = False  # SIGTERM waits for this save
        self.save(f"step-{self.step}")
        raise DatasetScanError(
            f"{error}; stopped at step {self.step}, saved {self.result.last_checkpoint}: once the shard is back, "
            f"continue with --set misc.resume={self.result.last_checkpoint}"
        ) from None

    def log(self, first: bool = False, timed: bool = True) -> None:
        """Read the device-side metrics since the last read (a collective); raises NonFiniteLoss on divergence.
        timed=False (and any read inside the profiled steps): the interval is left out of img/s and the ETA."""
        if self.step == self.last_logged:
            return
        read = self.step_fn.read_metrics(reduce=lambda t: mean(self.d, t))  # the loop's one CPU-GPU sync point
        try:
            snap = self.meter.update(
                first_step=self.last_logged,
                losses=read.losses,
                gnorms=read.gnorms,
                lr=self.lr,
                data_wait_s=self.batches.take_wait(),
                memory=cuda_memory(self.device),
                busy_s=read.busy_s,
                timed=timed and not self.profiler.running,
            )
        except NonFiniteLoss as e:
            raise NonFiniteLoss(e.step, e.value, "loss", self.good_checkpoint()) from None
        for i, gnorm in enumerate(read.gnorms):  # (the fused AdamW did not apply that step's update)
            if not math.isfinite(gnorm):
                raise NonFiniteLoss(self.last_logged + i + 1, gnorm, "gradient norm", self.good_checkpoint())
        self.last_logged = self.step
        self.result.final_loss = read.losses[-1]
        if first:
            self.out.info(f"first step done in {time.perf_counter() - self.t0:.1f}s (compilation included)")
            self.meter.restart_clock()
        self.out.metrics(snap)
        if self.on_log is not None:
            self.on_log(snap, read.losses)

    def share_bad_files(self) -> None:
        """Files that passed the scan but failed to decode, every rank's (a collective): left out on every rank."""
        if not hasattr(self.loader, "take_bad_files"):  # synthetic data has no files
            return
        found = [f for rank_found in gather(self.d, self.loader.take_bad_files()) for f in rank_found]
        if found and self.d.enabled:
            self.loader.leave_out_paths(found)
        for path, reason in found:
            self.result.bad_files.append((path, reason))
            self.out.info(f"WARNING: {path} cannot be decoded ({reason}); left out, the next file is read in its place")

    def save(self, name: str | None) -> None:
        """Checkpoint `name` (None: final.pt), a collective. A second save at the same step links the first.
        Never a diverged state: the metrics are read first (NonFiniteLoss), the weights checked finite."""
        self.log()
        saved_step, saved_path = self.saved
        if saved_step == self.step:  # the same step under another name: rank 0 hard-links its model.pt
            state = saved_path
        else:  # a collective (every rank's RNG and data position); the same decision on every rank
            if bad := check_finite(self.model):
                raise NonFiniteLoss(self.step, float("nan"), f"weights ({', '.join(bad[:3])})", self.good_checkpoint())
            state = training_state(
                model=self.model,
                optimizer=self.step_fn.optimizer,
                step=self.step,
                rng=gather(self.d, rng_state()),
                data=gather(self.d, self.loader.state()),
                config=self.cfg.to_dict(redacted=True),
                derived=self.derived,
            )
        path = None
        if self.d.is_main:  # only rank 0 writes; the others keep count
            resolved_cfg = resolved(self.cfg, self.derived)
            log_path = self.out.log_path
            try:
                path = (
                    self.ckpts.save_final(state)
                    if name is None
                    else self.ckpts.save(state, name, resolved_cfg, log_path)
                )
            except (CheckpointError, OSError) as e:  # a full disk: the run stops, the previous checkpoint is intact
                last = self.good_checkpoint()
                raise CheckpointError(
                    f"{e}; stopped at step {self.step}, the newest good checkpoint is {last}"
                ) from None
            self.out.checkpoint_saved(str(path))
            self.result.last_checkpoint = str(path)
        self.saved = (self.step, path)
        self.meter.restart_clock()  # the time spent saving is not training throughput

    def good_checkpoint(self) -> str:
        return self.result.last_checkpoint or "none yet"

    def visualize(self, done_epochs: int) -> None:
        """The reconstruction grid at the end of an epoch, when due: fixed images and masks, rank 0 only."""
        lg = self.cfg.logging
        if (
            self.d.is_main
            and lg.visualize_freq_epochs
            and self.vis_files
            and done_epochs % lg.visualize_freq_epochs == 0
        ):
            self.log()  # the interval so far is timed as usual; the grid's time is left out (restart_clock below)
            # fixed sample images, the same images and masks every time; rank 0 only
            png = Path(lg.output_dir) / "reconstructions" / f"epoch-{done_epochs}.png"
            a = self.cfg.data.augmentation
            try:
                visualize_files(
                    self.model,
                    self.vis_files,
                    png,
                    self.cfg.model.mask_ratio,
                    seed=self.cfg.misc.seed,
                    device=self.device,
                    mean=tuple(a.mean),
                    std=tuple(a.std),
                )
            except (CheckpointError, OSError) as e:  # like a log: a grid that cannot be written is dropped
                self.out.info(f"WARNING: {png} not written ({e}); training goes on")
            else:
                self.out.info(f"reconstructions: {png}")
                self.out.image(png, self.step, f"epoch {done_epochs}")
            self.meter.restart_clock()

    def evaluation_due(self) -> bool:
        """At the end of the epochs the evaluator is due at; the same on every rank."""
        epoch, rest = divmod(self.step, self.derived.steps_per_epoch)
        return self.evaluator is not None and not rest and self.evaluator.due(epoch)

    def evaluate(self) -> None:
        """kNN (and the linear probe) of the frozen encoder, a collective of every rank, before the epoch's
        checkpoints (the final numbers are in the log before final.pt). The metrics are read first and the
        clock restarted after, so no training interval holds evaluation time; the uncompiled model is used,
        and the training RNG streams are left as they were (a resumed run gives the same losses).
        A failure is raised on every rank alike: all of them go on training, without evaluation."""
        self.log()
        epoch = self.step // self.derived.steps_per_epoch
        try:
            result = self.evaluator(self.model, self.step, epoch)
        except (RuntimeError, ConfigError) as err:  # EvalDataError: no image of a set decodes
            self.out.info(f"WARNING: evaluation at epoch {epoch} failed ({err}); training goes on without evaluation")
            self.evaluator = None
        else:
            for path in result.skipped:
                self.out.info(f"WARNING: evaluation: {path} cannot be decoded; left out of this and later evaluations")
            self.result.evaluations.append(result)
            self.out.evaluation(result)
        if self.device.type == "cuda":  # the memory peaks are training's: the feature bank is freed
            torch.cuda.reset_peak_memory_stats(self.device)
        self.meter.restart_clock()  # the evaluation's time is not training throughput (eval_s has it)

    def stop_requested(self, at_log_point: bool) -> bool:
        """One process: after every step; several: at log points, where all ranks agree on it (a collective)."""
        if not self.d.enabled:
            return self.stop.signal is not None
        return at_log_point and any_rank(self.d, self.stop.signal is not None, self.device)

    def finish(self, stopping: bool, end: int) -> TrainResult:
        """The last read, then final.pt at the end of the schedule, or a step-N checkpoint when stopped early
        (a signal, or --max-steps: a smoke run leaves a checkpoint to visualize or export), then a summary."""
        if self.profiler.running:  # the run ended inside the profiled steps
            self.profile_end()
        self.stop.starting = False  # (no step ran: a resumed run already at its end) SIGTERM now waits for the save
        self.log()
        r = self.result
        if self.step >= self.derived.total_steps:  # done, even if a stop request came during the last steps
            self.save(None)
        elif stopping or self.stop_requested(True):
            sig = signal.Signals(self.stop.signal or signal.SIGTERM).name
            self.out.status(f"received {sig}: saving a checkpoint at step {self.step}")
            self.save(f"step-{self.step}")
            r.preempted = True
        elif self.step > r.start_step:  # --max-steps
            self.save(f"step-{self.step}")
        r.steps_done, r.seconds = self.step, time.perf_counter() - self.t0
        self.out.info(self.summary())
        return r

    def summary(self) -> str:
        """The end of the run in a few lines: what was done, and where everything is."""
        r, lg = self.result, self.cfg.logging
        steps = self.step - r.start_step
        rate = steps * self.derived.effective_batch / r.seconds if r.seconds > 0 else 0.0
        lines = [
            f"{'stopped' if r.preempted else 'done'}: step {self.step}/{self.derived.total_steps}, {steps} steps in "
            f"{r.seconds:.1f}s ({rate:,.1f} img/s with compilation), final loss {r.final_loss:.4f}",
            f"  checkpoint:      {r.last_checkpoint or 'none written'}",
            f"  log:             {r.log_path}",
            f"  metrics:         {Path(lg.output_dir) / 'metrics.jsonl'}",
        ]
        if lg.visualize_freq_epochs:
            lines.append(f"  reconstructions: {Path(lg.output_dir) / 'reconstructions'}")
        if r.evaluations:
            first, last = r.evaluations[0], r.evaluations[-1]
            curve = ", ".join(f"{e.knn_top1:.1f}% (epoch {e.epoch})" for e in r.evaluations[-4:])
            change = (
                f"; {last.knn_top1 - first.knn_top1:+.1f} points from epoch {first.epoch}" if last is not first else ""
            )
            lines.append(f"  kNN top-1:       {curve}{change}")
        return "\n".join(lines)
