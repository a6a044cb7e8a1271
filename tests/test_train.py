import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mae_fast.cli import EXIT_DIVERGED, EXIT_USAGE, main
from mae_fast.config import load_config
from mae_fast.train import train

ROOT = Path(__file__).resolve().parents[1]


def demo_cfg(tmp_path, *extra):
    return load_config(ROOT / "configs/demo.yaml", [f"logging.output_dir={tmp_path}/out",
                                                    f"checkpointing.checkpoint_dir={tmp_path}/ckpt", *extra])


def test_synthetic_train_runs_and_saves_resolved_config(tmp_path):
    cfg = demo_cfg(tmp_path, "data.backend=synthetic", "data.synthetic_images=256", "misc.compile=false",
                   "schedule.epochs=2", "logging.print_freq=4")
    lines = []
    result = train(cfg, log=lines.append)
    assert result.steps_done == 16 and len(result.losses) == 16
    text = "\n".join(lines)
    assert "lr: 0.001" in text and "accum_steps: 1" in text and "total_steps: 16" in text  # resolved config printed
    assert "img/s" in text and "ms/it" in text and "eta epoch" in text and "smooth" in text
    saved = yaml.safe_load((tmp_path / "out/config.yaml").read_text())
    assert saved["derived"]["steps_per_epoch"] == 8 and saved["model"]["type"] == "mae_vit_tiny_patch8"
    # the snapshots cover every step, in order
    assert [s.step for s in result.snapshots] == [1, 4, 8, 12, 16]


def test_divergence_stops_with_the_step(tmp_path, capsys):
    rc = main(["train", str(ROOT / "configs/demo.yaml"), "--set", "data.backend=synthetic",
               "--set", "data.synthetic_images=256", "--set", "misc.compile=false", "--set", "optimization.lr=1e30",
               "--set", "schedule.warmup_epochs=0", "--set", f"logging.output_dir={tmp_path}/out"])
    assert rc == EXIT_DIVERGED
    assert "loss became nan at step 2" in capsys.readouterr().err


def test_bad_config_exits_with_the_key(tmp_path, capsys):
    rc = main(["train", str(ROOT / "configs/demo.yaml"), "--set", "optimization.batch_sise=8"])
    assert rc == EXIT_USAGE
    assert "optimization.batch_sise: unknown key; did you mean optimization.batch_size?" in capsys.readouterr().err


def test_bench_step_reports_figures(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench-step", str(ROOT / "configs/demo.yaml"), "--set", "misc.compile=false", "--steps", "3",
               "--warmup", "1", "--compare", "--json", str(out)])
    assert rc == 0
    import json
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["mae-fast", "reference"]
    for r in data["results"]:
        assert r["img_s"] > 0 and r["ms_per_iter"] > 0 and 0 < r["mfu"] and r["gflop_per_img"] > 0
    assert data["speedup"] == pytest.approx(data["results"][0]["img_s"] / data["results"][1]["img_s"])
    assert data["env"]["torch"] and data["env"]["matmul_peak_tflops"] > 0
