from pathlib import Path

import pytest
import torch
import yaml
from conftest import broken_huffman_copy
from helpers import ROOT, Recorder, demo_cfg

from mae_fast.cli import EXIT_DIVERGED, EXIT_USAGE, main
from mae_fast.train import train


def test_synthetic_train_runs_and_saves_resolved_config(tmp_path):
    cfg = demo_cfg(
        tmp_path,
        "data.backend=synthetic",
        "data.synthetic_images=256",
        "misc.compile=false",
        "schedule.epochs=2",
        "logging.print_freq=4",
    )
    lines = []
    rec = Recorder()
    result = train(cfg, log=lines.append, on_log=rec)
    assert result.steps_done == 16 and len(rec.losses) == 16
    text = "\n".join(lines)
    assert "lr: 0.001" in text and "accum_steps: 1" in text and "total_steps: 16" in text  # resolved config printed
    assert "img/s" in text and "ms/it" in text and "eta epoch" in text and "smooth" in text
    saved = yaml.safe_load((tmp_path / "out/config.yaml").read_text())
    assert saved["derived"]["steps_per_epoch"] == 8 and saved["model"]["type"] == "mae_vit_tiny_patch8"
    # the snapshots cover every step, in order
    assert [s.step for s in rec.snapshots] == [1, 4, 8, 12, 16]
    # the time in the step and the time waiting for data are disjoint parts of the wall time
    for snap in rec.snapshots[1:]:
        assert snap.busy_pct is not None and 20 < snap.busy_pct <= 100
        assert snap.busy_pct + snap.data_wait_pct <= 100.5
    assert "busy " in text


def test_divergence_stops_with_the_step(tmp_path, capsys):
    rc = main(
        [
            "train",
            str(ROOT / "configs/demo.yaml"),
            "--set",
            "evaluation=null",
            "--set",
            "data.backend=synthetic",
            "--set",
            "data.synthetic_images=256",
            "--set",
            "misc.compile=false",
            "--set",
            "optimization.lr=1e30",
            "--set",
            "schedule.warmup_epochs=0",
            "--set",
            f"logging.output_dir={tmp_path}/out",
        ]
    )
    assert rc == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "became nan at step 2" in err and "newest good checkpoint: none yet" in err and "gradient_clip" in err


def test_a_diverging_step_never_reaches_a_checkpoint(tmp_path, capsys, monkeypatch):
    """A NaN batch at step 5 (of print_freq 4, a save every 2 steps): the update is not applied, the save at
    step 6 reads the metrics first and stops the run; every model.pt written holds finite weights."""
    from mae_fast.checkpoint import load_checkpoint
    from mae_fast.step import TrainStep

    calls = []
    run = TrainStep.run

    def poisoned(self, batch, **kw):
        calls.append(1)
        return run(self, batch * float("nan") if len(calls) == 5 else batch, **kw)

    monkeypatch.setattr(TrainStep, "run", poisoned)
    overrides = ["evaluation=null", "data.backend=synthetic", "data.synthetic_images=256", "misc.compile=false"]
    overrides += ["logging.print_freq=4", "checkpointing.save_freq_steps=2", "checkpointing.keep_last_n=0"]
    rc = main(
        ["train", str(ROOT / "configs/demo.yaml")]
        + [a for o in overrides for a in ("--set", o)]
        + ["--set", f"logging.output_dir={tmp_path}/out", "--set", f"checkpointing.checkpoint_dir={tmp_path}/ckpt"]
    )
    assert rc == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "loss became nan at step 5" in err and f"newest good checkpoint: {tmp_path}/ckpt/step-4/model.pt" in err
    saved = sorted(p.parent.name for p in (tmp_path / "ckpt").glob("step-*/model.pt"))
    assert saved == ["step-2", "step-4"]
    for name in saved + ["latest.pt"]:
        path = tmp_path / "ckpt" / name
        state = load_checkpoint(path / "model.pt" if path.is_dir() else path)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), name


