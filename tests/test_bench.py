"""The benchmark harness runs on a CPU in small settings and reports what it should (figures are not asserted)."""

import json
from pathlib import Path

import torch

from mae_fast.bench import bench_all
from mae_fast.config import load_config
from mae_fast.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def test_harness_runs_and_writes_json(tmp_path):
    cfg = load_config(
        ROOT / "configs/bench_cpu.yaml",
        [
            f"data.data_path={tmp_path}/sample",
            "data.input_size=32",
            "optimization.batch_size=16",
            "optimization.micro_batch_size=16",
        ],
    )
    lines = []
    out = bench_all(cfg, steps=4, batches=3, out_dir=str(tmp_path / "results"), log=lines.append)
    loader, step, e2e, ratios = out["loader"], out["step"], out["e2e"], out["ratios"]
    assert list(loader) == ["dali", "pil"]
    assert list(step) == ["mae-fast", "reference", "compiled reference"]
    assert list(e2e) == ["reference e2e", "compiled reference e2e", "mae-fast e2e"]
    for r in [*loader.values(), *step.values(), *e2e.values()]:
        assert r["img_s"] > 0
    for r in e2e.values():
        assert 0 <= r["data_wait_pct"] <= 100 and r["mfu_matmul"] > 0 and r["mfu_peak"] is None
    mine = e2e["mae-fast e2e"]["img_s"]
    assert ratios["e2e_mae_fast_over_reference"] == mine / e2e["reference e2e"]["img_s"]
    assert ratios["e2e_mae_fast_over_compiled_reference"] == mine / e2e["compiled reference e2e"]["img_s"]
    assert ratios["step_mae_fast_over_compiled_reference"] == (
        step["mae-fast"]["img_s"] / step["compiled reference"]["img_s"]
    )
    (path,) = (tmp_path / "results").glob("cpu_mae_vit_tiny_patch8_*.json")
    saved = json.loads(path.read_text())
    assert saved["env"]["torch"] == torch.__version__ and "git_sha" in saved["env"] and "dali" in saved["env"]
    assert any(line.startswith("| mae-fast e2e |") for line in "\n".join(lines).splitlines())


def test_gradient_checkpointing_gives_the_same_gradients():
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    grads, calls = [], []
    for gc in (False, True):
        torch.manual_seed(0)
        model = build_model("mae_vit_tiny_patch8", grad_checkpointing=gc)
        count = [0]
        model.blocks[0].register_forward_pre_hook(lambda *a, count=count: count.__setitem__(0, count[0] + 1))
        loss, _, _ = model(imgs, 0.75, noise)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointing recomputes the block's forward during backward
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_bench_step_times_variants_against_the_config_in_one_run(tmp_path, capsys):
    from mae_fast.cli import EXIT_USAGE, main

    path = tmp_path / "step.json"
    args = [
        "bench-step",
        str(ROOT / "configs/bench_cpu.yaml"),
        "--set",
        "data.input_size=32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--variant",
        "model.embed_kept_only=true",
        "--variant",
        "misc.attention=math, optimization.micro_batch_size=8",
        "--variant",
        "data.augmentation.crop_scale=[0.3,1.0],model.mask_ratio=0.5",
        "--json",
        str(path),
    ]
    assert main(args) == 0
    results = list(json.loads(path.read_text())["results"].values())
    assert [r["name"] for r in results] == [
        "mae-fast",
        "model.embed_kept_only=true",
        "misc.attention=math, optimization.micro_batch_size=8",
        "data.augmentation.crop_scale=[0.3,1.0],model.mask_ratio=0.5",
    ]
    assert [r["batch"] for r in results] == [32, 32, 8, 32]
    assert results[3]["gflop_per_img"] > results[0]["gflop_per_img"]  # mask ratio 0.5: a longer encoder
    for r in results[1:]:
        assert r["vs_mae_fast"] == r["img_s"] / results[0]["img_s"]
    assert "x mae-fast" in capsys.readouterr().out
    assert main(args[:-2] + ["--variant", "misc.atention=math"]) == EXIT_USAGE
    assert "did you mean misc.attention" in capsys.readouterr().err
