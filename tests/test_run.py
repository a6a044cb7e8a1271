"""Run management: checkpoints, exact resume (SIGKILL), SIGTERM, rotation, failed saves, logs, dashboard."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import step_records
from rich.console import Console

from mae_fast.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from mae_fast.config import load_config
from mae_fast.dashboard import RunInfo, render, sparkline
from mae_fast.metrics import Snapshot
from mae_fast.runlog import RunLog
from mae_fast.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    from mae_fast.pipelines.sample_data import make_sample_data

    return make_sample_data(str(tmp_path_factory.mktemp("data") / "sample"), n=96)


def run_args(tmp, data, out, *extra):
    """A tiny DALI (CPU) run: 96 images, batch 16 as 2 x 8 accumulation -> 6 steps per epoch; no evaluation."""
    return [
        "--set",
        "evaluation=null",
        "--set",
        f"data.data_path={data}",
        "--set",
        "data.make_sample=false",
        "--set",
        "data.input_size=32",
        "--set",
        "optimization.batch_size=16",
        "--set",
        "optimization.micro_batch_size=8",
        "--set",
        "schedule.epochs=3",
        "--set",
        "schedule.warmup_epochs=1",
        "--set",
        "misc.compile=false",
        "--set",
        "logging.print_freq=1",
        "--set",
        f"logging.output_dir={out}",
        "--set",
        f"checkpointing.checkpoint_dir={tmp}/ckpt",
        "--set",
        "checkpointing.save_freq_epochs=0",
        *extra,
    ]


def losses_by_step(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in step_records(out_dir)}


def spawn(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mae_fast", "train", str(ROOT / "configs/demo.yaml"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120, lines: int = 0) -> None:
    """Until `path` exists (and holds `lines` lines: metrics.jsonl's first line is the run's readiness point, the
    first step done, after which a SIGTERM saves a checkpoint)."""
    t = time.time()
    while not path.exists() or (lines and path.read_text().count("\n") < lines):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read()}")
        if time.time() - t > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def kill_after_checkpoint(proc: subprocess.Popen, ckpt: Path, step: int) -> int:
    """SIGKILL `proc` once its step-`step` checkpoint is written and latest.pt points at it or later; returns the
    step latest.pt holds (what auto_resume will start from)."""
    wait_for(ckpt / f"step-{step}/model.pt", proc)
    # latest.pt is linked right after step-N/model.pt is written (atomically replaced: safe to read meanwhile)
    while int(torch.load(ckpt / "latest.pt", weights_only=True)["step"]) < step:
        assert proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int(torch.load(ckpt / "latest.pt", weights_only=True)["step"])


@pytest.mark.slow
def test_sigkill_then_auto_resume_gives_the_uninterrupted_losses(tmp_path, sample_dir):
    full = spawn(run_args(tmp_path / "a", sample_dir, tmp_path / "a/out"))
    assert full.wait(timeout=300) == 0, full.stdout.read()
    expect = losses_by_step(tmp_path / "a/out")
    assert sorted(expect) == list(range(1, 19))

    b = tmp_path / "b"
    first = spawn(
        run_args(
            b, sample_dir, b / "out1", "--set", "checkpointing.save_freq_steps=4", "--set", "misc.auto_resume=true"
        )
    )
    resumed_at = kill_after_checkpoint(first, b / "ckpt", 8)  # mid-epoch (6 steps per epoch)
    assert resumed_at >= 8 and resumed_at % 4 == 0
    second = spawn(
        run_args(
            b, sample_dir, b / "out2", "--set", "checkpointing.save_freq_steps=4", "--set", "misc.auto_resume=true"
        )
    )
    log = second.communicate(timeout=300)[0]
    assert second.returncode == 0, log
    assert f"resumed from {b}/ckpt/latest.pt: step {resumed_at}" in log
    got = losses_by_step(b / "out2")
    assert sorted(got) == list(range(resumed_at + 1, 19))
    for k, v in got.items():
        assert v == expect[k], f"step {k}: resumed {v} != uninterrupted {expect[k]}"
    assert (b / "ckpt/final.pt").exists()


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_code_4(tmp_path, sample_dir):
    proc = spawn(run_args(tmp_path, sample_dir, tmp_path / "out", "--set", "schedule.epochs=200"))
    wait_for(tmp_path / "out/metrics.jsonl", proc, lines=3)  # the run report and two log points: in training
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 4, log
    assert "received SIGTERM: saving a checkpoint at step" in log
    ckpt = load_checkpoint(tmp_path / "ckpt/latest.pt")
    step = ckpt["step"]
    assert (tmp_path / f"ckpt/step-{step}/model.pt").exists()
    assert (tmp_path / f"ckpt/step-{step}/config.json").exists()
    assert list((tmp_path / f"ckpt/step-{step}").glob("mae_pretrain_*.log"))
    assert 3 <= step < 200 * 6
    assert (
        "continue with:\n  mae-fast train " in log and f"--set misc.resume={tmp_path}/ckpt/step-{step}/model.pt" in log
    )
    # and it resumes from there
    again = spawn(
        run_args(
            tmp_path, sample_dir, tmp_path / "out2", "--set", "schedule.epochs=200", "--set", "misc.auto_resume=true"
        )
    )
    wait_for(tmp_path / "out2/metrics.jsonl", again, lines=2)  # ready: the run report, then its first step's record
    again.send_signal(signal.SIGTERM)
    log = again.communicate(timeout=120)[0]
    assert again.returncode == 4 and f"resumed from {tmp_path}/ckpt/latest.pt: step {step}" in log, log


def test_sigterm_during_startup_exits_4_and_loses_nothing(tmp_path, sample_dir):
    """A preempted start-up (here: the model built, the first step compiling) stops at once, exit 4, no checkpoint."""
    proc = spawn(run_args(tmp_path, sample_dir, tmp_path / "out", "--set", "misc.compile=true"))
    wait_for(tmp_path / "out/config.yaml", proc)  # written when the trainer starts building the model
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 4, log
    assert "received SIGTERM during start-up, before the first step was done: stopped; nothing was lost" in log
    assert "Traceback" not in log and not (tmp_path / "ckpt/latest.pt").exists()


def tiny_cfg(tmp_path, data, *extra):
    args = run_args(tmp_path, data, tmp_path / "out", *extra)
    return load_config(ROOT / "configs/demo.yaml", [a for a in args if a != "--set"])


def test_keep_last_n_and_checkpoint_contents(tmp_path, sample_dir):
    cfg = tiny_cfg(
        tmp_path,
        sample_dir,
        "checkpointing.save_freq_steps=2",
        "checkpointing.save_freq_epochs=1",
        "checkpointing.keep_last_n=2",
    )
    train(cfg, log=lambda m: None)
    ck = tmp_path / "ckpt"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-16", "step-18"]
    assert sorted(p.name for p in ck.glob("epoch-*")) == ["epoch-2", "epoch-3"]
    final = load_checkpoint(ck / "final.pt")
    assert final["step"] == 18 and final["epoch"] == 3
    assert set(final["model"]) == set(torch.load(ck / "epoch-3/model.pt", weights_only=True)["model"])
    assert "blocks.0.attn.qkv.weight" in final["model"]  # uncompiled names, no _orig_mod.
    assert set(final["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert (
        len(final["data"]) == 1
        and final["data"][0]["kind"] == "dali"
        and final["config"]["model"]["type"] == "mae_vit_tiny_patch8"
    )
    assert os.path.samefile(ck / "latest.pt", ck / "final.pt")
    # one state per step on disk: the end of the run is step-18, epoch-3 and final.pt, one file linked thrice
    assert os.path.samefile(ck / "final.pt", ck / "epoch-3/model.pt")
    assert os.path.samefile(ck / "final.pt", ck / "step-18/model.pt")
    # no temporary files or links left behind (the run's lock file stays: its text names the last holder)
    assert [p.name for p in ck.rglob(".*")] == [".mae-fast.lock"]
    saved = json.loads((ck / "epoch-3/config.json").read_text())
    assert saved["optimization"]["batch_size"] == 16 and saved["derived"]["accum_steps"] == 2
    assert load_config(ck / "epoch-3/config.json") == cfg  # the saved resolved config runs as it is
    # the log file and metrics.jsonl hold what they should
    logs = list((tmp_path / "out").glob("mae_pretrain_*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "derived:" in text and "checkpoint saved:" in text and "step 18/18" in text
    records = step_records(tmp_path / "out")
    assert [r["step"] for r in records] == list(range(1, 19))
    for key in (
        "epoch",
        "loss",
        "loss_smooth",
        "lr",
        "samples_per_s",
        "ms_per_iter",
        "data_wait_pct",
        "eta_epoch_s",
        "eta_run_s",
    ):
        assert key in records[-1], key


def test_failed_save_leaves_latest_loadable(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last_n=3)
    good = {"step": 1, "model": {"w": torch.ones(3)}}
    mgr.save(good, "step-1", {"a": 1}, None)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        mgr.save({"step": 2, "model": {"w": torch.zeros(3)}}, "step-2", {"a": 1}, None)
    monkeypatch.undo()
    latest = load_checkpoint(tmp_path / "latest.pt")
    assert latest["step"] == 1 and torch.equal(latest["model"]["w"], torch.ones(3))
    assert not list(tmp_path.rglob("*.tmp"))  # no debris


def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_the_last_good_one(tmp_path, sample_dir, monkeypatch):
    cfg = tiny_cfg(tmp_path, sample_dir, "checkpointing.save_freq_steps=2")
    save = CheckpointManager.save

    def full_disk_after_the_first(self, state, name, *a, **k):
        if name != "step-2":
            raise CheckpointError(
                f"could not write {self.root / name / 'model.pt'}: [Errno 28] No space left on device"
            )
        return save(self, state, name, *a, **k)

    monkeypatch.setattr(CheckpointManager, "save", full_disk_after_the_first)
    with pytest.raises(CheckpointError) as e:
        train(cfg, log=lambda m: None)
    assert str(e.value) == (
        f"could not write {tmp_path}/ckpt/step-4/model.pt: [Errno 28] No space left on device; stopped at step 4, "
        f"the newest good checkpoint is {tmp_path}/ckpt/step-2/model.pt"
    )


def test_mismatched_checkpoint_is_refused(tmp_path, sample_dir):
    cfg = tiny_cfg(tmp_path, sample_dir, "checkpointing.save_freq_steps=2")
    train(cfg, log=lambda m: None, max_steps=2)
    other = tiny_cfg(
        tmp_path, sample_dir, "misc.auto_resume=true", "optimization.batch_size=32", "optimization.micro_batch_size=16"
    )
    with pytest.raises(
        CheckpointError,
        match=r"does not fit this config \(optimization.batch_size: checkpoint 16, "
        r"config 32; micro-batch size: checkpoint 8, config 16",
    ):
        train(other, log=lambda m: None)


def test_resume_refuses_another_loss_and_explains_a_changed_schedule(tmp_path, sample_dir):
    cfg = tiny_cfg(tmp_path, sample_dir, "checkpointing.save_freq_steps=2")
    train(cfg, log=lambda m: None, max_steps=2)
    for change, key in (
        ("model.mask_ratio=0.5", "model.mask_ratio"),
        ("model.norm_pix_loss=true", "model.norm_pix_loss"),
    ):
        with pytest.raises(CheckpointError, match=f"does not fit this config \\({key}: checkpoint"):
            train(tiny_cfg(tmp_path, sample_dir, "misc.auto_resume=true", change), log=lambda m: None)
    lines = []
    longer = tiny_cfg(tmp_path, sample_dir, "misc.auto_resume=true", "schedule.epochs=400", "optimization.lr=5e-4")
    train(longer, log=lines.append, max_steps=1)
    notes = [x for x in lines if x.startswith("WARNING: resuming with a changed schedule")]
    assert len(notes) == 2
    assert "the peak lr was 0.001" in notes[0] and "now 0.0005" in notes[0] and "continues from step 2" in notes[0]
    assert (
        "the run was 3 epochs (18 steps" in notes[1] and "now 400 (2400 steps" in notes[1] and "recomputed" in notes[1]
    )


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mae_fast.config import config_from_dict

    cfg = config_from_dict(
        {
            "model": {"type": "mae_vit_tiny_patch8"},
            "optimization": {"batch_size": 8},
            "schedule": {"epochs": 1, "warmup_epochs": 0, "steps_per_epoch": 4},
            "data": {"backend": "synthetic", "input_size": 32, "synthetic_images": 32},
            "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
            "logging": {"output_dir": str(tmp_path / "out"), "print_freq": 2, "tensorboard": True, "dashboard": "off"},
            "misc": {"device": "cpu", "compile": False},
        }
    )
    train(cfg, log=lambda m: None)
    events = EventAccumulator(str(tmp_path / "out/tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/samples_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 4]
    records = step_records(tmp_path / "out")
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records])


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def snapshot(**kw):
    base = dict(
        step=120,
        epoch=3,
        epoch_step=20,
        steps_per_epoch=50,
        total_steps=500,
        loss=0.61,
        loss_avg=0.63,
        loss_smooth=0.64,
        lr=1.2e-3,
        grad_norm=0.5,
        samples_per_s=5123.4,
        ms_per_iter=49.9,
        data_wait_pct=1.5,
        eta_epoch_s=90,
        eta_run_s=4000,
        mfu=0.37,
        mfu_peak="H200 dense bf16 peak 989 TFLOP/s",
        mem_gb=13.0,
        mem_reserved_gb=14.5,
        alloc_retries=2,
        elapsed_s=600,
        history=[1.0, 0.9, 0.8, 0.7, 0.65, 0.61],
    )
    base.update(kw)
    return Snapshot(**base)


def test_dashboard_renders_a_frame():
    console = Console(record=True, width=110, force_terminal=True, color_system=None)
    console.print(
        render(
            snapshot(),
            RunInfo("vitb-run", "mae_vit_base_patch16", "NVIDIA H200", "batch 4096"),
            last_checkpoint="ckpt/step-100/model.pt",
        )
    )
    text = console.export_text()
    for piece in (
        "vitb-run",
        "mae_vit_base_patch16",
        "NVIDIA H200",
        "0.6100",
        "0.6400",
        "1.200e-03",
        "5,123 img/s",
        "49.9 ms",
        "1.5 %",
        "37.0 %",
        "MFU: a share of the H200 dense bf16 peak 989 TFLOP/s",
        "13.0 GB",
        "14.5 GB, 2 retries",
        "step 120/500",
        "20/50",
        "ckpt/step-100/model.pt",
        sparkline([1.0, 0.9, 0.8, 0.7, 0.65, 0.61]),
    ):
        assert piece in text, piece
    assert sparkline([3, 2, 1]) == "█▅▁" and sparkline([5, 5]) == "▁▁"


def test_non_terminal_output_prints_plain_lines(tmp_path):
    import io

    stream = io.StringIO()  # not a tty: no live dashboard
    log = RunLog(tmp_path, dashboard="auto", info=RunInfo("r", "m", "cpu", ""), stream=stream)
    assert log.dashboard is None
    log.metrics(snapshot())
    log.checkpoint_saved("ckpt/x.pt")
    log.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("epoch 3 [20/50] step 120/500 loss 0.6100") and "5,123.4 img/s" in lines[0]
    assert (
        "| mfu 37.0% of H200 dense bf16 peak 989 TFLOP/s | mem 13.0 GB (reserved 14.5 GB, 2 alloc retries)" in lines[0]
    )
    assert lines[1] == "checkpoint saved: ckpt/x.pt"
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["samples_per_s"] == 5123.4 and (record["mem_reserved_gb"], record["alloc_retries"]) == (14.5, 2)


def test_checkpoint_cadence():
    from mae_fast.config import CheckpointingConfig
    from mae_fast.train import checkpoints_due

    ck = CheckpointingConfig(save_freq_steps=4, save_freq_epochs=2)
    due = {step: checkpoints_due(step, 3, ck) for step in range(1, 13)}
    assert {s: n for s, n in due.items() if n} == {
        4: ["step-4"],
        6: ["epoch-2"],
        8: ["step-8"],
        12: ["step-12", "epoch-4"],
    }
    assert not any(checkpoints_due(s, 3, CheckpointingConfig(save_freq_steps=0, save_freq_epochs=0)) for s in range(20))


def test_checkpoint_manager_rotates_links_the_same_step_and_writes_final(tmp_path):
    from mae_fast.checkpoint import CheckpointManager

    ckpts = CheckpointManager(tmp_path, keep_last_n=2)
    log = tmp_path / "run.log"
    log.write_text("log so far\n")
    for step in (1, 2, 3):
        ckpts.save({"step": step}, f"step-{step}", {"k": step}, log)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2", "step-3"]  # the oldest rotated out
    assert load_checkpoint(ckpts.latest)["step"] == 3 and (tmp_path / "step-3/run.log").read_text() == "log so far\n"
    # the same step under another name is one file (a hard link), not a second write
    again = ckpts.save(tmp_path / "step-3/model.pt", "epoch-1", {"k": 3}, None)
    assert os.path.samefile(again, tmp_path / "step-3/model.pt") and os.path.samefile(ckpts.latest, again)
    final = ckpts.save_final(again)
    assert final == tmp_path / "final.pt" and os.path.samefile(final, ckpts.latest)
    ckpts.save({"step": 4}, "epoch-2", {}, None)
    ckpts.save({"step": 5}, "epoch-3", {}, None)
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-2", "epoch-3"]  # kinds rotate apart
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2", "step-3"]
    assert load_checkpoint(final)["step"] == 3  # final.pt kept its own link when latest moved on


def test_one_run_per_folder_and_a_killed_holder_does_not_block(tmp_path, capsys):
    """A second run on a locked checkpoint folder is refused at start (exit 2, the holder named) and does not
    touch the folder; once the holder is killed (SIGKILL: no clean-up), the next start goes through."""
    from mae_fast.cli import EXIT_USAGE, main

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mae_fast.checkpoint import RunLock\n"
         f"with RunLock({str(tmp_path / 'ckpt')!r}, 'x'):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    args = ["train", str(ROOT / "configs/demo.yaml"), "--max-steps", "2"]
    for o in ("evaluation=null", "data.backend=synthetic", "data.synthetic_images=64", "misc.compile=false",
              f"logging.output_dir={tmp_path}/out", f"checkpointing.checkpoint_dir={tmp_path}/ckpt"):  # fmt: skip
        args += ["--set", o]
    try:
        assert main(args) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started" in err
        assert "Traceback" not in err and not (tmp_path / "out").exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0


def test_an_unwritable_checkpoint_folder_is_refused_before_any_work(tmp_path, capsys):
    from mae_fast.cli import EXIT_USAGE, main

    (tmp_path / "a-file").write_text("")  # a folder under a file cannot be made, even by root
    bad = tmp_path / "a-file" / "ckpt"
    args = ["train", str(ROOT / "configs/demo.yaml"), "--set", f"checkpointing.checkpoint_dir={bad}"]
    args += ["--set", f"logging.output_dir={tmp_path}/out"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"error: checkpointing.checkpoint_dir: cannot write to {bad} (Not a directory)" in err
    assert not (tmp_path / "out").exists()


def test_a_second_ctrl_c_exits_130_without_a_traceback(tmp_path, capsys, monkeypatch):
    """The first SIGINT asks for a checkpoint; a second one ends the process at once: exit 130, one line."""
    import mae_fast.train
    from mae_fast.cli import EXIT_INTERRUPTED, main
    from mae_fast.preempt import StoppedAtStartup
    from mae_fast.train import StopFlag

    with StopFlag() as stop:
        with pytest.raises(KeyboardInterrupt):  # before the first step is done: at once, nothing to save
            stop._handle(signal.SIGINT, None)
        with pytest.raises(StoppedAtStartup):
            stop._handle(signal.SIGTERM, None)
        stop.starting = False  # the loop runs
        stop._handle(signal.SIGINT, None)
        assert stop.signal == signal.SIGINT  # the first: finish the step, save, exit 4
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mae_fast.train, "train", interrupted)
    assert main(["train", str(ROOT / "configs/demo.yaml")]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.startswith("interrupted: stopped at once, without saving") and "Traceback" not in err


def test_unreadable_checkpoints_say_what_they_are(tmp_path):
    """Each refusal names the file and says what is wrong with it (never torch's weights_only=False advice)."""
    from PIL import Image

    (tmp_path / "empty.pt").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    torch.save({"model": {"w": torch.zeros(64)}}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder").mkdir()
    expected = {
        "empty.pt": "the file is empty (0 bytes",
        "photo.jpg": "the file is a JPEG image, not a PyTorch checkpoint",
        "cut.pt": "the file is truncated or damaged",
        "folder": "is a folder without a model.pt",
    }
    for name, why in expected.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert name in str(e.value) and why in str(e.value) and "weights_only" not in str(e.value), name


def test_stale_writes_are_cleaned_and_files_follow_the_umask(tmp_path):
    from mae_fast.checkpoint import CheckpointManager

    ckpts = CheckpointManager(tmp_path, keep_last_n=0)
    ckpts.save({"step": 1}, "step-1", {}, None)
    (tmp_path / ".latest.pt.abc.tmp").write_bytes(b"half")  # a write killed midway
    (tmp_path / "step-1" / ".model.pt.x.tmp").write_bytes(b"half")
    (tmp_path / "step-2").mkdir()  # a full disk before its model.pt
    (tmp_path / "step-2" / "config.json").write_text("{}")
    removed = ckpts.clean_stale()
    assert sorted(Path(p).name for p in removed) == [".latest.pt.abc.tmp", ".model.pt.x.tmp", "step-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "step-1"] and ckpts.numbered("step")
    old = os.umask(0o027)  # a group that may read, others nothing
    try:
        ckpts.save({"step": 3}, "step-3", {}, None)
    finally:
        os.umask(old)
    for path in (tmp_path / "step-3/model.pt", tmp_path / "step-3/config.json"):
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_a_full_disk_under_output_dir_is_reported_once_and_training_goes_on(tmp_path):
    import errno

    class FullDisk:
        name = str(tmp_path / "out/metrics.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    lines = []
    log = RunLog(tmp_path / "out", echo=lines.append)
    log._jsonl = FullDisk()
    log.metrics(snapshot(step=1))
    log.metrics(snapshot(step=2))
    log.info("still logging")
    log.close()
    warnings = [x for x in lines if x.startswith("WARNING: cannot write")]
    assert warnings == [f"WARNING: cannot write {tmp_path}/out/metrics.jsonl (No space left on device); it is not "
                        "written from here on, training goes on"]  # fmt: skip
    assert "still logging" in lines and "step 2" in next(iter(tmp_path.glob("out/*.log"))).read_text()


def test_a_reconstruction_grid_that_cannot_be_written_is_a_warning_and_training_goes_on(tmp_path, sample_dir):
    from mae_fast.train import train

    (tmp_path / "out").mkdir()
    (tmp_path / "out/reconstructions").write_text("a file where the grids' folder goes")
    lines = []
    cfg = tiny_cfg(tmp_path, sample_dir, "--set", "logging.visualize_freq_epochs=1", "--set", "schedule.epochs=1")
    result = train(cfg, log=lines.append)
    assert result.steps_done == 6 and (tmp_path / "ckpt/final.pt").exists()
    (warning,) = [line for line in lines if "epoch-1.png not written" in line]
    assert warning.startswith(f"WARNING: {tmp_path}/out/reconstructions/epoch-1.png not written (")
    assert (tmp_path / "out/reconstructions").read_text().startswith("a file")  # untouched
