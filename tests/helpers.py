"""What several test files share: configs for short runs, a recorder of a run's log points, small steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mae_fast.config import Config, config_from_dict, load_config
from mae_fast.step import build_train_step, model_from_config

ROOT = Path(__file__).resolve().parents[1]


# the demo evaluates on a labelled sample in ./data; runs that test something else turn evaluation off
NO_EVAL = "evaluation=null"  # the section at its defaults: off


def demo_cfg(tmp_path, *extra: str) -> Config:
    """configs/demo.yaml with its output and checkpoints under tmp_path, evaluation off, and `extra` overrides."""
    return load_config(
        ROOT / "configs/demo.yaml",
        [f"logging.output_dir={tmp_path}/out", f"checkpointing.checkpoint_dir={tmp_path}/ckpt", NO_EVAL, *extra],
    )


def step_records(out_dir) -> list[dict]:
    """metrics.jsonl's per-interval records (no "kind": not the run report, not the evaluations)."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "kind" not in r]


class Recorder:
    """train(..., on_log=recorder): every snapshot and every step's loss, in order."""

    def __init__(self):
        self.snapshots, self.losses = [], []

    def __call__(self, snapshot, losses) -> None:
        self.snapshots.append(snapshot)
        self.losses.extend(losses)


def tiny_step_config(*overrides: str) -> Config:
    return config_from_dict({"model": {"type": "mae_vit_tiny_patch8"}, "data": {"input_size": 32}}, list(overrides))


def config_step_losses(cfg: Config, device: torch.device, steps: int = 4, batch: int = 16) -> list[float]:
    """Losses of `steps` steps of the configured step (build_train_step) on fixed random batches and masks."""
    torch.manual_seed(0)
    step = build_train_step(cfg, model_from_config(cfg).to(device), device=device, micro_batch=batch, lr=1e-3)
    g = torch.Generator(device=device).manual_seed(1)
    size, patches = cfg.data.input_size, step.noise.shape[1]
    for _ in range(steps):
        images = torch.randn(batch, 3, size, size, device=device, generator=g)
        step.run(images, noise=torch.rand(batch, patches, device=device, generator=g))
        step.optimizer_step(1e-3)
    return step.read_metrics().losses
