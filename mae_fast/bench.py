"""The benchmark harness: the training step on synthetic data, the data loaders, and end to end on
JPEGs, each against its peer (peers.py) measured in the same run. Timings synchronize before
reading the clock and leave out warm-up and compilation. Results are keyed by name."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from .config import Config, ConfigError, derive
from .data import TimedBatches, build_loader, data_format, find_dataset
from .metrics import card_peak
from .model import arch_for, model_flops_per_image
from .observe import versions
from .peers import compiled_reference_step, reference_step
from .pipelines.store import is_remote
from .runtime import device_name, seed_everything, setup_device, sync
from .step import build_train_step, model_from_config

Log = Callable[[str], None]


def env_info(device: torch.device) -> dict:
    name = device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    v = versions()
    return {
        "torch": v["torch"],
        "python": v["python"],
        "cpu_count": os.cpu_count(),
        "device": name,
        "dali": v["dali"],
        "git_sha": v["git_commit"],
        "cuda": v["cuda"],
        "timm": v["timm"],
        "mae_fast": v["mae_fast"],
    }


def measure_matmul_flops(device: torch.device) -> float:
    """The card's real dense matmul rate (bf16 on GPU, fp32 on CPU), FLOP/s: MFU's denominator."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def time_steps(
    run_step: Callable[[], None], steps: int, warmup: int, device: torch.device, start: Callable = lambda: None
) -> float:
    """Seconds per step after `warmup` untimed steps (compilation happens there); start() runs as the clock starts."""
    for _ in range(warmup):
        run_step()
    sync(device)
    start()
    t = time.perf_counter()
    for _ in range(steps):
        run_step()
    sync(device)
    return (time.perf_counter() - t) / steps


