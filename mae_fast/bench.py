"""Benchmarks: the training step on synthetic data, and the data loaders, each against its baseline
measured in the same run. Timings synchronize before reading the clock and leave out warm-up
and compilation."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import Config, derive
from .model import arch_for, build_model, model_flops_per_image
from .optim import build_optimizer
from .step import TrainStep, model_from_config, step_options
from .train import resolve_device, seed_everything


def env_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
    }
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    try:
        info["git_sha"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_sha"] = None
    info["git_sha"] = info["git_sha"] or os.environ.get("MAE_FAST_GIT_SHA")  # a copy of the tree without .git
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device) -> float:
    """The card's real dense matmul rate (bf16 on GPU, fp32 on CPU), FLOP/s: MFU's denominator."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _time_steps(run_step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step after `warmup` untimed steps (compilation happens there)."""
    for _ in range(warmup):
        run_step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        run_step()
    _sync(device)
    return (time.perf_counter() - t) / steps


def _mae_fast_step(cfg: Config, device: torch.device, batch: int) -> Callable[[], None]:
    o = cfg.optimization
    model = model_from_config(cfg).to(device)
    options = step_options(cfg)
    opt = build_optimizer(
        model, 1e-4, o.weight_decay, (o.adam_beta1, o.adam_beta2), device, compiled=options["compile_optimizer"]
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = TrainStep(
        model, opt, micro_batch=batch, accum_steps=1, device=device, input_dtype=dtype, log_every=1 << 20, **options
    )
    step.inputs.normal_()

    def run() -> None:
        step.micro_step()
        step.optimizer_step(1e-4)
        if step.ring_full:
            step.read_metrics()

    return run


def _reference_step(cfg: Config, device: torch.device, batch: int) -> Callable[..., None]:
    """The official engine_pretrain.py step: eager, fp16 autocast + GradScaler (grad-norm unscale),
    AdamW (foreach), loss.item() and a synchronize every step. fp32 without scaler on the CPU.
    run(images=None) trains on `images` (copied to the device, as the official loop) or a fixed batch."""
    o = cfg.optimization
    model = build_model(cfg.model.type, cfg.model.norm_pix_loss, cfg.data.input_size).to(device)
    from .optim import param_groups

    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=1e-4, betas=(o.adam_beta1, o.adam_beta2))
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    fixed = torch.randn(batch, 3, cfg.data.input_size, cfg.data.input_size, device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(images: torch.Tensor | None = None) -> None:
        x = fixed if images is None else images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss, _, _ = model(x, cfg.model.mask_ratio)
        loss.item()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, float("inf"))  # the official scaler computes the norm
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        _sync(device)

    return run