def test_non_finite_weights_are_never_saved(tmp_path):
    """The save-time check (for misc.compile_optimizer's AdamW, which cannot skip a step on the device)."""
    from mae_fast.checkpoint import check_finite
    from mae_fast.model import build_model

    model = build_model("mae_vit_tiny_patch8")
    assert check_finite(model) == []
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 4] = float("inf")
    assert check_finite(model) == ["blocks.1.mlp.fc1.weight"]


def test_bad_config_exits_with_the_key(tmp_path, capsys):
    rc = main(["train", str(ROOT / "configs/demo.yaml"), "--set", "optimization.batch_sise=8"])
    assert rc == EXIT_USAGE
    assert "optimization.batch_sise: unknown key; did you mean optimization.batch_size?" in capsys.readouterr().err


def test_bench_step_reports_figures(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench-step",
            str(ROOT / "configs/demo.yaml"),
            "--set",
            "misc.compile=false",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--compare",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    import json

    data = json.loads(out.read_text())
    results = data["results"]
    assert list(results) == ["mae-fast", "reference", "compiled reference"]
    for r in results.values():
        assert r["img_s"] > 0 and r["ms_per_iter"] > 0 and 0 < r["mfu_matmul"] and r["gflop_per_img"] > 0
        assert r["mfu_peak"] is None  # the CPU: no card peak
    assert data["speedup"] == pytest.approx(results["mae-fast"]["img_s"] / results["reference"]["img_s"])
    assert data["speedup_vs_compiled_reference"] == pytest.approx(
        results["mae-fast"]["img_s"] / results["compiled reference"]["img_s"]
    )
    assert data["env"]["torch"] and data["env"]["matmul_peak_tflops"] > 0


def test_demo_config_trains_on_sample_jpegs_through_dali_and_loss_falls(tmp_path):
    """The README's first command, shortened: real JPEGs (created on first use), DALI on the CPU."""
    cfg = demo_cfg(
        tmp_path,
        f"data.data_path={tmp_path}/sample",
        "misc.compile=false",
        "schedule.epochs=12",
        "checkpointing.save_freq_epochs=0",
    )
    lines = []
    rec = Recorder()
    result = train(cfg, log=lines.append, on_log=rec)
    assert any("DALI, decode on CPU" in line for line in lines)
    assert result.steps_done == 12 * 8 and len(rec.losses) == 96
    first, last = sum(rec.losses[:8]) / 8, sum(rec.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    # the demo saves a reconstruction grid of 4 fixed images every 10 epochs
    from PIL import Image

    assert Image.open(tmp_path / "out/reconstructions/epoch-10.png").size == (4 * 64, 4 * 64)


def test_folder_with_bad_files_trains_and_reports_them(tmp_path):
    """Corrupt and fake JPEGs are left out (and reported); grey, CMYK and PNG images are trained on.
    A JPEG that passes the scan but cannot be decoded is left out when the pipeline meets it."""
    from PIL import Image

    from mae_fast.pipelines.sample_data import make_sample_data

    data = Path(make_sample_data(str(tmp_path / "data"), n=30))
    photo = Image.open(next(data.glob("class_0/*.JPEG")))
    photo.convert("L").save(data / "class_0/grey.jpg")
    photo.convert("CMYK").save(data / "class_1/cmyk.jpg")
    photo.save(data / "class_2/photo.png")
    raw = (data / "class_0/img_000000.JPEG").read_bytes()
    (data / "class_3/truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (data / "class_3/notes.jpg").write_text("this is not an image")
    broken_huffman_copy(data / "class_0/img_000000.JPEG", data / "class_2/huffman.jpg")
    cfg = demo_cfg(
        tmp_path,
        f"data.data_path={data}",
        "misc.compile=false",
        "schedule.epochs=2",
        "optimization.batch_size=11",
        "data.input_size=32",
    )
    lines = []
    rec = Recorder()
    result = train(cfg, log=lines.append, on_log=rec)
    warning = next(line for line in lines if line.startswith("WARNING"))
    assert "2 of 36" in warning and "truncated.jpg" in warning and "notes.jpg" in warning
    assert result.derived.num_images == 34 and result.steps_done == 2 * 3
    assert [Path(p).name for p, _ in result.bad_files] == ["huffman.jpg"]
    assert any(line.startswith("WARNING") and "huffman.jpg cannot be decoded" in line for line in lines)


def test_missing_data_path_stops_before_the_model(tmp_path, capsys):
    rc = main(
        [
            "train",
            str(ROOT / "configs/demo.yaml"),
            "--set",
            f"data.data_path={tmp_path}/nope",
            "--set",
            "data.make_sample=false",
            "--set",
            f"logging.output_dir={tmp_path}/out",
        ]
    )
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "data.data_path" in err and f"{tmp_path}/nope" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".mae-fast.lock"]  # nothing was started


def test_missing_dali_is_a_clear_error(monkeypatch):
    import torch

    import mae_fast.pipelines.dali
    from mae_fast.config import ConfigError, config_from_dict
    from mae_fast.data import Dataset, build_loader

    monkeypatch.setattr(mae_fast.pipelines.dali, "dali_available", lambda: False)
    with pytest.raises(ConfigError, match="data.backend: dali, but nvidia.dali cannot be imported.*data.backend: pil"):
        build_loader(config_from_dict({}), Dataset(["a.jpg"] * 8, 8, []), 2, 1, torch.device("cpu"))


def test_bf16_precision_run_saves_fp32_checkpoints(tmp_path):
    import torch

    cfg = demo_cfg(
        tmp_path,
        "data.backend=synthetic",
        "data.synthetic_images=256",
        "misc.compile=false",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "misc.precision=bf16",
    )
    rec = Recorder()
    result = train(cfg, log=lambda line: None, on_log=rec)
    assert result.steps_done == 8 and all(v == v for v in rec.losses)
    ckpt = torch.load(tmp_path / "ckpt/final.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())


def test_max_steps_leaves_a_checkpoint_and_the_run_ends_with_a_summary(tmp_path):
    from mae_fast.weights import load_mae

    cfg = demo_cfg(tmp_path, "data.backend=synthetic", "data.synthetic_images=256", "misc.compile=false")
    lines = []
    result = train(cfg, log=lines.append, max_steps=3)
    assert result.steps_done == 3 and result.last_checkpoint == f"{tmp_path}/ckpt/step-3/model.pt"
    assert load_mae(result.last_checkpoint).model_type == "mae_vit_tiny_patch8"  # visualize/export can use it
    summary = lines[-1]
    assert summary.startswith("done: step 3/480, 3 steps in ") and f"final loss {result.final_loss:.4f}" in summary
    assert f"checkpoint:      {tmp_path}/ckpt/step-3/model.pt" in summary
    assert f"metrics:         {tmp_path}/out/metrics.jsonl" in summary and "reconstructions:" in summary


def test_make_sample_writes_only_its_own_folder_and_an_imagenet_root_is_refused(tmp_path, capsys):
    base = ["train", str(ROOT / "configs/demo.yaml"), "--set", f"logging.output_dir={tmp_path}/out"]
    base += ["--set", f"checkpointing.checkpoint_dir={tmp_path}/ckpt"]
    assert main(base + ["--set", f"data.data_path={tmp_path}/data/smaple"]) == EXIT_USAGE  # a typo
    err = capsys.readouterr().err
    assert f"{tmp_path}/data/smaple does not exist (data.make_sample creates the sample set only in a folder" in err
    assert not (tmp_path / "data").exists()
    (tmp_path / "imagenet/train/n01").mkdir(parents=True)
    (tmp_path / "imagenet/val/n01").mkdir(parents=True)
    assert main(base + ["--set", f"data.data_path={tmp_path}/imagenet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds train/ and val/ (an ImageNet root)" in err and f"data.data_path: {tmp_path}/imagenet/train" in err