def mae_fast_step(cfg: Config, device: torch.device, batch: int) -> Callable[[], None]:
    """mae-fast's configured step on a fixed random batch (its device-side metrics are never read here)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model_from_config(cfg).to(device)
    step = build_train_step(cfg, model, device=device, micro_batch=batch, input_dtype=dtype, lr=1e-4)
    images = torch.randn(step.inputs.shape, device=device, dtype=dtype)

    def run() -> None:
        step.run(images)
        step.optimizer_step(1e-4)

    return run


def profile_steps(run_step: Callable[[], None], steps: int, device: torch.device, path: str) -> str:
    """Where a step's time goes: the torch profiler's kernel table (sorted by device time) written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        sync(device)
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
    log: Log = print,
) -> dict:
    """Time mae-fast's step (and with compare, the two peers' steps) on synthetic data after warm-up.
    `variants`: (label, config) pairs timed in the same run, each reported against mae-fast's step.
    `profile`: also write the profiler's kernel table of mae-fast's step there (after the timing)."""
    seed_everything(cfg.misc.seed)
    device = setup_device(cfg.misc.device)
    matmul = measure_matmul_flops(device)
    card = card_peak(device_name(device)) if device.type == "cuda" else None
    log(f"{env_info(device)['device']}: {mfu_peaks(matmul, card)}")
    runs = [("mae-fast", mae_fast_step, cfg), *((label, mae_fast_step, c) for label, c in variants)]
    if compare:
        runs += [("reference", reference_step, cfg), ("compiled reference", compiled_reference_step, cfg)]
    results: dict[str, dict] = {}
    for name, make, run_cfg in runs:
        o = run_cfg.optimization
        n = batch or o.micro_batch_size or derive(run_cfg, o.batch_size).micro_batch_size
        flops_img = model_flops_per_image(
            arch_for(run_cfg.model.type, run_cfg.data.input_size), run_cfg.model.mask_ratio
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run = make(run_cfg, device, n)
        sec = time_steps(run, steps, warmup, device)
        if profile and name == "mae-fast":
            profile_steps(run, 3, device, profile)
            log(f"profile of 3 steps: {profile}")
        r = {
            "name": name,
            "batch": n,
            "img_s": n / sec,
            "ms_per_iter": 1000 * sec,
            "gflop_per_img": flops_img / 1e9,
            **mfu_of(flops_img * n / sec, matmul, card),
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        if results:
            r["vs_mae_fast"] = r["img_s"] / results["mae-fast"]["img_s"]
        results[name] = r
        mem = f"  peak mem {r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] is not None else ""
        ratio = f"  {r['vs_mae_fast']:.3f}x mae-fast" if "vs_mae_fast" in r else ""
        log(
            f"{name:>10}: {r['img_s']:,.1f} img/s  {r['ms_per_iter']:.1f} ms/iter  batch {n}  {format_mfu(r)}{mem}{ratio}"
        )
        del run
    m, x = cfg.model, cfg.misc
    env = {
        **env_info(device),
        "matmul_peak_tflops": matmul / 1e12,
        "card_peak": card.name if card else None,
        "card_peak_tflops": card.flops / 1e12 if card else None,
        "model": m.type,
        "compile": x.compile,
        "compile_mode": x.compile_mode,
        "compile_optimizer": x.compile_optimizer,
        "attention": x.attention,
        "embed_kept_only": m.embed_kept_only,
        "grad_checkpointing": m.grad_checkpointing,
    }
    out = {"results": results, "env": env}
    if compare:
        mine = results["mae-fast"]["img_s"]
        out["speedup"] = mine / results["reference"]["img_s"]
        out["speedup_vs_compiled_reference"] = mine / results["compiled reference"]["img_s"]
        log(
            f"mae-fast / reference: {out['speedup']:.2f}x; mae-fast / compiled reference: "
            f"{out['speedup_vs_compiled_reference']:.2f}x"
        )
    return out


def mfu_peaks(matmul: float, card) -> str:
    """The two peaks bench's MFU figures are shares of, said once."""
    rate = f"MFU of the measured matmul rate, {matmul / 1e12:.3g} TFLOP/s"
    return f"{rate}, and of the {card.name}" if card else f"{rate} (no known dense bf16 peak: no card-peak MFU)"


def mfu_of(flops_per_s: float, matmul: float, card) -> dict:
    """A result's MFU: as a share of the measured matmul rate, and of the card's dense bf16 peak (None: unknown)."""
    return {"mfu_matmul": flops_per_s / matmul, "mfu_peak": flops_per_s / card.flops if card else None}


def format_mfu(r: dict) -> str:
    """MFU 36.1% of measured matmul, 29.2% of card peak"""
    text = f"MFU {100 * r['mfu_matmul']:.1f}% of measured matmul"
    return text + (f", {100 * r['mfu_peak']:.1f}% of card peak" if r.get("mfu_peak") is not None else "")


def _loop(batches: TimedBatches, run: Callable[[torch.Tensor], None], steps: int, warmup: int, device) -> tuple:
    """`steps` timed calls of run(next batch) after `warmup` untimed ones -> (seconds, seconds waiting for data)."""
    per_step = time_steps(lambda: run(batches.next()), steps, warmup, device, start=batches.take_wait)
    return per_step * steps, batches.take_wait()


def _mean_image_bytes(dataset, limit: int = 2000) -> float:
    """Mean encoded image size: exact for shards (their index), from up to `limit` files spread over a folder."""
    if dataset.shards is not None:
        return float(dataset.shards.sizes.mean())
    files = dataset.files[:: max(1, len(dataset.files) // limit)]
    return statistics.fmean(os.path.getsize(f) for f in files) if files else 0.0


def bench_loader(
    cfg: Config,
    *,
    backend: str = "both",
    batches: int = 50,
    warmup: int = 5,
    shards: str | None = None,
    folder: str | None = None,
    store: str | None = None,
    log: Log = print,
) -> dict:
    """img/s, MB/s (encoded image bytes) and ms per batch of the DALI and/or PIL loaders over the config's data,
    same run, same data. `shards` (data.data_path a folder) or `folder` (data.data_path shards): the same images
    in the other format, read by DALI too, for the shards / folder ratio; PIL reads the folder only. `store` (an
    s3://, gs:// or http(s):// copy of data.data_path's shards): DALI over it too, for the store / local ratio
    and the store's requests per second."""
    device = setup_device(cfg.misc.device)
    paths, datasets = _loader_data(cfg, shards, folder, log)
    if store:
        if "shards" not in paths or is_remote(paths["shards"]):
            raise ConfigError(f"--store {store}: data.data_path must be the local copy of its shards")
        paths["store"] = store
        datasets["store"] = find_dataset(replace(cfg, data=replace(cfg.data, data_path=store, format="shards")))
    names = ["dali", "pil"] if backend == "both" else [backend]
    runs = [(name, "folder") for name in names if "folder" in datasets]
    runs += [("dali", fmt) for fmt in ("shards", "store") if fmt in datasets and "dali" in names]
    if "shards" in datasets and ("dali", "shards") not in runs:
        raise ConfigError("--backend pil: shards are read by DALI only; use --backend dali or both")
    if "pil" in names and "folder" not in datasets:
        log("pil: reads image files, not shards: left out (--folder DIR adds the folder)")
    batch = cfg.optimization.micro_batch_size or cfg.optimization.batch_size
    num_images = min(ds.num_images for ds in datasets.values())
    if num_images < batch:
        raise ValueError(f"data.data_path: {num_images} images, fewer than one batch of {batch}")
    results: dict[str, dict] = {}
    for name, fmt in runs:
        key = name if fmt == "folder" else fmt
        run_cfg = replace(cfg, data=replace(cfg.data, backend=name, data_path=paths[fmt]))
        per_epoch = num_images // batch
        results[key] = _time_loader(run_cfg, datasets[fmt], key, batch, per_epoch, batches, warmup, device, log)
    other = {f"{fmt}_path": path for fmt, path in paths.items() if path != cfg.data.data_path}
    env = {"input_size": cfg.data.input_size, "num_images": num_images, "data_path": cfg.data.data_path, **other}
    out = {"results": results, "env": {**env_info(device), **env}}
    if "dali" in results and "pil" in results:
        out["ratio_dali_over_pil"] = results["dali"]["img_s"] / results["pil"]["img_s"]
        log(f"DALI / PIL: {out['ratio_dali_over_pil']:.2f}x")
    if "dali" in results and "shards" in results:
        out["ratio_shards_over_folder"] = results["shards"]["img_s"] / results["dali"]["img_s"]
        log(f"shards / folder (DALI): {out['ratio_shards_over_folder']:.2f}x")
    if "store" in results:
        out["ratio_store_over_local"] = results["store"]["img_s"] / results["shards"]["img_s"]
        log(f"store / local shards (DALI): {out['ratio_store_over_local']:.2f}x")
    return out


def _loader_data(cfg: Config, shards: str | None, folder: str | None, log: Log) -> tuple[dict, dict]:
    """bench-loader's data: {format: path} and {format: Dataset}, data.data_path's format and, with --shards or
    --folder, the other one."""
    if shards and folder:
        raise ConfigError("--shards and --folder: give one, the other format is data.data_path")
    paths = {data_format(cfg): cfg.data.data_path}
    other, other_format = shards or folder, "shards" if shards else "folder"
    if other:
        if other_format in paths:
            flag = "--folder" if shards else "--shards"
            raise ConfigError(
                f"--{other_format}: data.data_path {cfg.data.data_path} is {other_format} already; use {flag} DIR"
            )
        paths[other_format] = other
    datasets = {
        fmt: find_dataset(replace(cfg, data=replace(cfg.data, data_path=path, format=fmt, backend="dali")))
        for fmt, path in paths.items()
    }
    for ds in datasets.values():
        for w in ds.warnings:
            log(f"WARNING: {w}")
    if len({ds.num_images for ds in datasets.values()}) > 1:
        log(f"WARNING: not the same images: {', '.join(f'{f} {ds.num_images}' for f, ds in datasets.items())}")
    return paths, datasets


def _time_loader(
    cfg: Config, dataset, key: str, batch: int, per_epoch: int, batches: int, warmup: int, device, log: Log
) -> dict:
    """One loader's figures: `batches` timed batches after `warmup` (its workers and decoders warmed up)."""
    loader, _, desc = build_loader(cfg, dataset, batch, per_epoch, device)
    log(f"{key}: {desc}, batch {batch}, {cfg.data.input_size}px")
    timed = TimedBatches(loader)
    t0 = time.perf_counter()
    sec = _loop(timed, lambda images: None, batches, warmup, device)[0] / batches
    wall = time.perf_counter() - t0
    b = timed.next()
    mean_bytes = _mean_image_bytes(dataset)
    result = {
        "backend": cfg.data.backend,
        "format": "shards" if dataset.shards is not None else "folder",
        "img_s": batch / sec,
        "MB_s": batch / sec * mean_bytes / 1e6,
        "mean_image_kb": mean_bytes / 1e3,
        "ms_per_batch": 1000 * sec,
        "batch": batch,
        "workers": cfg.data.num_workers,
        "output_device": str(b.device),
        "dtype": str(b.dtype),
    }
    rate = ""
    if dataset.shards is not None:
        result["reads"] = loader.read_stats.as_dict()  # opens, read calls (a store: GETs), bytes (whole blocks)
        # over the loop's wall time, warm-up and the reader's read-ahead included
        result["requests_per_s"] = result["reads"]["reads"] / wall
        rate = f"  {result['requests_per_s']:,.1f} requests/s"
    log(f"{key:>6}: {batch / sec:,.1f} img/s  {result['MB_s']:,.1f} MB/s  {1000 * sec:.1f} ms/batch{rate}")
    loader.close()
    return result


def e2e_mae_fast(cfg: Config, steps: int) -> dict:
    """mae-fast's own train loop on the config's data (DALI), a few log intervals; the first is left out."""
    from .train import train

    snaps = []
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = replace(
            cfg,
            logging=replace(
                cfg.logging,
                output_dir=f"{tmp}/out",
                dashboard="off",
                print_freq=max(1, steps // 5),
                visualize_freq_epochs=0,
                profile_start_step=0,
                profile_steps=0,
                wandb_project="",  # a benchmark is not an experiment to track
            ),
            checkpointing=replace(
                cfg.checkpointing, checkpoint_dir=f"{tmp}/ckpt", save_freq_epochs=0, save_freq_steps=0
            ),
            misc=replace(cfg.misc, auto_resume=False, resume=""),
            schedule=replace(cfg.schedule, epochs=max(cfg.schedule.epochs, 1000), warmup_epochs=0),
        )
        result = train(run_cfg, log=lambda m: None, max_steps=steps, on_log=lambda snap, losses: snaps.append(snap))
    snaps = snaps[2:] or snaps[-1:]  # leave out the first step and interval (warm-up)
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


def e2e_peer(cfg: Config, steps: int, warmup: int, device: torch.device, *, compiled: bool) -> dict:
    """A peer's plain loop over the config's JPEGs. compiled=False: the official pipeline, a PIL DataLoader
    (torchvision transforms, batches on the host) feeding the official engine's step. compiled=True: the
    config's loader (DALI) feeding the compiled reference step."""
    dataset = find_dataset(cfg, progress=False)
    batch = cfg.optimization.micro_batch_size or cfg.optimization.batch_size
    per_epoch = dataset.num_images // batch
    if compiled:
        name, make, loader_cfg, loader_device = "compiled reference e2e", compiled_reference_step, cfg, device
    else:
        name, make, loader_device = "reference e2e", reference_step, torch.device("cpu")
        loader_cfg = replace(cfg, data=replace(cfg.data, backend="pil", pin_memory=True))
    loader, _, _ = build_loader(loader_cfg, dataset, batch, per_epoch, loader_device)
    sec, wait = _loop(TimedBatches(loader), make(cfg, device, batch), steps, warmup, device)
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
    cfg: Config, *, steps: int = 30, batches: int = 40, out_dir: str | None = "benchmarks/results", log: Log = print
) -> dict:
    """The whole harness in one run, on one machine and one data set: loaders (DALI, PIL), the step on
    synthetic data (mae-fast, the official engine's, the compiled reference), and end to end on JPEGs
    (the official PIL + eager loop, the compiled reference fed by DALI, mae-fast's train loop)."""
    device = setup_device(cfg.misc.device)
    loader = bench_loader(cfg, backend="both", batches=batches, log=log)
    step = bench_step(cfg, steps=steps, compare=True, log=log)
    e2e: dict[str, dict] = {}
    for measure in (
        lambda: e2e_peer(cfg, steps, 3, device, compiled=False),
        lambda: e2e_peer(cfg, steps, 3, device, compiled=True),
        lambda: e2e_mae_fast(cfg, steps),
    ):
        r = measure()
        e2e[r["name"]] = r
        log(
            f"{r['name']:>22}: {r['img_s']:,.1f} img/s  {r['ms_per_iter']:.1f} ms/iter  data wait {r['data_wait_pct']:.0f}%"
        )
    env = step["env"]
    card = card_peak(device_name(device)) if env["card_peak"] else None
    flops_img = step["results"]["mae-fast"]["gflop_per_img"] * 1e9
    for r in e2e.values():
        r.update(mfu_of(flops_img * r["img_s"], env["matmul_peak_tflops"] * 1e12, card))
    mine = e2e["mae-fast e2e"]["img_s"]
    out = {
        "loader": loader["results"],
        "step": step["results"],
        "e2e": e2e,
        "ratios": {
            "loader_dali_over_pil": loader.get("ratio_dali_over_pil"),
            "step_mae_fast_over_reference": step["speedup"],
            "step_mae_fast_over_compiled_reference": step["speedup_vs_compiled_reference"],
            "e2e_mae_fast_over_reference": mine / e2e["reference e2e"]["img_s"],
            "e2e_mae_fast_over_compiled_reference": mine / e2e["compiled reference e2e"]["img_s"],
            "e2e_over_synthetic_step": mine / step["results"]["mae-fast"]["img_s"],
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
        "| what | img/s | ms/iter or batch | MFU of measured matmul | MFU of card peak | data wait | busy | peak mem |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in out["loader"].items():
        rows.append(f"| loader {name} | {r['img_s']:,.0f} | {r['ms_per_batch']:.1f} | | | | | |")
    for r in out["step"].values():
        mem = f"{r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") else ""
        rows.append(
            f"| step {r['name']} | {r['img_s']:,.0f} | {r['ms_per_iter']:.1f} | {_pct(r['mfu_matmul'])} | "
            f"{_pct(r['mfu_peak'])} | | | {mem} |"
        )
    for r in out["e2e"].values():
        busy = f"{r['busy_pct']:.0f}%" if r.get("busy_pct") is not None else ""
        rows.append(
            f"| {r['name']} | {r['img_s']:,.0f} | {r['ms_per_iter']:.1f} | {_pct(r['mfu_matmul'])} | "
            f"{_pct(r['mfu_peak'])} | {r['data_wait_pct']:.0f}% | {busy} | |"
        )
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in out["ratios"].items() if v is not None)
    env = out["env"]
    peaks = f"measured matmul {env['matmul_peak_tflops']:.3g} TFLOP/s; card peak: {env.get('card_peak') or 'unknown'}"
    return "\n".join(rows) + f"\n\n{env['device']}, {env.get('model')}: {ratios}\nMFU peaks: {peaks}"


def _pct(share: float | None) -> str:
    return f"{100 * share:.1f}%" if share is not None else "n/a"


def write_json(data: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