def _compiled_reference_step(cfg: Config, device: torch.device, batch: int) -> Callable[..., None]:
    """The strong peer: the official model and loss as they are, tuned the usual way: torch.compile
    (default mode, when misc.compile), bf16 autocast, fused AdamW, no GradScaler and no per-step sync.
    What it lacks against mae-fast: the static input buffer, fullgraph, the tensor lr, the options.
    run(images=None) trains on `images` (already on the device, e.g. DALI's) or a fixed batch."""
    o = cfg.optimization
    model = build_model(cfg.model.type, cfg.model.norm_pix_loss, cfg.data.input_size).to(device)
    from .optim import param_groups

    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=1e-4, betas=(o.adam_beta1, o.adam_beta2), fused=True
    )
    forward = torch.compile(model) if cfg.misc.compile else model
    fixed = torch.randn(batch, 3, cfg.data.input_size, cfg.data.input_size, device=device)
    a = cfg.data.augmentation
    mean255 = torch.tensor(a.mean, device=device).view(1, 3, 1, 1) * 255
    std255 = torch.tensor(a.std, device=device).view(1, 3, 1, 1) * 255

    def run(images: torch.Tensor | None = None) -> None:
        if images is None:
            x = fixed
        elif images.dtype == torch.uint8:  # data.output_dtype uint8: DALI left the normalization to the step
            x = (images.float() - mean255) / std255
        else:
            x = images.float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = forward(x, cfg.model.mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def profile_steps(run_step: Callable[[], None], steps: int, device: torch.device, path: str) -> str:
    """Where a step's time goes: the torch profiler's kernel table (sorted by device time) written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(table)
    return table


def bench_step(
    cfg: Config,
    *,
    steps: int = 20,
    warmup: int = 5,
    compare: bool = False,
    batch: int | None = None,
    profile: str | None = None,
    variants: list[tuple[str, Config]] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """Time mae-fast's step (and with compare, the reference step) on synthetic data after warm-up.
    `variants`: (label, config) pairs timed in the same run, each reported against mae-fast's step.
    `profile`: also write the profiler's kernel table of mae-fast's step there (after the timing)."""
    seed_everything(cfg.misc.seed)
    device = resolve_device(cfg.misc.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = measure_matmul_flops(device)
    log(f"{env_info(device)['device']}: measured matmul peak {peak / 1e12:.3g} TFLOP/s")

    runs = [("mae-fast", _mae_fast_step, cfg), *((label, _mae_fast_step, c) for label, c in variants)]
    if compare:  # the official engine's step, then the same model compiled and tuned (the strong peer)
        runs += [("reference", _reference_step, cfg), ("compiled reference", _compiled_reference_step, cfg)]
    results = []
    for name, make, run_cfg in runs:
        n = (
            batch
            or run_cfg.optimization.micro_batch_size
            or derive(run_cfg, run_cfg.optimization.batch_size).micro_batch_size
        )
        flops_img = model_flops_per_image(
            arch_for(run_cfg.model.type, run_cfg.data.input_size), run_cfg.model.mask_ratio
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run = make(run_cfg, device, n)
        sec = _time_steps(run, steps, warmup, device)
        if profile and name == "mae-fast":
            profile_steps(run, 3, device, profile)
            log(f"profile of 3 steps: {profile}")
        r = {
            "name": name,
            "batch": n,
            "img_s": n / sec,
            "ms_per_iter": 1000 * sec,
            "gflop_per_img": flops_img / 1e9,
            "mfu": flops_img * n / sec / peak,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        if results:
            r["vs_mae_fast"] = r["img_s"] / results[0]["img_s"]
        results.append(r)
        log(
            f"{name:>10}: {r['img_s']:,.1f} img/s  {r['ms_per_iter']:.1f} ms/iter  batch {n}  MFU {100 * r['mfu']:.1f}%"
            + (f"  peak mem {r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] is not None else "")
            + (f"  {r['vs_mae_fast']:.3f}x mae-fast" if "vs_mae_fast" in r else "")
        )
        del run
    m, x = cfg.model, cfg.misc
    out = {
        "results": results,
        "env": {
            **env_info(device),
            "matmul_peak_tflops": peak / 1e12,
            "model": m.type,
            "compile": x.compile,
            "compile_mode": x.compile_mode,
            "compile_optimizer": x.compile_optimizer,
            "attention": x.attention,
            "embed_kept_only": m.embed_kept_only,
            "grad_checkpointing": m.grad_checkpointing,
        },
    }
    if compare:
        out["speedup"] = results[0]["img_s"] / results[-2]["img_s"]
        out["speedup_vs_compiled_reference"] = results[0]["img_s"] / results[-1]["img_s"]
        log(
            f"mae-fast / reference: {out['speedup']:.2f}x; mae-fast / compiled reference: "
            f"{out['speedup_vs_compiled_reference']:.2f}x"
        )
    return out


def bench_loader(
    cfg: Config, *, backend: str = "both", batches: int = 50, warmup: int = 5, log: Callable[[str], None] = print
) -> dict:
    """img/s and ms per batch of the DALI and/or PIL loaders over the config's data, same run, same data."""
    from dataclasses import replace

    from .data import build_loader, find_dataset

    device = resolve_device(cfg.misc.device)
    dataset = find_dataset(cfg)
    for w in dataset.warnings:
        log(f"WARNING: {w}")
    batch = cfg.optimization.micro_batch_size or cfg.optimization.batch_size
    if dataset.num_images < batch:
        raise ValueError(f"data.data_path: {dataset.num_images} images, fewer than one batch of {batch}")
    per_epoch = dataset.num_images // batch
    results = []
    for name in ["dali", "pil"] if backend == "both" else [backend]:
        run_cfg = replace(cfg, data=replace(cfg.data, backend=name))
        loader, _, desc = build_loader(run_cfg, dataset, batch, per_epoch, device)
        log(f"{name}: {desc}, batch {batch}, {cfg.data.input_size}px")
        epoch, seen = 0, 0
        it = None
        t = 0.0
        for i in range(warmup + batches):
            if i == warmup:  # time from here, after the workers/threads and decoders warmed up
                _sync(device)
                t = time.perf_counter()
            if it is None or seen == per_epoch:
                loader.set_epoch(epoch)
                it, seen, epoch = iter(loader), 0, epoch + 1
            b = next(it)
            seen += 1
        _sync(device)
        sec = (time.perf_counter() - t) / batches
        results.append(
            {
                "backend": name,
                "img_s": batch / sec,
                "ms_per_batch": 1000 * sec,
                "batch": batch,
                "workers": cfg.data.num_workers,
                "output_device": str(b.device),
                "dtype": str(b.dtype),
            }
        )
        log(f"{name:>5}: {batch / sec:,.1f} img/s  {1000 * sec:.1f} ms/batch")
        if hasattr(loader, "close"):
            loader.close()
        del loader, it
    out = {
        "results": results,
        "env": {
            **env_info(device),
            "input_size": cfg.data.input_size,
            "num_images": dataset.num_images,
            "data_path": cfg.data.data_path,
        },
    }
    if len(results) == 2:
        out["ratio_dali_over_pil"] = results[0]["img_s"] / results[1]["img_s"]
        log(f"DALI / PIL: {out['ratio_dali_over_pil']:.2f}x")
    return out


def _e2e_mae_fast(cfg: Config, steps: int, log: Callable[[str], None]) -> dict:
    """mae-fast's own train loop on the config's data (DALI), a few log intervals; the first is left out."""
    import statistics
    import tempfile
    from dataclasses import replace

    from .train import train

    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = replace(
            cfg,
            logging=replace(
                cfg.logging,
                output_dir=f"{tmp}/out",
                dashboard="off",
                print_freq=max(1, steps // 5),
                visualize_freq_epochs=0,
            ),
            checkpointing=replace(
                cfg.checkpointing, checkpoint_dir=f"{tmp}/ckpt", save_freq_epochs=0, save_freq_steps=0
            ),
            misc=replace(cfg.misc, auto_resume=False, resume=""),
            schedule=replace(cfg.schedule, epochs=max(cfg.schedule.epochs, 1000), warmup_epochs=0),
        )
        result = train(run_cfg, log=lambda m: None, max_steps=steps)
    snaps = result.snapshots[2:] or result.snapshots[-1:]  # leave out the first step and interval (warm-up)
    ms = statistics.median(x.ms_per_iter for x in snaps)
    batch = result.derived.effective_batch
    return {
        "name": "mae-fast e2e",
        "img_s": batch * 1000 / ms,
        "ms_per_iter": ms,
        "batch": batch,
        "data_wait_pct": statistics.median(x.data_wait_pct for x in snaps),
        "steps": result.steps_done,
        "busy_pct": statistics.median(x.busy_pct for x in snaps),
    }


def _e2e_peer(cfg: Config, steps: int, warmup: int, device: torch.device, *, compiled: bool) -> dict:
    """A peer's plain loop over the config's JPEGs. compiled=False: the official pipeline, a PIL DataLoader
    (torchvision transforms, batches on the host) feeding the official engine's step. compiled=True: the
    config's loader (DALI) feeding the compiled reference step."""
    from dataclasses import replace

    from .data import build_loader, find_dataset

    dataset = find_dataset(cfg, progress=False)
    batch = cfg.optimization.micro_batch_size or cfg.optimization.batch_size
    per_epoch = dataset.num_images // batch
    if compiled:
        name, make, loader_cfg, loader_device = "compiled reference e2e", _compiled_reference_step, cfg, device
    else:
        name, make, loader_device = "reference e2e", _reference_step, torch.device("cpu")
        loader_cfg = replace(cfg, data=replace(cfg.data, backend="pil", pin_memory=True))
    loader, _, _ = build_loader(loader_cfg, dataset, batch, per_epoch, loader_device)
    run = make(cfg, device, batch)
    wait, t, epoch, it, seen = 0.0, 0.0, 0, None, per_epoch
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            wait, t = 0.0, time.perf_counter()
        if seen == per_epoch:
            loader.set_epoch(epoch)
            it, seen, epoch = iter(loader), 0, epoch + 1
        t0 = time.perf_counter()
        images = next(it)
        wait += time.perf_counter() - t0
        seen += 1
        run(images)
    _sync(device)
    sec = time.perf_counter() - t
    loader.close()
    return {
        "name": name,
        "img_s": batch * steps / sec,
        "ms_per_iter": 1000 * sec / steps,
        "batch": batch,
        "data_wait_pct": 100 * wait / sec,
        "steps": steps,
    }


def bench_all(
    cfg: Config,
    *,
    steps: int = 30,
    batches: int = 40,
    out_dir: str | None = "benchmarks/results",
    log: Callable[[str], None] = print,
) -> dict:
    """The whole harness in one run, on one machine and one data set: loaders (DALI, PIL), the step on
    synthetic data (mae-fast, the official engine's, the compiled reference), and end to end on JPEGs
    (the official PIL + eager loop, the compiled reference fed by DALI, mae-fast's train loop)."""
    device = resolve_device(cfg.misc.device)
    loader = bench_loader(cfg, backend="both", batches=batches, log=log)
    step = bench_step(cfg, steps=steps, compare=True, log=log)
    e2e = []
    for measure in (
        lambda: _e2e_peer(cfg, steps, 3, device, compiled=False),
        lambda: _e2e_peer(cfg, steps, 3, device, compiled=True),
        lambda: _e2e_mae_fast(cfg, steps, log),
    ):
        e2e.append(measure())
        r = e2e[-1]
        log(
            f"{r['name']:>22}: {r['img_s']:,.1f} img/s  {r['ms_per_iter']:.1f} ms/iter  data wait {r['data_wait_pct']:.0f}%"
        )
    peak = step["env"]["matmul_peak_tflops"] * 1e12
    flops_img = step["results"][0]["gflop_per_img"] * 1e9
    for r in e2e:
        r["mfu"] = flops_img * r["img_s"] / peak
    out = {
        "loader": loader["results"],
        "step": step["results"],
        "e2e": e2e,
        "ratios": {
            "loader_dali_over_pil": loader.get("ratio_dali_over_pil"),
            "step_mae_fast_over_reference": step["speedup"],
            "step_mae_fast_over_compiled_reference": step["speedup_vs_compiled_reference"],
            "e2e_mae_fast_over_reference": e2e[2]["img_s"] / e2e[0]["img_s"],
            "e2e_mae_fast_over_compiled_reference": e2e[2]["img_s"] / e2e[1]["img_s"],
            "e2e_over_synthetic_step": e2e[2]["img_s"] / step["results"][0]["img_s"],
        },
        "env": step["env"],
    }
    log(summary_table(out))
    if out_dir:
        name = "".join(c if c.isalnum() else "_" for c in out["env"]["device"].split("(")[0].strip().lower())
        path = Path(out_dir) / f"{name}_{cfg.model.type}_{time.strftime('%Y%m%d_%H%M%S')}.json"
        write_json(out, str(path))
        log(f"wrote {path}")
    return out


def summary_table(out: dict) -> str:
    rows = [
        "| what | img/s | ms/iter or batch | MFU | data wait | busy | peak mem |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in out["loader"]:
        rows.append(f"| loader {r['backend']} | {r['img_s']:,.0f} | {r['ms_per_batch']:.1f} | | | | |")
    for r in out["step"]:
        mem = f"{r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") else ""
        rows.append(
            f"| step {r['name']} | {r['img_s']:,.0f} | {r['ms_per_iter']:.1f} | {100 * r['mfu']:.1f}% | | | {mem} |"
        )
    for r in out["e2e"]:
        busy = f"{r['busy_pct']:.0f}%" if r.get("busy_pct") is not None else ""
        rows.append(
            f"| {r['name']} | {r['img_s']:,.0f} | {r['ms_per_iter']:.1f} | {100 * r['mfu']:.1f}% | "
            f"{r['data_wait_pct']:.0f}% | {busy} | |"
        )
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in out["ratios"].items() if v is not None)
    return "\n".join(rows) + f"\n\n{out['env']['device']}, {out['env'].get('model')}: {ratios}"


def write_json(data: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
