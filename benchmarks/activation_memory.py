"""What gradient checkpointing (model.grad_checkpointing) saves and costs, measured without a GPU.

Memory: the bytes that one image's forward pass leaves alive for the backward pass (saved
activations), with checkpointing off and on, for each MAE preset at 224 px, mask 0.75, bf16
autocast as in training. A dispatch mode records every tensor the forward creates; after the
forward, the storages still alive are what autograd (or the checkpoint) keeps. Batch 2 minus
batch 1 removes what does not grow with the batch (the bf16 copies of the weights), so the
figure is per image. This is the eager model: a compiled step recomputes some cheap ops and
keeps a little less, and the GPU's peak adds gradients, optimizer state and workspace.

Speed: the ratio of step times on this machine, eager, checkpointing on / off, same run, in fp32
(this CPU has no bf16 matrix unit: bf16 products run 100x slower than fp32 here).

    python benchmarks/activation_memory.py [--json benchmarks/results/cpu_activation_memory.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_fast.model import PRESETS, build_model  # noqa: E402


class _Created(TorchDispatchMode):
    """Remembers (weakly) every tensor that an op returns."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.refs.append(weakref.ref(t))
        return out


def alive_after_forward(model: torch.nn.Module, batch: int) -> int:
    """Bytes of the storages created by one forward that are still alive when it returns."""
    size = model.arch.img_size
    imgs = torch.randn(batch, 3, size, size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    mode = _Created()
    with mode, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(imgs, 0.75)
    storages = {}
    for ref in mode.refs:
        t = ref()
        if t is not None:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
    del loss
    return sum(storages.values())


def per_image_bytes(model_type: str, checkpointing: bool) -> int:
    model = build_model(model_type, grad_checkpointing=checkpointing).train()
    return alive_after_forward(model, 2) - alive_after_forward(model, 1)


def step_seconds(model_type: str, checkpointing: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(model_type, grad_checkpointing=checkpointing).train()
    imgs = torch.randn(batch, 3, model.arch.img_size, model.arch.img_size)

    def step():
        loss, _, _ = model(imgs, 0.75)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", default=["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]
    )
    ap.add_argument("--speed-model", default="mae_vit_base_patch16")
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--speed-steps", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    rows = []
    for name in args.models:
        off, on = per_image_bytes(name, False), per_image_bytes(name, True)
        rows.append(
            {
                "model": name,
                "img_size": PRESETS[name].img_size,
                "activation_mib_per_image": off / 2**20,
                "with_checkpointing_mib_per_image": on / 2**20,
                "ratio": on / off,
            }
        )
        print(
            f"{name:>24}: {off / 2**20:7.1f} MiB/image saved for backward; with checkpointing "
            f"{on / 2**20:6.1f} MiB ({100 * on / off:.0f}%)"
        )
    # interleaved, twice each, the faster of the two: the CPU's clock and caches drift
    off_s = on_s = float("inf")
    for _ in range(2):
        off_s = min(off_s, step_seconds(args.speed_model, False, args.speed_batch, args.speed_steps))
        on_s = min(on_s, step_seconds(args.speed_model, True, args.speed_batch, args.speed_steps))
    print(
        f"{args.speed_model} step (eager, fp32, batch {args.speed_batch}, this CPU): {off_s * 1000:.0f} ms, "
        f"with checkpointing {on_s * 1000:.0f} ms ({on_s / off_s:.2f}x)"
    )
    out = {
        "memory": rows,
        "speed": {
            "model": args.speed_model,
            "batch": args.speed_batch,
            "device": "cpu",
            "dtype": "float32",
            "ms_off": off_s * 1000,
            "ms_on": on_s * 1000,
            "ratio": on_s / off_s,
        },
        "torch": torch.__version__,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
